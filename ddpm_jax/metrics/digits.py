"""A Fréchet distance for the embedded 8x8 digits, with precision, recall and a classifier.

The FID Inception sees 299x299 photographs; the 8x8 digits need their own feature network.
This one is a small convolutional classifier trained in JAX on the 1,497 real training digits
(``digits:train``), deterministically (seed 0, a fixed number of Adam steps, random shifts by
at most one pixel), in a few seconds of CPU time:

  x / 255 -> conv 3x3, 16 (relu) -> conv 3x3 stride 2, 32 (relu) -> dense 64 (relu) = features
          -> dense 10 = logits

Convolutions are written as patch matrices times weights (XLA:CPU differentiates them many
times faster than its convolutions inside a loop). The trained parameters are cached beside the
prepared data, ``<data_dir>/digits/<version>/ddpm_jax_digits_features/``, in an ``.npz`` that
records the seed, the training recipe's version, the SHA-256 of the training images and labels
and the SHA-256 of the parameters (checked on every load), and that holds the features of the
300 real test digits (the reference) and the statistics of the training digits' features.

``evaluate_digits(images_uint8)`` returns, for uint8 ``[N, 8, 8, 1]`` samples:

* ``digits_fd``: the Fréchet distance (``scores.frechet_distance``) between the samples' features
  and the real test digits' features;
* ``digits_fd_real``: the same distance from the real training digits to the real test digits,
  and ``digits_fd_ratio = digits_fd / digits_fd_real`` (the "Fréchet ratio": 1 is as close to
  the test digits as the real training digits are; the network was trained on those, so a
  generator of the training distribution can come out slightly below 1);
* ``digits_fd_ratio_real_n``: the ratio that ``N`` real training digits get (``real_n_ratio``),
  what a generator of the training distribution would score with as many samples. The Fréchet
  distance is biased upwards by few samples: 500 real training digits score 1.09 (0.92 to 1.20
  over the 8 subsets), 200 score 1.21, so a ratio is read against this figure, not against 1;
* ``precision`` and ``recall`` (Kynkäänniemi et al. 2019, k = 3) against the real test digits in
  the same feature space (``scores.precision_recall``);
* ``digits_confidence``: the classifier's mean top probability on the samples (real test digits:
  ``digits_confidence_real``), and ``digits_classes``: how many samples fall in each class.

The Fréchet distance depends on the number of samples (its bias falls as 1 / N): compare runs
with the same ``N``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from ddpm_jax import datasets, sharding
from ddpm_jax.metrics import scores
from ddpm_jax.metrics.errors import MetricsError
from ddpm_jax.metrics.inception import check_images, run_batched

FEATURE_DIM = 64
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
SEED = 0
# The training recipe; a change of any of these is a new RECIPE (old caches are then refused).
RECIPE = 1
TRAIN_STEPS = 500
TRAIN_BATCH = 128
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
K = 3  # precision / recall neighbourhood (Kynkäänniemi et al. 2019)
REAL_N_DRAWS = 8  # subsets of the real training digits behind digits_fd_ratio_real_n
CACHE_DIR = "ddpm_jax_digits_features"
REFERENCE = "digits:test"
_HI = jax.lax.Precision.HIGHEST
_PARAM_SHAPES = {  # name -> shape; conv kernels [3, 3, in, out]
    "conv1": (3, 3, 1, 16), "conv1_bias": (16,),
    "conv2": (3, 3, 16, 32), "conv2_bias": (32,),
    "dense": (4 * 4 * 32, FEATURE_DIM), "dense_bias": (FEATURE_DIM,),
    "logits": (FEATURE_DIM, NUM_CLASSES), "logits_bias": (NUM_CLASSES,),
}


# -- the network -----------------------------------------------------------------------------------
def init_params(key: jax.Array) -> dict[str, jax.Array]:
    """He-normal kernels, zero biases (the classifier's kernel scaled by 1/2)."""
    params = {}
    kernels = [k for k in _PARAM_SHAPES if not k.endswith("_bias")]
    for name, k in zip(kernels, jax.random.split(key, len(kernels)), strict=True):
        shape = _PARAM_SHAPES[name]
        fan_in = int(np.prod(shape[:-1]))
        scale = np.sqrt(2.0 / fan_in) * (0.5 if name == "logits" else 1.0)
        params[name] = jax.random.normal(k, shape, jnp.float32) * scale
        params[name + "_bias"] = jnp.zeros(shape[-1:], jnp.float32)
    return params


def _conv3x3(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A 3x3 convolution, zero padding 1 ("SAME" for stride 1), as patches @ kernel."""
    _, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, i:i + h:stride, j:j + w:stride, :]
                               for i in range(3) for j in range(3)], axis=-1)  # [N, h', w', 9c]
    return jnp.dot(patches, kernel.reshape(9 * c, -1), precision=_HI)


def apply(params, images_uint8: jax.Array) -> dict[str, jax.Array]:
    """uint8 ``[N, 8, 8, 1]`` -> ``features`` float32 ``[N, 64]``, ``logits`` ``[N, 10]``."""
    x = images_uint8.astype(jnp.float32) / 255.0
    h = jax.nn.relu(_conv3x3(x, params["conv1"], 1) + params["conv1_bias"])  # [N, 8, 8, 16]
    h = jax.nn.relu(_conv3x3(h, params["conv2"], 2) + params["conv2_bias"])  # [N, 4, 4, 32]
    h = h.reshape(h.shape[0], -1)
    features = jax.nn.relu(jnp.dot(h, params["dense"], precision=_HI) + params["dense_bias"])
    logits = jnp.dot(features, params["logits"], precision=_HI) + params["logits_bias"]
    return dict(features=features, logits=logits)


def _shift(key: jax.Array, x: jax.Array) -> jax.Array:
    """Each image moved by -1, 0 or +1 pixels along each axis (zeros come in)."""
    n, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dy, dx = jax.random.randint(key, (2, n), 0, 3)
    return jax.vmap(lambda im, a, b: jax.lax.dynamic_slice(im, (a, b, 0), (h, w, c)))(
        padded, dy, dx)


@functools.partial(jax.jit, static_argnames=("steps",))
def _train(images: jax.Array, labels: jax.Array, key: jax.Array, steps: int):
    tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    params = init_params(jax.random.fold_in(key, 0))

    def step(i, carry):
        params, opt_state = carry
        pick, move = jax.random.split(jax.random.fold_in(key, i + 1))
        idx = jax.random.choice(pick, len(images), (TRAIN_BATCH,), replace=False)
        batch = _shift(move, images[idx])

        def loss_fn(p):
            logits = apply(p, batch)["logits"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))[0]


def train_params(images: np.ndarray, labels: np.ndarray, *, seed: int = SEED,
                 steps: int = TRAIN_STEPS) -> dict[str, np.ndarray]:
    """The classifier trained on uint8 ``[N, 8, 8, 1]`` images and int labels (numpy float32)."""
    params = _train(jnp.asarray(images), jnp.asarray(labels, jnp.int32), jax.random.key(seed),
                    steps)
    return {k: np.asarray(v, np.float32) for k, v in jax.device_get(params).items()}


def params_sha256(params: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(params[name], np.float32).tobytes())
    return h.hexdigest()


def data_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(images, np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return h.hexdigest()


# -- features, sharded -----------------------------------------------------------------------------
@functools.cache
def _forward_fn():
    def forward(params, images):
        out = apply(params, images)
        return dict(features=out["features"], probs=jax.nn.softmax(out["logits"]))

    return jax.jit(forward)


def digits_features(images_uint8, params, *, batch_size: int = 512,
                    mesh: jax.sharding.Mesh | None = None,
                    progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """``features`` float32 ``[N, 64]`` and class ``probs`` ``[N, 10]`` of uint8 digits, in
    compiled batches split over the ``data`` axis of ``mesh`` (default every device)."""
    images = check_digit_images(images_uint8)
    mesh = mesh or sharding.create_mesh()
    if len(images) == 0:
        return dict(features=np.zeros((0, FEATURE_DIM), np.float32),
                    probs=np.zeros((0, NUM_CLASSES), np.float32))
    placed = sharding.put({k: jnp.asarray(v) for k, v in params.items()},
                          sharding.replicated(mesh))
    return run_batched(_forward_fn(), placed, images, batch_size=batch_size, mesh=mesh,
                       progress=progress)


def check_digit_images(images_uint8) -> np.ndarray:
    images = check_images(images_uint8)
    if images.shape[1:] != IMAGE_SHAPE:
        raise MetricsError(f"the digits metrics need 8x8x1 images (the embedded digits), got "
                           f"{images.shape[1:]}: use fid / kid / is for other datasets")
    return images


# -- the cached feature network and its reference -------------------------------------------
@dataclasses.dataclass(frozen=True)
class DigitsReference:
    """The trained network and the real digits' features in its space."""

    params: dict[str, np.ndarray]
    test_features: np.ndarray  # float32 [300, 64]: the reference of every distance
    train_features: np.ndarray  # float32 [1497, 64]: the real training digits' features
    test_confidence: float  # mean top probability on the real test digits
    test_accuracy: float
    train_mu: np.ndarray  # float64 [64]
    train_sigma: np.ndarray  # float64 [64, 64]
    fd_real: float  # real train -> real test
    path: str
    seed: int
    params_sha256: str
    data_sha256: str
    _real_n: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def test_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return scores.feature_statistics(self.test_features)

    def provenance(self) -> dict:
        return dict(features="digits_cnn", recipe=RECIPE, seed=self.seed, cache=self.path,
                    params_sha256=self.params_sha256, data_sha256=self.data_sha256,
                    reference=REFERENCE, reference_n=len(self.test_features), k=K)


def _digits_data(data_dir: str | None) -> datasets.DataSpec:
    return datasets.DataSpec("digits", 8, 1, data_dir, num_threads=1)


def _read_split(data: datasets.DataSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    source = datasets.open_source(data, split)  # prepares the digits on first use
    records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    return images, np.asarray([int(r["label"]) for r in records], np.int64)


def cache_path(data_dir: str | None = None, *, seed: int = SEED) -> epath.Path:
    builder = datasets.make_builder(_digits_data(data_dir))
    return epath.Path(builder.data_dir) / CACHE_DIR / f"recipe{RECIPE}_seed{seed}.npz"


def _save(path: epath.Path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)  # never a half-written cache


def _load(path: epath.Path) -> dict[str, np.ndarray]:
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as e:  # noqa: BLE001 - a damaged file is one line
        raise MetricsError(f"cannot read the digits feature cache {path} ({type(e).__name__}): "
                           "delete it to train the feature network again") from None


def load_reference(data_dir: str | None = None, *, seed: int = SEED) -> DigitsReference:
    """The feature network and the real digits' features, trained and cached on first use.

    A cache whose training data or parameters do not match its recorded hashes is refused (one
    line: delete it), never silently replaced.
    """
    return _load_reference(str(cache_path(data_dir, seed=seed)), data_dir, seed)


@functools.lru_cache(maxsize=4)
def _load_reference(path_str: str, data_dir: str | None, seed: int) -> DigitsReference:
    path = epath.Path(path_str)
    data = _digits_data(data_dir)
    train_x, train_y = _read_split(data, "train")
    test_x, test_y = _read_split(data, "test")
    data_hash = data_sha256(np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y]))
    if path.exists():
        stored = _load(path)
        params = {k: stored[k] for k in _PARAM_SHAPES}
        if str(stored["data_sha256"]) != data_hash:
            raise MetricsError(f"{path} was trained on other digits than those in this data_dir "
                               "(data hash differs): delete it to train the feature network again")
        if str(stored["params_sha256"]) != params_sha256(params):
            raise MetricsError(f"{path} is damaged (its parameters do not match their recorded "
                               "hash): delete it to train the feature network again")
    else:
        params = train_params(train_x, train_y, seed=seed)
        stored = None
    mesh = sharding.create_mesh()
    test = digits_features(test_x, params, mesh=mesh)
    train_features = digits_features(train_x, params, mesh=mesh)["features"]
    if stored is None:
        mu, sigma = scores.feature_statistics(train_features)
        if jax.process_index() == 0:
            _save(path, dict(params, seed=np.int64(seed), recipe=np.int64(RECIPE),
                             data_sha256=np.str_(data_hash),
                             params_sha256=np.str_(params_sha256(params)),
                             train_mu=mu, train_sigma=sigma))
    else:
        mu, sigma = stored["train_mu"], stored["train_sigma"]
    probs = test["probs"]
    fd_real = scores.frechet_distance(mu, sigma, *scores.feature_statistics(test["features"]))
    return DigitsReference(
        params=params, test_features=test["features"], train_features=train_features,
        test_confidence=float(probs.max(axis=1).mean()),
        test_accuracy=float((probs.argmax(axis=1) == test_y).mean()),
        train_mu=mu, train_sigma=sigma, fd_real=fd_real, path=str(path), seed=seed,
        params_sha256=params_sha256(params), data_sha256=data_hash)


# -- the metrics -----------------------------------------------------------------------------------
def real_n_subsets(n: int, total: int) -> list[np.ndarray]:
    """The ``REAL_N_DRAWS`` index sets behind ``real_n_ratio``: the first ``n`` of the
    permutation ``np.random.default_rng([n, i]).permutation(total)`` for i = 0 .. draws - 1 (one
    set of all ``total`` when ``n >= total``)."""
    if n >= total:
        return [np.arange(total)]
    return [np.random.default_rng([n, i]).permutation(total)[:n] for i in range(REAL_N_DRAWS)]


def real_n_ratio(ref: DigitsReference, n: int) -> float:
    """The mean Fréchet ratio of ``n`` real training digits over ``real_n_subsets``: what a
    generator of the training distribution scores with ``n`` samples (1 from 1,497 on)."""
    if n not in ref._real_n:
        feats = ref.train_features
        distances = [scores.frechet_distance(*scores.feature_statistics(feats[idx]),
                                             *ref.test_stats)
                     for idx in real_n_subsets(n, len(feats))]
        ref._real_n[n] = float(np.mean(distances)) / ref.fd_real
    return ref._real_n[n]


def scores_from_outputs(features: np.ndarray, probs: np.ndarray, ref: DigitsReference, *,
                        k: int = K) -> dict:
    """The digits metrics of samples' network outputs (see the module docstring)."""
    if len(features) < 2:
        raise MetricsError(f"the digits metrics need at least 2 samples, got {len(features)}")
    mu, sigma = scores.feature_statistics(features)
    fd = scores.frechet_distance(mu, sigma, *ref.test_stats)
    precision, recall = scores.precision_recall(ref.test_features, features, k=k)
    return dict(
        digits_fd=fd, digits_fd_real=ref.fd_real, digits_fd_ratio=fd / ref.fd_real,
        digits_fd_ratio_real_n=real_n_ratio(ref, len(features)),
        precision=precision, recall=recall,
        digits_confidence=float(probs.max(axis=1).mean()),
        digits_confidence_real=ref.test_confidence,
        digits_classes=np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES).tolist(),
        num_samples=int(len(features)),
    )


def evaluate_digits(images_uint8, *, data_dir: str | None = None, k: int = K,
                    mesh: jax.sharding.Mesh | None = None) -> dict:
    """The digits metrics of uint8 ``[N, 8, 8, 1]`` samples, with their provenance.

    Returns a dict with ``digits_fd``, ``digits_fd_real``, ``digits_fd_ratio``,
    ``digits_fd_ratio_real_n``, ``precision``,
    ``recall``, ``digits_confidence``, ``digits_confidence_real``, ``digits_classes`` (10
    counts), ``num_samples`` and ``provenance`` (the network's seed, hashes and cache, the
    reference split and its size, k).
    """
    images = check_digit_images(images_uint8)
    ref = load_reference(data_dir)
    out = digits_features(images, ref.params, mesh=mesh)
    result = scores_from_outputs(out["features"], out["probs"], ref, k=k)
    result["provenance"] = ref.provenance() | dict(k=k)
    return result

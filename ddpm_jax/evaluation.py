"""Evaluation during training: sample metrics of the EMA weights at fixed steps.

``config.eval`` says what to measure::

    eval.metrics = "digits_fd,precision,recall"   # comma list; "" = none
    eval.every_steps = 200        # and always at the last step; 0 = only at the last step
    eval.num_samples = 500        # EMA samples per evaluation (the same noise every time)
    eval.sampler = None           # None: config.sampling's sampler (and its num_steps)
    eval.num_steps = None
    eval.best_metric = "digits_fd"  # keep the best checkpoint by this metric ("" = none)
    eval.wandb = False            # True: every metrics.jsonl row also goes to Weights & Biases

``plan(config)`` checks all of it before anything compiles: unknown metrics, a digits metric on
another dataset, an Inception metric (``fid``, ``is``) whose weight file is missing; each is one
line. ``Evaluator`` then samples ``num_samples`` images with the sharded, compiled chain of
``ddpm_jax.sampling`` (every process computes its devices' share, every process gets the
images), computes the features with the same sharded code as ``python -m ddpm_jax.evaluate``
and the scores in float64 on the host. Its row (``step``, each metric by name, and
``eval_seconds``) goes to ``metrics.jsonl`` and TensorBoard, written by process 0 only.

Metrics: ``digits_fd`` (with ``digits_fd_ratio`` and ``digits_confidence``; ``precision`` and
``recall`` are then measured in the digits network's space, ``ddpm_jax.metrics.digits``),
``fid`` (against the config's training split, its statistics cached beside the data as the
evaluate command caches them) and ``is`` (``is_mean``, 10 splits). The samples' key is
``fold_in(key(config.seed + 2), chunk)``, fixed for the run, so a resumed run logs exactly what an
uninterrupted run logs.

For ``python -m ddpm_jax.evaluate`` it also holds the computations from image batches: the
Inception's features streamed (``Inception.features``), a reference's statistics cached through
``metrics.cached_reference_stats`` (``reference_features``), ``inception_scores`` and the bound
(``bits_per_dim``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import numpy as np
from etils import epath

from ddpm_jax import config_lib, datasets, sampling, sharding

METRICS = ("digits_fd", "precision", "recall", "fid", "is")
INCEPTION_METRICS = ("fid", "is")
# Row keys a best checkpoint can follow, and whether higher is better.
BEST_KEYS = {"digits_fd": False, "digits_fd_ratio": False, "precision": True, "recall": True,
             "digits_confidence": True, "fid": False, "is_mean": True}
FID_STATS_DIR = "ddpm_jax_fid_stats"


def reference_stats_path(data: datasets.DataSpec, split: str, count: int, total: int, mode: str,
                         sha: str) -> epath.Path:
    """Where the FID statistics of ``count`` of the ``total`` images of ``split`` are cached:
    ``<tfds data_dir>/<dataset>/<version>/ddpm_jax_fid_stats/<split>_<size>px_<mode>_<sha>.npz``.
    """
    builder = datasets.make_builder(data)
    suffix = "" if count == total else f"_first{count}"
    name = (f"{split.replace('/', '_')}{suffix}_{data.image_size}px_{mode}_"
            f"{sha[:12]}.npz")
    return epath.Path(builder.data_dir) / FID_STATS_DIR / name


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked ``config.eval``."""

    metrics: tuple[str, ...]
    every_steps: int
    num_samples: int
    spec: sampling.SamplerSpec
    best_metric: str | None
    inception_weights: str | None  # the resolved file, for fid / is


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise config_lib.ConfigError(msg)


def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in str(text).split(",") if n.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise config_lib.ConfigError(
            f"config.eval.metrics: unknown {', '.join(unknown)}; choose from "
            f"{','.join(METRICS)}")
    return names


def plan(config) -> Plan | None:
    """``config.eval`` checked (one line per problem), or None when nothing is asked."""
    ev = config.get("eval")
    if ev is None:  # a config from before evaluation during training
        return None
    if ev.wandb:
        import importlib.util  # noqa: PLC0415

        _require(importlib.util.find_spec("wandb") is not None,
                 "config.eval.wandb=True needs the wandb package: pip install 'ddpm_jax[wandb]'"
                 " (or set config.eval.wandb=False)")
    metrics = parse_metrics(ev.metrics)
    if not metrics:
        return None
    _check_schedule(config)
    _check_metrics(config, metrics)
    best = _best_metric(ev.best_metric or None, metrics)
    spec = sampling.spec_from_config(config, sampler=ev.sampler, num_steps=ev.num_steps)
    weights = _inception_weights() if set(INCEPTION_METRICS) & set(metrics) else None
    return Plan(metrics, ev.every_steps, ev.num_samples, spec, best, weights)


def _check_schedule(config) -> None:
    """``every_steps`` and ``num_samples``."""
    ev = config.eval
    _require(isinstance(ev.every_steps, int) and ev.every_steps >= 0,
             f"config.eval.every_steps must be >= 0 (0 = only at the last step), got "
             f"{ev.every_steps!r}")
    k = config.training.steps_per_dispatch
    _require(ev.every_steps % k == 0,
             f"config.eval.every_steps={ev.every_steps} is not a multiple of "
             f"training.steps_per_dispatch={k}")
    _require(isinstance(ev.num_samples, int) and ev.num_samples >= 4,
             f"config.eval.num_samples must be at least 4, got {ev.num_samples!r}")


def _check_metrics(config, metrics: tuple[str, ...]) -> None:
    """What each metric needs: digits_fd with precision / recall, the digits, IS's splits."""
    if {"precision", "recall"} & set(metrics):
        _require("digits_fd" in metrics, "config.eval.metrics: precision / recall are measured "
                 "with digits_fd during training (in the digits network's features); add "
                 "digits_fd, or use python -m ddpm_jax.evaluate for the Inception's")
    if "digits_fd" in metrics:
        shape = (config.data.image_size, config.data.image_size, config.data.channels)
        _require(config.data.dataset == "digits" and shape == (8, 8, 1),
                 f"config.eval.metrics=digits_fd measures the 8x8x1 digits; this run trains "
                 f"{config.data.dataset} at {shape}: use fid")
    if "is" in metrics:
        _require(config.eval.num_samples >= 10, "config.eval.metrics=is needs num_samples >= 10 "
                 "(10 splits)")


def _best_metric(best: str | None, metrics: tuple[str, ...]) -> str | None:
    """``best_metric``, which must be a row key that ``metrics`` measure (or None)."""
    if best is None:
        return None
    row_keys = set()
    for m in metrics:
        row_keys |= {"digits_fd": {"digits_fd", "digits_fd_ratio", "digits_confidence"},
                     "is": {"is_mean"}}.get(m, {m})
    _require(best in BEST_KEYS and best in row_keys,
             f"config.eval.best_metric={best!r} is not measured: choose one of "
             f"{', '.join(sorted(row_keys & set(BEST_KEYS)))} (or '' for none)")
    return best


def _inception_weights() -> str:
    """The FID Inception's weights file (``$DDPM_JAX_INCEPTION_WEIGHTS``), checked."""
    from ddpm_jax.metrics import weights as weights_lib  # noqa: PLC0415
    from ddpm_jax.metrics.errors import MetricsError  # noqa: PLC0415

    try:
        weights = weights_lib.resolve_path(None)
        weights_lib.weights_sha256(weights)
    except MetricsError as e:
        raise config_lib.ConfigError(f"config.eval.metrics asks for fid / is: {e}") from None
    return weights


class Evaluator:
    """``evaluator(ema_params, step) -> row``: the metrics of ``plan`` at one step."""

    def __init__(self, plan_: Plan, config, graphdef, d, mesh):
        self.plan, self.config, self.d, self.mesh = plan_, config, d, mesh
        self.total = config.training.num_train_steps
        batch = sharding.padded_size(min(config.sampling.batch_size, plan_.num_samples), mesh)
        shape = (batch, config.data.image_size, config.data.image_size, config.data.channels)
        self.sample_fn = sampling.get_sampling_fn(graphdef, plan_.spec, shape, mesh)
        self.batch = batch
        self.digits_ref = None
        if "digits_fd" in plan_.metrics:
            from ddpm_jax.metrics import digits as dm  # noqa: PLC0415

            self.digits_ref = dm.load_reference(config.data.data_dir)  # trained once, cached
        self._fid_ref = None

    def due(self, step: int) -> bool:
        every = self.plan.every_steps
        return step == self.total or (every > 0 and step % every == 0)

    def samples(self, ema_params) -> np.ndarray:
        """uint8 ``[num_samples, H, W, C]``, the same noise at every evaluation."""
        key = jax.random.key(self.config.seed + 2)
        parts, n = [], self.plan.num_samples
        for i in range(-(-n // self.batch)):
            parts.append(sharding.to_host(self.sample_fn(
                ema_params, self.d, jax.random.fold_in(key, i), None, self.plan.spec.eta)))
        return np.concatenate(parts)[:n]

    def __call__(self, ema_params, step: int) -> dict[str, float]:
        start = time.time()
        images = self.samples(ema_params)
        row: dict[str, float] = {}
        if self.digits_ref is not None:
            from ddpm_jax.metrics import digits as dm  # noqa: PLC0415

            out = dm.digits_features(images, self.digits_ref.params, mesh=self.mesh)
            scores = dm.scores_from_outputs(out["features"], out["probs"], self.digits_ref)
            keep = ["digits_fd", "digits_fd_ratio", "digits_fd_ratio_real_n",
                    "digits_confidence"] + [
                m for m in ("precision", "recall") if m in self.plan.metrics]
            row.update({k: float(scores[k]) for k in keep})
        if set(INCEPTION_METRICS) & set(self.plan.metrics):
            row.update(self._inception(images))
        row["eval_seconds"] = round(time.time() - start, 3)
        return row

    def _inception(self, images: np.ndarray) -> dict[str, float]:
        from ddpm_jax import metrics as m  # noqa: PLC0415

        weights = self.plan.inception_weights
        feats = m.inception_features(images, weights=weights, mesh=self.mesh)
        out = {}
        if "is" in self.plan.metrics:
            out["is_mean"] = m.inception_score(feats["logits_unbiased"], splits=10)[0]
        if "fid" in self.plan.metrics:
            mu, sigma = m.feature_statistics(feats["pool3"])
            ref = self._fid_reference(weights)
            out["fid"] = m.frechet_distance(mu, sigma, ref.mu, ref.sigma)
        return out

    def _fid_reference(self, weights: str):
        """The training split's statistics, computed once and cached beside the data."""
        if self._fid_ref is None:
            from ddpm_jax import metrics as m  # noqa: PLC0415

            data = datasets.DataSpec.from_config(self.config)
            sha = m.weights_sha256(weights)
            total = len(datasets.open_source(data, data.split))
            path = reference_stats_path(data, data.split, total, total, "tf1", sha)

            def compute():
                stats = m.FeatureStats(2048)
                for batch in datasets.iter_split(data, data.split, batch_size=1024):
                    stats.update(m.inception_features(batch, weights=weights,
                                                      mesh=self.mesh)["pool3"])
                return stats.result()

            self._fid_ref = m.cached_reference_stats(
                str(path), compute, mode="tf1", weights_sha256=sha,
                write=jax.process_index() == 0)  # the others compute without writing
        return self._fid_ref


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Strictly better than ``best`` (None: anything is)."""
    if best is None:
        return True
    return value > best if BEST_KEYS[metric] else value < best


# -- the evaluate command's computations: from image batches to features, statistics, scores ----
def progress_bar(total: int, what: str):
    """A tqdm bar of images (shown by process 0 only)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, unit="img", desc=what, dynamic_ncols=True,
                disable=jax.process_index() != 0)


@dataclasses.dataclass
class Features:
    """The FID Inception's view of an image stream: streamed pool3 statistics (and sFID's), the
    pool3 features and unbiased logits themselves where they were kept."""

    stats: object  # metrics.FeatureStats of pool3
    spatial: object | None  # metrics.FeatureStats of the sFID features
    pool3: np.ndarray | None
    logits: np.ndarray | None
    seconds: float


@dataclasses.dataclass(frozen=True)
class Inception:
    """The FID Inception as used: its converted weights file and their SHA-256, the
    preprocessing ``mode`` and the images per compiled batch."""

    weights: str
    sha256: str
    mode: str = "tf1"
    batch_size: int = 64

    def features(self, batches, total: int, *, what: str, keep_pool3: bool = False,
                 keep_logits: bool = False, spatial: bool = False) -> Features:
        """The features of uint8 image ``batches`` (``total`` images, a progress bar named
        ``what``); memory is bounded by one batch plus what is kept."""
        from ddpm_jax import metrics as m  # noqa: PLC0415

        out = Features(m.FeatureStats(m.network.POOL3_DIM),
                       m.FeatureStats(m.network.SPATIAL_DIM) if spatial else None, None, None,
                       0.0)
        pool3, logits = [], []
        bar, start, done = progress_bar(total, what), time.time(), 0

        def progress(k: int) -> None:  # after every compiled batch
            bar.update(done + k - bar.n)
            bar.set_postfix(img_s=f"{bar.n / max(time.time() - start, 1e-9):.1f}")

        for images in batches:
            feats = m.inception_features(images, weights=self.weights, mode=self.mode,
                                         batch_size=self.batch_size, progress=progress)
            out.stats.update(feats["pool3"])
            if spatial:
                out.spatial.update(feats["spatial"])
            pool3 += [feats["pool3"]] if keep_pool3 else []
            logits += [feats["logits_unbiased"]] if keep_logits else []
            done += len(images)
        bar.close()
        out.pool3 = np.concatenate(pool3) if pool3 else None
        out.logits = np.concatenate(logits) if logits else None
        out.seconds = time.time() - start
        return out


def spatial_stats_path(path: epath.Path) -> epath.Path:
    """Where the sFID statistics are cached beside the FID statistics at ``path``."""
    return path.parent / path.name.replace(".npz", "_sfid.npz")


@dataclasses.dataclass(frozen=True)
class ReferenceFeatures:
    """A reference's pool3 statistics, its sFID statistics (if asked) and its pool3 features
    (if asked: KID, precision and recall need them)."""

    stats: object  # metrics.ReferenceStats
    spatial: object | None
    pool3: np.ndarray | None


def reference_features(net: Inception, batches, total: int, path: epath.Path, *, what: str,
                       keep_pool3: bool = False, sfid: bool = False) -> ReferenceFeatures:
    """The reference's statistics, cached at ``path`` (and ``spatial_stats_path(path)``) through
    ``metrics.cached_reference_stats``; ``batches()`` is read once, when a cache is missing or
    the features themselves are asked for. Process 0 writes the caches."""
    from ddpm_jax import metrics as m  # noqa: PLC0415

    passes = []

    def features() -> Features:
        if not passes:
            passes.append(net.features(batches(), total, what=what, keep_pool3=keep_pool3,
                                       spatial=sfid))
        return passes[0]

    if keep_pool3:
        features()
    cached = functools.partial(m.cached_reference_stats, mode=net.mode,
                               weights_sha256=net.sha256, write=jax.process_index() == 0)
    stats = cached(str(path), lambda: features().stats.result())
    spatial = None
    if sfid:
        spatial = cached(str(spatial_stats_path(path)), lambda: features().spatial.result(),
                         dim=m.network.SPATIAL_DIM)
    return ReferenceFeatures(stats, spatial, features().pool3 if keep_pool3 else None)


def inception_scores(logits: np.ndarray, splits: int) -> dict:
    """``is_mean`` / ``is_std`` over ``splits`` splits, and the two conventions side by side:
    ``is_1split`` (all logits as one split, as the original's 50k evaluation) and
    ``is_10split_mean`` / ``is_10split_std`` (the improved-GAN convention)."""
    from ddpm_jax import metrics as m  # noqa: PLC0415

    out = dict(zip(("is_mean", "is_std"), m.inception_score(logits, splits=splits),
                   strict=True))
    out["is_1split"] = m.inception_score(logits, splits=1)[0]
    if len(logits) >= 10:
        out["is_10split_mean"], out["is_10split_std"] = m.inception_score(logits, splits=10)
    return out


def bits_per_dim(bound_terms, images: np.ndarray, *, batch_size: int, seed: int) -> dict:
    """The bound in bits/dim of uint8 ``[N, H, W, C]`` images (``bound_terms(batch, key)``, as
    ``DDPM.bound_terms``, in compiled batches of ``batch_size``): mean, stderr and term means."""
    totals, terms, priors = [], [], []
    key = jax.random.key(seed)
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        n = len(chunk)
        if n < batch_size:  # pad to the compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        out = {k: sharding.to_host(v) for k, v in
               bound_terms(chunk, jax.random.fold_in(key, i)).items()}
        totals.append(out["total_bpd"][:n])
        terms.append(out["terms_bpd"][:n])
        priors.append(out["prior_bpd"][:n])
    total, terms = np.concatenate(totals), np.concatenate(terms)
    return dict(
        bits_per_dim=float(total.mean()),
        stderr=float(total.std(ddof=1) / math.sqrt(len(total))) if len(total) > 1 else None,
        num_examples=int(len(total)),
        prior_bpd=float(np.concatenate(priors).mean()),
        decoder_bpd=float(terms[:, 0].mean()),
        terms_bpd_sum=float(terms[:, 1:].sum(axis=1).mean()),
    )

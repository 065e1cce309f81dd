"""Evaluates a checkpoint: the paper's sample metrics (FID, Inception Score, KID), precision and
recall, the digits' Fréchet distance, and its NLL.

  python -m ddpm_jax.evaluate --workdir=runs/cifar10 --metrics=fid,is --num_samples=50000
  python -m ddpm_jax.evaluate --workdir=runs/cifar10 --metrics=bpd --split=test
  python -m ddpm_jax.evaluate --workdir=runs/cifar10 --metrics=fid --ref_stats=fid_stats.npz
  python -m ddpm_jax.evaluate --workdir=runs/digits --metrics=digits_fd,precision,recall \
      --num_samples=1000

Sample metrics (``fid``, ``is``, ``kid``) are computed on ``--num_samples`` EMA samples (the
paper: 50,000 from the full ancestral chain) with the FID Inception-v3 of ``ddpm_jax.metrics``:

1. Samples: a ``samples.npz`` in ``--samples_dir`` (default the workdir) that ``sample.py`` made
   from this checkpoint with the same sampler and at least N images is reused (its first N
   images, with its seed and batch size); otherwise the samples are made there, resumably, as
   ``sample.py`` makes them (samples of other settings are moved to ``previous_samples/``).
2. Features: pool3 and logits of the samples in sharded batches (a progress bar shows images/s),
   streamed from the file so memory is bounded by one batch.
3. Reference: ``--ref=DATASET:SPLIT`` (default the config's dataset and training split, the
   paper's protocol) is read through the project's data pipeline at the samples' resolution and
   its statistics (mu, sigma in float64, N, mode, weights hash) are cached once under
   ``<tfds data_dir>/<dataset>/<version>/ddpm_jax_fid_stats/``; ``--ref_stats=FILE.npz`` takes
   statistics from elsewhere (ours, or TTUR / pytorch-fid / clean-fid files with ``mu`` and
   ``sigma``). KID needs the reference features themselves, so it needs ``--ref``.
4. Scores on the host in float64 (``ddpm_jax.metrics.scores``).

``digits_fd`` (8x8x1 digits models) replaces the Inception by the digits' own feature network
(``ddpm_jax.metrics.digits``, trained once on ``digits:train`` and cached beside the prepared
data): the Fréchet distance from the samples to the real test digits, ``digits_fd_real`` (real
train to real test), ``digits_fd_ratio``, ``digits_confidence`` and ``digits_classes``; with it,
``precision`` and ``recall`` (k = 3) are measured in that feature space against the real test
digits. Without ``digits_fd`` they are measured in the Inception's pool3 against ``--ref``.
No Inception weights are needed for the digits metrics.

``sfid`` (Nash et al. 2021, as guided-diffusion's evaluator computes it) is the Fréchet
distance of the Inception's spatial features: the TF graph's ``mixed_6/conv`` (Mixed_6d's 1x1
branch, after its ReLU), its first 7 channels at 17x17, flattened to 2,023 numbers; its reference
statistics are cached beside the FID ones (``..._sfid.npz``).

``bpd`` is the full variational bound on ``--split`` (default ``config.data.eval_split``; T
network evaluations per batch), also written to ``bpd_<split>.json`` beside the checkpoint.

One JSON (``--out``, default ``<workdir>/evaluation.json``) holds every metric asked for at the
top level (``fid``, ``is_mean``, ``is_std`` over ``--is_splits``, ``is_1split`` and
``is_10split_mean`` / ``is_10split_std``, ``kid_mean``, ``kid_std``, ``bpd``, ``precision``,
``recall``, ``digits_fd`` and its companions) and a ``provenance`` object: checkpoint, step, EMA
or raw, sampler, variant, spacing, steps, NFE, eta, N, seed, the Inception mode and weights
hash, the reference, IS splits and KID subsets. Every flag, file and shape is
checked before anything compiles; on several processes every process takes part (process flags
as for ``train.py``) and process 0 writes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import numpy as np
from absl import flags, logging
from etils import epath

from ddpm_jax import api, cli, datasets, errors, files, generate, sampling, sharding

FLAGS = flags.FLAGS
METRICS = ("fid", "is", "kid", "bpd", "digits_fd", "precision", "recall", "sfid",
           "digits_class_share")
SAMPLE_METRICS = ("fid", "is", "kid", "digits_fd", "precision", "recall", "sfid",
                  "digits_class_share")
DIGITS_METRICS = ("digits_fd",)  # precision / recall go with them: see pr_space
STATS_DIR = "ddpm_jax_fid_stats"

flags.DEFINE_string("workdir", None, "Workdir, checkpoints directory or step directory.")
flags.DEFINE_list("metrics", ["bpd"], f"Comma-separated, from: {', '.join(METRICS)}.")
flags.DEFINE_string("out", None, "The JSON written (default: <workdir>/evaluation.json).")
flags.DEFINE_bool("raw", False, "Use the raw parameters instead of the EMA weights.")
flags.DEFINE_integer("seed", 0, "Seed of the samples, of the bound's x_t draws and of the KID "
                     "subsets.")
flags.DEFINE_string("data_dir", None, "Override config.data.data_dir (tfds data).")
# Samples.
flags.DEFINE_integer("num_samples", 50000, "Samples for FID / IS / KID.", lower_bound=1)
flags.DEFINE_string("samples_dir", None, "Where samples.npz is reused or made (default: the "
                    "workdir).")
flags.DEFINE_integer("sample_batch_size", None, "Images per compiled sampling chain (default: "
                     "config.sampling.batch_size).", lower_bound=1)
cli.define_sampler_flags()
flags.DEFINE_string("labels", None, "A class-conditional model: the classes sampled, as "
                    "sample.py --labels (default: all, the classes in equal numbers).")
flags.DEFINE_float("guidance", None, "A class-conditional model: the guidance w of the samples "
                   "(default: config.sampling.guidance).")
# The FID network and the reference.
flags.DEFINE_string("inception_weights", None, "The converted FID Inception weights "
                    "(default: $DDPM_JAX_INCEPTION_WEIGHTS).")
flags.DEFINE_enum("mode", "tf1", ["tf1", "pytorch_fid"], "Inception preprocessing: tf1 (the "
                  "paper's TF-GAN / TTUR conventions) or pytorch_fid.")
flags.DEFINE_integer("inception_batch_size", 64, "Images per compiled Inception batch.",
                     lower_bound=1)
flags.DEFINE_string("ref", None, "Reference images DATASET:SPLIT (default: the config's dataset "
                    "and config.data.split).")
flags.DEFINE_string("ref_stats", None, "Reference statistics FILE.npz (mu, sigma) instead of "
                    "--ref; not for KID.")
flags.DEFINE_integer("ref_num_examples", None, "First N images of the reference split "
                     "(default: all).", lower_bound=1)
flags.DEFINE_integer("is_splits", 10, "Inception Score splits.", lower_bound=1)
flags.DEFINE_integer("kid_subsets", 100, "KID subsets.", lower_bound=1)
flags.DEFINE_integer("kid_subset_size", 1000, "Images per KID subset.", lower_bound=2)
# The bound.
flags.DEFINE_string("split", None, "Split for bpd (default: config.data.eval_split).")
flags.DEFINE_integer("num_examples", None, "First N images of --split for bpd (default: all).",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Images per compiled batch of the bound.", lower_bound=1)
cli.define_process_flags()


class EvaluationError(errors.UserError, ValueError):
    """A metric, reference or sample setting that cannot be evaluated as asked."""


# -- the bound -------------------------------------------------------------------------------------
def evaluate_bpd(model: api.DDPM, images: np.ndarray, *, batch_size: int, seed: int) -> dict:
    """The bound in bits/dim of uint8 ``[N, H, W, C]`` images: mean, stderr and term means."""
    totals, terms, priors = [], [], []
    key = jax.random.key(seed)
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        n = len(chunk)
        if n < batch_size:  # pad to the compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        out = {k: sharding.to_host(v) for k, v in
               model.bound_terms(chunk, jax.random.fold_in(key, i)).items()}
        totals.append(out["total_bpd"][:n])
        terms.append(out["terms_bpd"][:n])
        priors.append(out["prior_bpd"][:n])
    total = np.concatenate(totals)
    return dict(
        bits_per_dim=float(total.mean()),
        stderr=float(total.std(ddof=1) / math.sqrt(len(total))) if len(total) > 1 else None,
        num_examples=int(len(total)),
        prior_bpd=float(np.concatenate(priors).mean()),
        decoder_bpd=float(np.concatenate(terms)[:, 0].mean()),
        terms_bpd_sum=float(np.concatenate(terms)[:, 1:].sum(axis=1).mean()),
    )


# -- the plan: every setting checked before anything compiles --------------------------------------
@dataclasses.dataclass
class Reference:
    """Where the reference statistics come from."""

    name: str  # DATASET:SPLIT, or the statistics file
    config: object | None = None  # the config that reads DATASET:SPLIT
    split: str | None = None
    count: int | None = None  # images read from the split
    cache: epath.Path | None = None  # our cached statistics of the split
    stats: object | None = None  # ReferenceStats of a --ref_stats file


def parse_metrics(names) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise EvaluationError(f"--metrics={','.join(names)}: unknown or empty "
                              f"({', '.join(unknown) or 'nothing asked'}); choose from "
                              f"{','.join(METRICS)}")
    return names


def pr_space(metrics) -> str | None:
    """Where precision / recall are measured: the digits network's features when ``digits_fd``
    is asked too, else the Inception's pool3; None if neither is asked."""
    if not {"precision", "recall"} & set(metrics):
        return None
    return "digits" if set(DIGITS_METRICS) & set(metrics) else "inception"


def inception_metrics(metrics) -> tuple[str, ...]:
    """The metrics that need the FID Inception (its weights file)."""
    wanted = [m for m in metrics if m in ("fid", "is", "kid", "sfid")]
    if pr_space(metrics) == "inception":
        wanted += [m for m in metrics if m in ("precision", "recall")]
    return tuple(wanted)


def _ref_config(config, ref: str, image_shape):
    """The model's config reading DATASET (``data.dataset`` and channels changed, same size)."""
    dataset, sep, split = ref.partition(":")
    if not sep or not dataset or not split:
        raise EvaluationError(f"--ref={ref!r} must be DATASET:SPLIT, e.g. cifar10:train; known "
                              f"datasets: {', '.join(datasets.DATASETS)}")
    spec = datasets.spec_by_name(dataset, "--ref DATASET")
    h, w, _ = image_shape
    if spec.layout == "exact" and spec.stored_size != h:
        s = spec.stored_size
        raise EvaluationError(f"the samples are {h}x{w} but the reference {ref} holds {s}x{s} "
                              "images: compare samples with a reference of their size")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.dataset = dataset
        config.data.channels = spec.channels
    return config, split


def plan_reference(model: api.DDPM, metrics: tuple[str, ...], sha: str) -> Reference | None:
    """Checks the reference of FID / KID and opens (but does not read) its images."""
    if not {"fid", "kid", "precision", "recall", "sfid"} & set(metrics):
        return None
    from ddpm_jax import metrics as m  # noqa: PLC0415

    if FLAGS.ref and FLAGS.ref_stats:
        raise EvaluationError("give --ref=DATASET:SPLIT or --ref_stats=FILE.npz, not both")
    if FLAGS.ref_stats:
        if "sfid" in metrics:
            raise EvaluationError("sfid needs the reference's spatial statistics, which a "
                                  "statistics file does not hold: pass --ref=DATASET:SPLIT")
        needs = [m for m in ("kid", "precision", "recall") if m in metrics]
        if needs:
            names = " and ".join("KID" if n == "kid" else n for n in needs)
            raise EvaluationError(f"{names} need{'s' if len(needs) == 1 else ''} the reference "
                                  "images' features, which a statistics file does not hold: "
                                  "pass --ref=DATASET:SPLIT")
        stats = m.load_reference_stats(FLAGS.ref_stats, mode=FLAGS.mode, weights_sha256=sha)
        return Reference(FLAGS.ref_stats, stats=stats)
    c = model.config.data
    ref = FLAGS.ref or f"{c.dataset}:{c.split}"
    config, split = _ref_config(model.config, ref, model.image_shape)
    source = datasets.open_source(config, split)  # a split or data that is not there: one line
    size = config.data.image_size
    count = len(source) if FLAGS.ref_num_examples is None else FLAGS.ref_num_examples
    if count > len(source):
        raise EvaluationError(f"--ref_num_examples={count} but {ref} holds {len(source)} images")
    if "kid" in metrics and count < FLAGS.kid_subset_size:
        raise EvaluationError(f"KID subsets of {FLAGS.kid_subset_size} images need at least as "
                              f"many reference images, {ref} gives {count}: lower "
                              "--kid_subset_size")
    builder = datasets.make_builder(config)
    suffix = "" if count == len(source) else f"_first{count}"
    name = f"{split.replace('/', '_')}{suffix}_{size}px_{FLAGS.mode}_{sha[:12]}.npz"
    return Reference(ref, config=config, split=split, count=count,
                     cache=epath.Path(builder.data_dir) / STATS_DIR / name)


def _samples_record(model: api.DDPM, spec: sampling.SamplerSpec, seed: int) -> dict:
    out = dict(checkpoint=str(model.source), checkpoint_step=model.step, ema=model.ema,
               seed=seed, **spec.record(model.diffusion), image_shape=list(model.image_shape))
    if model.num_classes:
        out.update(labels=sample_labels(model), guidance=sample_guidance(model))
    return out


def sample_labels(model: api.DDPM) -> str | None:
    """--labels, or "all" (class-balanced samples) for a class-conditional model."""
    if FLAGS.labels is None and model.num_classes:
        return "all"
    return FLAGS.labels


def sample_guidance(model: api.DDPM) -> float | None:
    """--guidance, or config.sampling.guidance for a class-conditional model."""
    if FLAGS.guidance is None and model.num_classes:
        return float(model.config.sampling.guidance)
    return FLAGS.guidance


def digits_class_share(model: api.DDPM, samples: epath.Path, n: int) -> float:
    """The share of the first ``n`` samples that the digits classifier
    (``ddpm_jax.metrics.digits``, trained once on the real training digits) assigns to the class
    each was sampled for."""
    from ddpm_jax.metrics import digits as dm  # noqa: PLC0415

    with np.load(str(samples), allow_pickle=False) as f:
        images, labels = f["images"][:n], f["labels"][:n]
    ref = dm.load_reference(model.config.data.data_dir)
    predicted = dm.digits_features(images, ref.params)["probs"].argmax(1)
    return float((predicted == labels).mean())


def find_samples(samples_dir: epath.Path, model: api.DDPM, spec: sampling.SamplerSpec,
                 n: int, seed: int) -> dict | None:
    """The description of reusable samples in ``samples_dir``: same checkpoint, weights,
    sampler and seed, at least ``n`` images; None if there are none (samples there that are not
    reusable are moved aside by ``generate``, never overwritten)."""
    try:
        made = files.read_json(samples_dir / "samples.json")
    except files.TornFileError:
        return None
    if made is None or not (samples_dir / "samples.npz").exists():
        return None
    want = _samples_record(model, spec, seed)
    same = all(made.get(k) == v for k, v in want.items() if k != "checkpoint")
    same_source = os.path.abspath(str(made.get("checkpoint"))) == os.path.abspath(
        str(model.source)) if "://" not in str(model.source) else made.get("checkpoint") == str(
        model.source)
    return made if same and same_source and made.get("num_samples", 0) >= n else None


# -- features and scores ---------------------------------------------------------------------------
def _bar(total: int, what: str):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, unit="img", desc=what, dynamic_ncols=True,
                disable=jax.process_index() != 0)


def stream_features(batches, total: int, *, what: str, keep_pool3: bool, keep_logits: bool,
                    weights: str, spatial_stats=None):
    """Feature statistics (and, if asked, pool3 / unbiased logits) of uint8 image batches;
    ``spatial_stats`` (a ``FeatureStats``), if given, takes the sFID features."""
    from ddpm_jax import metrics as m  # noqa: PLC0415

    stats = m.FeatureStats(2048)
    pool3, logits = [], []
    bar = _bar(total, what)
    start, done = time.time(), 0
    def progress(k: int) -> None:  # after every compiled batch
        bar.update(done + k - bar.n)
        bar.set_postfix(img_s=f"{bar.n / max(time.time() - start, 1e-9):.1f}")

    for images in batches:
        feats = m.inception_features(images, weights=weights, mode=FLAGS.mode,
                                     batch_size=FLAGS.inception_batch_size, progress=progress)
        stats.update(feats["pool3"])
        if spatial_stats is not None:
            spatial_stats.update(feats["spatial"])
        if keep_pool3:
            pool3.append(feats["pool3"])
        if keep_logits:
            logits.append(feats["logits_unbiased"])
        done += len(images)
    bar.close()
    seconds = time.time() - start
    cat = lambda parts: np.concatenate(parts) if parts else None
    return stats, cat(pool3), cat(logits), seconds


def _reference_batches(ref: Reference, chunk: int):
    return datasets.iter_split(ref.config, ref.split, batch_size=chunk, num_examples=ref.count)


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


def prepare_samples(model, spec, provenance: dict) -> tuple[epath.Path, dict]:
    """``samples.npz`` of at least ``--num_samples`` images, reused or made; its description."""
    n = FLAGS.num_samples
    samples_dir = epath.Path(FLAGS.samples_dir or FLAGS.workdir)
    made = find_samples(samples_dir, model, spec, n, FLAGS.seed)
    if made is None:
        generate.generate(model, str(samples_dir), num_samples=n, seed=FLAGS.seed, spec=spec,
                          batch_size=FLAGS.sample_batch_size, labels=sample_labels(model),
                          guidance=sample_guidance(model))
        made = files.read_json(samples_dir / "samples.json")
    else:
        print(f"reusing {samples_dir / 'samples.npz'} ({made['num_samples']} images, seed "
              f"{made['seed']}, batch size {made['batch_size']}): its first {n}", flush=True)
    provenance.update(
        num_samples=n, samples=str(samples_dir / "samples.npz"), sample_seed=made["seed"],
        sample_batch_size=made["batch_size"], **spec.record(model.diffusion))
    if model.num_classes:
        provenance.update(labels=made["labels"], guidance=made["guidance"])
    return samples_dir, made


def sample_rows(model, samples_dir: epath.Path, chunk: int):
    """The first ``--num_samples`` images of ``samples.npz`` in chunks (memory: one chunk)."""
    n = FLAGS.num_samples
    shape, rows = generate.iter_npz_rows(samples_dir / "samples.npz", "images", chunk, n)
    if shape[0] < n or tuple(shape[1:]) != model.image_shape:
        raise EvaluationError(f"{samples_dir / 'samples.npz'} holds {shape}, not {n} images of "
                              f"{model.image_shape}: remove it and samples.json to sample again")
    return rows


def digits_sample_metrics(model, metrics, samples_dir: epath.Path, digits_ref,
                          provenance: dict) -> dict:
    """``digits_fd`` (and its ratio, confidence, classes) and, with it, precision / recall in
    the digits network's feature space (``ddpm_jax.metrics.digits``)."""
    from ddpm_jax.metrics import digits as dm  # noqa: PLC0415

    n = FLAGS.num_samples
    bar = _bar(n, "digits features")
    features, probs = [], []
    start = time.time()
    for images in sample_rows(model, samples_dir, 4096):
        out = dm.digits_features(images, digits_ref.params)
        features.append(out["features"])
        probs.append(out["probs"])
        bar.update(len(images))
    bar.close()
    scores = dm.scores_from_outputs(np.concatenate(features), np.concatenate(probs), digits_ref)
    scores.pop("num_samples")
    provenance["digits"] = digits_ref.provenance() | dict(
        features_seconds=round(time.time() - start, 2))
    if pr_space(metrics) == "digits":
        provenance["precision_recall_features"] = "digits"
    else:
        scores.pop("precision")
        scores.pop("recall")
    return scores


def sample_metrics(model, metrics, samples_dir: epath.Path, ref: Reference | None,
                   weights: str, sha: str, provenance: dict) -> dict:
    """The Inception metrics of the samples: fid, is, kid (and precision / recall in pool3)."""
    from ddpm_jax import metrics as m  # noqa: PLC0415

    metrics = inception_metrics(metrics)
    n = FLAGS.num_samples
    chunk = 1024 * max(1, FLAGS.inception_batch_size // 64)
    rows = sample_rows(model, samples_dir, chunk)
    keep = {"kid", "precision", "recall"} & set(metrics)
    spatial = m.FeatureStats(m.network.SPATIAL_DIM) if "sfid" in metrics else None
    stats, pool3, logits, secs = stream_features(
        rows, n, what="samples", keep_pool3=bool(keep), keep_logits="is" in metrics,
        weights=weights, spatial_stats=spatial)
    provenance.update(
        mode=FLAGS.mode, inception_weights_sha256=sha, inception_weights_official=m.is_official(
            sha), sample_features_seconds=round(secs, 2))
    result = {}
    if "is" in metrics:
        result.update(inception_scores(logits, FLAGS.is_splits))
        provenance["is_splits"] = FLAGS.is_splits
    if ref is None:
        return result
    ref_pool3 = None
    if ref.stats is not None:  # a statistics file
        ref_stats = ref.stats
        provenance["reference"] = dict(stats_file=ref.name, n=ref_stats.n, mode=ref_stats.mode,
                                       weights_sha256=ref_stats.weights_sha256)
    else:
        spatial_cache = ref.cache.parent / ref.cache.name.replace(".npz", "_sfid.npz")
        ref_spatial = m.FeatureStats(m.network.SPATIAL_DIM)

        def compute():
            nonlocal ref_pool3
            s, ref_pool3, _, _ = stream_features(
                _reference_batches(ref, chunk), ref.count, what=f"reference {ref.name}",
                keep_pool3=bool(keep), keep_logits=False, weights=weights,
                spatial_stats=ref_spatial if "sfid" in metrics else None)
            return s.result()

        cached = ref.cache.exists()
        spatial_cached = spatial_cache.exists()
        if cached:  # computed before: provenance checked (another mode or weights is refused)
            ref_stats = m.load_reference_stats(str(ref.cache), mode=FLAGS.mode,
                                               weights_sha256=sha)
            if ref_stats.mode is None or ref_stats.weights_sha256 is None:
                raise EvaluationError(f"{ref.cache} records no mode and weights: delete it to "
                                      "recompute the statistics")
        # KID, precision and recall need the features themselves.
        if not cached or keep or ("sfid" in metrics and not spatial_cached):
            mu, sigma, count = compute()
            if not cached:
                if jax.process_index() == 0:
                    m.save_reference_stats(str(ref.cache), mu, sigma, count, mode=FLAGS.mode,
                                           weights_sha256=sha)
                ref_stats = m.ReferenceStats(mu, sigma, count, FLAGS.mode, sha)
            if "sfid" in metrics and not spatial_cached and jax.process_index() == 0:
                m.save_reference_stats(str(spatial_cache), *ref_spatial.result(),
                                       mode=FLAGS.mode, weights_sha256=sha)
        if "sfid" in metrics:
            if spatial_cached:
                ref_spatial_stats = m.load_reference_stats(
                    str(spatial_cache), dim=m.network.SPATIAL_DIM, mode=FLAGS.mode,
                    weights_sha256=sha)
            else:
                ref_spatial_stats = m.ReferenceStats(*ref_spatial.result(), FLAGS.mode, sha)
        provenance["reference"] = dict(dataset_split=ref.name, n=ref_stats.n,
                                       stats_file=str(ref.cache), reused_cache=cached)
    if "fid" in metrics:
        mu, sigma, _ = stats.result()
        result["fid"] = m.frechet_distance(mu, sigma, ref_stats.mu, ref_stats.sigma)
    if "sfid" in metrics:
        mu, sigma, _ = spatial.result()
        result["sfid"] = m.frechet_distance(mu, sigma, ref_spatial_stats.mu,
                                            ref_spatial_stats.sigma)
        provenance.update(sfid_features="mixed_6/conv[..., :7] (Mixed_6d.branch1x1), 17x17x7",
                          sfid_stats_file=str(spatial_cache))
    if "kid" in metrics:
        result["kid_mean"], result["kid_std"] = m.kernel_inception_distance(
            pool3, ref_pool3, subsets=FLAGS.kid_subsets, subset_size=FLAGS.kid_subset_size,
            seed=FLAGS.seed)
        provenance.update(kid_subsets=FLAGS.kid_subsets, kid_subset_size=FLAGS.kid_subset_size,
                          kid_seed=FLAGS.seed)
    if {"precision", "recall"} & set(metrics):
        result["precision"], result["recall"] = m.precision_recall(ref_pool3, pool3, k=3)
        provenance.update(precision_recall_features="inception_pool3", precision_recall_k=3)
    return result


def check_conditioning(model: api.DDPM, metrics) -> None:
    """The labels and guidance of the samples, and the class share's needs, before sampling."""
    guidance = sample_guidance(model)
    labels = generate.parse_labels(sample_labels(model), FLAGS.num_samples, model.num_classes)
    api.check_labels(labels, guidance or 0.0, FLAGS.num_samples, model.num_classes,
                     prefix="--")
    if "digits_class_share" in metrics and (model.config.data.dataset != "digits"
                                            or labels is None):
        raise EvaluationError("--metrics=digits_class_share needs a class-conditional digits "
                              "model (configs/digits_cond.py)")


def main():
    if FLAGS.workdir is None:
        cli.fail("--workdir is required")
    metrics = parse_metrics(FLAGS.metrics)
    logging.set_verbosity(logging.ERROR)  # Orbax warns on every read-only open
    cli.start_processes()
    model = api.load(FLAGS.workdir, ema=not FLAGS.raw)
    config = model.config
    if FLAGS.data_dir is not None:
        with config.ignore_type():
            config.data.data_dir = FLAGS.data_dir
    out = epath.Path(FLAGS.out or os.path.join(FLAGS.workdir, "evaluation.json"))

    # Everything is checked and opened before anything compiles.
    spec = weights = sha = ref = bpd_images = digits_ref = None
    wants_samples = bool(set(SAMPLE_METRICS) & set(metrics))
    if wants_samples:
        spec = sampling.spec_from_config(config, **cli.sampler_overrides())
        if {"precision", "recall"} & set(metrics) and FLAGS.num_samples < 4:
            raise EvaluationError(f"precision / recall need more than k = 3 samples, "
                                  f"--num_samples={FLAGS.num_samples}")
    if set(DIGITS_METRICS) & set(metrics):
        from ddpm_jax.metrics import digits as dm  # noqa: PLC0415

        if tuple(model.image_shape) != dm.IMAGE_SHAPE:
            raise EvaluationError(f"digits_fd measures 8x8x1 digits; this model makes "
                                  f"{model.image_shape} images: use fid, kid or is")
        if FLAGS.num_samples < 2:
            raise EvaluationError("digits_fd needs at least 2 samples (--num_samples)")
        digits_ref = dm.load_reference(config.data.data_dir)  # trained once, then cached
    if wants_samples:
        check_conditioning(model, metrics)
    if inception_metrics(metrics):
        from ddpm_jax import metrics as m  # noqa: PLC0415

        weights = m.weights.resolve_path(FLAGS.inception_weights)
        sha = m.weights_sha256(weights)
        m.inception.placed_params(weights, sharding.create_mesh())  # every tensor checked
        if not m.is_official(sha):
            print(f"note: {weights} was not converted from pytorch-fid's released Inception "
                  "weights; its numbers are not comparable with published ones", flush=True)
        if "is" in metrics and FLAGS.num_samples < FLAGS.is_splits:
            raise EvaluationError(f"--num_samples={FLAGS.num_samples} cannot be cut into "
                                  f"--is_splits={FLAGS.is_splits} splits")
        if "kid" in metrics and FLAGS.num_samples < FLAGS.kid_subset_size:
            raise EvaluationError(f"KID subsets of --kid_subset_size={FLAGS.kid_subset_size} "
                                  f"images need at least as many samples, --num_samples="
                                  f"{FLAGS.num_samples}: raise it or lower the subset size")
        ref = plan_reference(model, inception_metrics(metrics), sha)
    split = FLAGS.split or config.data.eval_split
    if "bpd" in metrics:
        bpd_images = datasets.load_split(config, split, FLAGS.num_examples)

    provenance = dict(checkpoint=str(model.source), checkpoint_step=model.step,
                      ema=not FLAGS.raw, metrics=list(metrics))
    result = {}
    if wants_samples:
        samples_dir, _ = prepare_samples(model, spec, provenance)
        if "digits_class_share" in metrics:
            result["digits_class_share"] = digits_class_share(
                model, samples_dir / "samples.npz", FLAGS.num_samples)
        if digits_ref is not None:
            result.update(digits_sample_metrics(model, metrics, samples_dir, digits_ref,
                                                provenance))
        if inception_metrics(metrics):
            result.update(sample_metrics(model, metrics, samples_dir, ref, weights, sha,
                                         provenance))
    if "bpd" in metrics:
        bpd = evaluate_bpd(model, bpd_images, batch_size=FLAGS.batch_size, seed=FLAGS.seed)
        bpd.update(split=split, checkpoint_step=model.step, ema=not FLAGS.raw)
        result["bpd"] = bpd["bits_per_dim"]
        provenance["bpd"] = bpd
        bpd_file = epath.Path(model.source).parent / f"bpd_{split}.json"
        if jax.process_index() == 0:
            files.write_json(bpd_file, bpd)
        print(f"{bpd['bits_per_dim']:.4f} bits/dim (stderr {bpd['stderr']}) on "
              f"{bpd['num_examples']} images of {split}, checkpoint step {model.step}; "
              f"written to {bpd_file}")
    result["provenance"] = provenance
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(out, result)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()
             if k != "provenance"}
    print(f"{shown} at checkpoint step {model.step}; written to {out}")


if __name__ == "__main__":
    cli.run(main)

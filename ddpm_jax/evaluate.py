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
train to real test), ``digits_fd_ratio``, ``digits_fd_ratio_real_n`` (the ratio of as many real
training digits as samples: the figure to read the ratio against, since few samples bias the
distance upwards), ``digits_confidence`` and ``digits_classes``; with it,
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

The command is ``spec_from_flags`` and four calls, each usable from Python without flags::

  spec = evaluate.EvalSpec(metrics=("fid", "is"), num_samples=1000, ref="cifar10:train")
  model = ddpm_jax.load("runs/cifar10")
  plan = evaluate.plan(model, spec)  # every check, before anything compiles
  result = evaluate.evaluate(model, spec, samples_dir="runs/cifar10", checked=plan)
  evaluate.write_results(model, result, "runs/cifar10/evaluation.json")

The features, reference statistics, scores and the bound themselves are ``ddpm_jax.evaluation``'s.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np
from absl import flags, logging
from etils import epath

from ddpm_jax import api, cli, datasets, errors, evaluation, files, generate, sampling, sharding

FLAGS = flags.FLAGS
METRICS = ("fid", "is", "kid", "bpd", "digits_fd", "precision", "recall", "sfid",
           "digits_class_share")
SAMPLE_METRICS = ("fid", "is", "kid", "digits_fd", "precision", "recall", "sfid",
                  "digits_class_share")
DIGITS_METRICS = ("digits_fd",)  # precision / recall go with them: see pr_space

def define_flags() -> None:
    """The command's flags (defined when it runs: importing the module defines none)."""
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
    flags.DEFINE_string("ref", None, "Reference images DATASET:SPLIT (default: the config's "
                        "dataset and config.data.split).")
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
    cli.define_lock_flag("samples folder")
    cli.define_process_flags()


class EvaluationError(errors.UserError, ValueError):
    """A metric, reference or sample setting that cannot be evaluated as asked."""


# -- what to compute ------------------------------------------------------------------------------
def parse_metrics(names) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise EvaluationError(f"--metrics={','.join(names)}: unknown or empty "
                              f"({', '.join(unknown) or 'nothing asked'}); choose from "
                              f"{','.join(METRICS)}")
    return names


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What to compute: the metrics, and the settings of their samples, FID network, reference
    and bound (the command's flags of the same names; ``sampler`` holds the keywords of
    ``sampling.spec_from_config``). ``metrics`` is checked and normalised when made."""

    metrics: tuple[str, ...] = ("bpd",)
    seed: int = 0
    num_samples: int = 50000
    sample_batch_size: int | None = None
    sampler: tuple[tuple[str, object], ...] = ()
    labels: str | None = None
    guidance: float | None = None
    inception_weights: str | None = None
    mode: str = "tf1"
    inception_batch_size: int = 64
    ref: str | None = None
    ref_stats: str | None = None
    ref_num_examples: int | None = None
    is_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    split: str | None = None
    num_examples: int | None = None
    batch_size: int = 64

    def __post_init__(self):
        object.__setattr__(self, "metrics", parse_metrics(self.metrics))
        object.__setattr__(self, "sampler", tuple(dict(self.sampler).items()))

    def wants(self, *names: str) -> bool:
        return bool(set(names) & set(self.metrics))

    @property
    def wants_samples(self) -> bool:
        return self.wants(*SAMPLE_METRICS)

    @property
    def pr_space(self) -> str | None:
        """Where precision / recall are measured: the digits network's features when
        ``digits_fd`` is asked too, else the Inception's pool3; None if neither is asked."""
        if not self.wants("precision", "recall"):
            return None
        return "digits" if self.wants(*DIGITS_METRICS) else "inception"

    @property
    def inception_metrics(self) -> tuple[str, ...]:
        """The metrics that need the FID Inception (its weights file)."""
        pool3 = ("precision", "recall") if self.pr_space == "inception" else ()
        return tuple(m for m in self.metrics if m in ("fid", "is", "kid", "sfid", *pool3))

    def sampler_spec(self, config) -> sampling.SamplerSpec:
        return sampling.spec_from_config(config, **dict(self.sampler))

    def sample_labels(self, model: api.DDPM) -> str | None:
        """``labels``, or "all" (class-balanced samples) for a class-conditional model."""
        return "all" if self.labels is None and model.num_classes else self.labels

    def sample_guidance(self, model: api.DDPM) -> float | None:
        """``guidance``, or config.sampling.guidance for a class-conditional model."""
        if self.guidance is None and model.num_classes:
            return float(model.config.sampling.guidance)
        return self.guidance


def spec_from_flags() -> EvalSpec:
    """The command's flags as an ``EvalSpec`` (each field is the flag of its name, ``sampler``
    the sampler flags); --metrics is checked (one line)."""
    named = {f.name: FLAGS[f.name].value for f in dataclasses.fields(EvalSpec)
             if f.name != "sampler"}
    return EvalSpec(**named, sampler=tuple(cli.sampler_overrides().items()))


def with_data_dir(model: api.DDPM, data_dir: str | None) -> api.DDPM:
    """``model`` reading its data (and caching statistics) under ``data_dir``: a new DDPM
    (``model`` itself when ``data_dir`` is None)."""
    if data_dir is None:
        return model
    config = model.config.copy_and_resolve_references()
    with config.ignore_type():
        config.data.data_dir = data_dir
    return model.replace(config=config)


# -- the plan: every setting checked and opened before anything compiles --------------------------
@dataclasses.dataclass(frozen=True)
class Reference:
    """Where the reference statistics come from."""

    name: str  # DATASET:SPLIT, or the statistics file
    data: datasets.DataSpec | None = None  # the data section that reads DATASET:SPLIT
    split: str | None = None
    count: int | None = None  # images read from the split
    cache: epath.Path | None = None  # our cached statistics of the split
    stats: object | None = None  # ReferenceStats of a --ref_stats file


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``EvalSpec`` needs, checked and opened: the sampler of the samples, the digits
    network, the FID Inception and reference, the bound's images of ``split``."""

    sampler: sampling.SamplerSpec | None = None
    digits_ref: object | None = None  # metrics.digits.DigitsReference
    inception: evaluation.Inception | None = None
    ref: Reference | None = None
    bpd_images: np.ndarray | None = None
    split: str | None = None


def plan(model: api.DDPM, spec: EvalSpec) -> Plan:
    """Checks ``spec`` against ``model`` (one line per problem) and opens what it reads."""
    sampler = check_samples(model, spec) if spec.wants_samples else None
    digits_ref = digits_reference(model, spec) if spec.wants(*DIGITS_METRICS) else None
    if spec.wants_samples:
        check_conditioning(model, spec)
    net = ref = None
    if spec.inception_metrics:
        net = inception_network(spec)
        ref = plan_reference(model, spec, net.sha256)
    split = spec.split or model.config.data.eval_split
    images = None
    if spec.wants("bpd"):
        images = datasets.load_split(datasets.DataSpec.from_config(model.config), split,
                                     spec.num_examples)
    return Plan(sampler, digits_ref, net, ref, images, split)


def check_samples(model: api.DDPM, spec: EvalSpec) -> sampling.SamplerSpec:
    """The sampler of the samples (checked), and enough samples for precision / recall."""
    sampler = spec.sampler_spec(model.config)
    if spec.wants("precision", "recall") and spec.num_samples < 4:
        raise EvaluationError(f"precision / recall need more than k = 3 samples, "
                              f"--num_samples={spec.num_samples}")
    return sampler


def digits_reference(model: api.DDPM, spec: EvalSpec):
    """The digits network and its reference statistics (trained once, then cached)."""
    from ddpm_jax.metrics import digits as dm  # noqa: PLC0415

    if tuple(model.image_shape) != dm.IMAGE_SHAPE:
        raise EvaluationError(f"digits_fd measures 8x8x1 digits; this model makes "
                              f"{model.image_shape} images: use fid, kid or is")
    if spec.num_samples < 2:
        raise EvaluationError("digits_fd needs at least 2 samples (--num_samples)")
    return dm.load_reference(model.config.data.data_dir)


def check_conditioning(model: api.DDPM, spec: EvalSpec) -> None:
    """The labels and guidance of the samples, and the class share's needs, before sampling."""
    n = spec.num_samples
    labels = generate.parse_labels(spec.sample_labels(model), n, model.num_classes)
    api.check_labels(labels, spec.sample_guidance(model) or 0.0, n, model.num_classes,
                     prefix="--")
    if spec.wants("digits_class_share") and (model.config.data.dataset != "digits"
                                             or labels is None):
        raise EvaluationError("--metrics=digits_class_share needs a class-conditional digits "
                              "model (configs/digits_cond.py)")


def inception_network(spec: EvalSpec) -> evaluation.Inception:
    """The FID Inception of ``spec``: its weights file read and checked, and enough samples for
    the IS splits and the KID subsets."""
    from ddpm_jax import metrics as m  # noqa: PLC0415

    weights = m.weights.resolve_path(spec.inception_weights)
    sha = m.weights_sha256(weights)
    m.inception.placed_params(weights, sharding.create_mesh())  # every tensor checked
    if not m.is_official(sha):
        print(f"note: {weights} was not converted from pytorch-fid's released Inception "
              "weights; its numbers are not comparable with published ones", flush=True)
    n = spec.num_samples
    if "is" in spec.metrics and n < spec.is_splits:
        raise EvaluationError(f"--num_samples={n} cannot be cut into "
                              f"--is_splits={spec.is_splits} splits")
    if "kid" in spec.metrics and n < spec.kid_subset_size:
        raise EvaluationError(f"KID subsets of --kid_subset_size={spec.kid_subset_size} "
                              f"images need at least as many samples, --num_samples="
                              f"{n}: raise it or lower the subset size")
    return evaluation.Inception(weights, sha, spec.mode, spec.inception_batch_size)


def _ref_data(config, ref: str, image_shape) -> tuple[datasets.DataSpec, str]:
    """The model's data section reading DATASET (its name and channels, the same size, no
    labels), and SPLIT."""
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
    data = dataclasses.replace(datasets.DataSpec.from_config(config), dataset=dataset,
                               channels=spec.channels, num_classes=0)
    return data, split


def plan_reference(model: api.DDPM, spec: EvalSpec, sha: str) -> Reference | None:
    """Checks the reference of FID / KID / sFID / precision / recall and opens (but does not
    read) its images; None when no Inception metric needs one."""
    metrics = spec.inception_metrics
    if not {"fid", "kid", "precision", "recall", "sfid"} & set(metrics):
        return None
    if spec.ref and spec.ref_stats:
        raise EvaluationError("give --ref=DATASET:SPLIT or --ref_stats=FILE.npz, not both")
    if spec.ref_stats:
        return _reference_file(spec, sha)
    return _reference_split(model, spec, sha)


def _reference_file(spec: EvalSpec, sha: str) -> Reference:
    from ddpm_jax import metrics as m  # noqa: PLC0415

    if "sfid" in spec.metrics:
        raise EvaluationError("sfid needs the reference's spatial statistics, which a "
                              "statistics file does not hold: pass --ref=DATASET:SPLIT")
    needs = [n for n in ("kid", "precision", "recall") if n in spec.inception_metrics]
    if needs:
        names = " and ".join("KID" if n == "kid" else n for n in needs)
        raise EvaluationError(f"{names} need{'s' if len(needs) == 1 else ''} the reference "
                              "images' features, which a statistics file does not hold: "
                              "pass --ref=DATASET:SPLIT")
    stats = m.load_reference_stats(spec.ref_stats, mode=spec.mode, weights_sha256=sha)
    return Reference(spec.ref_stats, stats=stats)


def _reference_split(model: api.DDPM, spec: EvalSpec, sha: str) -> Reference:
    c = model.config.data
    ref = spec.ref or f"{c.dataset}:{c.split}"
    data, split = _ref_data(model.config, ref, model.image_shape)
    total = len(datasets.open_source(data, split))  # a missing split or data: one line
    count = total if spec.ref_num_examples is None else spec.ref_num_examples
    if count > total:
        raise EvaluationError(f"--ref_num_examples={count} but {ref} holds {total} images")
    if "kid" in spec.metrics and count < spec.kid_subset_size:
        raise EvaluationError(f"KID subsets of {spec.kid_subset_size} images need at least as "
                              f"many reference images, {ref} gives {count}: lower "
                              "--kid_subset_size")
    cache = evaluation.reference_stats_path(data, split, count, total, spec.mode, sha)
    return Reference(ref, data=data, split=split, count=count, cache=cache)


# -- the samples -----------------------------------------------------------------------------------
def samples_record(model: api.DDPM, spec: EvalSpec, sampler: sampling.SamplerSpec) -> dict:
    """The ``generate.samples_record`` of the samples ``spec`` asks for."""
    return generate.samples_record(
        model, sampler, num_samples=spec.num_samples,
        batch_size=spec.sample_batch_size or model.config.sampling.batch_size, seed=spec.seed,
        labels=spec.sample_labels(model), guidance=spec.sample_guidance(model) or 0.0)


def prepare_samples(model: api.DDPM, spec: EvalSpec, sampler: sampling.SamplerSpec,
                    samples_dir, provenance: dict, *, take_over_lock: bool = False
                    ) -> epath.Path:
    """``samples.npz`` in ``samples_dir`` of at least ``spec.num_samples`` images, reused
    (``generate.find_reusable``) or made; its description goes into ``provenance``."""
    n, samples_dir = spec.num_samples, epath.Path(samples_dir)
    made = generate.find_reusable(samples_dir, samples_record(model, spec, sampler))
    if made is None:
        generate.generate(model, str(samples_dir), num_samples=n, seed=spec.seed, spec=sampler,
                          batch_size=spec.sample_batch_size, labels=spec.sample_labels(model),
                          guidance=spec.sample_guidance(model), take_over_lock=take_over_lock)
        made = files.read_json(samples_dir / "samples.json")
    else:
        print(f"reusing {samples_dir / 'samples.npz'} ({made['num_samples']} images, seed "
              f"{made['seed']}, batch size {made['batch_size']}): its first {n}", flush=True)
    provenance.update(
        num_samples=n, samples=str(samples_dir / "samples.npz"), sample_seed=made["seed"],
        sample_batch_size=made["batch_size"], **sampler.record(model.diffusion))
    if model.num_classes:
        provenance.update(labels=made["labels"], guidance=made["guidance"])
    return samples_dir / "samples.npz"


def sample_rows(samples: epath.Path, n: int, image_shape, chunk: int):
    """The first ``n`` images of ``samples`` (a samples.npz) in chunks (memory: one chunk)."""
    shape, rows = files.iter_npz_rows(samples, "images", chunk, n)
    if shape[0] < n or tuple(shape[1:]) != tuple(image_shape):
        raise EvaluationError(f"{samples} holds {shape}, not {n} images of {image_shape}: "
                              "remove it and samples.json to sample again")
    return rows


# -- the metrics -----------------------------------------------------------------------------------
def evaluate(model: api.DDPM, spec: EvalSpec, *, samples_dir, checked: Plan | None = None,
             take_over_lock: bool = False) -> dict:
    """The metrics of ``spec`` for ``model`` (samples reused or made in ``samples_dir``):
    ``{metric: value, ..., "provenance": {...}}``; ``checked``: ``plan(model, spec)``, if made;
    ``take_over_lock``: as ``generate.generate``'s."""
    p = plan(model, spec) if checked is None else checked
    provenance = dict(checkpoint=str(model.source), checkpoint_step=model.step, ema=model.ema,
                      metrics=list(spec.metrics))
    result = {}
    if spec.wants_samples:
        samples = prepare_samples(model, spec, p.sampler, samples_dir, provenance,
                                  take_over_lock=take_over_lock)
        result.update(sample_metrics(model, spec, p, samples, provenance))
    if spec.wants("bpd"):
        bpd = evaluation.bits_per_dim(model.bound_terms, p.bpd_images,
                                      batch_size=spec.batch_size, seed=spec.seed)
        bpd.update(split=p.split, checkpoint_step=model.step, ema=model.ema)
        result["bpd"] = bpd["bits_per_dim"]
        provenance["bpd"] = bpd
    result["provenance"] = provenance
    return result


def sample_metrics(model: api.DDPM, spec: EvalSpec, p: Plan, samples: epath.Path,
                   provenance: dict) -> dict:
    """The metrics of the samples in ``samples``: the class share, the digits', the Inception's."""
    result = {}
    if spec.wants("digits_class_share"):
        result["digits_class_share"] = digits_class_share(model, samples, spec.num_samples)
    if p.digits_ref is not None:
        result.update(digits_sample_metrics(model.image_shape, spec, samples, p.digits_ref,
                                            provenance))
    if spec.inception_metrics:
        result.update(inception_sample_metrics(model.image_shape, spec, p, samples,
                                               provenance))
    return result


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


def digits_sample_metrics(image_shape, spec: EvalSpec, samples: epath.Path, digits_ref,
                          provenance: dict) -> dict:
    """``digits_fd`` (and its ratio, confidence, classes) and, with it, precision / recall in
    the digits network's feature space (``ddpm_jax.metrics.digits``)."""
    from ddpm_jax.metrics import digits as dm  # noqa: PLC0415

    bar = evaluation.progress_bar(spec.num_samples, "digits features")
    features, probs = [], []
    start = time.time()
    for images in sample_rows(samples, spec.num_samples, image_shape, 4096):
        out = dm.digits_features(images, digits_ref.params)
        features.append(out["features"])
        probs.append(out["probs"])
        bar.update(len(images))
    bar.close()
    scores = dm.scores_from_outputs(np.concatenate(features), np.concatenate(probs), digits_ref)
    scores.pop("num_samples")
    provenance["digits"] = digits_ref.provenance() | dict(
        features_seconds=round(time.time() - start, 2))
    if spec.pr_space == "digits":
        provenance["precision_recall_features"] = "digits"
    else:
        scores.pop("precision")
        scores.pop("recall")
    return scores


def inception_sample_metrics(image_shape, spec: EvalSpec, p: Plan, samples: epath.Path,
                             provenance: dict) -> dict:
    """The Inception metrics of the samples: fid, is, kid, sfid (and precision / recall in
    pool3), the reference's side through ``evaluation.reference_features``."""
    from ddpm_jax import metrics as m  # noqa: PLC0415

    metrics, n, net = spec.inception_metrics, spec.num_samples, p.inception
    chunk = 1024 * max(1, spec.inception_batch_size // 64)
    keep = bool({"kid", "precision", "recall"} & set(metrics))
    feats = net.features(sample_rows(samples, n, image_shape, chunk), n, what="samples",
                         keep_pool3=keep, keep_logits="is" in metrics,
                         spatial="sfid" in metrics)
    provenance.update(mode=net.mode, inception_weights_sha256=net.sha256,
                      inception_weights_official=m.is_official(net.sha256),
                      sample_features_seconds=round(feats.seconds, 2))
    result = {}
    if "is" in metrics:
        result.update(evaluation.inception_scores(feats.logits, spec.is_splits))
        provenance["is_splits"] = spec.is_splits
    if p.ref is not None:
        ref = reference_side(p.ref, net, chunk, keep, "sfid" in metrics, provenance)
        result.update(reference_scores(spec, feats, ref, p.ref, provenance))
    return result


def reference_side(ref: Reference, net: evaluation.Inception, chunk: int, keep_pool3: bool,
                   sfid: bool, provenance: dict) -> evaluation.ReferenceFeatures:
    """The reference's statistics (and features, if kept): a statistics file's, or those of
    DATASET:SPLIT, cached."""
    if ref.stats is not None:  # a statistics file
        s = ref.stats
        provenance["reference"] = dict(stats_file=ref.name, n=s.n, mode=s.mode,
                                       weights_sha256=s.weights_sha256)
        return evaluation.ReferenceFeatures(s, None, None)
    reused = ref.cache.exists()
    batches = lambda: datasets.iter_split(ref.data, ref.split, batch_size=chunk,
                                          num_examples=ref.count)
    out = evaluation.reference_features(net, batches, ref.count, ref.cache,
                                        what=f"reference {ref.name}", keep_pool3=keep_pool3,
                                        sfid=sfid)
    provenance["reference"] = dict(dataset_split=ref.name, n=out.stats.n,
                                   stats_file=str(ref.cache), reused_cache=reused)
    return out


def reference_scores(spec: EvalSpec, feats: evaluation.Features,
                     ref: evaluation.ReferenceFeatures, where: Reference,
                     provenance: dict) -> dict:
    """FID, sFID, KID and precision / recall of the samples' features against the reference."""
    from ddpm_jax import metrics as m  # noqa: PLC0415

    metrics, result = spec.inception_metrics, {}
    if "fid" in metrics:
        mu, sigma, _ = feats.stats.result()
        result["fid"] = m.frechet_distance(mu, sigma, ref.stats.mu, ref.stats.sigma)
    if "sfid" in metrics:
        mu, sigma, _ = feats.spatial.result()
        result["sfid"] = m.frechet_distance(mu, sigma, ref.spatial.mu, ref.spatial.sigma)
        provenance.update(sfid_features="mixed_6/conv[..., :7] (Mixed_6d.branch1x1), 17x17x7",
                          sfid_stats_file=str(evaluation.spatial_stats_path(where.cache)))
    if "kid" in metrics:
        result["kid_mean"], result["kid_std"] = m.kernel_inception_distance(
            feats.pool3, ref.pool3, subsets=spec.kid_subsets,
            subset_size=spec.kid_subset_size, seed=spec.seed)
        provenance.update(kid_subsets=spec.kid_subsets, kid_subset_size=spec.kid_subset_size,
                          kid_seed=spec.seed)
    if {"precision", "recall"} & set(metrics):
        result["precision"], result["recall"] = m.precision_recall(ref.pool3, feats.pool3, k=3)
        provenance.update(precision_recall_features="inception_pool3", precision_recall_k=3)
    return result


# -- the command -----------------------------------------------------------------------------------
def write_results(model: api.DDPM, result: dict, out) -> None:
    """Writes ``result`` to ``out`` and its bound to ``bpd_<split>.json`` beside the checkpoint
    (process 0), and says so."""
    out, first = epath.Path(out), jax.process_index() == 0
    bpd = result["provenance"].get("bpd")
    if bpd is not None:
        bpd_file = epath.Path(model.source).parent / f"bpd_{bpd['split']}.json"
        if first:
            files.write_json(bpd_file, bpd)
        print(f"{bpd['bits_per_dim']:.4f} bits/dim (stderr {bpd['stderr']}) on "
              f"{bpd['num_examples']} images of {bpd['split']}, checkpoint step {model.step}; "
              f"written to {bpd_file}")
    if first:
        out.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(out, result)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()
             if k != "provenance"}
    print(f"{shown} at checkpoint step {model.step}; written to {out}")


def main():
    if FLAGS.workdir is None:
        cli.fail("--workdir is required")
    spec = spec_from_flags()
    logging.set_verbosity(logging.ERROR)  # Orbax reports every file it reads
    cli.start_processes()
    model = with_data_dir(api.load(FLAGS.workdir, ema=not FLAGS.raw), FLAGS.data_dir)
    out = FLAGS.out or os.path.join(FLAGS.workdir, "evaluation.json")
    p = plan(model, spec)  # everything is checked and opened before anything compiles
    result = evaluate(model, spec, samples_dir=FLAGS.samples_dir or FLAGS.workdir, checked=p,
                      take_over_lock=FLAGS.take_over_lock)
    write_results(model, result, out)


if __name__ == "__main__":
    define_flags()
    cli.run(main)

"""Sample quality against network evaluations (NFE) for every sampler and spacing.

  python -m ddpm_jax.benchmarks.quality_vs_nfe --workdir=runs/digits
  python -m ddpm_jax.benchmarks.quality_vs_nfe --workdir=runs/cifar10 --metric=fid \
      --ref_stats=cifar10_train_tf1.npz --inception_weights=fid_inception_v3.safetensors \
      --num_samples=50000 --nfe=10,20,50,100

For each sampler (``--samplers``; ``ancestral:fixedsmall`` is Algorithm 2 with sigma^2 = beta~,
the variance to respace with), each spacing (``--spacings``; ``own`` = the sampler's default)
and each NFE (``--nfe``: the steps are NFE, EDM's Heun takes (NFE + 1) // 2 steps of two calls
but the last), the same ``--num_samples`` starting noises are sampled by one compiled chain, timed
(wall and process CPU seconds per 1,000 images; compile time apart) and scored by the metric:

* ``digits``: ``ddpm_jax.metrics.digits`` (``digits_fd``: the Frechet distance to the real test
  digits in the digits CNN's features, its ratio to the real training digits' distance,
  precision, recall, the CNN's confidence), and beside it the Frechet distance to the 1,497
  real training digits in a 16-dimensional PCA space of the real digits (``fd_pca``) and the
  mean confidence of an RBF SVM fitted on them (``benchmarks.digits_quality``).
* ``fid``: FID against a reference statistics file with the FID Inception-v3 (CIFAR10 on the
  imported paper weights; needs an accelerator for 50k samples).

Settings whose timesteps coincide with one already run (every spacing at NFE = T) are skipped.
Prints one JSON line per setting, then a Markdown table; writes ``quality_vs_nfe.json`` and
``quality_vs_nfe.png`` (quality against NFE, one line per sampler and spacing) to ``--out_dir``.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

import ddpm_jax
from ddpm_jax import config_lib, diffusion, sampling, sharding
from ddpm_jax.benchmarks import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The program's flags (defined only when it runs: importing the module defines none)."""
    flags.DEFINE_string("workdir", "runs/digits", "Workdir of a trained (or imported) run.")
    flags.DEFINE_string("config", None, "Instead of --workdir: a config name in configs/ with "
                        "random weights (a smoke test of the program).")
    flags.DEFINE_string("out_dir", None, "Where to write the JSON and the plot (default: workdir).")
    flags.DEFINE_integer("num_samples", 500, "Samples per setting.", lower_bound=2)
    flags.DEFINE_list("nfe", ["10", "20", "50", "100", "1000"], "Network evaluations per image.")
    flags.DEFINE_list("samplers", list(config_lib.SAMPLERS) + ["ancestral:fixedsmall"],
                      "Samplers; ancestral:fixedsmall respaces with sigma^2 = beta~.")
    flags.DEFINE_list("spacings", ["own"] + list(config_lib.SPACINGS),
                      "Spacings (own = the sampler's default).")
    flags.DEFINE_list("thresholding", ["false"],
                      "The DPM-Solvers with and/or without thresholding.")
    flags.DEFINE_enum("metric", "digits", ["digits", "fid"], "Quality metric.")
    flags.DEFINE_string("ref_stats", None, "--metric=fid: reference statistics file (.npz).")
    flags.DEFINE_string("inception_weights", None, "--metric=fid: the converted Inception file.")
    flags.DEFINE_integer("seed", 0, "Sampling seed (the same noise for every setting).")
    flags.DEFINE_string("data_dir", None, "--metric=digits: where the digits are prepared "
                        "(default: tfds' default).")


# -- metrics: score(uint8 images) -> dict; floor() -> the same for real data --------------------
class DigitsQuality:
    """The project's digits metric (``ddpm_jax.metrics.digits``: Frechet distance, precision and
    recall in the digits CNN's features, against the real test digits), beside a Frechet
    distance in a PCA space of the real digits and an SVM's confidence (``fd_pca``,
    ``svm_confidence``: an independent check of the same ranking)."""

    name, key = "digits", "digits_fd"

    def __init__(self, data_dir: str | None = None, components: int = 16):
        from sklearn.datasets import load_digits  # noqa: PLC0415
        from sklearn.decomposition import PCA  # noqa: PLC0415

        from ddpm_jax.benchmarks import digits_quality  # noqa: PLC0415
        from ddpm_jax.metrics import digits  # noqa: PLC0415

        self.digits, self.data_dir = digits, data_dir
        self.ref_cnn = digits.load_reference(data_dir)  # trained once, cached by the data
        x, _ = load_digits(return_X_y=True)
        x = np.round(x * 255.0 / 16.0) / 255.0  # the stored uint8 values, scaled to [0, 1]
        self.train, self.test = x[:1497], x[1497:]
        self.pca = PCA(components, random_state=0).fit(self.train)
        self.ref = self._stats(self.train)
        self.clf = digits_quality.fit_classifier()[0]
        self._judge = digits_quality.judge

    def _stats(self, flat):
        f = self.pca.transform(flat).astype(np.float64)
        return f.mean(0), np.cov(f, rowvar=False)

    def _pca_scores(self, flat) -> dict:
        from ddpm_jax import metrics  # noqa: PLC0415

        fd = metrics.frechet_distance(*self._stats(flat), *self.ref)
        conf = self._judge(self.clf, np.round(flat * 255.0).astype(np.uint8))["mean_confidence"]
        return dict(fd_pca=float(fd), svm_confidence=float(conf))

    def score(self, images: np.ndarray) -> dict:
        r = self.digits.evaluate_digits(images, data_dir=self.data_dir)
        keep = ("digits_fd", "digits_fd_ratio", "precision", "recall", "digits_confidence")
        return {k: float(r[k]) for k in keep} | self._pca_scores(
            images.reshape(len(images), -1) / 255.0)

    def floor(self) -> dict:
        """Real digits: training digits to test digits in the CNN's space; test digits in PCA's."""
        return dict(digits_fd=self.ref_cnn.fd_real,
                    digits_confidence=self.ref_cnn.test_confidence) | self._pca_scores(self.test)


class FIDQuality:
    """FID with the FID Inception-v3 against a reference statistics file."""

    name, key = "fid", "fid"

    def __init__(self, ref_stats: str, weights: str):
        from ddpm_jax import metrics  # noqa: PLC0415

        self.m, self.weights = metrics, metrics.weights.resolve_path(weights)
        self.ref = metrics.load_reference_stats(ref_stats, mode="tf1",
                                                weights_sha256=metrics.weights_sha256(
                                                    self.weights))

    def score(self, images: np.ndarray) -> dict:
        feats = self.m.inception_features(images, weights=self.weights)["pool3"]
        mu, sigma = self.m.feature_statistics(feats)
        return dict(fid=float(self.m.frechet_distance(mu, sigma, self.ref.mu, self.ref.sigma)))

    def floor(self) -> dict:
        return {}


def make_metric():
    if FLAGS.metric == "fid":
        if not (FLAGS.ref_stats and FLAGS.inception_weights):
            raise config_lib.ConfigError("--metric=fid needs --ref_stats and --inception_weights")
        return FIDQuality(FLAGS.ref_stats, FLAGS.inception_weights)
    return DigitsQuality(FLAGS.data_dir)


# -- the grid --------------------------------------------------------------------------------------
def settings(model: ddpm_jax.DDPM, samplers, spacings, nfes, thresholds):
    """(label, model, spec) of every setting, skipping those whose chain was already listed."""
    T = model.config.diffusion.num_timesteps
    seen, out = set(), []
    for nfe in nfes:
        for name in samplers:
            sampler, _, var = name.partition(":")
            m = model
            if var:
                m = model.replace(diffusion=diffusion.Diffusion.create(
                    model.diffusion.betas64, model_mean_type=model.diffusion.model_mean_type,
                    model_var_type=var, loss_type=model.diffusion.loss_type))
            steps = (nfe + 1) // 2 if sampler == "heun" else nfe
            if not 1 <= steps <= T or (sampler == "heun" and steps < 2):
                continue
            for spacing in spacings:
                for th in (thresholds if sampler in sampling.DPM_SOLVERS else [False]):
                    spec = sampling.SamplerSpec(
                        sampler, steps, clip_denoised=model.config.sampling.clip_denoised,
                        spacing=None if spacing == "own" else spacing, thresholding=th)
                    spec.check(T)
                    chain_id = (name, th, tuple(spec.timesteps(m.diffusion)))
                    if chain_id in seen:
                        continue
                    seen.add(chain_id)
                    label = name + (" thresholding" if th else "")
                    out.append((label, m, spec))
    return out


def measure(label: str, model: ddpm_jax.DDPM, spec: sampling.SamplerSpec, metric, n: int,
            seed: int) -> dict:
    """Samples ``n`` images with ``spec`` in one compiled chain, timed, and scores them."""
    padded = sharding.padded_size(n, model.mesh)
    fn = sampling.get_sampling_fn(model.graphdef, spec, (padded,) + model.image_shape,
                                  model.mesh)
    args = (model.params, model.diffusion, jax.random.key(seed), None, spec.eta)
    compiled, compile_s = common.compile_timed(fn.lower(*args))
    cpu0, start = sum(os.times()[:2]), time.perf_counter()
    images = np.asarray(sharding.to_host(compiled(*args)))[:n]
    wall, cpu = time.perf_counter() - start, sum(os.times()[:2]) - cpu0
    return dict(sampler=label, spacing=spec.resolved_spacing, variant=spec.variant,
                num_steps=spec.steps(model.diffusion.num_timesteps), nfe=spec.nfe(model.diffusion),
                num_samples=n, compile_s=round(compile_s, 2),
                s_per_1000=round(wall / n * 1000, 2), cpu_s_per_1000=round(cpu / n * 1000, 2),
                **metric.score(images))


def table(rows: list[dict], metric) -> str:
    """Markdown: one row per (sampler, spacing), one column per NFE, cells 'quality (s/1k)'."""
    nfes = sorted({r["nfe"] for r in rows})
    keys = list(dict.fromkeys((r["sampler"], r["spacing"]) for r in rows))
    extra = " / precision / recall" if metric.name == "digits" else ""
    head = ("| sampler | spacing | " + " | ".join(f"NFE {k}" for k in nfes) + " |\n"
            + "|---|---|" + "---|" * len(nfes) + "\n")
    lines = []
    for sampler, spacing in keys:
        cells = []
        for k in nfes:
            r = next((r for r in rows if (r["sampler"], r["spacing"], r["nfe"]) ==
                      (sampler, spacing, k)), None)
            if r is None:
                cells.append("")
                continue
            q = f"{r[metric.key]:.2f}" + (f" / {r['precision']:.2f} / {r['recall']:.2f}"
                                          if extra else "")
            cells.append(f"{q} ({r['s_per_1000']:.0f} s)")
        lines.append(f"| {sampler} | {spacing} | " + " | ".join(cells) + " |")
    return (f"{metric.key}{extra} (seconds per 1,000 images)\n\n" + head + "\n".join(lines))


def plot(rows: list[dict], metric, path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sampler, spacing in dict.fromkeys((r["sampler"], r["spacing"]) for r in rows):
        pts = sorted((r["nfe"], r[metric.key]) for r in rows
                     if (r["sampler"], r["spacing"]) == (sampler, spacing))
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{sampler} ({spacing})")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel(metric.key + " (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with epath.Path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    nfes = [int(k) for k in FLAGS.nfe]
    thresholds = [t.lower() in ("true", "1", "yes") for t in FLAGS.thresholding]
    for name in FLAGS.samplers:
        if name.partition(":")[0] not in config_lib.SAMPLERS:
            raise app.UsageError(f"--samplers: {name!r} is not one of {config_lib.SAMPLERS}")
    metric = make_metric()
    if FLAGS.config:
        model = ddpm_jax.create(common.load_config(FLAGS.config))
    else:
        model = ddpm_jax.load(FLAGS.workdir)
    grid = settings(model, FLAGS.samplers, FLAGS.spacings, nfes, thresholds)
    out_dir = epath.Path(FLAGS.out_dir or FLAGS.workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    floor = metric.floor()
    if floor:
        print(json.dumps(dict(sampler="real test digits", **floor)), flush=True)
    rows = []
    for label, m, spec in grid:
        rows.append(measure(label, m, spec, metric, FLAGS.num_samples, FLAGS.seed))
        print(json.dumps(rows[-1]), flush=True)
        (out_dir / "quality_vs_nfe.json").write_text(json.dumps(
            dict(checkpoint=str(model.source), step=model.step, metric=metric.name,
                 floor=floor, rows=rows), indent=1))
    plot(rows, metric, str(out_dir / "quality_vs_nfe.png"))
    print(table(rows, metric))
    print(f"wrote {out_dir / 'quality_vs_nfe.json'} and {out_dir / 'quality_vs_nfe.png'}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

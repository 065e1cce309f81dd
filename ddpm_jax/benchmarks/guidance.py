"""Classifier-free guidance on the digits: class accuracy and fidelity against the scale w.

  python -m ddpm_jax.benchmarks.guidance --workdir=runs/digits_cond --out=docs/guidance.png

For each w of ``--guidance`` it samples ``--num_per_class`` images of every digit (the same
noise for every w) from a class-conditional digits checkpoint, guided with
eps = (1 + w) eps(x, y) - w eps(x, null), and reports:

* ``class_share``: the share of samples that the project's digits network
  (``ddpm_jax.metrics.digits``, trained once on the real training digits) assigns to the class
  asked for (``evaluate --metrics=digits_class_share``), and its lowest value over the classes;
* the digits metric of the same samples (``evaluate --metrics=digits_fd,precision,recall``):
  ``digits_fd`` (the Fréchet distance to the real test digits in that network's features),
  ``digits_fd_ratio`` (over the real training digits' distance), ``precision`` and ``recall``
  (k = 3) and ``digits_confidence`` (the network's mean top probability);
* ``pixel_fd``: the Fréchet distance between the samples' and the 1,797 real digits' pixels
  (64 dimensions, scaled to [0, 1], float64), a second, network-free view of the distribution.
  Class-balanced samples against the (nearly balanced) real digits.

Prints one JSON line per w and a Markdown table, and writes a two-panel plot to ``--out``.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import flags, logging

from ddpm_jax import cli, errors

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The program's flags (defined when it runs, so that importing the module defines none)."""
    flags.DEFINE_string("workdir", "runs/digits_cond", "Workdir of a class-conditional digits "
                        "run.")
    flags.DEFINE_integer("num_per_class", 100, "Samples of each digit per guidance scale.",
                         lower_bound=1)
    flags.DEFINE_list("guidance", ["0", "0.5", "1", "2", "4"], "Guidance scales w.")
    flags.DEFINE_string("sampler", "ddim", "Sampler.")
    flags.DEFINE_integer("num_steps", 100, "Sampler steps.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Sampling seed (the same noise for every w).")
    flags.DEFINE_string("out", None, "Where to write the plot (PNG); none without.")


def real_pixels() -> np.ndarray:
    """The 1,797 real digits as float64 [N, 64] in [0, 1] (their stored uint8 values / 255)."""
    from sklearn.datasets import load_digits  # noqa: PLC0415

    return np.round(load_digits().data * 255.0 / 16.0) / 255.0


def pixel_fd(images_uint8: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance of the pixels of uint8 images to reference pixels (float64)."""
    from ddpm_jax.metrics import frechet_distance  # noqa: PLC0415

    x = images_uint8.reshape(len(images_uint8), -1).astype(np.float64) / 255.0
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), reference.mean(0),
                            np.cov(reference, rowvar=False))


def measure(model, scales, *, num_per_class: int, sampler: str, num_steps: int,
            seed: int) -> list[dict]:
    """One row per guidance scale (see the module docstring)."""
    if model.num_classes != 10 or model.config.data.dataset != "digits":
        raise errors.UserError(f"{model.source}: needs a class-conditional digits model "
                               f"(configs/digits_cond.py), got dataset "
                               f"{model.config.data.dataset} with {model.num_classes} classes")
    from ddpm_jax.metrics import digits as dm  # noqa: PLC0415

    ref = dm.load_reference(model.config.data.data_dir)
    reference = real_pixels()
    labels = np.arange(10 * num_per_class, dtype=np.int32) % 10
    rows = []
    for w in scales:
        images = model.sample(jax.random.key(seed), len(labels), sampler=sampler,
                              num_steps=num_steps, labels=labels, guidance=float(w))
        out = dm.digits_features(images, ref.params)
        scores = dm.scores_from_outputs(out["features"], out["probs"], ref)
        hit = out["probs"].argmax(1) == labels
        rows.append(dict(
            guidance=float(w), class_share=float(hit.mean()),
            min_class_share=float(min(hit[labels == c].mean() for c in range(10))),
            **{k: scores[k] for k in ("digits_fd", "digits_fd_ratio", "precision", "recall",
                                      "digits_confidence")},
            pixel_fd=pixel_fd(images, reference), num_samples=int(len(labels)),
            sampler=sampler, num_steps=num_steps))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| w (diffusers scale 1 + w) | in the requested class | lowest class | "
             "digits_fd (ratio) | precision | recall | confidence | pixel FD |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['guidance']:g} ({1 + r['guidance']:g}) | {r['class_share']:.3f} | "
              f"{r['min_class_share']:.2f} | {r['digits_fd']:.1f} ({r['digits_fd_ratio']:.2f}) | "
              f"{r['precision']:.2f} | {r['recall']:.2f} | {r['digits_confidence']:.3f} | "
              f"{r['pixel_fd']:.3f} |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    w = [r["guidance"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(7.5, 3.2), dpi=80)
    a.plot(w, [r["class_share"] for r in rows], "o-", label="all classes")
    a.plot(w, [r["min_class_share"] for r in rows], "s--", label="lowest class")
    a.set(xlabel="guidance w", ylabel="share in the requested class", ylim=(0, 1.02))
    a.legend(loc="lower right", fontsize=8)
    b.plot(w, [r["digits_fd_ratio"] for r in rows], "o-", color="C3", label="digits_fd ratio")
    b.set(xlabel="guidance w", ylabel="digits_fd ratio (1 = real digits)")
    b2 = b.twinx()
    b2.plot(w, [r["precision"] for r in rows], "s--", color="C2", label="precision")
    b2.plot(w, [r["recall"] for r in rows], "^:", color="C4", label="recall")
    b2.set(ylabel="precision, recall", ylim=(0, 1.02))
    b.legend(handles=b.get_lines() + b2.get_lines(), loc="upper center", fontsize=7, ncol=3,
             bbox_to_anchor=(0.5, -0.22), frameon=False)
    fig.suptitle(f"Classifier-free guidance on the digits ({rows[0]['num_samples']} samples, "
                 f"{rows[0]['sampler']} {rows[0]['num_steps']} steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    import ddpm_jax  # noqa: PLC0415

    logging.set_verbosity(logging.ERROR)
    try:
        scales = [float(w) for w in FLAGS.guidance]
    except ValueError:
        raise errors.UserError(f"--guidance={','.join(FLAGS.guidance)} must be numbers") from None
    model = ddpm_jax.load(FLAGS.workdir)
    rows = measure(model, scales, num_per_class=FLAGS.num_per_class, sampler=FLAGS.sampler,
                   num_steps=FLAGS.num_steps, seed=FLAGS.seed)
    for row in rows:
        print(json.dumps(row), flush=True)
    print(table(rows))
    if FLAGS.out:
        print(f"plot: {plot(rows, FLAGS.out)}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

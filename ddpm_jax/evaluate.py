"""Bits/dim of a checkpoint on a dataset split (the paper's NLL column).

  python -m ddpm_jax.evaluate --workdir=runs/digits --num_examples=300

Evaluates the full variational bound (T network evaluations per batch, one compiled scan) on the
first ``num_examples`` images of ``config.data.eval_split`` and writes ``bpd_<split>.json``
beside the checkpoint with the mean, its standard error and the mean of each bound term.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
from absl import flags, logging
from etils import epath

from ddpm_jax import api, cli, datasets, sharding

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir, checkpoints directory or step directory.")
flags.DEFINE_string("split", None, "Split to evaluate (default: config.data.eval_split).")
flags.DEFINE_integer("num_examples", None, "First N images of the split (default: all).",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Images per compiled batch.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the x_t draws of the bound.")
flags.DEFINE_string("data_dir", None, "Override config.data.data_dir.")
flags.DEFINE_bool("raw", False, "Use the raw parameters instead of the EMA weights.")
cli.define_process_flags()


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


def main():
    if FLAGS.workdir is None:
        cli.fail("--workdir is required")
    logging.set_verbosity(logging.ERROR)  # Orbax warns on every read-only open
    cli.start_processes()
    model = api.load(FLAGS.workdir, ema=not FLAGS.raw)
    config = model.config
    split = FLAGS.split or config.data.eval_split
    if FLAGS.data_dir is not None:
        with config.ignore_type():
            config.data.data_dir = FLAGS.data_dir
    images = datasets.load_split(config, split, FLAGS.num_examples)
    result = evaluate_bpd(model, images, batch_size=FLAGS.batch_size, seed=FLAGS.seed)
    result.update(split=split, checkpoint_step=model.step, ema=not FLAGS.raw)
    out = epath.Path(model.source).parent / f"bpd_{split}.json"
    if jax.process_index() == 0:
        out.write_text(json.dumps(result, indent=2))
    print(f"{result['bits_per_dim']:.4f} bits/dim (stderr {result['stderr']}) on "
          f"{result['num_examples']} images of {split}, checkpoint step {model.step}; "
          f"written to {out}")


if __name__ == "__main__":
    cli.run(main)

"""Samples from a trained (or imported) DDPM checkpoint.

  python sample.py --workdir=runs/digits --num_samples=64
  python sample.py --workdir=runs/cifar10 --num_samples=50000 --sampler=ddim --num_steps=100

Writes OUTPUT_DIR/samples.npz (uint8 NHWC, key ``images``), samples.png and samples.json;
OUTPUT_DIR defaults to the workdir. A killed run resumes from its last finished batch when
started again with the same flags.
"""

import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint is used).")
flags.DEFINE_string("checkpoint", None, "A checkpoints directory or one step directory.")
flags.DEFINE_string("output_dir", None, "Where to write samples (default: the workdir).")
flags.DEFINE_integer("num_samples", 64, "Number of images.", lower_bound=1)
flags.DEFINE_integer("batch_size", None, "Images per compiled batch (default: config).",
                     lower_bound=1)
flags.DEFINE_enum("sampler", None, ["ancestral", "ddim"],
                  "Reverse process (default: config.sampling.sampler).")
flags.DEFINE_integer("num_steps", None, "Steps S < T: DDIM / respaced chain on i * (T // S) "
                     "(default: config.sampling.num_steps; None = all T steps).")
flags.DEFINE_float("eta", None, "DDIM noise, 0 = deterministic (default: config.sampling.eta).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("progressive", False, "Also write progressive.png and trajectory.png.")
flags.DEFINE_integer("progressive_every", None,
                     "Chain steps between columns of the progressive strip (default: 10 columns).",
                     lower_bound=1)
flags.DEFINE_bool("raw", False, "Use the raw parameters instead of the EMA weights.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
        raise app.UsageError("give exactly one of --workdir or --checkpoint")
    logging.set_verbosity(logging.ERROR)  # Orbax reports every file, and read-only opens
    from ddpm_jax import api, checkpoints, generate

    source = FLAGS.workdir or FLAGS.checkpoint
    try:
        model = api.load(source, ema=not FLAGS.raw)
    except checkpoints.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    c = model.config.sampling
    sampler = FLAGS.sampler or c.sampler
    num_steps = FLAGS.num_steps if FLAGS.num_steps is not None else (
        c.num_steps if FLAGS.sampler in (None, c.sampler) else None)
    eta = FLAGS.eta if FLAGS.eta is not None else c.eta
    out = FLAGS.output_dir or FLAGS.workdir or os.path.dirname(
        checkpoints.locate(FLAGS.checkpoint)[0])
    print(f"{model.num_params:,} parameters, checkpoint step {model.step}, "
          f"{sampler} sampler, {num_steps or model.config.diffusion.num_timesteps} "
          f"steps; writing to {out}", flush=True)
    try:
        path = generate.generate(
            model, out, num_samples=FLAGS.num_samples, seed=FLAGS.seed, sampler=sampler,
            num_steps=num_steps, eta=eta, batch_size=FLAGS.batch_size)
        extra = ""
        if FLAGS.progressive:
            p1, p2 = generate.write_progressive(
                model, out, seed=FLAGS.seed, every=FLAGS.progressive_every,
                sampler=sampler, num_steps=num_steps, eta=eta)
            extra = f"\n  progressive:  {p1}\n  trajectory:   {p2}"
    except (generate.SampleSpecError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"Wrote {FLAGS.num_samples} samples.\n  images:       {path} (key 'images')\n"
          f"  grid:         {os.path.join(out, 'samples.png')}{extra}")


if __name__ == "__main__":
    app.run(main)

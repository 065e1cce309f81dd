"""Samples from a trained (or imported) DDPM checkpoint.

  python sample.py --workdir=runs/digits --num_samples=64
  python sample.py --workdir=runs/cifar10 --num_samples=50000 --sampler=ddim --num_steps=100
  python sample.py --workdir=runs/cifar10 --sampler=dpm_solver++ --num_steps=20
  python sample.py --workdir=runs/digits_cond --num_samples=100 --labels=all --guidance=1

Writes OUTPUT_DIR/samples.npz (uint8 NHWC, key ``images``; for a class-conditional model with
``--labels`` also ``labels``, int32 [N]), samples.png and samples.json;
OUTPUT_DIR defaults to the workdir. A killed run resumes from its last finished batch when
started again with the same flags. Every flag is checked before OUTPUT_DIR is touched. Paths may
be ``gs://``; on several hosts, start the same command on every host (process flags as for
train.py): every device of every process samples, process 0 writes.
"""

from absl import flags, logging

from ddpm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint is used).")
flags.DEFINE_string("checkpoint", None, "A checkpoints directory or one step directory.")
flags.DEFINE_string("output_dir", None, "Where to write samples (default: the workdir).")
flags.DEFINE_integer("num_samples", 64, "Number of images.", lower_bound=1)
flags.DEFINE_integer("batch_size", None, "Images per compiled batch (default: config).",
                     lower_bound=1)
cli.define_sampler_flags()
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("progressive", False, "Also write progressive.png and trajectory.png.")
flags.DEFINE_integer("progressive_every", None, "Chain steps between columns of the progressive "
                     "strip; must divide the steps (default: about 10 columns).", lower_bound=1)
flags.DEFINE_bool("raw", False, "Use the raw parameters instead of the EMA weights.")
flags.DEFINE_string("labels", None, "Classes to sample from a class-conditional model: 3, "
                    "0,1,2 (in turn, as many of each) or all (every class, as many of each).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance w >= 0 with --labels: eps = "
                   "(1 + w) eps(x, y) - w eps(x, null), diffusers' guidance_scale = 1 + w "
                   "(default: config.sampling.guidance).")
cli.define_lock_flag("output folder")
cli.define_process_flags()


def main():
    import dataclasses  # noqa: PLC0415

    from ddpm_jax import api, checkpoints, generate, sampling  # noqa: PLC0415

    if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
        cli.fail("give exactly one of --workdir or --checkpoint")
    logging.set_verbosity(logging.ERROR)  # Orbax reports every file it reads
    cli.start_processes()
    model = api.load(FLAGS.workdir or FLAGS.checkpoint, ema=not FLAGS.raw)
    spec = sampling.spec_from_config(
        model.config, **cli.sampler_overrides(),
        record_every=FLAGS.progressive_every if FLAGS.progressive else None)
    out = FLAGS.output_dir or FLAGS.workdir or str(checkpoints.locate(FLAGS.checkpoint)[0].parent)
    print(f"{model.num_params:,} parameters, checkpoint step {model.step}, {spec.sampler} "
          f"sampler ({spec.variant}), {spec.resolved_spacing} spacing, "
          f"{spec.nfe(model.diffusion)} network calls per image; writing to {out}", flush=True)
    path = generate.generate(model, out, num_samples=FLAGS.num_samples, seed=FLAGS.seed,
                             spec=dataclasses.replace(spec, record_every=None),
                             batch_size=FLAGS.batch_size, labels=FLAGS.labels,
                             guidance=FLAGS.guidance, take_over_lock=FLAGS.take_over_lock)
    extra = ""
    if FLAGS.progressive:
        p1, p2 = generate.write_progressive(model, out, seed=FLAGS.seed, spec=spec)
        extra = f"\n  progressive:  {p1}\n  trajectory:   {p2}"
    print(f"Wrote {FLAGS.num_samples} samples.\n  images:       {path} (key 'images')\n"
          f"  grid:         {out}/samples.png{extra}")


if __name__ == "__main__":
    cli.run(main)

"""Trains a DDPM: ``python train.py --config=configs/digits.py --workdir=runs/digits``.

Resumes automatically when WORKDIR holds a checkpoint. Config values can be overridden with
``--config.path.to.key=value``. WORKDIR may be a ``gs://`` bucket. On several hosts, start the
same command on every host (``--coordinator_address --num_processes --process_id``, the
``JAX_*`` variables, or JAX's detection on Cloud TPU, SLURM and Open MPI).

Exit codes: 0 done; 2 bad config, data, workdir or checkpoint (nothing trained); 3 non-finite
loss or gradient (the last checkpoint is intact); 143 stopped by SIGTERM, 130 by SIGINT, after
committing a checkpoint of the current step.
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from ddpm_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, logs and "
                    "samples.")
cli.define_lock_flag("workdir")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_process_flags()


def main():
    from ddpm_jax import training  # noqa: PLC0415 - flags parse before JAX starts

    logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
    cli.start_processes()
    try:
        training.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                    take_over_lock=FLAGS.take_over_lock)
    except training.Preempted as e:
        print(f"{e}; the checkpoint of step {e.step} is committed, rerun the same command to "
              "resume", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    cli.run(main)

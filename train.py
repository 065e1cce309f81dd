"""Trains a DDPM: ``python train.py --config=configs/digits.py --workdir=runs/digits``.

Resumes automatically when WORKDIR holds a checkpoint. Config values can be overridden with
``--config.path.to.key=value``. Exit codes: 0 done; 2 bad config, data, workdir or checkpoint
(nothing trained); 3 non-finite loss or gradient (the last checkpoint is intact);
143 / 130 stopped by SIGTERM / SIGINT after committing a checkpoint of the current step.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ddpm_jax import checkpoints, config_lib, input_pipeline, training

    logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
    training.maybe_initialize_distributed()
    try:
        training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (config_lib.ConfigError, input_pipeline.DataError, checkpoints.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(training.EXIT_CONFIG)
    except training.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(training.EXIT_NONFINITE)
    except training.Preempted as e:
        print(f"{e}; the checkpoint of step {e.step} is committed, rerun the same command to "
              "resume", file=sys.stderr)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    app.run(main)

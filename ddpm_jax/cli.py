"""The command-line layer of ``train.py``, ``sample.py`` and the ``python -m ddpm_jax.*`` tools.

``run(main)`` parses the flags and runs ``main``. A ``UserError`` (a bad flag, config value,
dataset, path or checkpoint) is printed as one line ``error: <message>`` and ends the program with
its exit code (2 unless the error says otherwise); any other exception is a bug and keeps its
traceback. Flag mistakes are one line too, unknown ``--config.a.b`` keys included (with the
nearest valid keys).

``define_process_flags()`` adds ``--coordinator_address``, ``--num_processes``, ``--process_id``
and ``--distributed_timeout`` to a program; ``start_processes()`` then joins the other processes
(``ddpm_jax.distributed.initialize``).
"""

from __future__ import annotations

import ast
import os
import runpy
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from ddpm_jax import errors


def fail(message: str, code: int = 2) -> None:
    """Prints ``error: <message>`` on stderr and exits with ``code``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(main: Callable[[], None]) -> None:
    """Parses the flags, then runs ``main()``; user errors become one line and an exit code."""

    def wrapped(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            main()
        except errors.UserError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted (Ctrl-C); what was finished is kept: rerun the same command to "
                 "continue", 130)

    app.run(wrapped, flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's parsing with every mistake as one line and exit code 2."""
    _check_config_file(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(errors.first_line(e))
    except (AttributeError, KeyError) as e:  # an unknown --config.a.b override key
        fail(_unknown_override(argv) or f"bad config override ({e})")
    return []  # not reached


def _check_config_file(argv: Sequence[str]) -> None:
    """A ``--config`` file that is missing, does not parse or has no ``get_config``: one line
    (before ml_collections loads it, which would print its own traceback)."""
    args = list(argv)
    value = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if value is None and "--config" in args[:-1]:
        value = args[args.index("--config") + 1]
    if value is None:
        return
    file = value.partition(":")[0]
    if not os.path.isfile(file):
        fail(f"--config={value}: there is no file {file}; give a config file such as "
             "configs/digits.py")
    try:
        with open(file) as f:
            tree = ast.parse(f.read(), file)
    except (SyntaxError, ValueError, OSError) as e:
        where = f" at line {e.lineno}" if getattr(e, "lineno", None) else ""
        fail(f"--config={value}: {file} cannot be read as Python{where} "
             f"({getattr(e, 'msg', None) or e}); fix the file")
    if not any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body):
        fail(f"--config={value}: {file} defines no get_config(); a config file returns its "
             "ConfigDict from get_config()")


def _unknown_override(argv: Sequence[str]) -> str | None:
    """Names the first ``--config.a.b=v`` whose key the config file does not have."""
    from ddpm_jax import config_lib  # noqa: PLC0415 - keeps `--help` light

    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return None
    file, _, arg = path.partition(":")
    get_config = runpy.run_path(file)["get_config"]
    config = get_config(arg) if arg else get_config()
    for a in argv:
        if a.startswith("--config.") and "=" in a:
            key = a[len("--config."):].split("=", 1)[0]
            if config_lib.lookup(config, key) is config_lib.MISSING:
                return config_lib.unknown_key_message(config, key)
    return None


def define_sampler_flags() -> None:
    """``--sampler``, ``--num_steps``, ``--spacing``, ``--eta``, ``--thresholding`` and
    ``--churn`` (each defaults to ``config.sampling``; the names are ``config_lib.SAMPLERS`` /
    ``SPACINGS``)."""
    from ddpm_jax import config_lib  # noqa: PLC0415

    flags.DEFINE_enum("sampler", None, list(config_lib.SAMPLERS),
                      "Reverse process (default: config.sampling.sampler): ancestral "
                      "(Algorithm 2), ddim (Song et al., x0 not clipped), ddim_clipped / "
                      "ddim_iddpm (x0 clipped as diffusers / Improved DDPM), dpm_solver++ (2M), "
                      "dpm_solver++_3m (3M), heun (EDM).")
    flags.DEFINE_integer("num_steps", None, "Steps S (default: config.sampling.num_steps, "
                         "else the sampler's own: T, 20 for the DPM-Solvers, 18 for heun).")
    flags.DEFINE_enum("spacing", None, list(config_lib.SPACINGS),
                      "Which S of the T steps (default: config.sampling.spacing, else the "
                      "sampler's own: uniform, linspace for the DPM-Solvers, karras for heun).")
    flags.DEFINE_float("eta", None, "DDIM noise, 0 = deterministic (default: "
                       "config.sampling.eta).")
    flags.DEFINE_bool("thresholding", None, "The DPM-Solvers clip their predicted x0 to [-1, 1] "
                      "(default: config.sampling.thresholding).")
    flags.DEFINE_float("churn", None, "heun: EDM's S_churn, noise added at every step (0 = "
                       "deterministic; default: config.sampling.churn).")


def sampler_overrides() -> dict:
    """The sampler flags as keywords of ``sampling.spec_from_config``."""
    f = flags.FLAGS
    return dict(sampler=f.sampler, num_steps=f.num_steps, spacing=f.spacing, eta=f.eta,
                thresholding=f.thresholding, churn=f.churn)


def define_process_flags() -> None:
    """The flags that describe several processes (each defaults to JAX_* or JAX's detection)."""
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS, or JAX's "
                        "detection on Cloud TPU, SLURM, Open MPI and Kubernetes).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (default: "
                         "$JAX_NUM_PROCESSES or detected).", lower_bound=1)
    flags.DEFINE_integer("process_id", None, "This process, in [0, num_processes) (default: "
                         "$JAX_PROCESS_ID or detected).", lower_bound=0)
    flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for every process to "
                         "join before giving up.", lower_bound=1)


def define_lock_flag(folder: str) -> None:
    """``--take_over_lock``: take over ``folder``'s lock held by a run on another host."""
    flags.DEFINE_bool("take_over_lock", False, f"Take over the {folder}'s lock held by a run on "
                      "another host that is gone (a run on this host that no longer runs is "
                      "detected by itself).")


def start_processes() -> None:
    """Joins the other processes, as the process flags and the environment describe."""
    from ddpm_jax import distributed  # noqa: PLC0415

    f = flags.FLAGS
    distributed.initialize(coordinator_address=f.coordinator_address,
                           num_processes=f.num_processes, process_id=f.process_id,
                           timeout=f.distributed_timeout)

"""Shared fixtures: the embedded digits prepared once per session, small configs; the one
harness that runs a program with simulated devices (``run_python``, ``run_script``); and the
commands run in the test process itself (``run_script_here``, ``run_command_here``)."""

import contextlib
import json
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for the session, shared by this process and every program
# the tests start (they inherit the environment): dozens of train.py / sample.py runs compile the
# same steps of the test config, and reading them back instead of compiling again halves their
# time. A compiled program read from the cache is the one that was compiled, so results do not
# change. Set before anything imports JAX; a cache the caller chose is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="ddpm_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
else:
    _XLA_CACHE = None


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE is not None:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A tfds data_dir holding the prepared embedded digits (no network)."""
    from configs import test as test_config
    from ddpm_jax import datasets

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    config = test_config.get_config()
    config.data.data_dir = data_dir
    datasets.prepare_dataset(datasets.DataSpec.from_config(config))
    return data_dir


@pytest.fixture()
def test_cfg(digits_dir):
    """The tiny test config reading the session's digits."""
    from configs import test as test_config

    config = test_config.get_config()
    config.data.data_dir = digits_dir
    return config


def initial_params(config, seed: int = 0) -> dict:
    """The freshly initialised U-Net parameters of ``config`` (``unet.create_model``)."""
    from ddpm_jax import unet

    return unet.split(unet.create_model(unet.ModelSpec.from_config(config), seed=seed))[1]


def perturbed(params, key, scale: float = 0.05):
    """``params`` plus ``scale`` times N(0, 1) noise: non-trivial weights (the near-zero layers
    would hide most of the network). One flat draw for all leaves: one small compile."""
    import jax
    import numpy as np

    from ddpm_jax import rng

    leaves, tree = jax.tree.flatten(params)
    noise = np.asarray(rng.normal(key, (sum(p.size for p in leaves),)))
    parts = np.split(noise, np.cumsum([p.size for p in leaves])[:-1])
    return jax.tree.unflatten(tree, [p + scale * n.reshape(p.shape).astype(p.dtype)
                                     for p, n in zip(leaves, parts, strict=True)])


def train_program(train_step, state, steps_per_dispatch: int = 1):
    """``train_step`` compiled as train.py compiles it (``training.compile_train_step`` on this
    process's devices, ``steps_per_dispatch`` steps per call), so that the suite's compilation
    cache holds one program for the test config's step instead of one per test. It is called
    with its inputs laid out as train.py lays them out (a copy of the state, since the program
    donates it; the batch over the data axis; the key replicated): uncommitted arrays would
    lower to other StableHLO (other names of deduplicated functions), which the cache would not
    find."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ddpm_jax import sharding, training

    mesh = sharding.create_mesh()
    step = training.compile_train_step(train_step, mesh, state,
                                       steps_per_dispatch=steps_per_dispatch)
    layout = sharding.train_state_shardings(mesh, state)
    data = sharding.data_sharding(mesh) if steps_per_dispatch == 1 else NamedSharding(
        mesh, P(None, sharding.DATA))
    replicated = sharding.replicated(mesh)
    return lambda state, batch, key: step(
        jax.device_put(jax.tree.map(np.asarray, state), layout), jax.device_put(batch, data),
        sharding.put(key, replicated))


def python_env(devices: int = 1, env=None, xla_flags: str = "") -> dict:
    """The environment of a child Python: ``devices`` simulated CPU devices (and ``xla_flags``),
    the repo importable, TensorFlow quiet; ``env`` on top."""
    flags = f"--xla_force_host_platform_device_count={devices} {xla_flags}".strip()
    out = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               TF_CPP_MIN_LOG_LEVEL="3")
    out.update(env or {})
    return out


def popen_python(args, *, devices: int = 1, env=None, xla_flags: str = ""):
    """Starts ``python args...`` from the repo root (text pipes for stdout and stderr)."""
    import subprocess

    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT,
                            env=python_env(devices, env, xla_flags), text=True,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def run_python(args, *, devices: int = 1, timeout: int = 600, env=None, xla_flags: str = "",
               **kwargs):
    """Runs ``python args...`` from the repo root with ``devices`` simulated CPU devices."""
    import subprocess

    return subprocess.run([sys.executable, *args], cwd=ROOT,
                          env=python_env(devices, env, xla_flags),
                          text=True, capture_output=True, timeout=timeout, **kwargs)


def run_script(name: str, *args, devices: int = 1, timeout: int = 600) -> dict:
    """Runs ``tests/scripts/<name>`` with ``devices`` simulated devices; its last stdout line,
    a JSON object, is returned (the test fails with the script's stderr if it fails).

    A script that defines ``result(*args)`` (the object it prints) runs in this process instead
    when this process has ``devices`` devices: no interpreter to start, and the programs it
    compiles are shared with the other tests."""
    import runpy

    path = os.path.join(ROOT, "tests", "scripts", name)
    if "def result(" in open(path).read():
        import jax

        if jax.device_count() == devices:
            result = runpy.run_path(path)["result"](*map(str, args))
            return json.loads(json.dumps(result))  # what the script would have printed
    proc = run_python([os.path.join("tests", "scripts", name), *map(str, args)], devices=devices,
                      timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def script_module(name: str):
    """``tests/scripts/<name>.py`` imported as a module (its helpers, not its ``__main__``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "tests", "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_until(predicate, procs, timeout: float = 300.0, poll: float = 0.05) -> bool:
    """Polls ``predicate()`` until it holds (True), a process in ``procs`` exits or ``timeout``
    seconds pass (False)."""
    import time

    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if any(p.poll() is not None for p in procs):
            return False
        time.sleep(poll)
    return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(args, *, num_processes: int, devices: int, env=None,
                    started: int | None = None, xla_flags: str = ""):
    """Starts ``python args...`` as ``num_processes`` JAX processes on 127.0.0.1 (a free port),
    each with ``devices`` simulated CPU devices; returns the Popen objects. ``started``: only
    the first that many are started (the others never join)."""
    port = free_port()
    procs = []
    for i in range(num_processes if started is None else started):
        cluster = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i))
        procs.append(popen_python(args, devices=devices, env={**cluster, **(env or {})},
                                  xla_flags=xla_flags))
    return procs


def finish(procs, timeout: float = 600):
    """Waits for every process (killing all of them past ``timeout`` seconds or when the test
    fails); returns [(returncode, stdout, stderr)]."""
    import time

    deadline = time.time() + timeout
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=max(1.0, deadline - time.time()))
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def run_processes(args, *, num_processes: int = 2, devices: int = 2, timeout: float = 600,
                  env=None, xla_flags: str = ""):
    """``start_processes`` then ``finish``; asserts that every process succeeded."""
    results = finish(start_processes(args, num_processes=num_processes, devices=devices, env=env,
                                     xla_flags=xla_flags), timeout)
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"process {i} exited {code}: {err[-3000:]}"
    return results


def train_here(workdir, digits_dir, steps: int, **overrides) -> str:
    """``train.py --config=configs/test.py`` to ``steps`` with ``config.training`` overrides, run
    in this process (its compiled programs are shared with the other tests; runs in other
    processes are compared with it), or in a subprocess where this process has other devices
    than train.py's single one. Returns what the run wrote on stderr."""
    import contextlib
    import io

    import jax

    if jax.device_count() != 1:
        proc = run_python(["train.py", "--config=configs/test.py", f"--workdir={workdir}",
                           f"--config.data.data_dir={digits_dir}",
                           f"--config.training.num_train_steps={steps}",
                           *(f"--config.training.{k}={v}" for k, v in overrides.items())])
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr
    from configs import test as test_config
    from ddpm_jax import training

    config = test_config.get_config()
    config.data.data_dir = digits_dir
    config.training.num_train_steps = steps
    config.training.update(overrides)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert int(training.train_and_evaluate(config, str(workdir)).step) == steps
    return err.getvalue()


def sample_here(workdir, output_dir, *, num_samples: int, batch_size: int, sampler: str,
                num_steps: int, seed: int = 0) -> str:
    """What ``sample.py --workdir=W --output_dir=O --num_samples --batch_size --sampler
    --num_steps`` writes, made in this process (one device, the programs the other tests
    compiled): ``sample.py``'s own steps, minus its printing. Returns the path of samples.npz."""
    import jax

    import ddpm_jax
    from ddpm_jax import generate, sampling

    assert jax.device_count() == 1, "sample_here stands for a one-device sample.py"
    model = ddpm_jax.load(str(workdir))
    spec = sampling.spec_from_config(model.config, sampler=sampler, num_steps=num_steps,
                                     spacing=None, eta=None, thresholding=None)
    return generate.generate(model, str(output_dir), num_samples=num_samples, seed=seed,
                             spec=spec, batch_size=batch_size, progress=False)


_COMMAND_MODULES = ("ddpm_jax", "__main__", "sample", "train")  # where command flags come from


def _flags_of_commands(flag_values, also_absl: bool = False) -> list:
    """(module name, flag) of every flag a command of the project defined (``also_absl``: and
    every flag absl defined, such as ml_collections' ``--config.a.b`` overrides)."""
    return [(m, f) for m, fs in flag_values.flags_by_module_dict().items()
            if m.split(".")[0] in _COMMAND_MODULES or (also_absl and m.startswith("absl.flags"))
            for f in fs]


def _unregister(flag_values, flag) -> None:
    for name in (flag.name, flag.short_name):
        if name and name in flag_values:
            delattr(flag_values, name)


@contextlib.contextmanager
def command_flags():
    """absl's global flags without any command's flags while the block runs (the libraries'
    own, absl's and grain's, stay, and so do those a library defines meanwhile): a command
    defines and parses its flags as in a fresh interpreter; the flags set aside (another
    command's, with their values) are back afterwards."""
    import logging

    from absl import flags
    from absl import logging as absl_logging

    flag_values = flags.FLAGS
    parsed, aside = flag_values.is_parsed(), _flags_of_commands(flags.FLAGS)
    # A command's absl.app installs absl's log handler and a verbosity: the process's logging
    # is put back as it was (another test counts the lines on stderr).
    handlers, level = list(logging.root.handlers), logging.root.level
    verbosity = absl_logging.get_verbosity()
    for _, flag in aside:
        _unregister(flag_values, flag)
    flag_values.unparse_flags()
    before = {id(f) for _, f in _flags_of_commands(flag_values, also_absl=True)}
    try:
        yield flag_values
    finally:
        for _, flag in _flags_of_commands(flag_values, also_absl=True):
            if id(flag) not in before:
                _unregister(flag_values, flag)
        for module, flag in aside:
            flag_values[flag.name] = flag
            flag_values.register_flag_by_module(module, flag)
        flag_values.mark_as_parsed() if parsed else flag_values.unparse_flags()
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
        absl_logging.set_verbosity(verbosity)


def run_command_here(module_name: str, *args) -> tuple[str, str]:
    """``python -m MODULE ARGS`` run in this process, for a command whose ``__main__`` is
    ``define_flags()`` then ``main`` (every benchmark module): (stdout, stderr). Its compiled
    programs and imports are shared with the other tests; an exception in ``main`` fails the
    test with its traceback."""
    import importlib
    import inspect
    import io

    module = importlib.import_module(module_name)
    out, err = io.StringIO(), io.StringIO()
    with command_flags() as flag_values:
        module.define_flags()
        rest = flag_values([module_name, *map(str, args)])
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main(rest) if inspect.signature(module.main).parameters else module.main()
    return out.getvalue(), err.getvalue()


def run_script_here(script: str, *args) -> tuple[int, str, str]:
    """``python SCRIPT ARGS`` (``train.py``, ``sample.py``: flags at the top) or ``python -m
    MODULE ARGS`` (``run_script_here("-m", "ddpm_jax.evaluate", ...)``: flags defined by the
    module's ``define_flags()``), a command whose ``__main__`` ends in ``cli.run(main)``, run in
    this process: (exit code, stdout, stderr). One device, the programs the other tests compiled;
    an exception other than the exit fails the test with its traceback."""
    import importlib
    import io
    import runpy

    from ddpm_jax import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with command_flags(), pytest.MonkeyPatch.context() as patch:
        if script == "-m":
            module, args = importlib.import_module(args[0]), args[1:]
            module.define_flags()
            main, argv0 = module.main, module.__file__
        else:
            argv0 = os.path.join(ROOT, script)
            main = runpy.run_path(argv0, run_name=os.path.splitext(script)[0])["main"]
        patch.setattr(sys, "argv", [argv0, *map(str, args)])
        patch.chdir(ROOT)  # where the command's relative paths (configs/...) point
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.run(main)
            except SystemExit as e:
                code = 0 if e.code is None else e.code
    return code, out.getvalue(), err.getvalue()


def completed_here(*command, env=None):
    """``run_script_here`` with ``env`` set meanwhile, as the ``subprocess.CompletedProcess`` a
    ``run_python`` of the same command gives (``returncode``, ``stdout``, ``stderr``)."""
    import subprocess

    with pytest.MonkeyPatch.context() as patch:
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        return subprocess.CompletedProcess(list(command), *run_script_here(*command))


def snapshot(root) -> dict:
    """Every file under ``root`` (relative path -> bytes) and every folder (``path/`` -> None):
    equal before and after a command that must change nothing."""
    out = {}
    for d, dirs, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root) + "/"] = None
    return out

"""Shared fixtures: the embedded digits prepared once per session, small configs; and the one
harness that runs a program with simulated devices (``run_python``, ``run_script``)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A tfds data_dir holding the prepared embedded digits (no network)."""
    from configs import test as test_config
    from ddpm_jax import datasets

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    config = test_config.get_config()
    config.data.data_dir = data_dir
    datasets.prepare_dataset(config)
    return data_dir


@pytest.fixture()
def test_cfg(digits_dir):
    """The tiny test config reading the session's digits."""
    from configs import test as test_config

    config = test_config.get_config()
    config.data.data_dir = digits_dir
    return config


def run_python(args, *, devices: int = 1, timeout: int = 600, env=None, **kwargs):
    """Runs ``python args...`` from the repo root with ``devices`` simulated CPU devices."""
    import subprocess

    full_env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                    JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, text=True,
                          capture_output=True, timeout=timeout, **kwargs)


def run_script(name: str, *args, devices: int = 1, timeout: int = 600) -> dict:
    """Runs ``tests/scripts/<name>`` with ``devices`` simulated devices; its last stdout line,
    a JSON object, is returned (the test fails with the script's stderr if it fails)."""
    proc = run_python([os.path.join("tests", "scripts", name), *map(str, args)], devices=devices,
                      timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

"""Shared fixtures: the embedded digits prepared once per session, small configs."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A tfds data_dir holding the prepared embedded digits (no network)."""
    from configs import test as test_config
    from ddpm_jax import input_pipeline

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    config = test_config.get_config()
    config.data.data_dir = data_dir
    input_pipeline.prepare_dataset(config)
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

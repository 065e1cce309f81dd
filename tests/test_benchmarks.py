"""The CPU compiler options (same numbers as XLA's defaults, only on CPU, the user's flags win)
and smoke tests of the benchmark programs on the tiny test config. Speed is never asserted."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from ddpm_jax import diffusion, unet, xla_cpu
from ddpm_jax.benchmarks import train as train_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT32_ROUNDING = 1e-5  # relative: a different summation order, not a different result


def _rel(a, b) -> float:
    a, b = np.concatenate([np.ravel(v) for v in jax.tree.leaves(a)]), \
        np.concatenate([np.ravel(v) for v in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- when the options apply -------------------------------------------------------------------
def test_options_only_on_cpu(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    for platform in ("gpu", "tpu", "cuda", "rocm"):
        assert xla_cpu.compiler_options("train", platform=platform) is None
    train = xla_cpu.compiler_options("train", platform="cpu")
    forward = xla_cpu.compiler_options("forward", platform="cpu")
    # Full enum names, comma-separated: convolutions leave YNNPACK in both; reductions stay in
    # YNNPACK only where the backward's column sums need them.
    assert train == {"xla_cpu_experimental_ynn_fusion_type":
                     "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    assert forward == {"xla_cpu_experimental_ynn_fusion_type":
                       "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def test_the_users_xla_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                                    "--xla_cpu_experimental_ynn_fusion_type=-reduce")
    assert xla_cpu.compiler_options("train", platform="cpu") is None
    assert xla_cpu.compiler_options("forward", platform="cpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_cpu.compiler_options("forward", platform="cpu") is not None


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        xla_cpu.compiler_options("backward", platform="gpu")


# -- same numbers as the default ----------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    config = test_config.get_config()
    graphdef, _ = unet.abstract_model(config)

    @jax.jit
    def init():
        # Non-trivial weights: the near-zero layers would hide most of the network.
        leaves, tree = jax.tree.flatten(unet.split(unet.create_model(config, seed=0))[1])
        keys = jax.random.split(jax.random.key(1), len(leaves))
        return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                         for p, k in zip(leaves, keys, strict=True)])

    params = init()
    x0 = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1), minval=-1.0, maxval=1.0)
    return config, graphdef, params, x0


def _options(kind):
    options = xla_cpu.compiler_options(kind)
    if options is None:
        pytest.skip("the options apply only on CPU without a user choice in XLA_FLAGS")
    return options


def test_forward_with_options_equals_default(small):
    config, graphdef, params, x0 = small
    t = jnp.array([0, 10, 25, 49])
    fn = jax.jit(lambda p, x, t: unet.apply(graphdef, p, x, t)).lower(params, x0, t)
    default = fn.compile()(params, x0, t)
    ours = fn.compile(_options("forward"))(params, x0, t)
    assert _rel(ours, default) < FLOAT32_ROUNDING


def test_loss_and_gradients_with_options_equal_default_and_repeat_exactly(small):
    config, graphdef, params, x0 = small
    d = diffusion.Diffusion.from_config(config)

    def loss_fn(p, key):
        loss_key, dropout_key = jax.random.split(key)
        model_fn = lambda x, t: unet.apply(graphdef, p, x, t, dropout_key=dropout_key)
        return jnp.mean(diffusion.training_losses(d, model_fn, x0, loss_key))

    key = jax.random.key(3)
    lowered = jax.jit(jax.value_and_grad(loss_fn)).lower(params, key)
    loss0, grads0 = lowered.compile()(params, key)
    compiled = lowered.compile(_options("train"))
    loss1, grads1 = compiled(params, key)
    assert abs(float(loss1) - float(loss0)) <= FLOAT32_ROUNDING * abs(float(loss0))
    assert _rel(grads1, grads0) < FLOAT32_ROUNDING
    # Bit-identical from run to run (a resumed run repeats the same steps exactly).
    loss2, grads2 = compiled(params, key)
    assert float(loss2) == float(loss1)
    jax.tree.map(np.testing.assert_array_equal, grads2, grads1)


# -- the benchmark programs -----------------------------------------------------------------------
def test_peak_table():
    assert train_bench.peak_tflops("TPU v5 lite", "bfloat16") == (197, "bf16")
    assert train_bench.peak_tflops("TPU v3", "float32") == (61.5, "bf16")  # per TensorCore
    assert train_bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == (989.5, "bf16")
    assert train_bench.peak_tflops("NVIDIA H100 PCIe", "float32") == (378, "tf32")
    assert train_bench.peak_tflops("NVIDIA A100-SXM4-80GB", "float32")[1] == "tf32"
    assert train_bench.peak_tflops("cpu", "float32") is None
    assert train_bench.fits_on(20 * 2**30) == ["TPU v4", "TPU v5p", "TPU v6e", "A100 40GB",
                                               "A100 80GB", "H100", "H200"]


def test_train_benchmark_runs_the_real_step_and_reports_every_figure():
    peer = pytest.importorskip("diffusers") is not None and pytest.importorskip("torch")
    records = train_bench.run(train_bench.Settings(
        config="test", batch=2, xla_options=("project",), vs_diffusers=bool(peer), num_runs=1,
        warmup=0))
    by = {(r["measurement"], r["impl"]): r for r in records}
    assert set(by) == {(m, impl) for m in ("train", "forward") for impl in ("ddpm_jax",
                                                                             "diffusers")}
    for (_, impl), r in by.items():
        assert r["images_per_s"] > 0 and r["batch"] == 2
        json.dumps(r)  # one JSON line each
        if impl == "ddpm_jax":
            assert r["gflops_per_image"] > 0 and r["compile_s"] > 0
            assert r["memory"]["peak_bytes"] > r["memory"]["temp_bytes"] >= 0
            assert r["vs_diffusers"]["ratio"] > 0
            assert r["compiler_options"] == xla_cpu.compiler_options(r["measurement"])
    # A train step costs about 3 forward passes.
    ratio = by["train", "ddpm_jax"]["gflops_per_image"] / by["forward", "ddpm_jax"][
        "gflops_per_image"]
    assert 2.5 < ratio < 4


def test_memory_only_allocates_nothing_and_reports_memory():
    records = train_bench.run(train_bench.Settings(config="test", batch=512, memory_only=True,
                                                   measure=("forward",)))
    (r,) = records
    assert "images_per_s" not in r
    # Parameters (701,345 float32) are arguments; a batch of 512 8x8 images fits in temps.
    assert r["memory"]["argument_bytes"] >= 4 * 701_345
    assert r["fits_on"]


def test_sampling_benchmark_compares_one_step_with_diffusers():
    pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    out = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.benchmarks.sampling", "--config=test", "--batch=2",
         "--chains=none", "--step_runs=1", "--xla_options=project", "--vs_diffusers"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    rows = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert [r.get("xla_options") for r in rows] == ["project", None]
    assert rows[0]["vs_diffusers"]["ratio"] > 0 and rows[1]["impl"] == "diffusers"


def test_run_once_options_give_the_same_initial_state_bit_for_bit():
    from ddpm_jax import sharding, training

    config = test_config.get_config()
    tx = training.create_optimizer(config)
    state = training.create_train_state(config, tx, sharding.create_mesh())

    def init():
        return training.init_train_state(unet.split(unet.create_model(config, seed=config.seed))[1],
                                         tx)

    default = jax.jit(init)()  # XLA's default compilation
    if xla_cpu.run_once_options() is None:
        pytest.skip("the run-once options apply only on CPU")
    leaves, expected = jax.tree.leaves(state), jax.tree.leaves(default)
    assert len(leaves) == len(expected) > 100
    for a, b in zip(leaves, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

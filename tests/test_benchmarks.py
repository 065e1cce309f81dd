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
from conftest import initial_params, perturbed, run_command_here

from configs import test as test_config
from ddpm_jax import diffusion, unet, xla_cpu
from ddpm_jax.benchmarks import accelerator, common
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
    graphdef, _ = unet.abstract_model(unet.ModelSpec.from_config(config))

    params = perturbed(initial_params(config, 0), jax.random.key(1))
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
    assert common.peak_tflops("TPU v5 lite", "bfloat16") == (197, "bf16")
    assert common.peak_tflops("TPU v3", "float32") == (61.5, "bf16")  # per TensorCore
    assert common.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == (989.5, "bf16")
    assert common.peak_tflops("NVIDIA H100 PCIe", "float32") == (378, "tf32")
    assert common.peak_tflops("NVIDIA A100-SXM4-80GB", "float32")[1] == "tf32"
    assert common.device_peak("NVIDIA A100-SXM4-80GB").memory_gib == 80
    assert common.peak_tflops("NVIDIA H200", "bfloat16") == (989.5, "bf16")
    assert common.device_peak("NVIDIA H200").memory_gib == 141
    assert common.device_peak("NVIDIA H200 NVL") is None  # another part, other figures
    assert common.peak_tflops("TPU v5", "float32") == (459, "bf16")  # v5p, not v5e's prefix
    assert common.peak_tflops("cpu", "float32") is None
    assert common.fits_on(20 * 2**30) == ["TPU v4", "TPU v5p", "TPU v6e", "A100 80GB",
                                          "A100 40GB", "H100 PCIe", "H100", "H200"]


def test_mfu_is_achieved_over_the_peak_of_every_device():
    assert common.mfu(99.0, dict(peak_tflops_per_device=99.0, devices=2)) == 0.5
    assert common.mfu(99.0, dict(peak_tflops_per_device=None, devices=1)) is None


def test_interleaved_timer_takes_turns_and_reports_medians():
    calls = []
    timing = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                num_runs=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert [len(v) for v in timing.times.values()] == [3, 3]
    assert timing.median("a") == sorted(timing.times["a"])[1]


def test_config_by_name_or_path(tmp_path):
    assert common.load_config("test").model.ch == 64
    assert common.load_config("configs/test.py", "bfloat16").model.dtype == "bfloat16"
    other = tmp_path / "mine.py"
    other.write_text("from configs import test\n\ndef get_config():\n    c = test.get_config()\n"
                     "    c.model.ch = 96\n    return c\n")
    assert common.load_config(str(other)).model.ch == 96


def test_memory_only_allocates_nothing_and_reports_memory():
    records = train_bench.run(train_bench.Settings(config="test", batch=512, memory_only=True,
                                                   measure=("forward",)))
    (r,) = records
    assert "images_per_s" not in r
    # Parameters (643,841 float32) are arguments; a batch of 512 8x8 images fits in temps.
    assert r["memory"]["argument_bytes"] >= 4 * 643_841
    assert r["fits_on"]
    # Over an allocator's limit, the step is compiled (the same program: the cache) but not run.
    (r,) = train_bench.run(train_bench.Settings(config="test", batch=512, measure=("forward",),
                                                memory_limit_bytes=r["memory"]["peak_bytes"] - 1))
    assert "images_per_s" not in r and "exceeds the limit" in r["skipped"]


# -- the accelerator run ----------------------------------------------------------------------
def test_network_evaluations_per_sampler():
    assert accelerator.nfe("ancestral", 1000) == 1000
    assert accelerator.nfe("dpm_solver++", 20) == 20
    assert accelerator.nfe("heun", 18) == 35  # EDM: 2N - 1 evaluations


def test_network_evaluations_agree_with_the_samplers():
    from ddpm_jax import sampling

    d = diffusion.Diffusion.from_config(common.load_config("cifar10"))
    for name, steps in accelerator.Plan().samplers:
        spec = sampling.SamplerSpec(sampler=name, num_steps=steps)
        assert accelerator.nfe(name, steps) == spec.nfe(d), (name, steps)


def test_state_comparison_sees_one_ulp():
    a = [np.ones((3,), np.float32), np.arange(2, dtype=np.int32)]
    b = [a[0].copy(), a[1].copy()]
    assert accelerator.compare_states(a, b)["bit_identical"]
    b[0][1] = np.nextafter(np.float32(1), np.float32(2))
    r = accelerator.compare_states(a, b)
    assert not r["bit_identical"] and 0 < r["max_abs_diff"] < 1e-6


def test_only_the_one_step_train_variants_time_the_peer(monkeypatch):
    settings = []
    monkeypatch.setattr(accelerator.train_bench, "run",
                        lambda s, programs=None: settings.append(s) or [dict(step_s=0.5)])
    for variant, peer in ((("float32", 1), True), (("bfloat16", 2), True),
                          (("float32", 1), False)):
        (r,) = accelerator.train_part(accelerator.TINY, variant, peer)
        assert r["part"] == "train" and r["steps_per_s"] == 2.0
    assert [(s.dtype, s.steps_per_dispatch, s.vs_diffusers) for s in settings] == [
        ("float32", 1, True), ("bfloat16", 2, False), ("float32", 1, False)]


def test_the_full_plan_fits_the_machine_it_is_for():
    plan = accelerator.Plan()
    assert plan.batch == 128 and plan.big_batch == 64 and plan.big_dtype == "bfloat16"
    assert {("float32", 1), ("bfloat16", 1), ("float32", 8), ("bfloat16", 8)} == set(
        plan.train_variants)
    assert set(plan.sampling_batches) == {256, 1000} and plan.num_samples == 50_000
    # No part starts after budget_s (counted from the start, the determinism child included),
    # which leaves the last one and the install the rest of the 8 minutes.
    assert plan.determinism_timeout_s < plan.budget_s <= 6 * 60


# -- every benchmark module, as the README runs it ---------------------------------------------
def _have(*modules):
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def _check_train(rows, _):
    """The real step and the forward pass, each with every figure (and the peer's)."""
    by = {(r["measurement"], r["impl"]): r for r in rows}
    impls = ("ddpm_jax", "diffusers") if _have("diffusers", "torch") else ("ddpm_jax",)
    assert set(by) == {(m, impl) for m in ("train", "forward") for impl in impls}
    for (m, impl), r in by.items():
        assert r["images_per_s"] > 0 and r["batch"] == 8
        if impl == "ddpm_jax":
            assert r["gflops_per_image"] > 0 and r["compile_s"] > 0
            assert r["memory"]["peak_bytes"] > r["memory"]["temp_bytes"] >= 0
            assert r["compiler_options"] == xla_cpu.compiler_options(m)
            assert r["mfu"] is None  # a CPU has no peak in the table
            if "diffusers" in impls:
                assert r["vs_diffusers"]["ratio"] > 0
    # A train step costs about 3 forward passes.
    ratio = by["train", "ddpm_jax"]["gflops_per_image"] / by["forward", "ddpm_jax"][
        "gflops_per_image"]
    assert 2.5 < ratio < 4


def _check_sampling(rows, _):
    ours = [r for r in rows if r.get("xla_options") == "project"]
    assert len(ours) == 1 and ours[0]["scan_step_s"] > 0 and ours[0]["ddim_chain_s"] > 0
    if _have("diffusers", "torch"):
        assert ours[0]["vs_diffusers"]["ratio"] > 0 and rows[-1]["impl"] == "diffusers"


def _check_profile(rows, _):
    (r,) = rows
    assert r["thunk_ms_per_step"] > 0 and r["top_ops"]


def _check_checkpoint(rows, _):
    (r,) = rows
    assert r["bytes"] > 4 * 643_841 and r["restore_s"] > 0 and r["commit_s"] >= r["blocked_s"]


def _check_input_pipeline(rows, _):
    assert [r["source"] for r in rows] == ["digits (mock)", "8x8x1 ArrayRecord", "digits"]
    assert all(r["images_per_s"] > 0 for r in rows)


def _check_inception(rows, _):
    assert rows[0]["contender"] == "ddpm_jax" and rows[0]["images_per_s"] > 0


def _check_digits_quality(rows, _):
    (r,) = rows
    assert sum(r["ddim:5"]["counts"]) == 8 and 0 < r["real_test_confidence"] <= 1


def _check_accelerator(rows, out):
    doc = json.load(open(os.path.join(out, "accelerator.json")))
    records = doc["records"]
    assert not [r for r in records if "error" in r], records
    (det,) = [r for r in records if r["part"] == "determinism"]
    assert det["bit_identical"] and DETERMINISM in det["xla_flags"]
    assert DETERMINISM not in doc["environment"]["xla_flags"]
    (repeat,) = [r for r in records if r["part"] == "repeat"]
    # The repeat check runs the program the float32 train part timed, and TINY's big part (the
    # same program) takes it too: compiled once.
    assert repeat["bit_identical"] and repeat["reused_program"]
    train = [r for r in records if r["part"] == "train" and r["impl"] == "ddpm_jax"]
    assert {(r["dtype"], r["steps_per_dispatch"]) for r in train} == {("float32", 1),
                                                                       ("float32", 3)}
    for r in train:
        assert r["steps_per_s"] == pytest.approx(1 / r["step_s"]) and r["mfu"] is None  # CPU
    (s,) = [r for r in records if r["part"] == "sampling"]
    heun = s["implied"]["heun:5"]
    assert heun["nfe"] == 9
    assert heun["seconds"] == pytest.approx(9 * s["step_s"] * 16)  # 64 samples, batches of 4
    (fid,) = [r for r in records if r["part"] == "inception"]
    assert fid["images_per_s"] > 0
    big = [r for r in records if r["part"] == "big"]
    assert big and big[0]["memory"]["peak_bytes"] > 0 and big[0]["reused_program"]
    assert [r["reused_program"] for r in train] == [False, False]
    # The peer (the train benchmark's, run with it by COMMANDS["train"]) is left out here; which
    # variants time it: test_only_the_one_step_train_variants_time_the_peer.
    assert not [r for r in records if r.get("impl") == "diffusers"]
    (skipped,) = [r for r in records if r["part"] == "skipped"]
    assert skipped["what"] == "diffusers peer" and skipped["reason"] == (
        "--novs_diffusers" if _have("diffusers", "torch") else
        "diffusers or torch is not installed")
    table = open(os.path.join(out, "accelerator.txt")).read()
    for part in ("determinism", "train", "sampling", "inception", "big"):
        assert part in table


DETERMINISM = "--xla_gpu_deterministic_ops=true"

# Module -> (command-line flags on the test config, check of its JSON lines). The train and
# profile steps at the test config's batch of 8 are the program train.py compiles (the same
# HLO), which the suite's compilation cache then holds once. Every module of
# ddpm_jax/benchmarks must be here (test_every_benchmark_module_is_run).
COMMANDS = {
    "train": (["--config=configs/test.py", "--batch=8", "--num_runs=1", "--warmup=0"]
              + (["--vs_diffusers"] if _have("diffusers", "torch") else []), _check_train),
    "sampling": (["--config=configs/test.py", "--batch=2", "--timed_steps=2", "--ddim_steps=5",
                  "--num_runs=1", "--step_runs=1"]
                 + (["--vs_diffusers"] if _have("diffusers", "torch") else []), _check_sampling),
    "profile": (["--config=configs/test.py", "--batch=8", "--warmup=0", "--num_runs=1",
                 "--top=3"], _check_profile),
    "checkpoint": (["--config=configs/test.py", "--repeats=1"], _check_checkpoint),
    "input_pipeline": (["--config=configs/test.py", "--batch_size=8", "--num_batches=2",
                        "--warmup=1", "--num_examples=32", "--data_dir={digits_dir}"],
                       _check_input_pipeline),
    "inception": (["--batch=2", "--size=8", "--num_runs=1", "--warmup=0", "--novs_torch"],
                  _check_inception),
    "digits_quality": (["--workdir={workdir}", "--num_samples=8", "--samplers=ddim:5"],
                       _check_digits_quality),
    "accelerator": (["--out={out}", "--tiny", "--novs_diffusers"], _check_accelerator),
}


def _benchmark_modules():
    import pkgutil

    import ddpm_jax.benchmarks

    return sorted(m.name for m in pkgutil.iter_modules(ddpm_jax.benchmarks.__path__)
                  if m.name != "common")


# Benchmarks whose command a test of their own runs (on a trained run it makes).
RUN_ELSEWHERE = {
    "quality_vs_nfe": "test_benchmarks.py::test_quality_vs_nfe_runs_on_the_test_config",
    "guidance": "test_conditioning.py::test_the_guidance_benchmark_and_the_class_share",
}


def test_every_benchmark_module_is_run():
    assert _benchmark_modules() == sorted([*COMMANDS, *RUN_ELSEWHERE])
    for name in _benchmark_modules():  # what the tests run in-process is what the command runs
        with open(os.path.join(ROOT, "ddpm_jax", "benchmarks", f"{name}.py")) as f:
            tail = f.read().split('if __name__ == "__main__":\n')[-1].split()
        assert tail[0] == "define_flags()" and tail[1] in ("app.run(main)", "cli.run(main)"), name
    for test in RUN_ELSEWHERE.values():
        file, name = test.split("::")
        assert f"def {name}(" in open(os.path.join(ROOT, "tests", file)).read(), test


def test_importing_a_benchmark_defines_no_flag():
    from absl import flags

    before = set(flags.FLAGS)
    for name in _benchmark_modules():
        __import__(f"ddpm_jax.benchmarks.{name}")
    assert set(flags.FLAGS) == before


def test_the_library_runs_without_tensorflow():
    code = ("import sys, ddpm_jax, ddpm_jax.training, ddpm_jax.sampling, ddpm_jax.checkpoints, "
            "ddpm_jax.generate, ddpm_jax.benchmarks.train, ddpm_jax.benchmarks.accelerator, "
            "ddpm_jax.benchmarks.sampling, ddpm_jax.metrics; "
            "bad = {'tensorflow', 'tensorflow_datasets', 'tensorboardX'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120,
                   env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.fixture(scope="module")
def random_digits_run(tmp_path_factory):
    """A workdir holding the test config's freshly initialised weights (no training)."""
    from ddpm_jax import checkpoints

    config = test_config.get_config()
    workdir = str(tmp_path_factory.mktemp("bench") / "run")
    checkpoints.save_weights(workdir, config, initial_params(config, 0))
    return workdir


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_benchmark_module_runs_on_the_test_config(name, tmp_path, request):
    args, check = COMMANDS[name]
    fill = dict(out=str(tmp_path / "out"))
    if any("{digits_dir}" in a for a in args):
        fill["digits_dir"] = request.getfixturevalue("digits_dir")
    if any("{workdir}" in a for a in args):
        fill["workdir"] = request.getfixturevalue("random_digits_run")
    stdout, _ = run_command_here(f"ddpm_jax.benchmarks.{name}", *[a.format(**fill) for a in args])
    rows = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    assert rows or name == "accelerator"
    check(rows, fill["out"])


def test_run_once_options_give_the_same_initial_state_bit_for_bit():
    from ddpm_jax import config_lib, sharding, training

    config = test_config.get_config()
    tx = training.create_optimizer(config_lib.OptimizerSpec.from_config(config))
    state = training.create_train_state(unet.ModelSpec.from_config(config), config.seed, tx,
                                        sharding.create_mesh())

    def init():
        return training.init_train_state(initial_params(config, config.seed),
                                         tx)

    default = jax.jit(init)()  # XLA's default compilation
    if xla_cpu.run_once_options() is None:
        pytest.skip("the run-once options apply only on CPU")
    leaves, expected = jax.tree.leaves(state), jax.tree.leaves(default)
    assert len(leaves) == len(expected) > 100
    for a, b in zip(leaves, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_quality_vs_nfe_runs_on_the_test_config(tmp_path, digits_dir):
    pytest.importorskip("sklearn")
    stdout, _ = run_command_here(
        "ddpm_jax.benchmarks.quality_vs_nfe", "--config=test", f"--out_dir={tmp_path}",
        f"--data_dir={digits_dir}", "--num_samples=8", "--nfe=3,4", "--spacings=own,karras",
        "--samplers=dpm_solver++,heun")
    rows = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    assert rows[0]["sampler"] == "real test digits"
    got = {(r["sampler"], r["spacing"], r["nfe"]) for r in rows[1:]}
    # heun takes (NFE + 1) // 2 = 2 steps at NFE 3 and 4, on its own spacing, karras: one chain
    # run once.
    assert got == {("dpm_solver++", "linspace", 3), ("dpm_solver++", "karras", 3),
                   ("heun", "karras", 3), ("dpm_solver++", "linspace", 4),
                   ("dpm_solver++", "karras", 4)}
    assert all(r["digits_fd"] > 0 and r["fd_pca"] > 0 and 0 <= r["precision"] <= 1
               and 0 < r["svm_confidence"] <= 1 and r["s_per_1000"] > 0 for r in rows[1:])
    assert (tmp_path / "quality_vs_nfe.png").stat().st_size > 1000
    assert "| dpm_solver++ | linspace |" in stdout
    saved = json.loads((tmp_path / "quality_vs_nfe.json").read_text())
    assert len(saved["rows"]) == 5

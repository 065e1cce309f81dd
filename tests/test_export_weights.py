"""Exporting to diffusers, and importing by Hub name: the same network, process and parameters.

The export tests compare a diffusers ``UNet2DModel`` loaded from the exported directory with
``ddpm_jax.load(run).predict_noise``, one ``DDPMScheduler.step`` with ``sampling.p_sample``,
and import(export(run)) with the run, bit for bit. They need the torch extra (diffusers) for the
diffusers side and are skipped without it. The Hub tests build a Hugging Face cache in the
layout huggingface_hub writes and import from it offline; nothing here uses the network.
"""

import hashlib
import os
import sys

import jax
import numpy as np
import pytest
from conftest import completed_here, run_python

import ddpm_jax
from configs import cifar10
from configs import test as test_config
from ddpm_jax import (
    api,
    checkpoints,
    diffusion,
    export_weights,
    sampling,
    sharding,
    training,
    trees,
)
from ddpm_jax.weights import checkpoint as weights_io
from ddpm_jax.weights import diffusers as diffusers_format
from ddpm_jax.weights import hub as hub_format
from ddpm_jax.weights import layout

OFFLINE_CACHE = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _print(name, value):
    print(f"\n{name}: {value:.3g}")


def random_params(config, seed):
    """Our parameter tree with every tensor random (kernels ~ 1/sqrt(fan_in), norms ~ 1), so
    that the layers initialised at ~0 take part in every comparison."""
    rng = np.random.default_rng(seed)

    def fill(path, a):
        if path[-1].key == "kernel":
            fan_in = int(np.prod(a.shape[:-1]))
            return (rng.standard_normal(a.shape) / np.sqrt(fan_in)).astype(np.float32)
        base = 1.0 if path[-1].key == "scale" else 0.0
        return (base + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, layout.expected_params(config))


def assert_same_tree(a, b):
    flat_a, flat_b = trees.flatten(a), trees.flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for path in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[path]), np.asarray(flat_b[path]),
                                      err_msg=path)


def torch_eps(unet, x, t):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        out = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t)).sample
    return out.permute(0, 2, 3, 1).numpy()


def eps_error(workdir, out, timesteps, seed=0):
    """max |eps_diffusers - eps_ddpm_jax| over ``timesteps`` (int32 [B] each), and eps's std."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel.from_pretrained(os.path.join(out, "unet")).eval()
    model = ddpm_jax.load(workdir)
    rng = np.random.default_rng(seed)
    errors, stds = [], []
    for t in timesteps:
        x = rng.standard_normal((len(t),) + model.image_shape).astype(np.float32)
        theirs = torch_eps(unet, x, np.asarray(t, np.int64))
        with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
            ours = np.asarray(model.predict_noise(x, np.asarray(t, np.int32)))
        errors.append(float(np.abs(ours - theirs).max()))
        stds.append(float(theirs.std()))
    return max(errors), min(stds)


# -- a trained run -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(digits_dir, tmp_path_factory):
    """A 4-step run of the test config (the ``test_cfg`` fixture's config; module-scoped so that
    it trains once)."""
    config = test_config.get_config()
    config.data.data_dir = digits_dir
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    training.train_and_evaluate(config, workdir)
    return workdir


def test_trained_run_exports_to_the_same_network_and_process(trained_run, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    out = str(tmp_path / "out")
    proc = completed_here("-m", "ddpm_jax.export_weights", f"--workdir={trained_run}",
                          f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported 643,841 parameters (EMA weights of step 4)" in proc.stdout
    assert "fixedlarge -> fixed_large: sigma^2 at t = 0" in proc.stdout
    assert "call it with num_inference_steps=50" in proc.stdout
    assert sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out)
                  for f in fs) == sorted([diffusers_format.MODEL_INDEX,
                                          diffusers_format.UNET_CONFIG,
                                          diffusers_format.UNET_WEIGHTS,
                                          diffusers_format.SCHEDULER_CONFIG])

    err, std = eps_error(trained_run, out, [[0, 1, 25, 49], [49, 10, 2, 0]])
    _print("trained test-config run, max abs eps error", err)
    assert err <= 1e-4 and err <= 1e-4 * std  # eps is small after 4 steps: relative too

    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, diffusers.DDPMScheduler)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_import_of_the_export_restores_every_parameter(trained_run, tmp_path):
    model = ddpm_jax.load(trained_run)
    ema = jax.device_get(model.params)
    raw = jax.device_get(ddpm_jax.load(trained_run, ema=False).params)
    assert not np.array_equal(ema["conv_in"]["kernel"], raw["conv_in"]["kernel"])
    for weights, want in (("ema", ema), ("raw", raw)):
        info = weights_io.export_checkpoint(trained_run, str(tmp_path / weights),
                                                ema=weights == "ema")
        assert info["step"] == 4 and info["num_params"] == 643_841
        workdir = str(tmp_path / f"{weights}_imported")
        weights_io.import_checkpoint(str(tmp_path / weights), model.config, workdir)
        # diffusers weights go to params and ema_params alike
        assert_same_tree(jax.device_get(ddpm_jax.load(workdir, ema=weights == "raw").params),
                         want)


def test_export_reads_only_the_weights_it_writes_onto_the_host(trained_run, tmp_path,
                                                               monkeypatch):
    """One open of the checkpoint, one array item restored as host numpy arrays: no mesh, no
    model, no device transfer, no optimizer state."""
    def refuse(*args, **kwargs):
        raise AssertionError("export built a mesh, a model or moved arrays to a device")

    for module, name in ((sharding, "create_mesh"), (api, "load"), (jax, "device_put")):
        monkeypatch.setattr(module, name, refuse)
    opens, restores = [], []
    open_, restore = checkpoints.Checkpointer.open.__func__, checkpoints.Checkpointer._restore

    def recording_open(cls, path, **kwargs):
        opens.append(path)
        return open_(cls, path, **kwargs)

    def recording_restore(self, step, abstract, stored):  # every read of arrays comes here
        out = restore(self, step, abstract, stored)
        restores.append({item: {type(a) for a in jax.tree.leaves(tree)}
                         for item, tree in out[0].items()})
        return out

    monkeypatch.setattr(checkpoints.Checkpointer, "open", classmethod(recording_open))
    monkeypatch.setattr(checkpoints.Checkpointer, "_restore", recording_restore)
    for ema, item in ((True, "ema_params"), (False, "params")):
        opens.clear(), restores.clear()
        weights_io.export_checkpoint(trained_run, str(tmp_path / item), ema=ema)
        assert opens == [trained_run] and restores == [{item: {np.ndarray}}]
    monkeypatch.undo()
    with checkpoints.Checkpointer.open(trained_run) as ckpt:  # it holds an optimizer state
        assert jax.tree.leaves(ckpt.read_arrays(4, "opt_state"))


def test_the_mapping_is_one_to_one_in_both_directions():
    config = test_config.get_config()
    params = random_params(config, seed=0)
    state_dict = diffusers_format.diffusers_state_dict(params, config)
    assert len(state_dict) == len(trees.flatten(params))  # every parameter exactly once
    assert "mid_block.attentions.0.to_out.0.weight" in state_dict  # current diffusers names
    assert state_dict["up_blocks.0.resnets.1.conv_shortcut.weight"].shape == (64, 128, 1, 1)
    assert state_dict["conv_in.weight"].shape == (64, 1, 3, 3)
    assert_same_tree(diffusers_format.convert_diffusers(state_dict, config), params)
    for transform, ours, theirs in ((layout.TORCH_CONV, (2, 3, 4, 5), (5, 4, 2, 3)),
                                    (layout.TORCH_LINEAR, (4, 5), (5, 4)),
                                    (layout.TORCH_CONV1X1, (4, 5), (5, 4, 1, 1))):
        a = np.arange(np.prod(ours), dtype=np.float32).reshape(ours)
        assert transform.source_shape(ours) == theirs == transform.from_ours(a).shape
        np.testing.assert_array_equal(transform.to_ours(transform.from_ours(a)), a)
    params["conv_in"]["kernel"] = np.zeros((3, 3, 1, 63), np.float32)
    with pytest.raises(layout.WeightsError, match=r"conv_in/kernel has shape "
                       r"\(3, 3, 1, 63\) but the config needs \(3, 3, 1, 64\)"):
        diffusers_format.diffusers_state_dict(params, config)


# -- a cifar10-structured model at full size -----------------------------------------------------
def test_random_cifar10_model_exports_to_the_same_eps(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    config = cifar10.get_config()
    raw, ema = random_params(config, seed=0), random_params(config, seed=1)
    workdir = str(tmp_path / "run")
    checkpoints.save_weights(workdir, config, raw, ema_params=ema, step=7)
    out = str(tmp_path / "out")
    info = weights_io.export_checkpoint(workdir, out)
    assert info["num_params"] == 35_746_307 and info["step"] == 7
    err, std = eps_error(workdir, out, [[0, 999], [1, 500]])
    _print("random cifar10 model (35.7M), max abs eps error", err)
    assert std > 0.1 and err <= 1e-4
    weights_io.import_checkpoint(out, config, str(tmp_path / "back"))
    assert_same_tree(jax.device_get(ddpm_jax.load(str(tmp_path / "back")).params), ema)


# -- the scheduler -------------------------------------------------------------------------------
def _config(schedule="linear", var="fixedlarge", mean="eps", base=cifar10):
    config = base.get_config()
    config.unlock()
    config.diffusion.beta_schedule = schedule
    config.diffusion.model_var_type = var
    config.diffusion.model_mean_type = mean
    return config


def _scheduler(config):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDPMScheduler.from_config(diffusers_format.scheduler_config(config))


@pytest.mark.parametrize("schedule, base, diffusers_schedule", [
    ("linear", cifar10, "linear"), ("linear", test_config, "linear"),
    ("quad", cifar10, "scaled_linear"), ("cosine", cifar10, None), ("warmup10", cifar10, None),
])
def test_scheduler_carries_the_schedule(schedule, base, diffusers_schedule):
    config = _config(schedule, base=base)
    sched_json = diffusers_format.scheduler_config(config)
    d = diffusion.Diffusion.from_config(config)
    assert sched_json["num_train_timesteps"] == d.num_timesteps
    if diffusers_schedule is None:  # the float64 betas themselves
        assert sched_json["trained_betas"] == list(d.betas64)
    else:
        assert sched_json["beta_schedule"] == diffusers_schedule
        assert sched_json["trained_betas"] is None
    assert diffusers_format.scheduler_differences(sched_json, config) == []
    sched = _scheduler(config)
    betas, abar = sched.betas.numpy(), sched.alphas_cumprod.numpy()
    beta_rel = float(np.max(np.abs(betas - d.betas) / d.betas))
    abar_abs = float(np.max(np.abs(abar - d.alphas_cumprod)))
    _print(f"{schedule} (T={d.num_timesteps}) betas, max relative difference", beta_rel)
    _print(f"{schedule} (T={d.num_timesteps}) alphas_cumprod, max abs difference", abar_abs)
    if diffusers_schedule is None:  # float64 -> float32, rounded as ddpm_jax rounds
        np.testing.assert_array_equal(betas, np.asarray(d.betas))
    assert beta_rel <= 5e-7 and abar_abs <= 1e-6  # float32 rounding, nothing more


def _step_pair(config, model_output, x, t, seed, sched=None):
    """(diffusers' DDPMScheduler.step, sampling.p_sample) from the same output and noise, NHWC."""
    torch = pytest.importorskip("torch")
    sched = sched or _scheduler(config)
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    theirs = sched.step(to_torch(model_output), t, to_torch(x),
                        generator=torch.Generator().manual_seed(seed)).prev_sample
    # step draws its noise with randn on the generator: the same draw, in NHWC for p_sample.
    noise = torch.randn(to_torch(x).shape, generator=torch.Generator().manual_seed(seed))
    d = diffusion.Diffusion.from_config(config)
    ours, _ = sampling.p_sample(d, lambda *_: model_output, x, np.full((x.shape[0],), t, np.int32),
                                noise.permute(0, 2, 3, 1).numpy(),
                                clip_denoised=config.sampling.clip_denoised)
    return theirs.permute(0, 2, 3, 1).numpy(), np.asarray(ours)


def _float64_constants(sched, config):
    """The scheduler with ddpm_jax's float64 alphas_cumprod in place of its float32 ones."""
    torch = pytest.importorskip("torch")
    betas = np.asarray(diffusion.Diffusion.from_config(config).betas64)
    sched.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


def _inputs(rng, var, d, t, shape=(2, 8, 8, 3)):
    x = rng.standard_normal(shape).astype(np.float32)
    out = rng.standard_normal(shape).astype(np.float32)
    if var == "learned_range":  # v in [-1, 1]
        out = np.concatenate([out, rng.uniform(-1, 1, shape).astype(np.float32)], axis=-1)
    elif var == "learned":  # log sigma^2 between log beta~_t and log beta_t
        lo, hi = float(d.posterior_log_variance_clipped[t]), float(d.log_betas[t])
        out = np.concatenate([out, rng.uniform(lo, hi, shape).astype(np.float32)], axis=-1)
    return out, x


@pytest.mark.parametrize("var, mean", [("fixedlarge", "eps"), ("fixedsmall", "eps"),
                                       ("learned_range", "eps"), ("fixedlarge", "xstart")])
def test_one_diffusers_step_equals_p_sample(var, mean):
    config = _config(var=var, mean=mean)
    d = diffusion.Diffusion.from_config(config)
    rng = np.random.default_rng(0)
    errors, errors64 = {}, {}
    for t in (999, 500, 100, 10, 1, 0):
        out, x = _inputs(rng, var, d, t)
        theirs, ours = _step_pair(config, out, x, t, seed=t)
        errors[t] = float(np.abs(theirs - ours).max())
        sched64 = _float64_constants(_scheduler(config), config)
        theirs64, _ = _step_pair(config, out, x, t, seed=t, sched=sched64)
        errors64[t] = float(np.abs(theirs64 - ours).max())
    print(f"\n{mean}/{var}: max abs step difference by t {errors}; with float64 constants "
          f"{errors64}")
    # diffusers' float32 constants (beta_t = 1 - abar_t / abar_{t-1}) cost digits at small t;
    # with float64 constants the step is ours to float32 rounding, at every t, t = 0 included.
    assert max(errors.values()) <= 2e-4 and errors[999] <= 5e-6 and errors[500] <= 5e-6
    assert max(errors64.values()) <= 1e-6


def test_t0_variance_differs_but_adds_no_noise():
    """fixedlarge's sigma^2 at t = 0 is beta~ of step 1 here, beta_0 in diffusers: unused."""
    config = _config(var="fixedlarge")
    d = diffusion.Diffusion.from_config(config)
    sched = _scheduler(config)
    theirs = float(sched._get_variance(0))
    assert np.isclose(theirs, d.betas[0], rtol=1e-3)  # 1 - abar_0 in float32: ~1e-4 off
    assert np.isclose(float(d.fixedlarge_variance[0]), d.posterior_variance[1], rtol=1e-6)
    assert abs(d.fixedlarge_variance[0] / theirs - 1) > 0.4  # the tables differ at t = 0
    out, x = _inputs(np.random.default_rng(1), "fixedlarge", d, 0)
    a, b = _step_pair(config, out, x, 0, seed=1)
    c, _ = _step_pair(config, out, x, 0, seed=2)  # other noise: same result at t = 0
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(a, c)


def test_learned_variance_is_read_as_log_here_and_as_variance_in_diffusers():
    config = _config(var="learned")
    assert any(line.startswith("learned -> learned: diffusers reads the variance channels as "
                               "sigma^2") for line in diffusers_format.differences(config))
    d = diffusion.Diffusion.from_config(config)
    rng = np.random.default_rng(2)
    for t in (500, 1):
        out, x = _inputs(rng, "learned", d, t)
        theirs, ours = _step_pair(config, out, x, t, seed=t)
        assert np.isnan(theirs).all()  # sqrt of a log variance < 0
        as_variance = np.concatenate([out[..., :3], np.exp(out[..., 3:])], axis=-1)
        sched64 = _float64_constants(_scheduler(config), config)
        theirs, _ = _step_pair(config, as_variance, x, t, seed=t, sched=sched64)
        np.testing.assert_allclose(theirs, ours, atol=1e-6)  # the only difference


def test_differences_name_what_diffusers_cannot_express():
    lines = diffusers_format.differences(_config(var="fixedsmall"))
    assert len(lines) == 2 and lines[0].startswith("float32 schedule")
    assert lines[1].startswith("fixedsmall -> fixed_small: at t = 0")
    config = _config(var="learned_range", base=test_config)
    config.model.dtype = "bfloat16"
    lines = diffusers_format.differences(config)
    assert [line.split(":")[0] for line in lines] == [
        "float32 schedule", "learned_range -> learned_range", "model.dtype is bfloat16",
        "T = 50"]
    assert all("\n" not in line for line in lines)
    for topic in ("``fixedlarge``", "``learned``", "``model.dtype``", "T other than 1000"):
        assert topic in export_weights.__doc__  # the docstring lists the same differences


# -- bad inputs ----------------------------------------------------------------------------------
def _one_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_export_refuses_bad_inputs_before_writing(trained_run, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    proc = completed_here("-m", "ddpm_jax.export_weights", f"--workdir={trained_run}",
                          f"--out={busy}")
    _one_line(proc, "is not empty (it holds keep.txt)", "nothing is overwritten")
    assert os.listdir(busy) == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"

    config = test_config.get_config()
    config.unlock()
    config.diffusion.model_mean_type = "xprev"
    xprev_run = str(tmp_path / "xprev")
    checkpoints.save_weights(xprev_run, config, random_params(config, seed=0))
    # In-process: the command prints this UserError as one line too (as for the case above).
    with pytest.raises(diffusers_format.ExportError) as e:
        weights_io.export_checkpoint(xprev_run, str(tmp_path / "out"))
    assert "model_mean_type is 'xprev'" in str(e.value) and "only eps and xstart" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        weights_io.export_checkpoint(str(tmp_path / "missing"), str(tmp_path / "out"))
    with pytest.raises(checkpoints.CheckpointError, match="no committed checkpoint step 3"):
        weights_io.export_checkpoint(trained_run, str(tmp_path / "out"), step=3)
    assert not (tmp_path / "out").exists()  # nothing written by any refusal

    config = test_config.get_config()
    config.unlock()
    config.model.block_size = 2
    config.model.resamp_with_conv = False
    with pytest.raises(diffusers_format.ExportError) as e:
        diffusers_format.check_exportable(config)
    assert "model.block_size is 2" in str(e.value) and "resamp_with_conv is False" in str(e.value)
    # diffusers sizes conv_in and the time embedding by the first level's width.
    config.model.block_size, config.model.resamp_with_conv, config.model.ch_mult = 1, True, (2, 4)
    with pytest.raises(diffusers_format.ExportError, match="model.ch_mult starts at 2"):
        diffusers_format.check_exportable(config)
    config.model.ch_mult = (1, 2)
    diffusers_format.check_exportable(config)


# -- the Hugging Face Hub ------------------------------------------------------------------------
COMMIT = hashlib.sha1(b"ddpm_jax test snapshot").hexdigest()


def write_hub_cache(cache, repo_id, files, *, commit=COMMIT, refs=("main",)):
    """Writes ``files`` as huggingface_hub caches a download: ``models--owner--name/`` with
    ``blobs/<etag>`` (sha256 for LFS files, the git blob sha1 otherwise), relative symlinks in
    ``snapshots/<commit>/`` and ``refs/<branch>`` holding the commit."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        etag = (hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else
                hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        blob = os.path.join(repo, "blobs", etag)
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(repo, "snapshots", commit, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)


def hub_files(config, *, pipeline_layout=True):
    """The files of a diffusers repository of ``config``'s U-Net with random weights."""
    files = diffusers_format.pipeline_files(random_params(config, seed=3), config)
    if pipeline_layout:
        return files
    return {"config.json": files[diffusers_format.UNET_CONFIG],  # the older, flat layout
            diffusers_format.DIFFUSERS_WEIGHTS: files[diffusers_format.UNET_WEIGHTS],
            "scheduler_config.json": files[diffusers_format.SCHEDULER_CONFIG],
            "model_index.json": files[diffusers_format.MODEL_INDEX]}


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache in tmp_path holding google/ddpm-cifar10-32 (test-sized)."""
    hub = pytest.importorskip("huggingface_hub")
    cache = str(tmp_path / "hf_cache")
    write_hub_cache(cache, "google/ddpm-cifar10-32", hub_files(test_config.get_config()),
                    refs=("main", "v1"))
    # huggingface_hub itself reads the layout back: scanned, and resolved without the network.
    (repo,) = hub.scan_cache_dir(cache).repos
    (revision,) = repo.revisions
    assert repo.repo_id == "google/ddpm-cifar10-32" and revision.commit_hash == COMMIT
    assert revision.refs == {"main", "v1"} and len(revision.files) == 4
    snapshot = hub.snapshot_download("google/ddpm-cifar10-32", cache_dir=cache,
                                     local_files_only=True)
    assert snapshot == os.path.join(cache, "models--google--ddpm-cifar10-32", "snapshots", COMMIT)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hf_import_reads_the_cache_offline_like_the_directory(hub_cache, tmp_path):
    snapshot = os.path.join(hub_cache, "models--google--ddpm-cifar10-32", "snapshots", COMMIT)
    workdir = str(tmp_path / "run")
    proc = run_python(["-m", "ddpm_jax.import_weights", "--source=hf://google/ddpm-cifar10-32",
                       "--config=configs/test.py", f"--workdir={workdir}"], timeout=300,
                      env=dict(OFFLINE_CACHE, HF_HUB_CACHE=hub_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from diffusers hf://google/ddpm-cifar10-32@{COMMIT}" in proc.stdout
    assert "note:" not in proc.stdout  # the cached scheduler is the config's process
    config = test_config.get_config()
    direct, _, _ = weights_io.read_source(os.path.join(snapshot, "unet"), config)
    assert_same_tree(jax.device_get(ddpm_jax.load(workdir).params), direct)


@pytest.mark.parametrize("source", ["hf://google/ddpm-cifar10-32@v1",
                                    f"hf://google/ddpm-cifar10-32@{COMMIT}"])
def test_hf_revisions_and_the_flat_layout_resolve(hub_cache, source):
    snapshot = os.path.join(hub_cache, "models--google--ddpm-cifar10-32", "snapshots", COMMIT)
    assert hub_format.hub_snapshot(source) == (os.path.join(snapshot, "unet"),
                                                   f"google/ddpm-cifar10-32@{COMMIT}")
    config = test_config.get_config()
    write_hub_cache(hub_cache, "google/ddpm-cat-256", hub_files(config, pipeline_layout=False))
    directory, _ = hub_format.hub_snapshot("hf://google/ddpm-cat-256")
    assert directory == os.path.join(hub_cache, "models--google--ddpm-cat-256", "snapshots",
                                     COMMIT)
    params, _, info = weights_io.read_source("hf://google/ddpm-cat-256", config)
    assert info["source"] == f"hf://google/ddpm-cat-256@{COMMIT}" and info["notes"] == []
    assert_same_tree(params, random_params(config, seed=3))
    config.unlock()
    config.diffusion.model_var_type = "fixedsmall"  # the cached scheduler says fixed_large
    _, _, info = weights_io.read_source("hf://google/ddpm-cat-256", config)
    assert len(info["notes"]) == 1
    assert "variance_type is 'fixed_large' there, 'fixed_small' here" in info["notes"][0]


def test_hf_name_not_in_the_cache_offline_is_one_line(hub_cache, tmp_path):
    proc = run_python(["-m", "ddpm_jax.import_weights", "--source=hf://google/ddpm-church-256",
                       "--config=configs/lsun_church.py", f"--workdir={tmp_path / 'run'}"],
                      timeout=300, env=dict(OFFLINE_CACHE, HF_HUB_CACHE=hub_cache))
    _one_line(proc, "google/ddpm-church-256 is not in the Hugging Face cache",
              "unset HF_HUB_OFFLINE")
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(hub_format.HubError, match="google/ddpm-cifar10-32@nope is not in"):
        hub_format.hub_snapshot("hf://google/ddpm-cifar10-32@nope")


def test_hf_names_are_checked_before_the_hub_is_asked():
    assert hub_format.parse_hub_source("hf://google/ddpm-bedroom-256") == (
        "google/ddpm-bedroom-256", None)
    assert hub_format.parse_hub_source("hf://google/ddpm-celebahq-256@main") == (
        "google/ddpm-celebahq-256", "main")
    for bad in ("hf://ddpm-cifar10-32", "hf://google/ddpm-cifar10-32@", "hf://a/b/c"):
        with pytest.raises(hub_format.HubError, match="is not a Hub model name"):
            hub_format.parse_hub_source(bad)


def test_without_huggingface_hub_one_line_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if absent
    with pytest.raises(hub_format.HubError) as e:
        weights_io.import_checkpoint("hf://google/ddpm-cifar10-32", test_config.get_config(),
                                         str(tmp_path / "run"))
    assert str(e.value) == ("hf:// sources need huggingface_hub: pip install 'ddpm_jax[hf]'")
    assert not (tmp_path / "run").exists()

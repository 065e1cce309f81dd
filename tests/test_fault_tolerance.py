"""Nothing is lost: bit-exact resume, preemption, kills during saves, other meshes, refusals."""

import errno
import json
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    ROOT,
    popen_python,
    run_python,
    run_script,
    run_script_here,
    snapshot,
    train_here,
    wait_until,
)

from configs import test as test_config
from ddpm_jax import checkpoints, config_lib, errors, images, input_pipeline, training


def _train_cmd(workdir, digits_dir, *overrides, steps=None):
    extra = [] if steps is None else [f"--config.training.num_train_steps={steps}"]
    return ["train.py", "--config=configs/test.py", f"--workdir={workdir}",
            f"--config.data.data_dir={digits_dir}", *extra, *overrides]


def _leaves(workdir, step):
    """Every array of a committed step, read back with Orbax as stored (no config needed)."""
    out = {}
    with checkpoints.Checkpointer.open(workdir) as ckpt:
        for item, restored in ckpt.read_items(step, *checkpoints.ARRAY_ITEMS).items():
            for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
                out[f"{item}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        (meta,) = ckpt.read_json(step, "meta")
    return out, meta


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _assert_same_run(a, b, step):
    leaves_a, meta_a = _leaves(a, step)
    leaves_b, meta_b = _leaves(b, step)
    assert leaves_a.keys() == leaves_b.keys() and len(leaves_a) > 50
    for name in leaves_a:
        np.testing.assert_array_equal(leaves_a[name], leaves_b[name], err_msg=name)
    assert meta_a == meta_b
    assert _losses(a) == _losses(b)  # every logged loss, bit for bit


def test_resume_is_bit_exact_and_resuming_at_the_end_is_a_no_op(digits_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_here(straight, digits_dir, 6)
    train_here(resumed, digits_dir, 3, checkpoint_every=3)  # K steps
    # 2K in a fresh process, which has only the checkpoint.
    proc = run_python(_train_cmd(resumed, digits_dir, "--config.training.checkpoint_every=3",
                                 steps=6))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming at step 3" in proc.stderr
    _assert_same_run(straight, resumed, 6)
    # Again at the end: nothing changes.
    assert "trained to training.num_train_steps=6 already" in train_here(
        resumed, digits_dir, 6, checkpoint_every=3)  # config.json, metrics untouched
    _assert_same_run(straight, resumed, 6)


def _logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return len(open(path).readlines()) if os.path.exists(path) else 0


def test_sigterm_saves_the_current_step_and_resumes_exactly(digits_dir, tmp_path):
    workdir = tmp_path / "preempted"
    proc = popen_python(_train_cmd(workdir, digits_dir, "--config.training.num_train_steps=100000",
                             "--config.training.checkpoint_every=100000"))
    assert wait_until(lambda: _logged_steps(workdir) >= 3, [proc], 240, 0.01), \
        proc.communicate()[1][-3000:]
    seen = _logged_steps(workdir)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM
    ckpts = os.listdir(workdir / "checkpoints")
    steps = [int(s) for s in ckpts if s.isdigit()]
    assert len(steps) == 1 and steps[0] >= seen  # no step lost
    assert not [n for n in ckpts if "tmp" in n]  # the save was committed before exiting
    assert f"checkpoint of step {steps[0]} is committed" in err
    k = steps[0]
    # Resume to K + 2 (from the checkpoint alone) and compare with a run that never stopped.
    assert f"Resuming at step {k}" in train_here(workdir, digits_dir, k + 2)
    straight = tmp_path / "straight"
    train_here(straight, digits_dir, k + 2, checkpoint_every=100000)
    _assert_same_run(straight, workdir, k + 2)


def test_sigkill_during_a_save_resumes_from_the_last_committed_step(digits_dir, tmp_path):
    workdir = tmp_path / "killed"
    ckpt_dir = workdir / "checkpoints"
    proc = popen_python(_train_cmd(workdir, digits_dir, "--config.training.num_train_steps=100000",
                             "--config.training.checkpoint_every=1",
                             "--config.training.max_to_keep=100"))

    def saving():
        names = os.listdir(ckpt_dir) if ckpt_dir.exists() else []
        return any("tmp" in n for n in names) and any(n.isdigit() for n in names)

    caught = wait_until(saving, [proc], 240, 0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert caught, "no save in flight was observed"
    committed = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    last = committed[-1]
    # The restarted run resumes from the last committed step and saves normally afterwards.
    err = train_here(workdir, digits_dir, last + 2, checkpoint_every=1, max_to_keep=100)
    assert f"Resuming at step {last}" in err
    names = os.listdir(ckpt_dir)
    assert not [n for n in names if "tmp" in n]
    assert {last + 1, last + 2} <= {int(n) for n in names if n.isdigit()}


def test_checkpoint_from_1_device_restores_on_8_and_4(digits_dir, tmp_path):
    workdir = str(tmp_path / "one")
    # Trained and saved here (one device: the compiled step is shared with the other tests),
    # then restored laid out over 8 and over 4 devices.
    trees = {n: run_script("restore_tree.py", digits_dir, workdir, n, *flags, devices=n)
             for n, flags in ((1, ["--train"]), (8, []), (4, []))}
    assert trees[1].keys() == trees[8].keys() == trees[4].keys()
    for key in trees[1]:
        assert trees[1][key] == trees[8][key] == trees[4][key], key


# ---------------------------------------------------------------------------------------------
# Refusals.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_dir):
    """A committed 2-step run of the test config."""
    config = test_config.get_config()
    config.data.data_dir = digits_dir
    config.training.num_train_steps = 2
    workdir = str(tmp_path_factory.mktemp("trained"))
    training.train_and_evaluate(config, workdir)
    return config, workdir


def _copy(workdir, tmp_path):
    import shutil

    dst = str(tmp_path / "copy")
    shutil.copytree(workdir, dst)
    return dst


def test_resume_with_a_different_model_config_is_refused(trained, tmp_path):
    config, workdir = trained
    config = test_config.get_config()
    config.data.data_dir = trained[0].data.data_dir
    config.model.ch = 32
    with pytest.raises(checkpoints.CheckpointError, match=r"model\.ch: checkpoint 64, config 32"):
        _setup(config, workdir)


def _setup(config, workdir):
    import contextlib

    with contextlib.ExitStack() as stack:
        return training.setup(config, workdir, stack)


def test_shape_mismatch_names_the_path_and_both_shapes(trained):
    _, workdir = trained
    from ddpm_jax import unet

    other = test_config.get_config()
    other.model.ch = 32
    _, abstract = unet.abstract_model(unet.ModelSpec.from_config(other))
    with checkpoints.Checkpointer.open(workdir) as ckpt, pytest.raises(
            checkpoints.CheckpointError,
            match=r"ema_params/conv_in/bias has shape \(64,\) in the checkpoint but "
                  r"\(32,\) in the config"):
        ckpt.restore(2, {"ema_params": abstract})


@pytest.mark.parametrize("damage", ["delete_array_dir", "truncate_data", "delete_meta"])
def test_damaged_checkpoint_is_refused_with_its_path(trained, tmp_path, damage):
    import ddpm_jax

    _, workdir = trained
    workdir = _copy(workdir, tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", "2")
    if damage == "delete_array_dir":
        import shutil

        shutil.rmtree(os.path.join(step_dir, "ema_params", "d"))
    elif damage == "truncate_data":
        for root, _, files in os.walk(os.path.join(step_dir, "ema_params")):
            for name in files:
                path = os.path.join(root, name)
                if os.path.getsize(path) > 1000:
                    with open(path, "r+b") as f:
                        f.truncate(100)
    else:
        os.remove(os.path.join(step_dir, "meta", "metadata"))
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint .*/2 is damaged"):
        ddpm_jax.load(workdir)


def test_unwritable_workdir_is_refused(tmp_path, test_cfg):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(config_lib.ConfigError, match="is not writable"):
        _setup(test_cfg, str(blocker / "run"))


def test_failed_save_keeps_the_last_good_checkpoint(trained, tmp_path, monkeypatch):
    config, workdir = trained
    workdir = _copy(workdir, tmp_path)
    config = test_config.get_config()
    config.data.data_dir = trained[0].data.data_dir
    config.training.num_train_steps = 4

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", disk_full)
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"step 4 failed .*No space left.*\(step 2, .*/2\) is intact"):
        training.train_and_evaluate(config, workdir)
    monkeypatch.undo()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    import ddpm_jax

    assert ddpm_jax.load(workdir).step == 2


def _config(trained, steps):
    config = test_config.get_config()
    config.data.data_dir = trained[0].data.data_dir
    config.training.num_train_steps = steps
    return config


def test_finished_or_overtrained_workdir_is_left_as_it_is(trained, tmp_path, capsys):
    workdir = _copy(trained[1], tmp_path)
    before = snapshot(workdir)
    assert int(training.train_and_evaluate(_config(trained, 2), workdir).step) == 2
    assert "trained to training.num_train_steps=2 already" in capsys.readouterr().err
    with pytest.raises(checkpoints.CheckpointError) as e:
        training.train_and_evaluate(_config(trained, 1), workdir)
    assert "at step 2, past training.num_train_steps=1" in str(e.value)
    assert snapshot(workdir) == before  # config.json, metrics, grids untouched


def test_replace_params_checks_shapes_and_finiteness(trained):
    import ddpm_jax

    model = ddpm_jax.load(trained[1])
    leaves, tree = jax.tree_util.tree_flatten_with_path(model.params)
    first = jax.tree_util.keystr(leaves[0][0], simple=True, separator="/")
    wrong = jax.tree.unflatten(tree, [np.zeros((3,), np.float32)] + [v for _, v in leaves[1:]])
    with pytest.raises(ValueError, match=f"params {first} is float32 \\(3,\\), this network "):
        model.replace(params=wrong)
    nan = jax.tree.map(lambda v: np.full(v.shape, np.nan, v.dtype), model.params)
    with pytest.raises(ValueError, match=f"params {first} holds NaN"):
        model.replace(params=nan)
    same = model.replace(params=jax.tree.map(np.asarray, model.params))
    assert same.num_params == model.num_params


def test_api_errors_name_arguments_not_flags(trained):
    import ddpm_jax

    model = ddpm_jax.load(trained[1])
    with pytest.raises(ValueError) as e:
        model.sample(jax.random.key(0), 0)
    assert "--" not in str(e.value) and "num_samples" in str(e.value)


_MARK = 7  # a batch of only this value becomes NaN on the devices (see _poison)


class _Poisoned:
    """A reader whose batch number ``position`` (1-based) is marked to turn into NaN."""

    def __init__(self, reader, position):
        self.reader, self.poison_at = reader, position

    def __next__(self):
        batch = next(self.reader)
        return np.full_like(batch, _MARK) if self.reader.position == self.poison_at else batch

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.reader.close()

    def __getattr__(self, name):
        return getattr(self.reader, name)


def _poison(monkeypatch, position):
    real = input_pipeline.create_train_reader
    monkeypatch.setattr(input_pipeline, "create_train_reader",
                        lambda *a, **k: _Poisoned(real(*a, **k), position))
    scale = images.to_model_space
    monkeypatch.setattr(images, "to_model_space", lambda x: jnp.where(
        jnp.all(x == _MARK), jnp.nan, scale(x)))


def test_nan_stops_the_run_without_a_bad_checkpoint(test_cfg, tmp_path, monkeypatch):
    _poison(monkeypatch, 3)
    test_cfg.training.num_train_steps = 6
    with pytest.raises(training.NonFiniteError, match="non-finite loss or gradient at step 3"):
        training.train_and_evaluate(test_cfg, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # nothing saved after it
    leaves, _ = _leaves(str(tmp_path), 2)
    assert all(np.all(np.isfinite(v)) for v in leaves.values())


def test_skip_nonfinite_keeps_training(test_cfg, tmp_path, monkeypatch):
    _poison(monkeypatch, 2)
    test_cfg.optim.skip_nonfinite = True
    state = training.train_and_evaluate(test_cfg, str(tmp_path))
    assert int(state.step) == 4 and int(state.nonfinite_steps) == 1
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["nonfinite_steps"] == 1


def test_a_non_finite_loss_exits_train_py_with_code_3(digits_dir, tmp_path, monkeypatch):
    # train.py in this process, on the poisoned batch of the two tests above (their compiled
    # step, read back from the compilation cache): exit code 3 and the step, in one line.
    _poison(monkeypatch, 3)
    code, _, err = run_script_here(*_train_cmd(tmp_path, digits_dir, steps=6))
    assert code == 3, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "non-finite loss or gradient at step 3" in line and "Traceback" not in err


@pytest.mark.parametrize(
    "override, message",
    [  # a mistake in the flags, in a value's type, and one found by validation
        ("--config.model.chanels=3", "unknown config key model.chanels; did you mean model.ch"),
        ("--config.model.ch=wide", "model.ch"),
        ("--config.diffusion.beta_schedule=cosin", "beta_schedule='cosin' is not one of"),
    ],
)
def test_bad_config_fails_at_start_with_one_line(digits_dir, tmp_path, override, message):
    code, _, err = run_script_here(*_train_cmd(tmp_path / "w", digits_dir, override))
    assert code == 2  # and no traceback: any exception but the exit would fail the test
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert not (tmp_path / "w" / "checkpoints").exists() or not os.listdir(
        tmp_path / "w" / "checkpoints")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.dataset", "imagenet", "unknown dataset"),
        ("data.channels", 3, "config.data.channels=3 does not match digits"),
        ("sampling.num_steps", 5000, "sampling.num_steps must be"),
    ],
)
def test_bad_config_is_refused_before_anything_is_written(test_cfg, tmp_path, key, value,
                                                         message):
    # The same UserError as above, here in-process: train.py prints it as one line, exit code 2.
    section, name = key.split(".")
    test_cfg[section][name] = value
    workdir = tmp_path / "w"
    with pytest.raises(errors.UserError) as excinfo:
        training.train_and_evaluate(test_cfg, str(workdir))
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


def test_loading_a_checkpoint_logs_no_warning(trained, caplog):
    import logging

    import ddpm_jax

    caplog.set_level(logging.WARNING)
    ddpm_jax.load(trained[1])  # read-only: Orbax's notices that it is read-only are dropped
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_warmup_longer_than_the_run_is_a_warning_not_a_refusal():
    config = test_config.get_config()
    config.optim.warmup = 100  # the test config trains 4 steps
    config_lib.validate(config)
    (warning,) = config_lib.warnings(config)
    assert warning.startswith("optim.warmup=100 is longer than training.num_train_steps=4")
    config.optim.warmup = 4
    assert config_lib.warnings(config) == []
    # k steps per call on CPU: a warning there (the loop is ~20x slower), none elsewhere.
    config.training.steps_per_dispatch = 2
    (warning,) = config_lib.warnings(config, backend="cpu")
    assert warning.startswith("training.steps_per_dispatch=2 on CPU") and "\n" not in warning
    assert config_lib.warnings(config, backend="gpu") == config_lib.warnings(config) == []


def test_batch_not_divisible_by_devices_is_refused(digits_dir, tmp_path):
    proc = run_python(_train_cmd(tmp_path, digits_dir, "--config.training.batch_size=12"),
                      devices=8, timeout=120)
    assert proc.returncode == 2
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "12" in line[0] and "8" in line[0]


def test_no_pickle_anywhere():
    pattern = re.compile(
        r"pickle\.loads?\(|allow_pickle\s*=\s*True|torch\.load\((?![^)]*weights_only=True)")
    offenders = []
    for folder in ("ddpm_jax", "configs"):
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            offenders += [os.path.join(root, f) for f in files if f.endswith(".py")
                          and pattern.search(open(os.path.join(root, f)).read())]
    offenders += [f for f in ("train.py", "sample.py")
                  if pattern.search(open(os.path.join(ROOT, f)).read())]
    assert not offenders

"""Bad input refused before anything runs, in one line, with nothing on disk changed: locks on
workdirs and sample folders, configs, config files, unwritable folders, finished runs, params.
In-process wherever possible (set-up stops before any compile)."""

import contextlib
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import snapshot

from configs import test as test_config
from ddpm_jax import config_lib, datasets, files, training


def _setup(config, workdir, **kwargs):
    with contextlib.ExitStack() as stack:
        return training.setup(config, workdir, stack, **kwargs)


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# -- locks ----------------------------------------------------------------------------------------
def _lock_file(folder, name, **holder) -> str:
    path = os.path.join(folder, f".{name}.lock")
    files.write_json(path, dict(program="train.py", since="then", token="t", **holder))
    return path


@pytest.fixture()
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_second_run_on_a_workdir_in_use_is_refused_naming_the_holder(test_cfg, tmp_path,
                                                                     live_pid):
    host = socket.gethostname()
    _lock_file(tmp_path, "train", host=host, pid=live_pid, started=files._start_time(live_pid))
    before = snapshot(tmp_path)
    with pytest.raises(files.LockedError) as e:
        _setup(test_cfg, str(tmp_path))
    msg = _one_line(e)
    assert f"workdir {tmp_path} is in use by train.py on host {host} (pid {live_pid}" in msg
    assert snapshot(tmp_path) == before  # refused before anything was written


def test_lock_of_a_killed_run_on_this_host_does_not_block(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    _lock_file(tmp_path, "train", host=socket.gethostname(), pid=dead.pid, started="1")
    with files.FolderLock(tmp_path, "train", what="workdir", program="train.py") as lock:
        assert files.read_json(lock.path)["pid"] == os.getpid()
    assert "no longer runs" in capsys.readouterr().err
    assert not os.path.exists(lock.path)  # released at the end
    # A reused pid (a live process started at another time) is not the holder either.
    _lock_file(tmp_path, "train", host=socket.gethostname(), pid=os.getpid(), started="1")
    with files.FolderLock(tmp_path, "train", what="workdir", program="train.py"):
        pass


def test_lock_held_on_another_host_needs_the_take_over_flag(tmp_path, capsys):
    path = _lock_file(tmp_path, "samples", host="elsewhere-7", pid=123)
    before = snapshot(tmp_path)
    with pytest.raises(files.LockedError) as e:
        with files.FolderLock(tmp_path, "samples", what="folder x", program="sample.py"):
            pass
    msg = _one_line(e)
    assert "on host elsewhere-7 (pid 123" in msg and "rerun with --take_over_lock" in msg
    assert snapshot(tmp_path) == before
    with files.FolderLock(tmp_path, "samples", what="folder x", program="sample.py",
                          take_over=True):
        assert files.read_json(path)["host"] == socket.gethostname()
    assert "taken over" in capsys.readouterr().err


def test_the_processes_of_one_run_share_the_lock(tmp_path):
    # A process other than 0 never takes the lock; it stops when process 0 could not.
    with files.FolderLock(tmp_path, "train", what="w", program="p", leader=False,
                          broadcast=lambda v: 1):
        assert not os.listdir(tmp_path)
    with pytest.raises(files.LockedError, match="process 0 says which"):
        with files.FolderLock(tmp_path, "train", what="w", program="p", leader=False,
                              broadcast=lambda v: 0):
            pass
    # Nested use in one process (evaluate, then the sampling it runs) is allowed.
    with files.FolderLock(tmp_path, "s", what="w", program="p"), \
            files.FolderLock(tmp_path, "s", what="w", program="p"):
        pass


# -- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(beta_schedule="jsd"), "ends with beta = 1, so the last alpha-bar is 0"),
    (dict(beta_end=1.0), "ends with beta = 1, so the last alpha-bar is 0"),
    (dict(beta_start=0.02, beta_end=1e-4), "decrease (beta_start=0.02 > beta_end=0.0001?)"),
    (dict(loss_type="mse", model_var_type="learned_range"), "would get no gradient"),
])
def test_configs_that_cannot_train_are_refused(changes, message):
    config = test_config.get_config()
    for k, v in changes.items():
        config.diffusion[k] = v
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    assert message in _one_line(e)


@pytest.mark.parametrize("key, value, message", [
    ("num_classes", 2.7, "model.num_classes must be a non-negative integer"),
    ("num_classes", True, "model.num_classes must be a non-negative integer"),
    ("num_classes", "10", "model.num_classes must be a non-negative integer"),
    ("num_classes", -1, "model.num_classes must be a non-negative integer"),
    ("cond_drop_prob", 1.0, "model.cond_drop_prob must be in [0, 1)"),
])
def test_class_settings_of_a_saved_config_are_checked_as_written(key, value, message):
    tree = config_lib.to_dict(test_config.get_config())  # as a config.json holds it
    tree["model"][key] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config_lib.from_dict(tree))
    assert message in _one_line(e)


def test_schedules_that_train_still_pass():
    for schedule in ("linear", "quad", "const", "warmup10", "cosine"):
        config = test_config.get_config()
        config.diffusion.beta_schedule = schedule
        config_lib.validate(config)
    config.diffusion.update(beta_schedule="jsd", model_mean_type="xstart")
    config_lib.validate(config)  # jsd divides by alpha-bar only through eps


@pytest.mark.parametrize("content, message", [
    (None, "there is no file"),
    ("def get_config(:\n", "cannot be read as Python at line 1"),
    ("x = 1\n", "defines no get_config()"),
])
def test_config_file_that_cannot_load_is_one_line(tmp_path, content, message, capsys):
    from ddpm_jax import cli

    path = tmp_path / "exp.py"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        cli.parse_flags(["train.py", f"--config={path}", f"--workdir={tmp_path / 'w'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("error: ") and message in err
    assert not (tmp_path / "w").exists()


# -- folders and finished runs -------------------------------------------------------------------
def test_checkpoints_folder_that_is_a_file_is_refused_before_compiling(test_cfg, tmp_path):
    (tmp_path / "checkpoints").write_text("in the way")
    before = snapshot(tmp_path)
    with pytest.raises(config_lib.ConfigError) as e:
        _setup(test_cfg, str(tmp_path))
    assert "checkpoints folder" in _one_line(e) and "not writable" in str(e.value)
    assert snapshot(tmp_path) == before


def test_refused_start_leaves_no_empty_workdir(test_cfg, tmp_path):
    (tmp_path / "data").write_text("a file")
    test_cfg.data.data_dir = str(tmp_path / "data")
    with pytest.raises(datasets.DataError) as e:
        training.train_and_evaluate(test_cfg, str(tmp_path / "new"))
    assert "is a file, not a folder" in _one_line(e)
    assert not (tmp_path / "new").exists()


# -- sample.py / evaluate on one output folder (no network: the chunks are stubbed) --------------
@pytest.fixture()
def fake_model(monkeypatch):
    import types

    from ddpm_jax import diffusion, generate, sharding

    config = test_config.get_config()
    model = types.SimpleNamespace(config=config, source="ck", step=2, ema=True, num_classes=0,
                                  mesh=sharding.create_mesh(), image_shape=(8, 8, 1),
                                  diffusion=diffusion.Diffusion.from_config(config))
    calls = []

    def chunks(model, key, plan, spec, *, start=0, x_T=None, labels=None, guidance=0.0):
        for i in range(start, plan.num_chunks):
            if calls and calls[-1] == "interrupt" and i == start + 1:
                raise KeyboardInterrupt
            yield np.full((plan.rows(i), 8, 8, 1), i, np.uint8)

    monkeypatch.setattr(generate, "iter_chunks", chunks)
    return model, calls


def test_ctrl_c_in_sampling_keeps_finished_batches_and_resumes(fake_model, tmp_path):
    from ddpm_jax import generate

    model, calls = fake_model
    calls.append("interrupt")
    with pytest.raises(generate.Interrupted) as e:
        generate.generate(model, str(tmp_path), num_samples=6, batch_size=2, progress=False)
    assert e.value.exit_code == 130
    assert "interrupted after 2 of 6 images" in _one_line(e)
    assert sorted(os.listdir(tmp_path / generate.SHARDS)) == ["shard_000000.npz", "spec.json"]
    assert not os.path.exists(tmp_path / ".samples.lock")  # released
    calls.append("run")
    path = generate.generate(model, str(tmp_path), num_samples=6, batch_size=2, progress=False)
    np.testing.assert_array_equal(np.load(path)["images"][:, 0, 0, 0], [0, 0, 1, 1, 2, 2])


def test_second_sampler_on_one_folder_and_unwritable_folders_are_refused(fake_model, tmp_path,
                                                                         live_pid):
    from ddpm_jax import generate

    model, _ = fake_model
    _lock_file(tmp_path, "samples", host=socket.gethostname(), pid=live_pid,
               started=files._start_time(live_pid))
    before = snapshot(tmp_path)
    with pytest.raises(files.LockedError) as e:
        generate.generate(model, str(tmp_path), num_samples=2, progress=False)
    assert f"output folder {tmp_path} is in use by train.py" in _one_line(e)
    assert snapshot(tmp_path) == before
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(files.WriteError) as e:
        generate.generate(model, str(tmp_path / "a_file"), num_samples=2, progress=False)
    assert "output folder" in _one_line(e) and "a file is in the way" in str(e.value)


@pytest.mark.parametrize("damage", ["junk", "truncated", "empty"])
def test_junk_or_truncated_weights_file_is_one_line(tmp_path, damage):
    from etils import epath
    from safetensors.numpy import save

    from ddpm_jax.weights import diffusers

    good = save({"conv_in.weight": np.zeros((32, 3, 3, 3), np.float32)})
    data = {"junk": b"not safetensors at all", "truncated": good[:len(good) // 2],
            "empty": b""}[damage]
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    path.write_bytes(data)
    with pytest.raises(diffusers.WeightsError) as e:
        diffusers._read_tensors(epath.Path(path))
    assert "is not a readable .safetensors file" in _one_line(e) and str(path) in str(e.value)
    assert path.read_bytes() == data


@pytest.mark.parametrize("command", ["sample.py", "evaluate"])
def test_sample_and_evaluate_name_and_honour_take_over_lock(command, digits_dir, tmp_path):
    from conftest import initial_params, run_script_here

    from ddpm_jax import checkpoints

    config = test_config.get_config()
    config.data.data_dir = digits_dir
    workdir, out = str(tmp_path / "run"), tmp_path / "out"
    checkpoints.save_weights(workdir, config, initial_params(config, 0))
    os.makedirs(out)
    _lock_file(out, "samples", host="elsewhere-7", pid=123)
    before = snapshot(out)
    args = ([command] if command == "sample.py" else ["-m", "ddpm_jax.evaluate"]) + [
        f"--workdir={workdir}", "--num_samples=4", "--sampler=ddim", "--num_steps=2",
        *((f"--output_dir={out}", "--batch_size=4") if command == "sample.py" else
          (f"--samples_dir={out}", "--sample_batch_size=4", "--metrics=digits_fd",
           f"--out={tmp_path / 'eval.json'}"))]
    code, _, err = run_script_here(*args)
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and "elsewhere-7" in line and "rerun with --take_over_lock" in line, err
    assert snapshot(out) == before and not os.path.exists(tmp_path / "eval.json")
    code, _, err = run_script_here(*args, "--take_over_lock")
    assert code == 0, err[-3000:]
    assert "taken over" in err and not os.path.exists(out / ".samples.lock")  # then released
    assert np.load(out / "samples.npz")["images"].shape == (4, 8, 8, 1)

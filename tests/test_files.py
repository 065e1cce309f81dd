"""Files that are never torn and never lost: atomic writes, JSON read back, the npz stream,
metrics.jsonl, and samples of other settings moved aside (all in-process, no compile)."""

import gc
import json
import os
import subprocess
import warnings

import numpy as np
import pytest

from ddpm_jax import files, generate, metric_logging


def snapshot(root) -> dict:
    """Every file under ``root`` with its bytes: 'nothing on disk changed' is equality."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@pytest.fixture()
def full_disk(tmp_path):
    """A 64 KiB tmpfs (needs root; skipped elsewhere): writes past it fail with ENOSPC."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_write_is_atomic_on_a_full_disk(full_disk):
    target = full_disk / "samples.json"
    files.write_json(target, {"old": 1})
    before = snapshot(full_disk)
    with pytest.raises(files.WriteError) as e:
        files.write_bytes(target, b"x" * (1 << 20))
    msg = str(e.value)
    assert "\n" not in msg and str(target) in msg and "No space left" in msg
    assert snapshot(full_disk) == before  # the old file whole, no temporary left


def test_write_failing_midway_leaves_the_old_file(tmp_path):
    target = tmp_path / "a.npz"
    files.write_npz(target, images=np.zeros(3, np.uint8))
    before = snapshot(tmp_path)

    def chunks():
        yield np.ones((2, 2), np.uint8)
        raise OSError(28, "No space left on device")

    with pytest.raises(files.WriteError, match="could not write .*a.npz"):
        files.write_npz_stream(target, "images", (4, 2), np.uint8, chunks())
    with pytest.raises(ValueError, match="wrote 2 rows"):
        files.write_npz_stream(target, "images", (4, 2), np.uint8, iter([np.ones((2, 2))]))
    assert snapshot(tmp_path) == before


def test_read_json_missing_torn_and_strict_nan(tmp_path):
    assert files.read_json(tmp_path / "none.json") is None
    for text in ("", '{"a": 1'):
        (tmp_path / "t.json").write_text(text)
        with pytest.raises(files.TornFileError) as e:
            files.read_json(tmp_path / "t.json")
        assert "\n" not in str(e.value) and "t.json" in str(e.value)
        assert "delete it and rerun" in str(e.value)
    files.write_json(tmp_path / "n.json", {"bpd": float("nan"), "x": [np.float32(np.inf), 1.5]})
    text = (tmp_path / "n.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"bpd": None,
                                                                        "x": [None, 1.5]}


def test_npz_stream_round_trip_and_no_leaked_handle(tmp_path):
    path = tmp_path / "s.npz"
    data = np.arange(7 * 3 * 2, dtype=np.uint8).reshape(7, 3, 2)
    files.write_npz_stream(path, "images", data.shape, np.uint8, [data[:4], data[4:]])
    np.testing.assert_array_equal(np.load(path)["images"], data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shape, rows = files.iter_npz_rows(path, "images", 3, 5)
        assert shape == data.shape
        np.testing.assert_array_equal(np.concatenate(list(rows)), data[:5])
        with pytest.raises(files.NpzError, match="no uncompressed array 'labels'"):
            files.iter_npz_rows(path, "labels", 3)
        shape, rows = files.iter_npz_rows(path, "images", 3)
        next(rows)
        del rows  # stopped early: closed when collected
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], caught
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:-40])
    for bad, match in ((b"", "not an .npz"), (path.read_bytes()[:100], "not an .npz")):
        (tmp_path / "bad.npz").write_bytes(bad)
        with pytest.raises(files.NpzError, match=match):
            files.iter_npz_rows(tmp_path / "bad.npz", "images", 3)


def test_metrics_jsonl_damaged_line_reported_and_kept(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\ngarbage\n{"step": 2, "loss": NaN}\n'
                    '{"step": 3, "loss": 0.5}\n{"step": 4, "lo')
    writer = metric_logging.MetricWriter(tmp_path, resume_step=2, enabled=True)
    writer.write(3, {"loss": float("nan")})
    writer.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line(s) 2, 5" in err[0] and "metrics.jsonl.damaged" in err[0]
    lines = path.read_text().splitlines()
    rows = [json.loads(ln, parse_constant=lambda c: pytest.fail(c)) for ln in lines]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": None},
                    {"step": 3, "loss": None}]
    assert (tmp_path / "metrics.jsonl.damaged").read_text() == 'garbage\n{"step": 4, "lo\n'


SPEC = dict(checkpoint="ck", checkpoint_step=4, ema=True, num_samples=2, batch_size=2, seed=0,
            sampler="ancestral", num_steps=None, eta=0.0, image_shape=[2, 2, 1])


def _moved(out, k=0):
    return snapshot(out / "previous_samples" / str(k))


@pytest.mark.parametrize("case", ["no_json", "torn_json", "other_seed", "npz_torn"])
def test_samples_not_of_these_settings_are_moved_aside(tmp_path, case, capsys):
    out = tmp_path
    files.write_npz(out / "samples.npz", images=np.zeros((2, 2, 2, 1), np.uint8))
    if case == "torn_json":
        (out / "samples.json").write_text("")
    elif case == "other_seed":
        files.write_json(out / "samples.json", dict(SPEC, seed=1))
    elif case == "npz_torn":
        files.write_json(out / "samples.json", SPEC)
        (out / "samples.npz").write_bytes(b"PK\x03\x04")
    before = snapshot(out)
    shard_dir = generate._prepare(out, SPEC)
    assert shard_dir == out / generate.SHARDS
    assert not (out / "samples.npz").exists()
    assert _moved(out) == before  # every byte kept, under previous_samples/0
    msg = capsys.readouterr().out
    assert "moved to" in msg and "previous_samples/0" in msg
    assert files.read_json(shard_dir / "spec.json") == SPEC


def test_complete_samples_are_reused_and_torn_spec_recovered(tmp_path, capsys):
    files.write_npz(tmp_path / "samples.npz", images=np.zeros((2, 2, 2, 1), np.uint8))
    files.write_json(tmp_path / "samples.json", SPEC)
    before = snapshot(tmp_path)
    assert generate._prepare(tmp_path, SPEC) is None
    assert snapshot(tmp_path) == before
    # A spec.json left empty (a write cut short): its shards are kept aside, sampling restarts.
    other = tmp_path / "o"
    shards = other / generate.SHARDS
    shards.mkdir(parents=True)
    (shards / "spec.json").write_text("")
    files.write_npz(shards / "shard_000000.npz", images=np.ones((2, 2, 2, 1), np.uint8))
    before = snapshot(other)
    assert generate._prepare(other, SPEC) == shards
    assert "spec.json is unreadable" in capsys.readouterr().out
    assert _moved(other) == before
    assert files.read_json(shards / "spec.json") == SPEC
    assert not (shards / "shard_000000.npz").exists()

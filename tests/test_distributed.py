"""Several real JAX processes on 127.0.0.1 (gloo collectives, two simulated CPU devices each):
training, sampling, preemption, failures. Each test bounds its time and kills its children."""

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
from conftest import (
    finish,
    run_processes,
    run_python,
    run_script,
    run_script_here,
    sample_here,
    start_processes,
    train_here,
    wait_until,
)

# The multi-process training runs compile at XLA:CPU's lowest LLVM optimisation level: the same
# programs (HLO, collectives, checkpoints), compiled in about 60 % of the time (their 4-device
# steps are compiled by every process: the compilation cache is off for several processes on
# CPU), run a little slower. Every comparison is between runs compiled alike, since the level
# changes float rounding as a device count does.
COMPILE_FAST = "--xla_backend_optimization_level=0"


def _train(workdir, digits_dir, *extra):
    return ["train.py", "--config=configs/test.py", f"--workdir={workdir}",
            f"--config.data.data_dir={digits_dir}", *extra]


def _dump(workdir, step):
    return run_script("dump_run.py", workdir, step)


def test_rows_go_to_the_devices_that_own_them_across_processes():
    results = run_processes(["tests/scripts/process_rows.py"], num_processes=2, devices=2)
    outs = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    # An interleaved mesh (p0 d0, p1 d0, p0 d1, p1 d1) gives each process rows 0-1 and 4-5 of
    # process 0 ... not contiguous; the global batch still equals the rows read.
    assert outs[0]["rows"] == [0, 1, 4, 5] and outs[1]["rows"] == [2, 3, 6, 7]
    assert all(o["ok"] for o in outs)


def test_sampling_on_two_processes_writes_the_same_file(digits_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train_here(workdir, digits_dir, 2)
    sample = ["sample.py", f"--workdir={workdir}", "--num_samples=7", "--batch_size=3",
              "--sampler=ddim", "--num_steps=5"]
    run_processes([*sample, f"--output_dir={tmp_path / 'two'}"], num_processes=2, devices=2)
    sample_here(workdir, tmp_path / "one", num_samples=7, batch_size=3, sampler="ddim",
                num_steps=5)  # sample.py with the same flags, on one device
    two, one = (open(tmp_path / d / "samples.npz", "rb").read() for d in ("two", "one"))
    assert two == one  # the same bytes: every image of every batch
    assert not os.path.exists(tmp_path / "two" / "sample_shards")


def _wait_for_rows(path, count, procs):
    return wait_until(lambda: os.path.exists(path) and len(open(path).readlines()) >= count,
                      procs)


@pytest.fixture(scope="module")
def preempted(digits_dir, tmp_path_factory):
    """Two processes checkpointing every 2 steps, stopped by SIGTERM at a step K that they
    commit; then a copy of their run with the checkpoints after the last one before K removed,
    resumed on two processes back to K: (results of the stopped processes, their checkpointed
    steps, the stopped workdir, the resumed workdir)."""
    root = tmp_path_factory.mktemp("preempted")
    workdir, resumed = str(root / "preempted"), str(root / "resumed")
    # No grid before the signal (the resumed run writes its final grid on both processes).
    long = ("--config.training.num_train_steps=100000", "--config.training.checkpoint_every=2",
            "--config.training.sample_every=100000")
    procs = start_processes(_train(workdir, digits_dir, *long), num_processes=2, devices=2,
                            xla_flags=COMPILE_FAST)
    try:
        assert _wait_for_rows(os.path.join(workdir, "metrics.jsonl"), 3, procs)
        for p in procs:
            p.send_signal(signal.SIGTERM)
    finally:
        results = finish(procs, timeout=240)
    steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    earlier = [s for s in steps if s < steps[-1]]
    if earlier:
        shutil.copytree(workdir, resumed)
        for s in steps[len(earlier):]:
            shutil.rmtree(os.path.join(resumed, "checkpoints", str(s)))
        run_processes(_train(resumed, digits_dir, f"--config.training.num_train_steps={steps[-1]}"),
                      num_processes=2, devices=2, xla_flags=COMPILE_FAST)
    return results, steps, workdir, resumed


def test_sigterm_to_every_process_commits_one_step_and_resumes_exactly(preempted):
    results, steps, workdir, resumed = preempted
    assert [code for code, _, _ in results] == [143, 143], results[0][2][-2000:]
    k = steps[-1]  # the step the processes were at: its checkpoint is the newest
    assert k >= 3 and len(steps) >= 2, steps
    for _, _, err in results:  # both processes stopped at the same, committed step
        assert f"the checkpoint of step {k} is committed" in err
    # Resumed from the checkpoint before K, the run reaches at K exactly what the stopped run
    # committed: every array, the meta a resume reads (data position, key), every logged loss,
    # bit for bit. So the committed step is the uninterrupted run's, and training resumes exactly.
    assert _dump(workdir, k) == _dump(resumed, k)


def test_two_processes_train_like_one_process_with_the_same_devices(preempted, digits_dir,
                                                                   tmp_path):
    two, num_steps = preempted[2], preempted[1][-1]  # the stopped run: uninterrupted up to K
    one = str(tmp_path / "one")
    proc = run_python(_train(one, digits_dir, f"--config.training.num_train_steps={num_steps}"),
                      devices=4, xla_flags=COMPILE_FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _dump(two, num_steps), _dump(one, num_steps)
    assert a["meta"] == b["meta"] and a["leaves"].keys() == b["leaves"].keys()
    losses_a, losses_b = np.array(list(a["losses"].values())), np.array(list(b["losses"].values()))
    assert len(losses_a) == num_steps
    # The gradient all-reduce sums the devices' parts in another order across processes (gloo)
    # than inside one process: equal to float32 rounding, not bit for bit.
    np.testing.assert_allclose(losses_a, losses_b, rtol=1e-6)
    assert losses_a[0] == losses_b[0]  # the first step's loss (before any update) is exact


def test_a_process_that_dies_stops_the_others(digits_dir, tmp_path):
    workdir = str(tmp_path / "run")
    args = _train(workdir, digits_dir, "--config.training.num_train_steps=100000",
                  "--distributed_timeout=10")
    procs = start_processes(args, num_processes=2, devices=2, xla_flags=COMPILE_FAST)
    try:
        # config.json is written once every process has joined (before anything compiles).
        config_json = os.path.join(workdir, "config.json")
        assert wait_until(lambda: os.path.exists(config_json), procs)
        procs[1].kill()
        start = time.time()
        procs[0].wait(timeout=120)  # JAX's heartbeat notices the dead process
        assert procs[0].returncode != 0 and time.time() - start < 120
    finally:
        finish(procs, timeout=10)


def test_a_coordinator_that_never_answers_is_one_line_and_exit_code_2(tmp_path):
    from conftest import free_port

    start = time.time()
    proc = run_python(["train.py", "--config=configs/test.py", f"--workdir={tmp_path / 'w'}",
                       f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2",
                       "--process_id=1", "--distributed_timeout=3"], timeout=120)
    assert proc.returncode == 2 and time.time() - start < 60
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "did not answer within 3 s" in line and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "w")  # nothing was written


def test_a_process_that_never_joins_is_one_line_and_exit_code_2_on_every_process(tmp_path):
    # Three processes expected, two started: process 0 names the missing one, process 1 hears
    # that process 0 gave up; neither aborts, and nothing is written.
    start = time.time()
    procs = start_processes(["train.py", "--config=configs/test.py", f"--workdir={tmp_path / 'w'}",
                             "--distributed_timeout=4"], num_processes=3, devices=1, started=2)
    results = finish(procs, timeout=120)
    assert time.time() - start < 90
    lines = []
    for code, _, err in results:
        assert code == 2 and "Traceback" not in err and "Check failure" not in err, err[-2000:]
        (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
        lines.append(line)
    assert "process(es) 2 of 3 did not join within 4 s" in lines[0]
    assert "process 0 (127.0.0.1:" in lines[1] and "gave up waiting" in lines[1]
    assert not os.path.exists(tmp_path / "w")


def test_processes_started_with_other_counts_are_one_line_each(tmp_path):
    from conftest import free_port, popen_python

    address = f"127.0.0.1:{free_port()}"
    procs = [popen_python(["train.py", "--config=configs/test.py", f"--workdir={tmp_path / 'w'}",
                           f"--coordinator_address={address}", f"--num_processes={n}",
                           f"--process_id={i}", "--distributed_timeout=4"])
             for i, n in ((0, 2), (1, 3))]
    lines = []
    for code, _, err in finish(procs, timeout=120):
        assert code == 2 and "Traceback" not in err, err[-2000:]
        (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
        lines.append(line)
    assert "process(es) 1 of 2 did not join within 4 s" in lines[0]
    assert "process 0 runs 2 processes, this one was started with --num_processes=3" in lines[1]


def test_incomplete_process_flags_are_refused():
    code, _, err = run_script_here("train.py", "--config=configs/test.py",
                                   "--workdir=/nonexistent/w", "--num_processes=2")
    assert code == 2
    assert "missing --coordinator_address, --process_id" in err

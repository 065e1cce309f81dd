"""Where the time of the compiled train step (or forward pass) goes, op by op.

  python -m ddpm_jax.benchmarks.profile --config=cifar10 --batch=32 --measure=train
  python -m ddpm_jax.benchmarks.profile --config=cifar10 --batch=32 --measure=forward --top=15

Compiles the real step as ``ddpm_jax.benchmarks.train`` does (the project's XLA options, or
XLA's defaults with ``--xla_options=default``), runs it ``--warmup`` times, then ``--num_runs``
times under ``jax.profiler`` and reads the trace back with ``jax.profiler.ProfileData`` (no
TensorBoard needed). On XLA:CPU every executed thunk (a fusion, a convolution, a YNNPACK call, a
copy) is one event named after its HLO instruction. Each event counts its own time only (less
the events nested in it on the same thread, such as the body of a ``while``); wrappers
(executable launch, argument handling) are left out. Events are grouped into classes by their
instruction name (convolution, dot, reduction, copy or transpose, YNNPACK call, elementwise
fusion, collective, rng, other), and per class and per instruction the time per step and its
share are printed, then one JSON line. Thunks that run on several threads at once make the
total exceed the wall time; thunks that wait make it fall short of it.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile
from collections.abc import Sequence

import jax
from absl import app, flags

from ddpm_jax import sharding
from ddpm_jax.benchmarks import common
from ddpm_jax.benchmarks import train as bench

FLAGS = flags.FLAGS

# Instruction-name patterns -> class, first match wins (XLA names thunks after their HLO).
CLASSES = (
    ("YNNPACK call", re.compile(r"^ynn")),
    ("convolution", re.compile(r"conv|convolution")),
    ("dot / matmul", re.compile(r"dot|gemm|matmul")),
    ("reduction", re.compile(r"reduce|reduction")),
    ("copy / transpose", re.compile(r"copy|transpose|bitcast|slice|concatenate|pad")),
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|collective")),
    ("rng", re.compile(r"rng|random|threefry")),
    ("elementwise fusion", re.compile(r"fusion|add|multiply|subtract|divide|exp|log|tanh|"
                                      r"maximum|select|compare|convert")),
)
# Events that are wrappers around the thunks, not work of their own.
WRAPPERS = re.compile(r"^(PjitFunction|PjRt|CommonPjRt|Execute|ThunkExecutor|jit_|XlaModule|"
                      r"TfrtCpuExecutable|\$|ExecuteHelper|ParseArguments|Handle inputs)", re.I)


def op_class(name: str) -> str:
    lower = name.lower()
    for label, pattern in CLASSES:
        if pattern.search(lower):
            return label
    return "other"


def read_trace(log_dir: str) -> list[tuple[str, int]]:
    """(event name, self time in ns) of every event of the trace: an event's own duration less
    that of the events nested in it on the same thread (a ``while`` and its body's thunks, an
    executable and its thunks), so that nothing is counted twice."""
    from jax.profiler import ProfileData  # noqa: PLC0415

    paths = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise SystemExit(f"no trace was written under {log_dir}")
    events = []
    for plane in ProfileData.from_file(paths[0]).planes:
        for line in plane.lines:
            spans = sorted(((e.start_ns, e.end_ns, e.name) for e in line.events),
                           key=lambda e: (e[0], -e[1]))
            stack: list[list] = []  # [end, name, self ns]
            for start, end, name in spans:
                while stack and stack[-1][0] <= start:
                    events.append((stack[-1][1], stack.pop()[2]))
                if stack:  # nested: its time is not its parent's own
                    stack[-1][2] -= end - start
                stack.append([end, name, end - start])
            events.extend((name, own) for _, name, own in stack)
    return events


def summarize(events, steps: int, top: int) -> dict:
    """Time per step by op class and the ``top`` instructions (wrappers left out)."""
    per_op = collections.Counter()
    count = collections.Counter()
    for name, ns in events:
        if WRAPPERS.search(name):
            continue
        per_op[name] += ns
        count[name] += 1
    total = sum(per_op.values())
    classes = collections.Counter()
    for name, ns in per_op.items():
        classes[op_class(name)] += ns
    ms = lambda ns: round(ns / steps / 1e6, 3)
    return dict(
        thunk_ms_per_step=ms(total),
        classes={k: dict(ms_per_step=ms(v), share=round(v / max(total, 1), 4))
                 for k, v in classes.most_common()},
        top_ops=[dict(op=k, ms_per_step=ms(v), calls_per_step=count[k] / steps,
                      share=round(v / max(total, 1), 4), cls=op_class(k))
                 for k, v in per_op.most_common(top)],
    )


def profile(kind: str, config, batch: int, setting: str, warmup: int, num_runs: int, top: int):
    mesh = sharding.create_mesh()
    if kind == "train":
        lowered, tx, _ = bench.lower_train(config, mesh, 1, batch)
        compiled, compile_s = common.compile_timed(lowered, bench.options_for(setting, "train"))
        run = bench.TrainRunner(compiled, *bench.train_inputs(config, mesh, 1, batch, 0, tx))
    else:
        lowered, _ = bench.lower_forward(config, mesh, batch)
        compiled, compile_s = common.compile_timed(lowered, bench.options_for(setting, "forward"))
        inputs = bench.forward_inputs(config, mesh, batch, 0)
        run = lambda: jax.block_until_ready(compiled(*inputs))
    for _ in range(warmup):
        run()
    with tempfile.TemporaryDirectory() as log_dir:
        import time  # noqa: PLC0415

        jax.profiler.start_trace(log_dir)
        start = time.perf_counter()
        for _ in range(num_runs):
            run()
        wall = (time.perf_counter() - start) / num_runs
        jax.profiler.stop_trace()
        events = read_trace(log_dir)
    summary = summarize(events, num_runs, top)
    return dict(measure=kind, config=config.data.dataset, batch=batch, xla_options=setting,
                compile_s=round(compile_s, 2), wall_ms_per_step=round(wall * 1e3, 2),
                device=jax.devices()[0].device_kind, **summary)


def print_report(r: dict, file=sys.stderr) -> None:
    print(f"\n{r['measure']} step, {r['config']} batch {r['batch']}, XLA options "
          f"{r['xla_options']}: {r['wall_ms_per_step']} ms wall per step, "
          f"{r['thunk_ms_per_step']} ms of thunk time per step", file=file)
    print(f"{'class':<22}{'ms/step':>10}{'share':>8}", file=file)
    for k, v in r["classes"].items():
        print(f"{k:<22}{v['ms_per_step']:>10.1f}{v['share']:>8.1%}", file=file)
    print(f"\n{'op':<60}{'ms/step':>10}{'calls':>7}{'share':>8}", file=file)
    for o in r["top_ops"]:
        print(f"{o['op'][:59]:<60}{o['ms_per_step']:>10.1f}{o['calls_per_step']:>7.0f}"
              f"{o['share']:>8.1%}", file=file)


def main(argv: Sequence[str]) -> None:
    del argv
    config = common.load_config(FLAGS.config)
    batch = FLAGS.batch or config.training.batch_size
    for kind in FLAGS.measure:
        r = profile(kind, config, batch, FLAGS.xla_options, FLAGS.warmup, FLAGS.num_runs,
                    FLAGS.top)
        print_report(r)
        common.emit(r)


def define_flags() -> None:
    """The command's flags (defined only when this module is the program)."""
    flags.DEFINE_string("config", "cifar10", "Config name in configs/ (or its .py path).")
    flags.DEFINE_integer("batch", None, "Global batch (default: training.batch_size).")
    flags.DEFINE_list("measure", ["train"], "train and/or forward.")
    flags.DEFINE_enum("xla_options", "project", ["project", "default"],
                      "The project's XLA:CPU options or XLA's defaults.")
    flags.DEFINE_integer("warmup", 2, "Untimed calls after compiling.")
    flags.DEFINE_integer("num_runs", 3, "Profiled calls.")
    flags.DEFINE_integer("top", 20, "Instructions listed.")


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""The accelerator run: every figure of one GPU (or TPU) that the README needs, in one command.

  python -m ddpm_jax.benchmarks.accelerator --out=DIR            # CIFAR10 and 256x256 sizes
  python -m ddpm_jax.benchmarks.accelerator --out=DIR --tiny     # configs/test.py, CPU, seconds
  bash ddpm_jax/benchmarks/accelerator.sh OUT                    # on a machine without network

Writes ``DIR/accelerator.json`` (every record, rewritten after each part, so a run stopped
early keeps what it measured) and ``DIR/accelerator.txt`` (a short table, also printed). The
parts below run in this order, except that the train variants with several steps per dispatch
and the repeat check run last; each is skipped once ``--budget_s`` seconds have passed since
the start:

1. ``determinism``: a child process with ``--xla_gpu_deterministic_ops=true`` added to
   ``XLA_FLAGS`` runs the CIFAR10 train step 3 times from the initial state, twice, and
   compares every array of the two final states bit for bit (started first, before this
   process takes the accelerator's memory). This process repeats the same check without the
   flag on the float32 step it times.
2. ``train``: ``benchmarks.train`` on ``configs/cifar10.py`` at ``--batch`` (128, the paper's)
   for each ``--train_variants`` entry ``dtype:steps_per_dispatch``: images/s, steps/s, XLA's
   FLOPs, TFLOP/s, MFU against the detected peak (``common.PEAKS``), XLA's memory and the
   allocator's peak; with one step per dispatch, diffusers' ``UNet2DModel`` in the same layout
   on the same device (float32, or under ``torch.autocast`` for bfloat16), timed interleaved.
3. ``sampling``: the ancestral chain's ``lax.scan`` over ``--sampling_timed_steps`` steps of
   the CIFAR10 model at each of ``--sampling_batches`` and ``--sampling_dtypes`` (seconds per
   step = time / steps). The time for ``--num_samples`` samples is then NFE x seconds per step
   x the number of batches, for each ``--samplers`` entry ``name:steps`` (NFE = steps, Heun's
   2 x steps - 1): one U-Net call per function evaluation dominates every sampler's step, so
   the figure holds for any sampler with that many network calls.
4. ``inception``: the FID network (``metrics.inception_features``, random weights of the real
   shapes) on ``--fid_images`` uint8 32x32 images in batches of ``--fid_batch``: images/s.
5. ``big``: the 256x256 config (``configs/celebahq.py``) at ``--big_batch`` (64) in bfloat16:
   XLA's memory, and the speed when it fits the device (the allocator's limit).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags

from ddpm_jax import config_lib, sharding, training
from ddpm_jax.benchmarks import common
from ddpm_jax.benchmarks import sampling as sampling_bench
from ddpm_jax.benchmarks import train as train_bench

DETERMINISM_FLAG = "--xla_gpu_deterministic_ops=true"
PARTS = ("determinism", "train", "sampling", "inception", "big")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one accelerator run (``full`` on a GPU, ``tiny`` for the CPU rehearsal)."""

    config: str = "cifar10"
    batch: int = 128
    train_variants: tuple[tuple[str, int], ...] = (
        ("bfloat16", 1), ("float32", 1), ("bfloat16", 8), ("float32", 8))
    num_runs: int = 5
    sampling_batches: tuple[int, ...] = (256, 1000)
    sampling_dtypes: tuple[str, ...] = ("bfloat16", "float32")
    sampling_timed_steps: int = 10
    num_samples: int = 50_000
    samplers: tuple[tuple[str, int], ...] = (
        ("ancestral", 1000), ("ddim", 100), ("ddim", 50), ("dpm_solver++", 20), ("heun", 18))
    fid_images: int = 2000
    fid_batch: int = 500
    fid_size: int = 32
    big_config: str = "celebahq"
    big_batch: int = 64
    big_dtype: str = "bfloat16"
    budget_s: float = 360.0
    determinism_steps: int = 3
    determinism_timeout_s: float = 150.0


# The rehearsal's k-step variant is train.py's float32 program with steps_per_dispatch=3, which
# the test suite's k-steps test compiles too (bfloat16 is rehearsed by the sampling part).
TINY = Plan(config="test", batch=8, train_variants=(("float32", 1), ("float32", 3)),
            num_runs=1, sampling_batches=(4,), sampling_dtypes=("bfloat16",),
            sampling_timed_steps=2, num_samples=64, samplers=(("ancestral", 50), ("heun", 5)),
            fid_images=2, fid_batch=2, fid_size=8, big_config="test", big_batch=8,
            big_dtype="float32",  # the float32 variant's program again (compiled once)
            budget_s=1e9, determinism_timeout_s=1200.0)  # no budget: plain JSON numbers


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations of ``steps`` steps: Heun's second-order step evaluates twice except
    on its last step (EDM, Algorithm 1); every other sampler once per step."""
    return 2 * steps - 1 if sampler == "heun" else steps


# ---------------------------------------------------------------------------------------------
# The parts.
# ---------------------------------------------------------------------------------------------


def three_step_states(config, batch: int, steps: int, compiled=None) -> tuple[list, list]:
    """Runs the real train step ``steps`` times from the initial state, twice; the leaves of
    both final states (host arrays)."""
    mesh = sharding.create_mesh()
    if compiled is None:
        lowered, _, _ = train_bench.lower_train(config, mesh, 1, batch)
        compiled = lowered.compile(train_bench.options_for("project", "train"))
    tx = training.create_optimizer(config_lib.OptimizerSpec.from_config(config))
    finals = []
    for _ in range(2):
        run = train_bench.TrainRunner(compiled, *train_bench.train_inputs(config, mesh, 1, batch,
                                                                          0, tx))
        for _ in range(steps):
            run()
        finals.append([np.asarray(x) for x in jax.tree.leaves(run.state)])
    return finals[0], finals[1]


def compare_states(a: list, b: list) -> dict[str, Any]:
    """Whether two lists of arrays are bit-identical, and the largest difference if not."""
    same = all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))
    diff = max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
               if x.size else 0.0 for x, y in zip(a, b, strict=True))
    return dict(bit_identical=same, max_abs_diff=diff, arrays=len(a))


def determinism_child(plan: Plan) -> dict:
    """The ``determinism`` part, run in a child process whose XLA_FLAGS ask for it."""
    config = common.load_config(plan.config, "float32")
    a, b = three_step_states(config, plan.batch, plan.determinism_steps)
    return dict(part="determinism", xla_flags=os.environ.get("XLA_FLAGS", ""),
                steps=plan.determinism_steps, batch=plan.batch, config=plan.config,
                **compare_states(a, b), **common.device_fields("float32"))


def start_determinism(plan_args: list[str], out: str) -> subprocess.Popen:
    """Starts the child of the ``determinism`` part (before this process takes the device)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + DETERMINISM_FLAG).strip()
    path = os.path.join(out, "determinism.json")
    return subprocess.Popen([sys.executable, "-m", "ddpm_jax.benchmarks.accelerator",
                             f"--out={out}", "--child=determinism", *plan_args], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(path + ".log", "w"))


def finish_determinism(proc: subprocess.Popen, out: str, timeout: float) -> dict:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return dict(part="determinism", error=f"did not finish in {timeout:.0f} s")
    path = os.path.join(out, "determinism.json")
    if proc.returncode != 0 or not os.path.exists(path):
        with open(path + ".log") as f:
            tail = f.read()[-600:]
        return dict(part="determinism", error=f"exit code {proc.returncode}: {tail}")
    with open(path) as f:
        return json.load(f)


def train_part(plan: Plan, variant: tuple[str, int], peer: bool,
               programs: dict | None = None) -> list[dict]:
    dtype, k = variant
    settings = train_bench.Settings(
        config=plan.config, batch=plan.batch, dtype=dtype, steps_per_dispatch=k,
        measure=("train",), vs_diffusers=peer and k == 1, num_runs=plan.num_runs, warmup=1)
    records = train_bench.run(settings, programs)
    for r in records:
        r.update(part="train", steps_per_s=1.0 / r["step_s"])
    return records


def repeat_check(plan: Plan, programs: dict | None = None) -> dict:
    """Two 3-step runs of the float32 step with this process's XLA flags, compared: the program
    the float32 train part timed when ``programs`` holds it."""
    config = common.load_config(plan.config, "float32")
    key = train_bench.program_key(common.config_name(plan.config), "float32", "train", 1,
                                  plan.batch, "project")
    timed = (programs or {}).get(key)
    a, b = three_step_states(config, plan.batch, plan.determinism_steps,
                             compiled=timed["compiled"] if timed else None)
    return dict(part="repeat", xla_flags=os.environ.get("XLA_FLAGS", ""),
                steps=plan.determinism_steps, reused_program=timed is not None,
                **compare_states(a, b))


def sampling_part(plan: Plan, dtype: str, batch: int) -> dict:
    """Seconds per ancestral step of the config's model at ``batch``, and what they imply."""
    import ddpm_jax  # noqa: PLC0415

    config = common.load_config(plan.config, dtype)
    model = ddpm_jax.create(config, seed=0)
    k = plan.sampling_timed_steps
    key = jax.random.key(1)
    compiled, compile_s = sampling_bench.compile_seconds(
        sampling_bench.scan_chain(model, batch, k), model.params, key,
        options=train_bench.options_for("project", "forward"))
    run = lambda: compiled(model.params, key).block_until_ready()
    timing = common.interleaved({"scan": run}, plan.num_runs, warmup=1)
    step_s = timing.median("scan") / k
    batches = math.ceil(plan.num_samples / batch)
    implied = {f"{name}:{steps}": dict(nfe=nfe(name, steps),
                                       seconds=nfe(name, steps) * step_s * batches)
               for name, steps in plan.samplers}
    return dict(part="sampling", config=plan.config, dtype=dtype, batch=batch, timed_steps=k,
                compile_s=compile_s, step_s=step_s, images_steps_per_s=batch / step_s,
                num_samples=plan.num_samples, batches=batches, implied=implied,
                num_runs=plan.num_runs, **timing.load(), **common.device_fields(dtype))


def inception_part(plan: Plan) -> dict:
    from ddpm_jax.benchmarks import inception as inception_bench  # noqa: PLC0415
    from ddpm_jax.metrics import inception, weights  # noqa: PLC0415

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (plan.fid_images, plan.fid_size, plan.fid_size, 3), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "random_inception.safetensors")
        weights.save_tensors(inception_bench.random_tensors(0), path, "random-weights")
        run = lambda: inception.inception_features(images, weights=path, mode="tf1",
                                                   batch_size=plan.fid_batch)
        start = time.perf_counter()
        run()
        first_s = time.perf_counter() - start
        seconds = common.median_seconds(run, plan.num_runs, warmup=0)
    return dict(part="inception", images=plan.fid_images, batch=plan.fid_batch,
                size=plan.fid_size, first_call_s=first_s, seconds=seconds,
                images_per_s=plan.fid_images / seconds,
                tflops_per_s=inception_bench.GFLOPS_PER_IMAGE * plan.fid_images / seconds / 1e3,
                **common.device_fields("float32"))


def big_part(plan: Plan, programs: dict | None = None) -> list[dict]:
    limit = (common.device_memory() or {}).get("bytes_limit")
    settings = train_bench.Settings(
        config=plan.big_config, batch=plan.big_batch, dtype=plan.big_dtype, measure=("train",),
        num_runs=max(1, plan.num_runs // 2), warmup=1, memory_limit_bytes=limit)
    records = train_bench.run(settings, programs)
    for r in records:
        r.update(part="big", device_bytes_limit=limit)
        if "step_s" in r:
            r["steps_per_s"] = 1.0 / r["step_s"]
    return records


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def table(records: list[dict]) -> str:
    """A short readable table of the records."""
    gib = lambda b: f"{b / 2**30:.1f}" if b else "-"
    num = lambda v, f="{:.1f}": f.format(v) if isinstance(v, (int, float)) else "-"
    lines = [f"{'part':<12}{'what':<34}{'images/s':>10}{'steps/s':>9}{'TFLOP/s':>9}"
             f"{'MFU':>7}{'XLA GiB':>9}{'dev GiB':>9}"]
    for r in records:
        part = r.get("part", "?")
        if "error" in r:
            lines.append(f"{part:<12}error: {r['error'][:120]}")
            continue
        if part in ("determinism", "repeat"):
            flags_ = "deterministic ops" if part == "determinism" else "default flags"
            lines.append(f"{part:<12}{flags_ + ', 3-step runs':<34}bit-identical: "
                         f"{r['bit_identical']} (max |diff| {r['max_abs_diff']:.3g})")
        elif part in ("train", "big"):
            what = (f"{r['config']} b{r['batch']} {r['dtype']} {r.get('impl')}"
                    f" k={r.get('steps_per_dispatch', 1)}")
            if "skipped" in r:
                lines.append(f"{part:<12}{what:<34}skipped: {r['skipped']}")
                continue
            mfu = r.get("mfu")
            lines.append(
                f"{part:<12}{what:<34}{num(r.get('images_per_s')):>10}"
                f"{num(r.get('steps_per_s'), '{:.2f}'):>9}{num(r.get('tflops_per_s')):>9}"
                f"{(f'{100 * mfu:.1f}%' if mfu else '-'):>7}"
                f"{gib((r.get('memory') or {}).get('peak_bytes')):>9}"
                f"{gib((r.get('device_memory') or {}).get('peak_bytes_in_use')):>9}")
        elif part == "sampling":
            what = f"{r['config']} step b{r['batch']} {r['dtype']}"
            implied = ", ".join(f"{k} {v['seconds'] / 60:.1f} min" for k, v in
                                r["implied"].items())
            lines.append(f"{part:<12}{what:<34}{num(r['images_steps_per_s']):>10}"
                         f"{num(1 / r['step_s'], '{:.2f}'):>9}  {r['num_samples']:,} samples: "
                         f"{implied}")
        elif part == "inception":
            lines.append(f"{part:<12}{'FID Inception, ' + str(r['size']) + 'px':<34}"
                         f"{num(r['images_per_s']):>10}{'':>9}{num(r['tflops_per_s']):>9}")
        elif part == "skipped":
            lines.append(f"{'skipped':<12}{r['what']}: {r['reason']}")
    return "\n".join(lines)


class Recorder:
    """Collects records and rewrites the JSON and the table after each part."""

    def __init__(self, out: str, plan: Plan, start: float):
        self.out, self.plan, self.records = out, plan, []
        self.start = start  # the budget counts from the start of the run
        self.environment = dict(python=sys.version.split()[0], jax=jax.__version__,
                                xla_flags=os.environ.get("XLA_FLAGS", ""),
                                plan=dataclasses.asdict(plan))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def part(self, what: str, fn, *args) -> None:
        """Runs one part unless the budget is spent; an error becomes a record, not an exit."""
        if self.elapsed() > self.plan.budget_s:
            self.add([dict(part="skipped", what=what,
                           reason=f"budget of {self.plan.budget_s:.0f} s spent")])
            return
        start = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - one failed part must not lose the others
            first = (str(e).splitlines() or [""])[0][:300]
            out = dict(part=what.split()[0], what=what, error=f"{type(e).__name__}: {first}")
        out = out if isinstance(out, list) else [out]
        for r in out:
            r.setdefault("what", what)
            r["part_s"] = time.perf_counter() - start
            r["device_memory"] = common.device_memory()
        self.add(out)

    def add(self, records: list[dict]) -> None:
        self.records.extend(records)
        doc = dict(environment=self.environment, elapsed_s=self.elapsed(), records=self.records)
        tmp = os.path.join(self.out, "accelerator.json.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(tmp, os.path.join(self.out, "accelerator.json"))
        with open(os.path.join(self.out, "accelerator.txt"), "w") as f:
            f.write(table(self.records) + f"\n\n{self.elapsed():.0f} s in all\n")


def run(plan: Plan, out: str, plan_args: list[str], parts: Sequence[str],
        peer: bool = True) -> list[dict]:
    """All ``parts`` of ``plan``; the records (also in ``out``)."""
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    child = start_determinism(plan_args, out) if "determinism" in parts else None
    if child is not None:  # alone on the device until it is done
        determinism = finish_determinism(child, out, plan.determinism_timeout_s)
    rec = Recorder(out, plan, start)
    rec.environment.update(common.device_fields())
    if child is not None:
        rec.add([dict(determinism, part_s=rec.elapsed())])
    programs: dict = {}  # compiled once: the repeat check (and TINY's big part) reuse them
    installed = importlib_find("diffusers") and importlib_find("torch")
    have_peer = peer and installed
    # One step per dispatch first (with the peer), then what else the budget allows, most
    # wanted first; several steps per dispatch last.
    if "train" in parts:
        for variant in [v for v in plan.train_variants if v[1] == 1]:
            rec.part(f"train {variant[0]}:{variant[1]}", train_part, plan, variant, have_peer,
                     programs)
        if not have_peer:
            rec.add([dict(part="skipped", what="diffusers peer",
                          reason="--novs_diffusers" if installed else
                          "diffusers or torch is not installed")])
    if "sampling" in parts:
        for dtype in plan.sampling_dtypes:
            for batch in plan.sampling_batches:
                rec.part(f"sampling {dtype} b{batch}", sampling_part, plan, dtype, batch)
    if "big" in parts:
        rec.part("big", big_part, plan, programs)
    if "inception" in parts:
        rec.part("inception", inception_part, plan)
    if "train" in parts:
        for variant in [v for v in plan.train_variants if v[1] > 1]:
            rec.part(f"train {variant[0]}:{variant[1]}", train_part, plan, variant, have_peer,
                     programs)
        rec.part("repeat", repeat_check, plan, programs)
    print(table(rec.records), flush=True)
    print(f"{rec.elapsed():.0f} s in all; {out}/accelerator.json", flush=True)
    return rec.records


def importlib_find(name: str) -> bool:
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when this module is the program)."""
    full = Plan()
    flags.DEFINE_string("out", None, "Directory of accelerator.json and accelerator.txt.")
    flags.DEFINE_bool("tiny", False, "configs/test.py and tiny sizes: the CPU rehearsal.")
    flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {PARTS}.")
    flags.DEFINE_list("train_variants", None, "dtype:steps_per_dispatch entries "
                      f"(default {','.join(f'{d}:{k}' for d, k in full.train_variants)}).")
    flags.DEFINE_list("samplers", None, "name:steps entries for the implied sampling times "
                      f"(default {','.join(f'{n}:{s}' for n, s in full.samplers)}).")
    flags.DEFINE_list("sampling_batches", None, f"Batches of the sampling step "
                      f"(default {','.join(map(str, full.sampling_batches))}).")
    flags.DEFINE_integer("num_samples", None, f"Samples of the implied times ({full.num_samples}).")
    flags.DEFINE_float("budget_s", None, f"Seconds after which parts are skipped "
                       f"({full.budget_s:.0f}).")
    flags.DEFINE_bool("vs_diffusers", True, "Time diffusers' train step beside ours.")
    flags.DEFINE_enum("child", None, ["determinism"], "Internal: run one part in this process.")


def plan_from_flags() -> tuple[Plan, list[str]]:
    """The plan of the flags, and the flags that give it to a child process."""
    plan = TINY if FLAGS.tiny else Plan()
    changes: dict[str, Any] = {}
    pair = lambda e: (e.split(":")[0], int(e.split(":")[1]))
    try:
        if FLAGS.train_variants:
            changes["train_variants"] = tuple(pair(e) for e in FLAGS.train_variants)
        if FLAGS.samplers:
            changes["samplers"] = tuple(pair(e) for e in FLAGS.samplers)
        if FLAGS.sampling_batches:
            changes["sampling_batches"] = tuple(int(b) for b in FLAGS.sampling_batches)
    except (IndexError, ValueError) as e:
        raise app.UsageError(f"--train_variants, --samplers and --sampling_batches take "
                             f"name:integer entries ({e})") from None
    for dtype, k in changes.get("train_variants", ()):
        if dtype not in ("float32", "bfloat16") or k < 1:
            raise app.UsageError(f"--train_variants: {dtype}:{k} is not float32|bfloat16:k>=1")
    if FLAGS.num_samples is not None:
        changes["num_samples"] = common.positive("num_samples", FLAGS.num_samples)
    if FLAGS.budget_s is not None:
        changes["budget_s"] = FLAGS.budget_s
    args = ["--tiny"] if FLAGS.tiny else []
    return dataclasses.replace(plan, **changes), args


def main(argv: Sequence[str]) -> None:
    del argv
    if not FLAGS.out:
        raise app.UsageError("--out=DIR is required")
    unknown = set(FLAGS.parts) - set(PARTS)
    if unknown:
        raise app.UsageError(f"--parts: unknown {sorted(unknown)}; choose from {PARTS}")
    plan, args = plan_from_flags()
    if FLAGS.child == "determinism":
        r = determinism_child(plan)
        with open(os.path.join(FLAGS.out, "determinism.json"), "w") as f:
            json.dump(r, f)
        return
    run(plan, FLAGS.out, args, FLAGS.parts, peer=FLAGS.vs_diffusers)


if __name__ == "__main__":
    define_flags()
    app.run(main)

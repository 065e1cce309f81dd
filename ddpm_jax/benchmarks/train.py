"""Speed, FLOPs, MFU and memory of the real jitted train step (and the forward pass), per config.

  python -m ddpm_jax.benchmarks.train --config=configs/cifar10.py --batch=32 --vs_diffusers
  python -m ddpm_jax.benchmarks.train --config=configs/celebahq.py --batch=64 --memory_only

The step is the one training runs: ``training.make_train_step`` with ``create_optimizer`` and
``init_train_state`` on the parameters of ``unet.create_model``, jitted on a 1-D ``data`` mesh
of all devices (state replicated and donated, batch split over ``data``). ``--steps_per_dispatch
k`` runs k steps (k stacked batches) per call in the loop of ``training.make_multi_step``, as
training with ``training.steps_per_dispatch=k`` does. The forward pass is the evaluation U-Net
call (no dropout), which is what one sampling step costs.

Every timed unit is one call ended by ``block_until_ready``. After compiling and ``--warmup``
untimed calls of everything, the timed calls run interleaved (ours, theirs, ours, theirs, ...)
``--num_runs`` times, so that a noisy machine slows every contender alike; medians are reported.
``--xla_options=default,project`` measures XLA's default compiler options against
``ddpm_jax.xla_cpu.compiler_options`` (the project's, which are None off CPU) in one process.

One JSON line per measurement goes to stdout (a readable table to stderr) with: compile
seconds; seconds per step and images/s; XLA's FLOPs per image (``cost_analysis()`` of the
compiled step: 2 per multiply-add, none for conv taps on SAME padding, plus elementwise work);
achieved FLOP/s; MFU against the device's dense peak when it is known (below); the per-device
memory of XLA's buffer assignment (``memory_analysis()``: arguments, outputs, aliased (donated)
bytes, temporaries, generated code; peak = arguments + outputs - aliased + temporaries); the
load average before and after, and the fraction of CPU time other processes took while timing.

``--memory_only`` compiles without running anything: the step is lowered from
``jax.ShapeDtypeStruct``s, so nothing is allocated and any batch can be sized on a laptop.
XLA's figure is that of the backend that compiles it: on CPU it is an estimate of what a
TPU or GPU needs (other fusion and scheduling), so leave a margin, or run the same command on
the accelerator.

``--vs_diffusers`` (needs the torch extra) builds diffusers' ``UNet2DModel`` in the same layout
(``weights.diffusers.diffusers_config``), float32, channels_last, on the CPU with
``torch.set_num_threads(os.cpu_count())`` (on CUDA when JAX runs on a GPU and torch has CUDA),
and times in the same process, at the same batch: a training step (random t, q_sample, forward,
MSE to the noise, backward, global-norm clipping to ``optim.grad_clip``, ``torch.optim.Adam``,
EMA of the weights: what ours does) and a forward pass under ``no_grad``. Its FLOP/s use our
XLA FLOP count as the work count; the ratio is ours / theirs in images/s.

MFU is against the device's dense peak from ``common.PEAKS`` (TPUs: bf16; GPUs: bf16 for a
bfloat16 model, TF32 for float32 at JAX's default matmul precision); other devices get none.
The forward records also give the ratio of XLA's count to the paper's model where one is known
(about 6.2 GMACs = 12.4 GFLOPs per CIFAR10 image, 248.5 GMACs = 497 GFLOPs at 256x256): a little
under 1, since XLA counts no taps on the zero padding and adds the elementwise work.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import config_lib, diffusion, sharding, training, unet, xla_cpu
from ddpm_jax.benchmarks import common
from ddpm_jax.weights import diffusers as weights_diffusers

XLA_OPTIONS = ("default", "project")
MEASUREMENTS = ("train", "forward")


# Forward GFLOPs per image (2 x GMACs) of the paper's models.
REFERENCE_GFLOPS = {"cifar10": 12.4, "celebahq": 497.0, "lsun_bedroom": 497.0,
                    "lsun_cat": 497.0, "lsun_church": 497.0}


# ---------------------------------------------------------------------------------------------
# Our steps.
# ---------------------------------------------------------------------------------------------


def options_for(setting: str, kind: str) -> dict[str, str] | None:
    """The compiler options of ``setting`` (``default`` or ``project``) for ``kind``.

    ``default`` names XLA's own fusion types explicitly (the same program as no option), so
    that it also overrides the options the train step's jit carries; None where the project's
    options do not apply (off CPU, or a user's ``XLA_FLAGS`` choice).
    """
    project = xla_cpu.compiler_options(kind)
    if setting == "project" or project is None:
        return project
    return {xla_cpu.FUSION_TYPE_OPTION: ",".join(xla_cpu.JAXLIB_DEFAULT_FUSION_TYPES)}


def jit_train(config, mesh, k: int):
    """The real jitted k-step train function, and the abstract (state, batches) it takes."""
    sections = config_lib.validate(config)
    tx = training.create_optimizer(sections.optimizer)
    graphdef, params = unet.abstract_model(sections.model)
    state = training.abstract_state(params, tx)
    step = training.make_train_step(sections, graphdef,
                                    diffusion.Diffusion.from_spec(sections.process), tx)
    fn = training.compile_train_step(step, mesh, state, steps_per_dispatch=k)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, sharding.train_state_shardings(mesh, state))
    return fn, state, tx


def abstract_batches(config, mesh, k: int, batch: int) -> jax.ShapeDtypeStruct:
    """uint8 images ``[B, H, W, C]`` (``[k, B, H, W, C]`` for k > 1), split over ``data``."""
    d = config.data
    shape = (batch, d.image_size, d.image_size, d.channels)
    data = (sharding.data_sharding(mesh) if k == 1
            else NamedSharding(mesh, P(None, sharding.DATA)))  # [k, B, ...]: B split
    return jax.ShapeDtypeStruct(shape if k == 1 else (k,) + shape, jnp.uint8, sharding=data)


def abstract_key(mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


def lower_train(config, mesh, k: int, batch: int):
    """(lowered k-step train function, optimizer) from shapes only: nothing is allocated."""
    fn, state, tx = jit_train(config, mesh, k)
    start = time.perf_counter()
    lowered = fn.lower(state, abstract_batches(config, mesh, k, batch), abstract_key(mesh))
    return lowered, tx, time.perf_counter() - start


def lower_forward(config, mesh, batch: int):
    """The lowered evaluation forward pass ``(params, x, t) -> eps`` from shapes only."""
    graphdef, params = unet.abstract_model(unet.ModelSpec.from_config(config))
    replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          params)
    d = config.data
    x = jax.ShapeDtypeStruct((batch, d.image_size, d.image_size, d.channels), jnp.float32,
                             sharding=data)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data)
    fn = jax.jit(lambda p, x, t: unet.apply(graphdef, p, x, t), out_shardings=data)
    start = time.perf_counter()
    return fn.lower(params, x, t), time.perf_counter() - start


def train_inputs(config, mesh, k: int, batch: int, seed: int, tx):
    """The initial train state (``training.create_train_state``), random uint8 batches (drawn
    on the host: nothing to compile), a key."""
    state = training.create_train_state(unet.ModelSpec.from_config(config), config.seed, tx,
                                        mesh)
    spec = abstract_batches(config, mesh, k, batch)
    batches = np.random.default_rng(seed + 1).integers(0, 256, spec.shape, dtype=np.uint8)
    batches = sharding.put(batches, spec.sharding)
    key = sharding.put(jax.random.key(seed + 2), sharding.replicated(mesh))
    return state, batches, key


def forward_inputs(config, mesh, batch: int, seed: int):
    """Parameters of ``create_model``, x ~ N(0, I) and t uniform in [0, T) (drawn on the
    host)."""
    params = unet.split(unet.create_model(unet.ModelSpec.from_config(config), seed=seed))[1]
    params = sharding.put(params, sharding.replicated(mesh))
    d, rng = config.data, np.random.default_rng(seed + 1)
    x = rng.standard_normal((batch, d.image_size, d.image_size, d.channels), np.float32)
    t = rng.integers(0, config.diffusion.num_timesteps, (batch,), dtype=np.int32)
    data = sharding.data_sharding(mesh)
    return params, sharding.put(x, data), sharding.put(t, data)


class TrainRunner:
    """Calls a compiled k-step train function, threading its donated state."""

    def __init__(self, compiled, state, batches, key):
        self.compiled, self.state, self.batches, self.key = compiled, state, batches, key

    def __call__(self):
        self.state, metrics = self.compiled(self.state, self.batches, self.key)
        jax.block_until_ready((self.state, metrics))


# ---------------------------------------------------------------------------------------------
# The diffusers peer (torch).
# ---------------------------------------------------------------------------------------------


class DiffusersPeer:
    """diffusers' ``UNet2DModel`` in our layout: a train step and a forward pass, timed as ours.

    ``dtype="bfloat16"`` runs the network under ``torch.autocast`` (float32 weights, bf16
    matrix products and convolutions), PyTorch's counterpart of ``model.dtype=bfloat16``.
    """

    def __init__(self, config, batch: int, seed: int, dtype: str = "float32"):
        import contextlib  # noqa: PLC0415

        import diffusers  # noqa: PLC0415 - the torch extra
        import torch  # noqa: PLC0415

        self.torch, self.dtype = torch, dtype
        torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(seed)
        on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if (
            dtype == "bfloat16") else contextlib.nullcontext
        kwargs = dict(weights_diffusers.diffusers_config(config), dropout=config.model.dropout)
        self.model = diffusers.UNet2DModel(**kwargs).to(self.device,
                                                        memory_format=torch.channels_last)
        self.params = [p for p in self.model.parameters()]
        self.ema = [p.detach().clone() for p in self.params]
        o = config.optim
        self.opt = torch.optim.Adam(self.params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.grad_clip, self.ema_decay = o.grad_clip, o.ema_decay
        d = diffusion.Diffusion.from_config(config)
        as_tensor = lambda a: torch.as_tensor(np.array(a), dtype=torch.float32,
                                              device=self.device)
        self.sqrt_abar = as_tensor(d.sqrt_alphas_cumprod)
        self.sqrt_1m_abar = as_tensor(d.sqrt_one_minus_alphas_cumprod)
        self.T = config.diffusion.num_timesteps
        c, s = config.data.channels, config.data.image_size
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.rand((batch, c, s, s), generator=gen) * 2 - 1
        self.x0 = x.to(self.device).contiguous(memory_format=torch.channels_last)
        self.t = torch.randint(0, self.T, (batch,), generator=gen).to(self.device)
        self.num_params = sum(p.numel() for p in self.params)
        self.scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=self.T, trained_betas=np.asarray(d.betas64),  # our betas
            clip_sample=config.sampling.clip_denoised,
            variance_type="fixed_large" if d.model_var_type == "fixedlarge" else "fixed_small")
        self.generator = torch.Generator(self.device).manual_seed(seed + 2)

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def train_step(self):
        """One step of Algorithm 1 with Adam, clipping and EMA, as ``training.make_train_step``."""
        torch, x0 = self.torch, self.x0
        self.model.train()
        t = torch.randint(0, self.T, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        shape = (-1, 1, 1, 1)
        x_t = self.sqrt_abar[t].view(shape) * x0 + self.sqrt_1m_abar[t].view(shape) * noise
        with self.autocast():
            eps = self.model(x_t, t).sample
        loss = torch.nn.functional.mse_loss(eps.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)
        self._sync()
        return loss.item()

    def forward(self):
        """One evaluation U-Net call (one sampling step's network cost)."""
        self.model.eval()
        with self.torch.no_grad(), self.autocast():
            out = self.model(self.x0, self.t).sample
        self._sync()
        return out

    def sample_step(self, t: int = 500):
        """One ancestral step x_t -> x_{t-1}: a U-Net call and ``DDPMScheduler.step``."""
        self.model.eval()
        with self.torch.no_grad():
            with self.autocast():
                eps = self.model(self.x0, t).sample
            out = self.scheduler.step(eps.float(), t, self.x0, generator=self.generator).prev_sample
        self._sync()
        return out


# ---------------------------------------------------------------------------------------------
# The benchmark.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    config: str
    batch: int | None = None
    dtype: str | None = None
    steps_per_dispatch: int = 1
    xla_options: Sequence[str] = ("project",)
    measure: Sequence[str] = MEASUREMENTS
    vs_diffusers: bool = False
    peer_dtype: str | None = None  # the peer's dtype (default: the model's)
    memory_only: bool = False
    # Compile, then run only if XLA's peak bytes per device are at most this (else the records
    # say ``skipped``): what an accelerator's allocator limit allows.
    memory_limit_bytes: int | None = None
    num_runs: int = 5
    warmup: int = 1
    seed: int = 0


def program_key(config_name: str, dtype: str, measurement: str, k: int, batch: int,
                setting: str) -> tuple:
    """What identifies a compiled program in the ``programs`` dict of ``run``."""
    return config_name, dtype, measurement, k, batch, setting


def _compile_ours(s: Settings, config, mesh, batch: int, programs: dict | None = None) -> dict:
    """Per (measurement, xla setting): the compiled function and its static figures, taken from
    ``programs`` when it holds them (a program compiled earlier in this process) and added to
    it otherwise."""
    out = {}
    for m in s.measure:
        k = s.steps_per_dispatch if m == "train" else 1
        keys = {setting: program_key(common.config_name(s.config), config.model.dtype, m, k,
                                     batch, setting) for setting in s.xla_options}
        if programs is not None and all(key in programs for key in keys.values()):
            out.update({(m, setting): dict(programs[key], reused=True)
                        for setting, key in keys.items()})
            continue
        if m == "train":
            lowered, _, lower_s = lower_train(config, mesh, k, batch)
        else:
            lowered, lower_s = lower_forward(config, mesh, batch)
        for setting in s.xla_options:
            options = options_for(setting, "train" if m == "train" else "forward")
            compiled, compile_s = common.compile_timed(lowered, options)
            # cost_analysis counts a loop's body once: the FLOPs of one step, whatever k.
            flops = common.xla_flops(compiled)
            memory = common.memory_stats(compiled)
            out[m, setting] = dict(compiled=compiled, compile_s=lower_s + compile_s,
                                   gflops_per_image=flops / batch / 1e9, compiler_options=options,
                                   memory=memory, steps=k, reused=False)
            if programs is not None:
                programs[keys[setting]] = out[m, setting]
    return out


def _runners(s: Settings, config, mesh, batch: int, ours: dict, peer) -> dict[str, dict]:
    """Per measurement, the named callables to interleave (each one timed unit)."""
    runners: dict[str, dict] = {m: {} for m in s.measure}
    tx = training.create_optimizer(config_lib.OptimizerSpec.from_config(config))
    for (m, setting), o in ours.items():
        if m == "train":
            state, batches, key = train_inputs(config, mesh, o["steps"], batch, s.seed, tx)
            runners[m][setting] = TrainRunner(o["compiled"], state, batches, key)
        else:
            params, x, t = forward_inputs(config, mesh, batch, s.seed)
            runners[m][setting] = (lambda c=o["compiled"], a=(params, x, t):
                                   c(*a).block_until_ready())
    if peer is not None:
        for m in s.measure:
            runners[m]["diffusers"] = peer.train_step if m == "train" else peer.forward
    return runners


def _our_record(s, name, config, batch, m, setting, o, timing, base) -> dict:
    r = dict(base, measurement=m, impl="ddpm_jax", xla_options=setting,
             compiler_options=o["compiler_options"], compile_s=o["compile_s"],
             reused_program=o["reused"],  # compiled by an earlier run in this process
             gflops_per_image=o["gflops_per_image"], memory=o["memory"],
             steps_per_dispatch=o["steps"])
    if m == "forward" and name in REFERENCE_GFLOPS:
        r["xla_over_paper_gflops"] = o["gflops_per_image"] / REFERENCE_GFLOPS[name]
    if o["memory"] is not None:
        r["fits_on"] = common.fits_on(o["memory"]["peak_bytes"])
    if timing is None:
        return r
    times = timing.times[setting]
    step_s = statistics.median(times) / o["steps"]
    r.update(step_s=step_s, images_per_s=batch / step_s,
             tflops_per_s=o["gflops_per_image"] * batch / step_s / 1e3, num_runs=len(times),
             **timing.load())
    r["mfu"] = common.mfu(r["tflops_per_s"], r)
    if "diffusers" in timing.times:
        theirs = timing.times["diffusers"]
        per_round = [t / o["steps"] / u for t, u in zip(times, theirs, strict=True)]
        r["vs_diffusers"] = dict(
            images_per_s=batch / statistics.median(theirs),
            ratio=statistics.median(theirs) / step_s,  # ours / theirs in images/s
            paired_ratio=1.0 / statistics.median(per_round))  # median over rounds
    return r


def _peer_record(config, batch, m, peer, timing, gflops_per_image, base) -> dict:
    import diffusers  # noqa: PLC0415
    import torch  # noqa: PLC0415

    step_s = timing.median("diffusers")
    return dict(base, measurement=m, impl="diffusers", dtype=peer.dtype,
                torch=torch.__version__, diffusers=diffusers.__version__,
                torch_device=peer.device.type, torch_threads=torch.get_num_threads(),
                params=peer.num_params, step_s=step_s, images_per_s=batch / step_s,
                tflops_per_s=None if gflops_per_image is None
                else gflops_per_image * batch / step_s / 1e3,
                num_runs=len(timing.times["diffusers"]))


def run(s: Settings, programs: dict | None = None) -> list[dict]:
    """Compiles (and unless ``memory_only`` times) the steps of ``s``; one record each.

    ``programs``: a dict that keeps the compiled programs between runs in one process
    (``program_key``), so that a later run of the same program does not compile it again."""
    name = common.config_name(s.config)
    config = common.load_config(s.config, s.dtype)
    batch = s.batch or config.training.batch_size
    mesh = sharding.create_mesh()
    if batch % mesh.size:
        raise app.UsageError(f"--batch={batch} must be a multiple of the {mesh.size} devices")
    ours = _compile_ours(s, config, mesh, batch, programs)
    base = dict(benchmark="train", config=name, batch=batch, dtype=config.model.dtype,
                params=unet.count_params(
                    unet.abstract_model(unet.ModelSpec.from_config(config))[1]),
                **common.device_fields(config.model.dtype))
    too_big = s.memory_limit_bytes is not None and any(
        o["memory"] and o["memory"]["peak_bytes"] > s.memory_limit_bytes for o in ours.values())
    if s.memory_only or too_big:
        records = [_our_record(s, name, config, batch, m, setting, o, None, base)
                   for (m, setting), o in ours.items()]
        if too_big:
            for r in records:
                r["skipped"] = (f"XLA's peak {r['memory']['peak_bytes'] / 2**30:.1f} GiB per "
                                f"device exceeds the limit {s.memory_limit_bytes / 2**30:.1f} GiB")
        return records
    peer = DiffusersPeer(config, batch, s.seed, s.peer_dtype or config.model.dtype) if (
        s.vs_diffusers) else None
    records = []
    for m, runners in _runners(s, config, mesh, batch, ours, peer).items():
        timing = common.interleaved(runners, s.num_runs, s.warmup)
        for setting in s.xla_options:
            records.append(_our_record(s, name, config, batch, m, setting, ours[m, setting],
                                       timing, base))
        if peer is not None:
            flops = ours[m, s.xla_options[0]]["gflops_per_image"]
            records.append(_peer_record(config, batch, m, peer, timing, flops, base))
    return records


def print_table(records: list[dict], file=sys.stderr) -> None:
    """A readable summary of the records."""
    for r in records:
        who = r["impl"] + (f" [{r['xla_options']}]" if r["impl"] == "ddpm_jax" else "")
        line = f"{r['measurement']:<8} {who:<22}"
        if "images_per_s" in r:
            line += f" {r['images_per_s']:9.2f} images/s  {1e3 * r['step_s']:9.1f} ms/step"
        if r.get("compile_s") is not None:
            line += f"  compile {r['compile_s']:.1f} s"
        if r.get("gflops_per_image") is not None:
            line += f"  {r['gflops_per_image']:.2f} GFLOP/image"
        if r.get("mfu") is not None:
            line += f"  MFU {100 * r['mfu']:.1f}%"
        if r.get("vs_diffusers"):
            line += f"  x{r['vs_diffusers']['ratio']:.3f} vs diffusers"
        if r.get("memory"):
            line += f"  peak {r['memory']['peak_bytes'] / 2**30:.2f} GiB/device"
        print(line, file=file)


_FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when this module is the program)."""
    flags.DEFINE_string("config", "cifar10", "Config name in configs/ (or its .py path).")
    flags.DEFINE_integer("batch", None, "Global batch (default: training.batch_size).")
    flags.DEFINE_enum("dtype", None, list(config_lib.DTYPES), "Override model.dtype.")
    flags.DEFINE_integer("steps_per_dispatch", 1, "Train steps per call (one loop).")
    flags.DEFINE_list("xla_options", ["project"],
                      "Compiler options to measure, interleaved: default and/or project.")
    flags.DEFINE_list("measure", list(MEASUREMENTS), "What to measure: train and/or forward.")
    flags.DEFINE_bool("vs_diffusers", False, "Also time diffusers' UNet2DModel (torch).")
    flags.DEFINE_bool("memory_only", False, "Compile from shapes and report memory; no runs.")
    flags.DEFINE_integer("num_runs", 5, "Timed calls of each contender (medians reported).")
    flags.DEFINE_integer("warmup", 1, "Untimed calls of each contender after compiling.")
    flags.DEFINE_integer("seed", 0, "Seed of the weights and inputs.")


def main(argv: Sequence[str]) -> None:
    """Runs the benchmark of the flags; JSON lines to stdout, a table to stderr."""
    del argv
    f = _FLAGS
    for value, allowed, flag in ((f.xla_options, XLA_OPTIONS, "xla_options"),
                                 (f.measure, MEASUREMENTS, "measure")):
        if not value or set(value) - set(allowed):
            raise app.UsageError(f"--{flag} takes a comma list of {allowed}, got {value}")
    if f.steps_per_dispatch < 1:
        raise app.UsageError("--steps_per_dispatch must be >= 1")
    records = run(Settings(
        config=f.config, batch=f.batch, dtype=f.dtype, steps_per_dispatch=f.steps_per_dispatch,
        xla_options=tuple(dict.fromkeys(f.xla_options)), measure=tuple(dict.fromkeys(f.measure)),
        vs_diffusers=f.vs_diffusers, memory_only=f.memory_only, num_runs=f.num_runs,
        warmup=f.warmup, seed=f.seed))
    print_table(records)
    for r in records:
        common.emit(r)


if __name__ == "__main__":
    define_flags()
    app.run(main)

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
(``import_weights.diffusers_config``), float32, channels_last, on the CPU with
``torch.set_num_threads(os.cpu_count())`` (on CUDA when JAX runs on a GPU and torch has CUDA),
and times in the same process, at the same batch: a training step (random t, q_sample, forward,
MSE to the noise, backward, global-norm clipping to ``optim.grad_clip``, ``torch.optim.Adam``,
EMA of the weights: what ours does) and a forward pass under ``no_grad``. Its FLOP/s use our
XLA FLOP count as the work count; the ratio is ours / theirs in images/s.

Peak dense FLOP/s per JAX device (TFLOP/s), and memory per device (GiB), from the vendors:

============  =====  =====  =====  ====  =============================================
device_kind   bf16   tf32   fp32   mem   source
============  =====  =====  =====  ====  =============================================
TPU v3        61.5   --     --     16    cloud.google.com/tpu/docs/v3: 123 TFLOPS bf16
                                         and 32 GiB per chip; 2 TensorCores per chip,
                                         each one JAX device
TPU v4        275    --     --     32    cloud.google.com/tpu/docs/v4 (megacore: one
                                         device per chip)
TPU v5 lite   197    --     --     16    cloud.google.com/tpu/docs/v5e (v5e)
TPU v5(p)     459    --     --     95    cloud.google.com/tpu/docs/v5p
TPU v6 lite   918    --     --     32    cloud.google.com/tpu/docs/v6e (Trillium)
A100          312    156    19.5   40/80 NVIDIA A100 datasheet (dense; SXM and PCIe)
H100 PCIe     756    378    51     80    NVIDIA H100 datasheet (sparsity figures / 2)
H100 (SXM)    989.5  494.5  67     80    NVIDIA H100 datasheet (sparsity figures / 2)
H200 (SXM)    989.5  494.5  67     141   NVIDIA H200 datasheet (sparsity figures / 2)
============  =====  =====  =====  ====  =============================================

Which peak: on TPUs always bf16 (the MXU's rate; float32 dots at JAX's default precision run
as bf16 passes, and Cloud TPU publishes no fp32 figure). On GPUs bf16 for a bfloat16 model, and
for float32 TF32 at JAX's default matmul precision or fp32 under ``highest``. Other devices
(CPUs, NVL variants, unknown kinds) get no MFU.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import config_lib, diffusion, import_weights, training, unet, xla_cpu

XLA_OPTIONS = ("default", "project")
MEASUREMENTS = ("train", "forward")


# ---------------------------------------------------------------------------------------------
# Devices: peaks and memory.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Peak:
    """Dense peak TFLOP/s and memory (GiB) of one JAX device."""

    bf16: float
    tf32: float | None
    fp32: float | None
    memory_gib: float


_TPU = "tpu"
# (device_kind test, platform, peak); the first match wins. Sources: the module docstring.
PEAKS: tuple[tuple[Callable[[str], bool], str, Peak], ...] = (
    (lambda k: k == "TPU v3", _TPU, Peak(61.5, None, None, 16)),
    (lambda k: k == "TPU v4", _TPU, Peak(275, None, None, 32)),
    (lambda k: k in ("TPU v5 lite", "TPU v5e"), _TPU, Peak(197, None, None, 16)),
    (lambda k: k in ("TPU v5", "TPU v5p"), _TPU, Peak(459, None, None, 95)),
    (lambda k: k in ("TPU v6 lite", "TPU v6e"), _TPU, Peak(918, None, None, 32)),
    (lambda k: "A100" in k and "80GB" in k, "gpu", Peak(312, 156, 19.5, 80)),
    (lambda k: "A100" in k, "gpu", Peak(312, 156, 19.5, 40)),
    (lambda k: "H100" in k and "PCIe" in k, "gpu", Peak(756, 378, 51, 80)),
    (lambda k: "H100" in k and "NVL" not in k, "gpu", Peak(989.5, 494.5, 67, 80)),
    (lambda k: "H200" in k and "NVL" not in k, "gpu", Peak(989.5, 494.5, 67, 141)),
)


def device_peak(device_kind: str) -> tuple[str, Peak] | None:
    """(platform family, peak) of a ``jax.Device.device_kind``, or None if not in the table."""
    for matches, family, peak in PEAKS:
        if matches(device_kind):
            return family, peak
    return None


def peak_tflops(device_kind: str, dtype: str) -> tuple[float, str] | None:
    """(dense peak TFLOP/s of one device for a model of ``dtype``, which peak) or None."""
    found = device_peak(device_kind)
    if found is None:
        return None
    family, peak = found
    if family == _TPU or dtype != "float32":
        return peak.bf16, "bf16"
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    if precision in ("highest", "float32"):
        return peak.fp32, "fp32"
    return peak.tf32, "tf32"


def memory_stats(compiled) -> dict[str, int] | None:
    """Per-device bytes of XLA's buffer assignment for ``compiled``, and their peak."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    out = dict(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
               alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
               generated_code_bytes=m.generated_code_size_in_bytes)
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                         + out["temp_bytes"])
    return out


def fits_on(peak_bytes: int) -> list[str]:
    """The accelerators of the table whose memory per device holds ``peak_bytes``."""
    names = {"TPU v3": 16, "TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "TPU v6e": 32,
             "A100 40GB": 40, "A100 80GB": 80, "H100": 80, "H200": 141}
    return [name for name, gib in names.items() if peak_bytes <= gib * 2**30]


def xla_flops(compiled) -> float:
    """Total FLOPs of a compiled computation (``cost_analysis`` is a dict or a list of dicts)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, dict):
        analysis = [analysis]
    return float(sum(a.get("flops", 0.0) for a in analysis or []))


# ---------------------------------------------------------------------------------------------
# Our steps.
# ---------------------------------------------------------------------------------------------


def load_config(name: str, dtype: str | None = None):
    """The locked config of ``configs/<name>.py`` (or a path to it), ``model.dtype`` overridden."""
    name = os.path.splitext(os.path.basename(name))[0]
    config = importlib.import_module(f"configs.{name}").get_config()
    if dtype is not None:
        config.model.dtype = dtype
    config_lib.validate(config)
    return config


def create_mesh() -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over all devices, axis type ``Auto`` (as training uses)."""
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


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
    tx = training.create_optimizer(config)
    graphdef, params = unet.abstract_model(config)
    state = training.abstract_state(params, tx)
    step = training.make_train_step(config, graphdef, diffusion.Diffusion.from_config(config), tx)
    fn = training.compile_train_step(step, mesh, state, steps_per_dispatch=k)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                        sharding=NamedSharding(mesh, P())), state)
    return fn, state, tx


def abstract_batches(config, mesh, k: int, batch: int) -> jax.ShapeDtypeStruct:
    """uint8 images ``[B, H, W, C]`` (``[k, B, H, W, C]`` for k > 1), split over ``data``."""
    d = config.data
    shape = (batch, d.image_size, d.image_size, d.channels)
    spec = P("data") if k == 1 else P(None, "data")
    return jax.ShapeDtypeStruct(shape if k == 1 else (k,) + shape, jnp.uint8,
                                sharding=NamedSharding(mesh, spec))


def abstract_key(mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))


def compile_timed(lowered, options) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = lowered.compile(options)
    return compiled, time.perf_counter() - start


def lower_train(config, mesh, k: int, batch: int):
    """(lowered k-step train function, optimizer) from shapes only: nothing is allocated."""
    fn, state, tx = jit_train(config, mesh, k)
    start = time.perf_counter()
    lowered = fn.lower(state, abstract_batches(config, mesh, k, batch), abstract_key(mesh))
    return lowered, tx, time.perf_counter() - start


def lower_forward(config, mesh, batch: int):
    """The lowered evaluation forward pass ``(params, x, t) -> eps`` from shapes only."""
    graphdef, params = unet.abstract_model(config)
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
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
    """The initial train state (``training.create_train_state``), random uint8 batches, a key."""
    state = training.create_train_state(config, tx, mesh)
    spec = abstract_batches(config, mesh, k, batch)
    batches = jax.random.randint(jax.random.key(seed + 1), spec.shape, 0, 256, jnp.int32)
    batches = jax.device_put(batches.astype(jnp.uint8), spec.sharding)
    key = jax.device_put(jax.random.key(seed + 2), NamedSharding(mesh, P()))
    return state, batches, key


def forward_inputs(config, mesh, batch: int, seed: int):
    """Parameters of ``create_model``, x ~ N(0, I) and t uniform in [0, T)."""
    params = unet.split(unet.create_model(config, seed=seed))[1]
    params = jax.device_put(params, NamedSharding(mesh, P()))
    d = config.data
    kx, kt = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(kx, (batch, d.image_size, d.image_size, d.channels), jnp.float32)
    t = jax.random.randint(kt, (batch,), 0, config.diffusion.num_timesteps, jnp.int32)
    data = NamedSharding(mesh, P("data"))
    return params, jax.device_put(x, data), jax.device_put(t, data)


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
    """diffusers' ``UNet2DModel`` in our layout: a train step and a forward pass, timed as ours."""

    def __init__(self, config, batch: int, seed: int):
        import diffusers  # noqa: PLC0415 - the torch extra
        import torch  # noqa: PLC0415

        self.torch = torch
        torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(seed)
        on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        kwargs = dict(import_weights.diffusers_config(config), dropout=config.model.dropout)
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
        loss = torch.nn.functional.mse_loss(self.model(x_t, t).sample, noise)
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
        with self.torch.no_grad():
            out = self.model(self.x0, self.t).sample
        self._sync()
        return out

    def sample_step(self, t: int = 500):
        """One ancestral step x_t -> x_{t-1}: a U-Net call and ``DDPMScheduler.step``."""
        self.model.eval()
        with self.torch.no_grad():
            eps = self.model(self.x0, t).sample
            out = self.scheduler.step(eps, t, self.x0, generator=self.generator).prev_sample
        self._sync()
        return out


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


def _loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def _cpu_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def interleaved(runners: dict[str, Callable[[], object]], num_runs: int, warmup: int) -> dict:
    """Times ``runners`` in turns; per name the list of seconds, and the machine's load.

    ``foreign_cpu_fraction``: the share of all cores that other processes used while timing.
    """
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    times = {name: [] for name in runners}
    load_before, busy0, own0, wall0 = _loadavg(), _cpu_busy_s(), _own_cpu_s(), time.time()
    for _ in range(num_runs):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    wall, busy1 = time.time() - wall0, _cpu_busy_s()
    foreign = None
    if busy0 is not None and busy1 is not None:
        foreign = max(0.0, (busy1 - busy0) - (_own_cpu_s() - own0)) / (wall * (os.cpu_count() or 1))
    return dict(times=times, loadavg_before=load_before, loadavg_after=_loadavg(),
                foreign_cpu_fraction=foreign)


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
    memory_only: bool = False
    num_runs: int = 5
    warmup: int = 1
    seed: int = 0


def _compile_ours(s: Settings, config, mesh, batch: int) -> dict:
    """Per (measurement, xla setting): the compiled function and its static figures."""
    out = {}
    for m in s.measure:
        k = s.steps_per_dispatch if m == "train" else 1
        if m == "train":
            lowered, _, lower_s = lower_train(config, mesh, k, batch)
        else:
            lowered, lower_s = lower_forward(config, mesh, batch)
        for setting in s.xla_options:
            options = options_for(setting, "train" if m == "train" else "forward")
            compiled, compile_s = compile_timed(lowered, options)
            # cost_analysis counts a scan's body once: the FLOPs of one step, whatever k.
            flops = xla_flops(compiled)
            memory = memory_stats(compiled)
            out[m, setting] = dict(compiled=compiled, compile_s=lower_s + compile_s,
                                   gflops_per_image=flops / batch / 1e9, compiler_options=options,
                                   memory=memory, steps=k)
    return out


def _runners(s: Settings, config, mesh, batch: int, ours: dict, peer) -> dict[str, dict]:
    """Per measurement, the named callables to interleave (each one timed unit)."""
    runners: dict[str, dict] = {m: {} for m in s.measure}
    tx = training.create_optimizer(config)
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


def _device_fields(config) -> dict:
    dev = jax.devices()[0]
    peak = peak_tflops(dev.device_kind, config.model.dtype)
    return dict(platform=dev.platform, device_kind=dev.device_kind, devices=jax.device_count(),
                peak_tflops_per_device=None if peak is None else peak[0],
                peak_kind=None if peak is None else peak[1])


def _our_record(s, name, config, batch, m, setting, o, timing, base) -> dict:
    r = dict(base, measurement=m, impl="ddpm_jax", xla_options=setting,
             compiler_options=o["compiler_options"], compile_s=o["compile_s"],
             gflops_per_image=o["gflops_per_image"], memory=o["memory"],
             steps_per_dispatch=o["steps"])
    if o["memory"] is not None:
        r["fits_on"] = fits_on(o["memory"]["peak_bytes"])
    if timing is None:
        return r
    times = timing["times"][setting]
    step_s = statistics.median(times) / o["steps"]
    r.update(step_s=step_s, images_per_s=batch / step_s,
             tflops_per_s=o["gflops_per_image"] * batch / step_s / 1e3,
             loadavg_before=timing["loadavg_before"], loadavg_after=timing["loadavg_after"],
             foreign_cpu_fraction=timing["foreign_cpu_fraction"], num_runs=len(times))
    peak = r["peak_tflops_per_device"]
    r["mfu"] = None if not peak else r["tflops_per_s"] / (peak * r["devices"])
    if "diffusers" in timing["times"]:
        theirs = timing["times"]["diffusers"]
        per_round = [t / o["steps"] / u for t, u in zip(times, theirs, strict=True)]
        r["vs_diffusers"] = dict(
            images_per_s=batch / statistics.median(theirs),
            ratio=statistics.median(theirs) / step_s,  # ours / theirs in images/s
            paired_ratio=1.0 / statistics.median(per_round))  # median over rounds
    return r


def _peer_record(config, batch, m, peer, timing, gflops_per_image, base) -> dict:
    import diffusers  # noqa: PLC0415
    import torch  # noqa: PLC0415

    step_s = statistics.median(timing["times"]["diffusers"])
    return dict(base, measurement=m, impl="diffusers", dtype="float32",
                torch=torch.__version__, diffusers=diffusers.__version__,
                torch_device=peer.device.type, torch_threads=torch.get_num_threads(),
                params=peer.num_params, step_s=step_s, images_per_s=batch / step_s,
                tflops_per_s=None if gflops_per_image is None
                else gflops_per_image * batch / step_s / 1e3,
                num_runs=len(timing["times"]["diffusers"]))


def run(s: Settings) -> list[dict]:
    """Compiles (and unless ``memory_only`` times) the steps of ``s``; one record each."""
    name = os.path.splitext(os.path.basename(s.config))[0]
    config = load_config(s.config, s.dtype)
    batch = s.batch or config.training.batch_size
    mesh = create_mesh()
    if batch % mesh.size:
        raise app.UsageError(f"--batch={batch} must be a multiple of the {mesh.size} devices")
    ours = _compile_ours(s, config, mesh, batch)
    base = dict(benchmark="train", config=name, batch=batch, dtype=config.model.dtype,
                params=unet.count_params(unet.abstract_model(config)[1]),
                **_device_fields(config))
    if s.memory_only:
        return [_our_record(s, name, config, batch, m, setting, o, None, base)
                for (m, setting), o in ours.items()]
    peer = DiffusersPeer(config, batch, s.seed) if s.vs_diffusers else None
    records = []
    for m, runners in _runners(s, config, mesh, batch, ours, peer).items():
        timing = interleaved(runners, s.num_runs, s.warmup)
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
    flags.DEFINE_integer("steps_per_dispatch", 1, "Train steps per call (one lax.scan).")
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
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""The Python API: ``ddpm_jax.create(config)`` and ``ddpm_jax.load(path)`` return a ``DDPM``.

    model = ddpm_jax.load("runs/digits")            # EMA weights of the latest checkpoint
    images = model.sample(jax.random.key(0), 16)    # uint8 [16, H, W, C]
    eps = model.predict_noise(x_t, t)               # float32 [B, H, W, C]
    bpd = model.bits_per_dim(images, jax.random.key(1))
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import checkpoints, config_lib, diffusion, sampling, schedules, unet

SAMPLERS = config_lib.SAMPLERS


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) array as one numpy array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def create_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over all devices (of all processes).

    Axis type ``Auto``: the compiler propagates shardings from the inputs (batch on ``data``,
    parameters replicated), which is all data parallelism needs; ``Explicit`` axes (the default
    of ``jax.make_mesh`` since JAX 0.9) would make sharding part of every array's type.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


class DDPM:
    """A U-Net with its diffusion process, ready to sample and evaluate.

    Attributes:
      config: the locked run config.
      params: the parameters in use (EMA weights when loaded from a checkpoint).
      num_params: number of parameters.
      diffusion: the ``Diffusion`` constants.
    """

    def __init__(self, config: ml_collections.ConfigDict, graphdef, params, *, mesh=None):
        self.config = config
        self.graphdef = graphdef
        self.mesh = mesh or create_mesh()
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self.num_params = unet.count_params(params)
        c = config.diffusion
        self._betas64 = schedules.get_beta_schedule(
            c.beta_schedule, beta_start=c.beta_start, beta_end=c.beta_end,
            num_timesteps=c.num_timesteps)
        self.diffusion = diffusion.Diffusion.create(
            self._betas64, model_mean_type=c.model_mean_type, model_var_type=c.model_var_type,
            loss_type=c.loss_type)
        self._cache: dict[Any, Any] = {}
        self.step: int | None = None  # the checkpoint step, when loaded
        self.source: str | None = None  # the checkpoints directory, when loaded
        self.ema: bool | None = None  # whether the EMA weights were loaded

    # -- model -----------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        d = self.config.data
        return (d.image_size, d.image_size, d.channels)

    def model_fn(self, params):
        return lambda x, t: unet.apply(self.graphdef, params, x, t)

    def predict_noise(self, x_t, t) -> jax.Array:
        """eps_theta(x_t, t): float32 ``[B, H, W, C]``, t int32 ``[B]`` in [0, T).

        For learned-variance models the eps half of the output; for x0- or x_{t-1}-predicting
        models the eps implied by the prediction.
        """
        x_t = jnp.asarray(x_t, jnp.float32)
        t = jnp.asarray(t, jnp.int32)
        self._check_images(x_t, "x_t")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must be int32 [B] = [{x_t.shape[0]}], got shape {t.shape}")
        if "eps" not in self._cache:
            def eps_fn(params, x, t):
                out = unet.apply(self.graphdef, params, x, t)
                return diffusion.p_mean_variance(
                    self.diffusion, out, x, t, clip_denoised=False
                )["eps"]

            self._cache["eps"] = jax.jit(eps_fn)
        return self._cache["eps"](self.params, x_t, t)

    def _check_images(self, x, name):
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{name} must have shape [B, {', '.join(map(str, self.image_shape))}] for this "
                f"model, got {tuple(x.shape)}"
            )

    # -- sampling --------------------------------------------------------------------------------
    def _sampler(self, sampler: str, num_steps: int | None, eta: float, batch: int,
                 record_every: int | None = None):
        """The compiled chain for one batch shape; cached."""
        cache_key = ("sample", sampler, num_steps, float(eta), batch, record_every)
        if cache_key in self._cache:
            return self._cache[cache_key]
        d, T = self.diffusion, self.config.diffusion.num_timesteps
        clip = self.config.sampling.clip_denoised
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        shape = (batch,) + self.image_shape
        if sampler == "ddim":
            steps = T if num_steps is None else num_steps
            sampling.ddim_timesteps(T, steps)  # validates num_steps

            def run(params, key, x_T):
                return sampling.ddim_sample_loop(
                    d, self.model_fn(params), key, shape, num_steps=steps, eta=eta, x_T=x_T,
                    clip_denoised=clip, record_every=record_every)
        elif num_steps is None or num_steps == T:
            def run(params, key, x_T):
                return sampling.sample_loop(d, self.model_fn(params), key, shape, x_T=x_T,
                                            clip_denoised=clip, record_every=record_every)
        else:
            respaced, tmap = sampling.respace(d, self._betas64,
                                              sampling.ddim_timesteps(T, num_steps))

            def run(params, key, x_T):
                return sampling.sample_loop(respaced, self.model_fn(params), key, shape,
                                            x_T=x_T, clip_denoised=clip,
                                            record_every=record_every, timestep_map=tmap)

        data = NamedSharding(self.mesh, P("data")) if batch % self.mesh.size == 0 else None
        fn = jax.jit(run, out_shardings=data if record_every is None else None)
        self._cache[cache_key] = fn
        return fn

    def sample_batch(self, key, batch: int, *, sampler: str = "ancestral",
                     num_steps: int | None = None, eta: float = 0.0, x_T=None) -> jax.Array:
        """One compiled chain: float32 ``[batch, H, W, C]`` in [-1, 1].

        Without ``x_T`` the starting noise is drawn inside the compiled chain from ``key``.
        """
        return self._sampler(sampler, num_steps, eta, batch)(self.params, key, x_T)

    def sample(self, key, num_samples: int, *, sampler: str = "ancestral",
               num_steps: int | None = None, eta: float = 0.0, x_T=None,
               batch_size: int | None = None) -> np.ndarray:
        """``num_samples`` images as uint8 ``[N, H, W, C]``.

        Runs in batches of ``batch_size`` (default ``config.sampling.batch_size``); batch i
        uses ``fold_in(key, i)``, so results depend only on (key, N, batch size). ``x_T``
        (float32 ``[N, H, W, C]``) fixes the starting noise. ``num_steps`` < T: DDIM on
        tau_i = i * (T // S), or a respaced ancestral chain for ``sampler="ancestral"``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if x_T is not None:
            x_T = jnp.asarray(x_T, jnp.float32)
            self._check_images(x_T, "x_T")
            if x_T.shape[0] != num_samples:
                raise ValueError(f"x_T holds {x_T.shape[0]} images, num_samples={num_samples}")
        out = [
            to_host(sampling.to_uint8(self.sample_chunk(
                key, i, num_samples, sampler=sampler, num_steps=num_steps, eta=eta,
                x_T=x_T, batch_size=batch_size)))
            for i in range(self.num_chunks(num_samples, batch_size))
        ]
        return np.concatenate(out)[:num_samples]

    def chunk_size(self, num_samples: int, batch_size: int | None = None) -> int:
        batch_size = self.config.sampling.batch_size if batch_size is None else batch_size
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples and batch_size must be positive, got {num_samples} "
                             f"and {batch_size}")
        batch = min(batch_size, num_samples)
        return int(math.ceil(batch / self.mesh.size) * self.mesh.size)

    def num_chunks(self, num_samples: int, batch_size: int | None = None) -> int:
        return int(math.ceil(num_samples / self.chunk_size(num_samples, batch_size)))

    def sample_chunk(self, key, i: int, num_samples: int, *, batch_size=None, x_T=None,
                     **kwargs) -> jax.Array:
        """Chunk i of ``sample``: float32 ``[chunk, H, W, C]`` (the last one padded)."""
        batch = self.chunk_size(num_samples, batch_size)
        chunk_key = jax.random.fold_in(key, i)
        x0 = None
        if x_T is not None:
            x0 = x_T[i * batch:(i + 1) * batch]
            if x0.shape[0] < batch:
                fill = sampling.initial_noise(chunk_key, (batch,) + self.image_shape)
                x0 = jnp.concatenate([x0, fill[x0.shape[0]:]])
        return self.sample_batch(chunk_key, batch, x_T=x0, **kwargs)

    def progressive(self, key, num_samples: int, *, every: int = 50, sampler="ancestral",
                    num_steps=None, eta: float = 0.0):
        """Paper Fig. 6: (x_0, x_t every k steps, predicted x_0 every k steps), uint8.

        The trajectories are ``[N, K, H, W, C]`` with K = steps / every.
        """
        fn = self._sampler(sampler, num_steps, eta, num_samples, record_every=every)
        x0, xs, x0s = fn(self.params, key, None)  # x_T drawn inside the chain from key
        to8 = lambda a: to_host(sampling.to_uint8(a))
        return to8(x0), np.swapaxes(to8(xs), 0, 1), np.swapaxes(to8(x0s), 0, 1)

    def interpolate(self, key, image1, image2, *, t: int = 500, num: int = 9) -> np.ndarray:
        """Paper Fig. 8 between two uint8 ``[H, W, C]`` images: uint8 ``[num, H, W, C]``."""
        T = self.config.diffusion.num_timesteps
        if not 0 <= t < T:
            raise ValueError(f"t must be in [0, {T}), got {t}")
        x1, x2 = (np.asarray(im) for im in (image1, image2))
        for name, im in (("image1", x1), ("image2", x2)):
            if im.dtype != np.uint8 or im.shape != self.image_shape:
                raise ValueError(f"{name} must be uint8 {self.image_shape}, got {im.dtype} "
                                 f"{im.shape}")
        if ("interp", t) not in self._cache:
            self._cache[("interp", t)] = jax.jit(lambda params, key, x1, x2, lambdas: (
                sampling.interpolate(self.diffusion, self.model_fn(params), key, x1, x2, t=t,
                                     lambdas=lambdas,
                                     clip_denoised=self.config.sampling.clip_denoised)))
        x1, x2 = (jnp.asarray(im, jnp.float32) / 127.5 - 1.0 for im in (x1, x2))
        out = self._cache[("interp", t)](self.params, key, x1, x2, jnp.linspace(0, 1, num))
        return to_host(sampling.to_uint8(out))

    # -- evaluation ------------------------------------------------------------------------------
    def bits_per_dim(self, images, key) -> jax.Array:
        """The full variational bound of uint8 ``[B, H, W, C]`` images in bits/dim: float32 [B].

        T network evaluations per batch (one compiled scan, ``diffusion.calc_bpd_loop``).
        """
        return self.bound_terms(images, key)["total_bpd"]

    def bound_terms(self, images, key) -> dict[str, jax.Array]:
        """Every output of ``diffusion.calc_bpd_loop`` (total, prior and per-t terms)."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"bits_per_dim takes uint8 images, got {images.dtype}")
        self._check_images(images, "images")
        x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
        if "bpd" not in self._cache:
            def bpd(params, x, key):
                return diffusion.calc_bpd_loop(
                    self.diffusion, self.model_fn(params), x, key,
                    clip_denoised=self.config.sampling.clip_denoised)

            self._cache["bpd"] = jax.jit(bpd)
        return self._cache["bpd"](self.params, x, key)


def create(config: ml_collections.ConfigDict, *, seed: int = 0) -> DDPM:
    """A freshly initialised model for ``config``."""
    config_lib.validate(config)
    graphdef, params = unet.split(unet.create_model(config, seed=seed))
    return DDPM(config, graphdef, params)


def load(path: str, *, ema: bool = True, step: int | None = None, mesh=None) -> DDPM:
    """Restores a ``DDPM`` from a workdir, its checkpoints directory, or one step directory.

    EMA weights by default (``ema=False`` for the raw parameters); the latest step unless
    ``step`` (or a step directory) says otherwise. Needs no optimizer state and no dataset.
    """
    directory, path_step = checkpoints.locate(path)
    manager = checkpoints.create_manager(directory, read_only=True)
    steps = manager.all_steps()
    step = step if step is not None else (path_step if path_step is not None else max(
        steps, default=None))
    if step is None or step not in steps:
        raise checkpoints.CheckpointError(
            f"no committed checkpoint {'step ' + str(step) + ' ' if step is not None else ''}"
            f"in {directory} (found steps {sorted(steps)})")
    config = checkpoints.load_config(manager, step)
    mesh = mesh or create_mesh()
    graphdef, abstract = unet.abstract_model(config)
    replicated = NamedSharding(mesh, P())
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
    item = "ema_params" if ema else "params"
    restored = checkpoints.restore(manager, step, {item: abstract})
    manager.close()
    model = DDPM(config, graphdef, restored[item], mesh=mesh)
    model.step, model.source, model.ema = int(step), str(directory), ema
    return model

"""The Python API: ``ddpm_jax.create(config)`` and ``ddpm_jax.load(path)`` return a ``DDPM``.

    model = ddpm_jax.load("runs/digits")            # EMA weights of the latest checkpoint
    images = model.sample(jax.random.key(0), 16)    # uint8 [16, H, W, C]
    eps = model.predict_noise(x_t, t)               # float32 [B, H, W, C]
    bpd = model.bits_per_dim(images, jax.random.key(1))

A ``DDPM`` is immutable: its config, network structure, parameters, process, mesh and
provenance are fixed when it is made; ``model.replace(params=...)`` gives another one. Each
method is a few lines over compiled functions cached per (network, settings, shape, mesh), so
repeated calls never compile again.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import (
    checkpoints,
    config_lib,
    diffusion,
    images,
    sampling,
    sharding,
    trees,
    unet,
    xla_cpu,
)

SamplerSpec = sampling.SamplerSpec


@dataclasses.dataclass(frozen=True, eq=False)
class DDPM:
    """A U-Net with its diffusion process, ready to sample and evaluate.

    Attributes:
      config: the locked run config.
      graphdef: the U-Net's structure (``unet.split``).
      params: the parameters in use (EMA weights when loaded from a checkpoint), replicated.
      diffusion: the process constants (``Diffusion.from_config(config)``).
      mesh: the devices the model runs on.
      step, source, ema: the checkpoint step, its checkpoints directory and whether the EMA
        weights were loaded (None for a fresh model).
    """

    config: ml_collections.ConfigDict
    graphdef: Any
    params: Any
    diffusion: diffusion.Diffusion
    mesh: jax.sharding.Mesh
    step: int | None = None
    source: str | None = None
    ema: bool | None = None

    @classmethod
    def build(cls, config, graphdef, params, *, mesh=None, **provenance) -> DDPM:
        """A DDPM of ``params`` for ``config``, its parameters replicated over ``mesh``."""
        mesh = mesh or sharding.create_mesh()
        params = sharding.put(params, sharding.replicated(mesh))
        return cls(config, graphdef, params, diffusion.Diffusion.from_config(config), mesh,
                   **provenance)

    def replace(self, **changes) -> DDPM:
        """A copy with some fields changed (``params`` are checked, then placed on the mesh).

        Raises:
          ValueError: ``params`` do not have this network's structure and shapes (the first
            differing path is named) or hold non-finite values.
        """
        if "params" in changes:
            check_params(self.params, changes["params"])
            changes["params"] = sharding.put(changes["params"], sharding.replicated(self.mesh))
        return dataclasses.replace(self, **changes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        d = self.config.data
        return (d.image_size, d.image_size, d.channels)

    @functools.cached_property
    def num_params(self) -> int:
        return unet.count_params(self.params)

    # -- the network ------------------------------------------------------------------------------
    def predict_noise(self, x_t, t, *, labels=None) -> jax.Array:
        """eps_theta(x_t, t): float32 ``[B, H, W, C]``, t int32 ``[B]`` in [0, T).

        For learned-variance models the eps half of the output; for x0- or x_{t-1}-predicting
        models the eps implied by the prediction. ``labels`` (int ``[B]`` in [0, num_classes],
        num_classes being the null class) condition a class-conditional model; without them
        it predicts for the null class.
        """
        x_t = np.asarray(x_t, np.float32)
        t = self._check_timesteps(t, x_t)
        padded, n = _pad_rows(x_t, self.mesh), x_t.shape[0]
        t = _pad_rows(t, self.mesh)
        fn = _eps_fn(self.graphdef, self.mesh)
        if labels is None:
            return fn(self.params, self.diffusion, padded, t)[:n]
        labels = np.asarray(labels)
        if not self.num_classes or labels.shape != (n,) or labels.min() < 0 or (
                labels.max() > self.num_classes):
            raise ValueError(f"labels must be int [{n}] in [0, {self.num_classes}] for a "
                             f"class-conditional model, got {labels.dtype} {labels.shape}")
        return fn(self.params, self.diffusion, padded, t,
                  _pad_rows(labels.astype(np.int32), self.mesh))[:n]

    def _check_timesteps(self, t, x_t) -> np.ndarray:
        self._check_images(x_t, "x_t")
        T = self.config.diffusion.num_timesteps
        t = np.asarray(t)
        if t.shape != (x_t.shape[0],) or not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"t must be integer [B] = [{x_t.shape[0]}], got {t.dtype} {t.shape}")
        if t.size and (t.min() < 0 or t.max() >= T):
            raise ValueError(f"t must lie in [0, {T}) (0-based timesteps of this model's T = {T} "
                             f"steps), got values in [{t.min()}, {t.max()}]")
        return t.astype(np.int32)

    def _check_images(self, x, name):
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{name} must have shape [B, {', '.join(map(str, self.image_shape))}] for this "
                f"model, got {tuple(x.shape)}")

    # -- sampling ---------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model (0: unconditional)."""
        return config_lib.num_classes(self.config)

    def sample_batch(self, key, batch: int, spec: SamplerSpec = sampling.ANCESTRAL, *,
                     x_T=None, labels=None, guidance: float = 0.0) -> jax.Array:
        """One compiled chain: uint8 ``[batch, H, W, C]`` split over the devices.

        ``batch`` must divide over the devices (``DDPM.sample`` pads for you). Without ``x_T``
        the starting noise is drawn inside the chain from ``key``. ``labels`` (int32
        ``[batch]``, checked by ``DDPM.sample``) and the guidance w run the guided chain; w is
        an argument of the compiled chain, so every w shares one compilation.
        """
        shape = (batch,) + self.image_shape
        x_T = None if x_T is None else np.asarray(x_T, np.float32)
        if labels is None:
            fn = sampling.get_sampling_fn(self.graphdef, spec, shape, self.mesh)
            return fn(self.params, self.diffusion, key, x_T, spec.eta)
        fn = sampling.get_sampling_fn(self.graphdef, spec, shape, self.mesh,
                                      sampling.guided_network_fn)
        labels = sharding.put(np.asarray(labels, np.int32), sharding.data_sharding(self.mesh))
        return fn(self.params, self.diffusion, key, x_T, spec.eta,
                  sampling.guidance_args(labels, guidance))

    def sample(self, key, num_samples: int, *, sampler: str = "ancestral",
               num_steps: int | None = None, eta: float = 0.0, spacing: str | None = None,
               x_T=None, batch_size: int | None = None,
               thresholding: bool = False, churn: float = 0.0, labels=None,
               guidance: float = 0.0) -> np.ndarray:
        """``num_samples`` images as uint8 ``[N, H, W, C]``.

        Runs in chunks of ``batch_size`` (default ``config.sampling.batch_size``); chunk i
        starts from ``fold_in(key, i)``, so results depend only on (key, N, batch size) (see
        ``sampling.Plan``). ``x_T`` (float32 ``[N, H, W, C]``) fixes the starting noise.
        ``sampler``: ``ancestral`` (Algorithm 2; respaced on fewer steps), ``ddim`` (Song et
        al., x0 not clipped), ``ddim_clipped`` / ``ddim_iddpm`` (x0 clipped as diffusers /
        Improved DDPM), ``dpm_solver++`` (2M), ``dpm_solver++_3m`` (3M), ``heun`` (EDM);
        ``sampling.VARIANTS`` says exactly what each computes. ``num_steps`` and ``spacing``
        (``uniform``, ``quadratic``, ``linspace``, ``leading``, ``trailing``, ``karras``) default
        to the sampler's own; ``eta`` is DDIM's noise; ``thresholding`` clips the DPM-Solvers'
        predicted x0; ``churn`` is EDM's S_churn for ``heun`` (its stochastic sampler).
        ``labels`` (int ``[N]`` in [0, num_classes), a class-conditional model only) asks for
        those classes, with classifier-free guidance w = ``guidance`` (any sampler):
        eps = (1 + w) eps(x, y) - w eps(x, null) (diffusers' guidance_scale is 1 + w).
        """
        spec = self._spec(sampler, num_steps, eta, spacing=spacing, thresholding=thresholding,
                          churn=churn)
        labels = check_labels(labels, guidance, num_samples, self.num_classes)
        chunks = sampling.plan(num_samples, batch_size or self.config.sampling.batch_size,
                               self.mesh)
        if x_T is not None:
            x_T = np.asarray(x_T, np.float32)
            self._check_images(x_T, "x_T")
            if x_T.shape[0] != num_samples:
                raise ValueError(f"x_T holds {x_T.shape[0]} images, num_samples={num_samples}")
        sample_batch = functools.partial(self.sample_batch, spec=spec, guidance=guidance)
        return np.concatenate(list(sampling.iter_chunks(sample_batch, self.image_shape, key,
                                                        chunks, x_T=x_T, labels=labels)))

    def _spec(self, sampler, num_steps, eta, record_every=None, *, spacing=None,
              thresholding=False, churn=0.0) -> SamplerSpec:
        spec = SamplerSpec(sampler, num_steps, float(eta), self.config.sampling.clip_denoised,
                           record_every, spacing, bool(thresholding), float(churn))
        spec.check(self.config.diffusion.num_timesteps)
        return spec

    def progressive(self, key, num_samples: int, spec: SamplerSpec):
        """Paper Fig. 6: (x_0, x_t every k steps, predicted x_0 every k steps), uint8.

        ``spec.record_every`` = k; the trajectories are ``[N, K, H, W, C]`` with K = steps / k.
        """
        padded = sharding.padded_size(num_samples, self.mesh)
        fn = sampling.get_sampling_fn(self.graphdef, spec, (padded,) + self.image_shape,
                                      self.mesh)
        x0, xs, x0s = (sharding.to_host(a) for a in fn(self.params, self.diffusion, key, None,
                                                        spec.eta))
        return x0[:num_samples], np.swapaxes(xs, 0, 1)[:num_samples], np.swapaxes(
            x0s, 0, 1)[:num_samples]

    def interpolate(self, key, image1, image2, *, t: int = 500, num: int = 9,
                    shared_noise: bool = False) -> np.ndarray:
        """Paper Fig. 8 between two uint8 ``[H, W, C]`` images: uint8 ``[num, H, W, C]``.

        ``t`` is the paper's number of diffusion steps (1..T); each image is diffused with its
        own noise as in the original (``shared_noise=True``: one noise for both, a variant).
        """
        T = self.config.diffusion.num_timesteps
        if not 1 <= t <= T:
            raise ValueError(f"t (the number of diffusion steps) must be in [1, {T}], got {t}")
        for name, im in (("image1", image1), ("image2", image2)):
            im = np.asarray(im)
            if im.dtype != np.uint8 or im.shape != self.image_shape:
                raise ValueError(f"{name} must be uint8 {self.image_shape}, got {im.dtype} "
                                 f"{im.shape}")
        fn = _interpolation_fn(self.graphdef, t, self.config.sampling.clip_denoised,
                               shared_noise)
        out = fn(self.params, self.diffusion, key, image1, image2, jnp.linspace(0, 1, num))
        return sharding.to_host(out)

    # -- evaluation -------------------------------------------------------------------------------
    def bits_per_dim(self, images_uint8, key) -> jax.Array:
        """The full variational bound of uint8 ``[B, H, W, C]`` images in bits/dim: float32 [B].

        T network evaluations per batch (one compiled scan, ``diffusion.calc_bpd_loop``).
        """
        return self.bound_terms(images_uint8, key)["total_bpd"]

    def bound_terms(self, images_uint8, key) -> dict[str, jax.Array]:
        """Every output of ``diffusion.calc_bpd_loop`` (total, prior and per-t terms)."""
        x = np.asarray(images_uint8)
        if x.dtype != np.uint8:
            raise ValueError(f"bits_per_dim takes uint8 images, got {x.dtype}")
        self._check_images(x, "images")
        fn = _bound_fn(self.graphdef, self.config.sampling.clip_denoised, self.mesh)
        out = fn(self.params, self.diffusion, _pad_rows(x, self.mesh), key)
        return {k: v[:x.shape[0]] for k, v in out.items()}


def check_labels(labels, guidance: float, num_samples: int, num_classes: int,
                 *, prefix: str = "") -> np.ndarray | None:
    """The labels as int32 ``[num_samples]`` (None without), after the checks that keep a
    conditional request from running wrong: labels only for a class-conditional model, each in
    [0, num_classes), guidance only with labels, and w finite and >= 0.

    ``prefix`` names the settings as flags ("--") in the messages.
    """
    config_lib.check_guidance(guidance, prefix=prefix)
    if labels is None:
        if guidance:
            raise config_lib.ConfigError(
                f"{prefix}guidance={guidance} needs {prefix}labels (guidance steers towards "
                f"the classes asked for); add {prefix}labels or drop {prefix}guidance")
        return None
    if not num_classes:
        raise config_lib.ConfigError(
            f"{prefix}labels given, but this model is unconditional (model.num_classes = 0); "
            f"drop {prefix}labels or use a class-conditional checkpoint")
    labels = np.asarray(labels)
    if labels.shape != (num_samples,) or not np.issubdtype(labels.dtype, np.integer):
        raise config_lib.ConfigError(
            f"{prefix}labels must be integers, one per sample ([{num_samples}]), got "
            f"{labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise config_lib.ConfigError(
            f"{prefix}labels must lie in [0, {num_classes}) (this model's classes), got values "
            f"in [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int32)


def _pad_rows(x, mesh) -> jax.Array:
    """``x`` with its leading axis padded (repeating the last row) to a multiple of the devices,
    split over them."""
    x = np.asarray(x)
    n = x.shape[0]
    padded = sharding.padded_size(n, mesh)
    if padded != n:
        x = np.concatenate([x, np.repeat(x[-1:], padded - n, axis=0)])
    return sharding.put(x, sharding.data_sharding(mesh))


@functools.lru_cache(maxsize=8)
def _eps_fn(graphdef, mesh):
    def eps(params, d, x, t, labels=None):
        out = unet.apply(graphdef, params, x, t, labels=labels)
        return diffusion.p_mean_variance(d, out, x, t, clip_denoised=False)["eps"]

    return jax.jit(eps, out_shardings=sharding.data_sharding(mesh),
                   compiler_options=xla_cpu.compiler_options("forward"))


@functools.lru_cache(maxsize=8)
def _bound_fn(graphdef, clip_denoised: bool, mesh):
    def bound(params, d, x_uint8, key):
        model_fn = lambda x, t: unet.apply(graphdef, params, x, t)
        return diffusion.calc_bpd_loop(d, model_fn, images.to_model_space(x_uint8), key,
                                       clip_denoised=clip_denoised)

    return jax.jit(bound, out_shardings=sharding.data_sharding(mesh),
                   compiler_options=xla_cpu.compiler_options("forward"))


@functools.lru_cache(maxsize=8)
def _interpolation_fn(graphdef, t: int, clip_denoised: bool, shared_noise: bool):
    def interpolate(params, d, key, image1, image2, lambdas):
        model_fn = lambda x, s: unet.apply(graphdef, params, x, s)
        x1, x2 = images.to_model_space(image1), images.to_model_space(image2)
        out = sampling.interpolate(d, model_fn, key, x1, x2, t=t, lambdas=lambdas,
                                   clip_denoised=clip_denoised, shared_noise=shared_noise)
        return images.to_uint8(out)

    return jax.jit(interpolate, compiler_options=xla_cpu.compiler_options("forward"))


def check_params(reference, params) -> None:
    """Raises ValueError unless ``params`` match ``reference``'s paths, shapes and dtypes and
    are all finite; the message names the first path that differs."""
    want, got = trees.flatten(reference), trees.flatten(params)
    for path in [*want, *(p for p in got if p not in want)]:
        if path not in got:
            raise ValueError(f"params lack {path} (shape {tuple(want[path].shape)}); give the "
                             "parameters of this network (model.params has the structure)")
        if path not in want:
            raise ValueError(f"params hold {path}, which this network does not have")
        a, b = want[path], got[path]
        if tuple(np.shape(b)) != tuple(a.shape) or np.result_type(b) != a.dtype:
            raise ValueError(f"params {path} is {np.result_type(b)} {tuple(np.shape(b))}, "
                             f"this network needs {a.dtype} {tuple(a.shape)}")
    bad = next((p for p, v in got.items() if not bool(jnp.all(jnp.isfinite(v)))), None)
    if bad is not None:
        raise ValueError(f"params {bad} holds NaN or infinite values; give finite "
                         "parameters")


def create(config: ml_collections.ConfigDict, *, seed: int = 0, mesh=None) -> DDPM:
    """A freshly initialised model for ``config``."""
    model = config_lib.validate(config).model
    graphdef, params = unet.split(unet.create_model(model, seed=seed))
    return DDPM.build(config, graphdef, params, mesh=mesh)


def load(path: str, *, ema: bool = True, step: int | None = None, mesh=None) -> DDPM:
    """Restores a ``DDPM`` from a workdir, its checkpoints directory, or one step directory.

    EMA weights by default (``ema=False`` for the raw parameters); the latest step unless
    ``step`` (or a step directory) says otherwise. Needs no optimizer state and no dataset.
    ``path`` may be local or ``gs://``.
    """
    mesh = mesh or sharding.create_mesh()
    with checkpoints.Checkpointer.open(path, read_only=True) as ckpt:
        step = ckpt.resolve_step(step)
        config = ckpt.read_config(step)
        graphdef, abstract = unet.abstract_model(unet.ModelSpec.from_config(config))
        item = "ema_params" if ema else "params"
        placed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=sharding.replicated(mesh)), abstract)
        restored, _ = ckpt.restore(step, {item: placed})
        return DDPM(config, graphdef, restored[item], diffusion.Diffusion.from_config(config),
                    mesh, step=int(step), source=ckpt.directory, ema=ema)

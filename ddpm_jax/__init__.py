"""ddpm_jax: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) in JAX and Flax.

    import ddpm_jax
    model = ddpm_jax.load("runs/digits")      # EMA weights of the latest checkpoint
    images = model.sample(jax.random.key(0), 16)
"""

__version__ = "0.1.0"

from ddpm_jax.api import DDPM, create, load  # noqa: E402

__all__ = ["DDPM", "create", "load", "__version__"]

"""Faithful to the original: interpolation (paper Fig. 8) with each image diffused by its own
noise for the paper's t steps and the chain run over indices t - 1, ..., 0 (no U-Net needed);
the Inception Score with one split (the original's 50k evaluation) and with ten."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, sampling


@pytest.fixture()
def latents(monkeypatch):
    """sampling.interpolate with the reverse chain replaced by one that returns its start."""
    seen = {}

    def chain(step_fn, x_t, timesteps, record):
        seen["timesteps"] = np.asarray(timesteps)
        return x_t

    monkeypatch.setattr(sampling, "_chain", chain)
    return seen


def test_fresh_noise_per_image_and_t_counts_steps(latents):
    d = diffusion.Diffusion.create(np.linspace(1e-4, 0.02, 10, dtype=np.float64))
    x = jnp.full((4, 4, 1), 0.5, jnp.float32)
    key = jax.random.key(0)
    out = sampling.interpolate(d, None, key, x, x, t=3, lambdas=[0.0, 0.5, 1.0])
    np.testing.assert_array_equal(latents["timesteps"], [2, 1, 0])  # t = 3 steps
    z1, mid, z2 = np.asarray(out)
    assert np.abs(z1 - z2).max() > 0.1  # the same image, two noise draws
    np.testing.assert_allclose(mid, (z1 + z2) / 2, atol=1e-6)
    # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps at index t - 1 (float64 abar).
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 10))[2]
    noise = np.asarray(jax.random.normal(jax.random.split(key)[0], (2, 4, 4, 1)))
    np.testing.assert_allclose(z1, np.sqrt(abar) * 0.5 + np.sqrt(1 - abar) * noise[0],
                               atol=1e-5)
    np.testing.assert_allclose(z2, np.sqrt(abar) * 0.5 + np.sqrt(1 - abar) * noise[1],
                               atol=1e-5)
    shared = np.asarray(sampling.interpolate(d, None, key, x, x, t=3, lambdas=[0.0, 1.0],
                                             shared_noise=True))
    np.testing.assert_array_equal(shared[0], shared[1])


def _is_float64(logits, splits):
    """Inception Score written out: exp(E_x KL(p(y|x) || p(y))) per split, then mean and std."""
    scores = []
    for part in np.array_split(np.asarray(logits, np.float64), splits):
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return np.mean(scores), np.std(scores)


def test_inception_score_reported_with_1_and_10_splits():
    from ddpm_jax import evaluation

    logits = np.random.default_rng(0).normal(size=(40, 12)).astype(np.float32) * 3
    out = evaluation.inception_scores(logits, 4)
    np.testing.assert_allclose([out["is_mean"], out["is_std"]], _is_float64(logits, 4),
                               rtol=1e-5)
    np.testing.assert_allclose(out["is_1split"], _is_float64(logits, 1)[0], rtol=1e-5)
    np.testing.assert_allclose([out["is_10split_mean"], out["is_10split_std"]],
                               _is_float64(logits, 10), rtol=1e-5)
    assert out["is_1split"] > out["is_10split_mean"]  # one big split sees more classes

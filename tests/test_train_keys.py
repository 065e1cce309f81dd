"""Training randomness that can be seen: dropout is applied (with the train step's key) and t,
the noise and the dropout key change with the step and only with it (a spy network, no U-Net
compile for the keys)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import test as test_config
from ddpm_jax import config_lib, diffusion, training, unet


def test_dropout_is_inverted_dropout_at_its_rate():
    x = jnp.ones((64, 64), jnp.float32)
    out = np.asarray(unet._dropout(x, 0.25, jax.random.key(0)))
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.75)}
    assert abs((out == 0).mean() - 0.25) < 0.02  # 4096 draws: 5 sigma is 0.034
    np.testing.assert_array_equal(unet._dropout(x, 0.25, None), x)  # evaluation: no-op


def test_the_unet_applies_dropout_only_with_a_key():
    config = test_config.get_config()
    config.model.dropout = 0.5
    graphdef, params = unet.split(unet.create_model(unet.ModelSpec.from_config(config), seed=0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([3, 7], jnp.int32)
    run = jax.jit(lambda k: unet.apply(graphdef, params, x, t, dropout_key=k))
    a, b, a2 = run(jax.random.key(0)), run(jax.random.key(1)), run(jax.random.key(0))
    assert float(jnp.abs(a - b).max()) > 0  # the key reaches the blocks
    np.testing.assert_array_equal(a, a2)


def test_t_noise_and_dropout_change_with_the_step(monkeypatch):
    seen = []

    def spy(graphdef, params, x, t, *, labels=None, dropout_key=None):
        jax.debug.callback(lambda *v: seen.append(v), x, t, jax.random.key_data(dropout_key))
        return params["w"] * x

    monkeypatch.setattr(unet, "apply", spy)
    config = test_config.get_config()
    d = diffusion.Diffusion.create(np.linspace(1e-4, 0.02, 100, dtype=np.float64))
    tx = optax.sgd(0.0)
    step_fn = jax.jit(training.make_train_step(config_lib.validate(config), None, d, tx))
    state = training.init_train_state({"w": jnp.ones(())}, tx)
    batch = jnp.full((4, 8, 8, 1), 128, jnp.uint8)
    key = jax.random.key(0)
    step1, _ = step_fn(state, batch, key)
    step_fn(step1, batch, key)
    step_fn(state, batch, key)  # step 0 again
    jax.effects_barrier()
    (x0, t0, k0), (x1, t1, k1), (x0b, t0b, k0b) = [tuple(map(np.asarray, v)) for v in seen]
    assert not np.array_equal(t0, t1) and not np.array_equal(x0, x1)  # t and noise
    assert not np.array_equal(k0, k1)  # dropout key
    for a, b in ((x0, x0b), (t0, t0b), (k0, k0b)):
        np.testing.assert_array_equal(a, b)  # the key of step s depends on s only

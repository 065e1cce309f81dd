"""Training: a real run end to end, the optimiser, EMA, and sharded == unsharded."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from conftest import run_python
from PIL import Image

from configs import test as test_config
from ddpm_jax import diffusion, input_pipeline, training, unet


def test_train_end_to_end_writes_everything(test_cfg, tmp_path):
    workdir = str(tmp_path / "run")
    state = training.train_and_evaluate(test_cfg, workdir)
    assert int(state.step) == 4
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"loss", "grad_norm", "lr", "steps_per_sec", "images_per_sec"} <= r.keys()
        assert np.isfinite(r["loss"]) and r["loss"] > 0
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(5e-4)  # warmup 2
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    grid = Image.open(os.path.join(workdir, "samples", "step_0000004.png"))
    assert grid.size[0] > 8 and grid.mode == "L"
    assert Image.open(os.path.join(workdir, "loss.png")).size == (640, 360)
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["ch"] == 32 and saved["data"]["dataset"] == "digits"


def test_one_step_on_mock_cifar10(tmp_path):
    config = test_config.get_config()
    config.data.dataset = "cifar10"
    config.data.image_size, config.data.channels = 32, 3
    config.data.random_flip = True
    config.model.attn_resolutions = (16,)
    config.training.num_train_steps = 1
    config.optim.warmup = 1
    config.training.num_sample_images = 2
    with tfds.testing.mock_data(num_examples=16):
        state = training.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 1
    assert os.path.isdir(tmp_path / "checkpoints" / "1")


def _setup(config, seed=0):
    graphdef, params = unet.split(unet.create_model(config, seed=seed))
    tx = training.create_optimizer(config)
    d = diffusion.Diffusion.from_config(config)
    step = jax.jit(training.make_train_step(config, graphdef, d, tx))
    return step, training.init_train_state(params, tx)


def _fixed_batch(config, n=8):
    return jnp.asarray(input_pipeline.load_split(config, "train", n), jnp.float32) / 127.5 - 1.0


def test_loss_decreases_on_a_fixed_batch(test_cfg):
    test_cfg.optim.warmup = 0
    test_cfg.model.dropout = 0.0
    step, state = _setup(test_cfg)
    batch, key = _fixed_batch(test_cfg), jax.random.key(0)
    losses = []
    for _ in range(60):
        state, metrics = step(state, batch, key)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


def test_warmup_schedule_and_clipping():
    config = test_config.get_config()
    config.optim.lr, config.optim.warmup = 2e-4, 5000
    lr = training.learning_rate_fn(config)
    assert float(lr(0)) == 0.0
    assert float(lr(2500)) == pytest.approx(1e-4)
    assert float(lr(5000)) == pytest.approx(2e-4)
    assert float(lr(800_000)) == pytest.approx(2e-4)
    # Clipping by global norm 1.0 happens before Adam: its first moment is (1 - b1) * g_clipped.
    tx = training.create_optimizer(config)
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}  # norm 50
    _, opt_state = tx.update(grads, tx.init(params), params)
    adam_state = opt_state[1][0]
    assert float(optax.global_norm(adam_state.mu)) == pytest.approx(0.1 * 1.0, rel=1e-6)
    small = {"w": jnp.array([0.3, 0.4, 0.0, 0.0])}  # norm 0.5: untouched
    _, opt_state = tx.update(small, tx.init(params), params)
    assert float(optax.global_norm(opt_state[1][0].mu)) == pytest.approx(0.05, rel=1e-6)


def test_ema_follows_its_definition(test_cfg):
    test_cfg.optim.ema_decay = 0.9
    step, state = _setup(test_cfg)
    batch, key = _fixed_batch(test_cfg), jax.random.key(0)
    ema = state.ema_params
    for _ in range(3):
        state, _ = step(state, batch, key)
        ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, state.params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     state.ema_params, ema)
    assert not np.allclose(state.ema_params["conv_in"]["kernel"], state.params["conv_in"]["kernel"])


def test_non_finite_update_is_not_applied(test_cfg):
    step, state = _setup(test_cfg)
    batch = _fixed_batch(test_cfg).at[0, 0, 0, 0].set(jnp.nan)
    new, metrics = step(state, batch, jax.random.key(0))
    assert int(metrics["nonfinite_steps"]) == 1 and int(metrics["first_nonfinite_step"]) == 0
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
    assert int(new.step) == 1


_SHARDED = """
import json, sys, jax, jax.numpy as jnp, numpy as np
from configs import test as test_config
from ddpm_jax import api, diffusion, training, unet
config = test_config.get_config()
config.training.batch_size = 16
mesh = api.create_mesh()
assert mesh.size == int(sys.argv[1])
graphdef, params = unet.split(unet.create_model(config, seed=0))
tx = training.create_optimizer(config)
state = training.init_train_state(params, tx)
step = training.compile_train_step(
    training.make_train_step(config, graphdef, diffusion.Diffusion.from_config(config), tx),
    mesh, state)
batch = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1), minval=-1, maxval=1)
losses = []
for _ in range(3):
    state, m = step(state, batch, jax.random.key(0))
    losses.append(float(m["loss"]))
leaves = [np.asarray(x).ravel()[:50].tolist() for x in jax.tree.leaves(state.params)]
print(json.dumps(dict(losses=losses, leaves=leaves)))
"""


def test_sharded_step_on_8_devices_equals_1_device():
    outs = []
    for n in (1, 8):
        proc = run_python(["-c", _SHARDED, str(n)], devices=n)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    one, eight = outs
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    for a, b in zip(one["leaves"], eight["leaves"], strict=True):
        # Adam turns float32 noise in near-zero gradients into noise of a small fraction of lr.
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)

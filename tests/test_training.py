"""Training: a real run end to end, the optimiser, EMA, and sharded == unsharded."""

import dataclasses
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from conftest import run_script, train_program
from PIL import Image

from configs import test as test_config
from ddpm_jax import config_lib, datasets, diffusion, training, unet, xla_cpu


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
    events = _tensorboard_events(os.path.join(workdir, "tensorboard"))
    assert {("loss", step) for step in (1, 2, 3, 4)} <= {(t, s) for t, s, _ in events}
    (png,) = [v for t, s, v in events if t == "samples" and s == 4]  # the final grid, at its step
    assert Image.open(io.BytesIO(png)).size == grid.size
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["ch"] == 64 and saved["data"]["dataset"] == "digits"


def _tensorboard_events(logdir):
    """(tag, step, value or encoded image) of every summary in the event files of ``logdir``."""
    import tensorflow as tf

    out = []
    for name in os.listdir(logdir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
            for v in event.summary.value:
                out.append((v.tag, event.step, v.image.encoded_image_string
                            if v.HasField("image") else v.simple_value))
    return out


# Compiles the 32x32x3 model's train step and sampler (about a minute on two cores): slow. The
# faster tests covering it: the mock CIFAR10 stream (test_input_pipeline.py), the CIFAR10
# network's shapes and parameters (test_unet.py), and the digits run end to end above.
@pytest.mark.slow
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
    (row,) = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert row["step"] == 1 and np.isfinite(row["loss"]) and 0.05 < row["loss"] < 10
    assert np.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 and row["nonfinite_steps"] == 0
    assert state.params["conv_in"]["kernel"].shape == (3, 3, 3, 32)


_STEPS = {}  # config JSON -> its jitted train step: traced and compiled once for this file


def _setup(config, seed=0):
    from ddpm_jax import config_lib

    graphdef, params = unet.split(unet.create_model(unet.ModelSpec.from_config(config), seed=seed))
    tx = training.create_optimizer(config_lib.OptimizerSpec.from_config(config))
    key, state = config_lib.to_json(config), training.init_train_state(params, tx)
    if key not in _STEPS:
        d = diffusion.Diffusion.from_config(config)
        sections = config_lib.validate(config)
        _STEPS[key] = train_program(training.make_train_step(sections, graphdef, d, tx), state)
    return _STEPS[key], state


def _fixed_batch(config, n=8):
    data = datasets.DataSpec.from_config(config)
    return jnp.asarray(datasets.load_split(data, "train", n))  # uint8, as the reader gives


def test_loss_decreases_on_a_fixed_batch(test_cfg):
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
    lr = training.learning_rate_fn(config_lib.OptimizerSpec.from_config(config))
    assert float(lr(0)) == 0.0
    assert float(lr(2500)) == pytest.approx(1e-4)
    assert float(lr(5000)) == pytest.approx(2e-4)
    assert float(lr(800_000)) == pytest.approx(2e-4)
    # Clipping by global norm 1.0 happens before Adam: its first moment is (1 - b1) * g_clipped.
    tx = training.create_optimizer(config_lib.OptimizerSpec.from_config(config))
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}  # norm 50
    _, opt_state = tx.update(grads, tx.init(params), params)
    adam_state = opt_state[1][0]
    assert float(optax.global_norm(adam_state.mu)) == pytest.approx(0.1 * 1.0, rel=1e-6)
    small = {"w": jnp.array([0.3, 0.4, 0.0, 0.0])}  # norm 0.5: untouched
    _, opt_state = tx.update(small, tx.init(params), params)
    assert float(optax.global_norm(opt_state[1][0].mu)) == pytest.approx(0.05, rel=1e-6)


def test_optimizer_section_reads_older_configs_and_drives_the_schedules():
    # A saved config without the optim keys added later reads as those runs behaved; each
    # field of the section reaches what training builds from it.
    tree = config_lib.to_dict(test_config.get_config())
    for key in ("schedule", "ema_warmup", "skip_nonfinite"):
        del tree["optim"][key]
    o = config_lib.OptimizerSpec.from_config(config_lib.from_dict(tree))
    assert (o.schedule, o.ema_warmup, o.skip_nonfinite) == ("constant", False, False)
    assert (o.lr, o.warmup, o.num_train_steps) == (1e-3, 2, 4)
    cosine = training.learning_rate_fn(dataclasses.replace(o, schedule="cosine"))
    assert float(cosine(2)) == pytest.approx(1e-3) and float(cosine(3)) == pytest.approx(5e-4)
    assert float(cosine(4)) == pytest.approx(0.0, abs=1e-12)
    assert float(training.learning_rate_fn(o)(4)) == pytest.approx(1e-3)
    assert float(training.ema_decay_fn(dataclasses.replace(o, ema_warmup=True))(0)) == (
        pytest.approx(0.1))
    assert training.ema_decay_fn(o)(0) == o.ema_decay
    with pytest.raises(config_lib.ConfigError, match="optim.schedule='linear' is not one of"):
        dataclasses.replace(o, schedule="linear").check()


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
    params = jax.tree.map(lambda p: p, state.params)
    params["conv_in"]["bias"] = params["conv_in"]["bias"].at[0].set(jnp.inf)
    state = state.replace(params=params)
    new, metrics = step(state, _fixed_batch(test_cfg), jax.random.key(0))
    assert int(metrics["nonfinite_steps"]) == 1 and int(metrics["first_nonfinite_step"]) == 0
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, new.opt_state, state.opt_state)
    assert int(new.step) == 1
    # The logged lr is the one Adam applied: the schedule at the count of applied updates (the
    # test config warms up over 2 steps: lr(0) = 0, lr(1) = 5e-4).
    _, state = _setup(test_cfg)
    batch, key = _fixed_batch(test_cfg), jax.random.key(0)
    state, m1 = step(state, batch, key)
    state, m2 = step(state.replace(nonfinite_steps=state.nonfinite_steps + 1), batch, key)
    assert float(m1["lr"]) == 0.0 and float(m2["lr"]) == 0.0  # one update applied: count 0
    assert int(state.opt_state[1][0].count) == 2


def test_k_steps_per_dispatch_equal_k_single_steps_bit_for_bit(test_cfg):
    train_step = training.make_train_step(config_lib.validate(test_cfg), *_parts(test_cfg))
    plain, state = _setup(test_cfg)  # train.py's one step per dispatch
    # train.py's program with training.steps_per_dispatch=3 (the accelerator rehearsal's
    # float32:3 variant: one compile in the cache), against the same loop run one step per call.
    three = train_program(train_step, state, steps_per_dispatch=3)
    one = jax.jit(training.make_multi_step(train_step),
                  compiler_options=xla_cpu.compiler_options("train"))
    batch = _fixed_batch(test_cfg, 8)
    batches = jnp.stack([batch[::-1], batch, batch[::2].repeat(2, axis=0)])
    key = jax.random.key(7)
    single, by_plain = state, state
    for b in batches:
        single, last = one(single, b[None], key)
        by_plain, _ = plain(by_plain, b, key)
    several, metrics = three(state, batches, key)
    jax.tree.map(np.testing.assert_array_equal, several, single)
    assert float(metrics["loss"]) == float(last["loss"]) and int(several.step) == 3
    # The step compiled alone rounds differently (Adam turns float32 noise in near-zero
    # gradients into noise of a small fraction of lr, as between device counts).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 several.params, by_plain.params)


def _parts(config):
    graphdef, _ = unet.abstract_model(unet.ModelSpec.from_config(config))
    tx = training.create_optimizer(config_lib.OptimizerSpec.from_config(config))
    return graphdef, diffusion.Diffusion.from_config(config), tx


def test_sharded_step_on_8_devices_equals_1_device():
    one = run_script("sharded_train_step.py", 1, devices=1)
    eight = run_script("sharded_train_step.py", 8, devices=8)
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    for a, b in zip(one["leaves"], eight["leaves"], strict=True):
        # Adam turns float32 noise in near-zero gradients into noise of a small fraction of lr.
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)

"""Three compiled train steps on a fixed batch, on however many devices there are: losses and
the first values of every parameter as JSON (compared across device counts by the tests).
``sharded_train_step.py DEVICES``."""

import json
import sys

import jax
import numpy as np

from configs import test as test_config
from ddpm_jax import config_lib, diffusion, sharding, training, unet


def result(devices: str) -> dict:
    config = test_config.get_config()  # batch 8: on one device, the step train.py compiles
    mesh = sharding.create_mesh()
    assert mesh.size == int(devices)
    tx = training.create_optimizer(config_lib.OptimizerSpec.from_config(config))
    graphdef, abstract_params = unet.abstract_model(unet.ModelSpec.from_config(config))
    # Initialised on one device (the program every test shares) and laid out over the mesh as
    # train.py lays out its state: the initialisation over 8 devices is the same draws.
    one = sharding.create_mesh(jax.devices()[:1])
    state = training.create_train_state(unet.ModelSpec.from_config(config), config.seed, tx, one)
    state = jax.device_put(state, sharding.train_state_shardings(mesh, state))
    step = training.compile_train_step(
        training.make_train_step(config_lib.validate(config), graphdef,
                                 diffusion.Diffusion.from_config(config), tx),
        mesh, training.abstract_state(abstract_params, tx))
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    rows = sharding.process_rows(mesh, 8)
    losses = []
    for _ in range(3):
        state, m = step(state, sharding.make_global_batch(batch[rows], mesh, rows, 8),
                        jax.random.key(0))
        losses.append(float(m["loss"]))
    leaves = [np.asarray(x).ravel()[:50].tolist() for x in jax.tree.leaves(state.params)]
    return dict(losses=losses, leaves=leaves)


if __name__ == "__main__":
    print(json.dumps(result(sys.argv[1])))

"""The train state of a committed run as restored on however many devices there are, as JSON
(dtype, shape and SHA-256 of the bytes of every array of the parameters, the EMA and the
optimiser state; compared across device counts by the tests).

``restore_tree.py DATA_DIR WORKDIR DEVICES [--train]``: with ``--train``, first trains the run's
2 steps (batch 8) on those devices."""

import contextlib
import hashlib
import json
import sys

import jax
import numpy as np

from configs import test as test_config
from ddpm_jax import training


def _config(data_dir):
    config = test_config.get_config()
    config.data.data_dir = data_dir
    config.training.batch_size = 8
    config.training.num_train_steps = 2
    return config


def result(data_dir, workdir, devices, *flags):
    if "--train" in flags:
        training.train_and_evaluate(_config(data_dir), workdir)
    with contextlib.ExitStack() as stack:
        try:
            training.setup(_config(data_dir), workdir, stack)
            raise AssertionError(f"{workdir} was not trained to its 2 steps")
        except training.AlreadyTrained as done:  # restored, laid out, nothing rewritten
            state = done.state
        assert jax.device_count() == int(devices) and int(state.step) == 2
        assert all(len(x.sharding.device_set) == int(devices) for x in jax.tree.leaves(state))
        leaves = jax.tree_util.tree_flatten_with_path(
            dict(params=state.params, ema=state.ema_params, opt=state.opt_state))[0]
        return {jax.tree_util.keystr(p): [str(v.dtype), list(v.shape),
                                          hashlib.sha256(np.asarray(v).tobytes()).hexdigest()]
                for p, v in leaves}


if __name__ == "__main__":
    print(json.dumps(result(*sys.argv[1:])))

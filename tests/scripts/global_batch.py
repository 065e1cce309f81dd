"""Run on 8 simulated devices: every row of a global batch lands on the device that owns it,
for the default device order and for a permuted one."""

import json

import jax
import numpy as np

from ddpm_jax import sharding


def check(mesh) -> str:
    local = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    rows = sharding.process_rows(mesh, 16)
    array = sharding.make_global_batch(local[rows], mesh, rows, 16)
    assert array.shape == (16, 3), array.shape
    order = list(mesh.devices.flat)
    for shard in array.addressable_shards:
        start = shard.index[0].start
        assert shard.data.shape == (2, 3), shard.data.shape
        assert order.index(shard.device) == start // 2  # the mesh says which device owns it
        np.testing.assert_array_equal(np.asarray(shard.data), local[start:start + 2])
    np.testing.assert_array_equal(np.asarray(array), local)
    return "ok"


devices = jax.devices()
assert len(devices) == 8
permuted = [devices[i] for i in (3, 0, 6, 1, 7, 2, 5, 4)]
print(json.dumps({"default": check(sharding.create_mesh()),
                  "permuted": check(sharding.create_mesh(permuted))}))

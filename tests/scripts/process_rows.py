"""Run as 2 processes with 2 devices each: on a mesh whose devices alternate between processes,
each process reads the rows its devices own and the assembled global batch is the true one."""

import json

import jax
import numpy as np

from ddpm_jax import distributed, sharding

distributed.initialize()
by_process = {p: [d for d in jax.devices() if d.process_index == p] for p in range(2)}
order = [by_process[0][0], by_process[1][0], by_process[0][1], by_process[1][1]]
mesh = sharding.create_mesh(order)
rows = sharding.process_rows(mesh, 8)
full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
batch = sharding.make_global_batch(full[rows], mesh, rows, 8)
ok = bool(np.array_equal(sharding.to_host(batch), full))
for shard in batch.addressable_shards:
    start = shard.index[0].start
    ok &= order.index(shard.device) == start // 2
    ok &= bool(np.array_equal(np.asarray(shard.data), full[start:start + 2]))
total = jax.jit(lambda x: x.sum())(batch)
ok &= float(sharding.to_host(total)) == float(full.sum())
print(json.dumps(dict(rows=rows.tolist(), ok=ok)))

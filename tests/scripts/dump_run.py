"""Prints a run's state as JSON: every array of a committed step (dtype, shape, SHA-256 of the
bytes), its meta, and the losses of metrics.jsonl. Works on local and gs:// workdirs, and on
checkpoints written by any mesh or number of processes.

``dump_run.py WORKDIR STEP``."""

import hashlib
import json
import sys

import jax
from etils import epath

from ddpm_jax import checkpoints


def result(workdir: str, step: str) -> dict:
    step = int(step)
    leaves = {}
    with checkpoints.Checkpointer.open(workdir) as ckpt:
        for item, tree in ckpt.read_items(step, *checkpoints.ARRAY_ITEMS).items():
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                leaves[item + jax.tree_util.keystr(path)] = [
                    str(leaf.dtype), list(leaf.shape), hashlib.sha256(leaf.tobytes()).hexdigest()]
        (meta,) = ckpt.read_json(step, "meta")
    text = (epath.Path(workdir) / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    return dict(leaves=leaves, meta=meta, losses={r["step"]: r["loss"] for r in rows})


if __name__ == "__main__":
    print(json.dumps(result(*sys.argv[1:3])))

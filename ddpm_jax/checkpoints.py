"""Orbax checkpoints: everything a run needs, committed atomically, restorable onto any mesh.

A checkpoint step directory ``WORKDIR/checkpoints/<step>/`` holds the items

- ``params``, ``ema_params``: the U-Net parameters (plain dicts of float32 arrays);
- ``opt_state``: the optax state (absent in checkpoints made from imported weights);
- ``meta``: JSON with ``step``, ``data_position`` (global batches consumed), ``base_key`` (the
  run's raw PRNG key data) and ``nonfinite_steps``;
- ``config``: the run's config as JSON.

Orbax writes each step to a temporary directory and renames it when complete, so a step that
was being written when the process died is never listed and never restored. Nothing here uses
pickle: arrays are TensorStore/OCDBT files, the rest is JSON.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ddpm_jax import config_lib

ARRAY_ITEMS = ("params", "ema_params", "opt_state")
JSON_ITEMS = ("meta", "config")
CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the problem and the fix."""


def _handlers() -> dict[str, Any]:
    handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
    return handlers


def create_manager(
    directory: str,
    *,
    max_to_keep: int | None = None,
    read_only: bool = False,
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """A manager over ``directory`` (the ``checkpoints`` folder of a workdir)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
        # Temporary folders of saves interrupted by a kill are removed at start-up.
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=_handlers()
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    params,
    ema_params,
    opt_state=None,
    meta: dict[str, Any],
    config: ml_collections.ConfigDict,
) -> None:
    """Starts an (asynchronous) save of one step; ``manager.wait_until_finished()`` commits it."""
    items = dict(
        params=ocp.args.StandardSave(params),
        ema_params=ocp.args.StandardSave(ema_params),
        meta=ocp.args.JsonSave(dict(meta, step=int(step))),
        config=ocp.args.JsonSave(json.loads(config_lib.to_json(config))),
    )
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    manager.save(int(step), args=ocp.args.Composite(**items), force=True)


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def read_json_items(manager: ocp.CheckpointManager, step: int) -> tuple[dict, dict]:
    """(meta, config dict) of a step, or CheckpointError if they are missing or damaged."""
    path = step_dir(manager, step)
    out = []
    for name in JSON_ITEMS:
        file = os.path.join(path, name, "metadata")
        try:
            with open(file) as f:
                out.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"checkpoint {path} is damaged ({name}: {e.__class__.__name__}: {e}); "
                f"move {path} aside to resume from the previous step"
            ) from None
    return out[0], out[1]


def check_tree(expected, path: str, item: str) -> None:
    """Compares the stored tree of ``item`` with ``expected`` (arrays or ShapeDtypeStructs).

    Raises CheckpointError naming the first path whose presence, shape or dtype differs.
    """
    try:
        stored = ocp.StandardCheckpointHandler().metadata(epath.Path(path) / item)
    except Exception as e:  # noqa: BLE001 - any failure to read metadata means damage
        raise CheckpointError(
            f"checkpoint {path} is damaged (cannot read {item!r}: {e.__class__.__name__}); "
            f"move {path} aside to resume from the previous step"
        ) from None
    stored_tree = stored.tree if hasattr(stored, "tree") else stored
    flat_stored = {_keystr(k): v for k, v in _flatten(stored_tree)}
    flat_expected = {_keystr(k): v for k, v in _flatten(expected)}
    for key in sorted(flat_expected.keys() | flat_stored.keys()):
        want, have = flat_expected.get(key), flat_stored.get(key)
        if have is None:
            raise CheckpointError(
                f"checkpoint {path} does not match the config: {item}{key} is missing "
                f"(the config expects shape {tuple(want.shape)})"
            )
        if want is None:
            raise CheckpointError(
                f"checkpoint {path} does not match the config: {item}{key} "
                f"(shape {tuple(have.shape)}) is not in the model the config builds"
            )
        if tuple(want.shape) != tuple(have.shape):
            raise CheckpointError(
                f"checkpoint {path} does not match the config: {item}{key} has shape "
                f"{tuple(have.shape)} in the checkpoint but {tuple(want.shape)} in the config"
            )
        if np.dtype(want.dtype) != np.dtype(have.dtype):
            raise CheckpointError(
                f"checkpoint {path} does not match the config: {item}{key} has dtype "
                f"{np.dtype(have.dtype)} in the checkpoint but {np.dtype(want.dtype)} expected"
            )


def _flatten(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _keystr(path) -> str:
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(f"/{name}")
    return "".join(parts)


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract: dict[str, Any],
) -> dict[str, Any]:
    """Restores the array items named in ``abstract`` (trees of ShapeDtypeStructs with
    shardings: the target mesh, whatever mesh wrote the checkpoint) plus ``meta``.

    Shapes are checked first, so a mismatch is reported by path before anything is read.
    """
    path = step_dir(manager, step)
    meta, _ = read_json_items(manager, step)
    for item, tree in abstract.items():
        if not os.path.isdir(os.path.join(path, item)):
            raise CheckpointError(
                f"checkpoint {path} has no {item!r} (it holds "
                f"{sorted(n for n in os.listdir(path) if not n.startswith('_'))})"
                + ("; it was made from imported weights and cannot resume training"
                   if item == "opt_state" else "")
            )
        check_tree(tree, path, item)
    args = {item: ocp.args.StandardRestore(tree) for item, tree in abstract.items()}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - TensorStore raises many kinds on damaged files
        raise CheckpointError(
            f"checkpoint {path} is damaged ({e.__class__.__name__}: {str(e)[:200]}); "
            f"move {path} aside to resume from the previous step"
        ) from None
    out = {item: restored[item] for item in abstract}
    out["meta"] = meta
    return out


def locate(path: str) -> tuple[str, int | None]:
    """(checkpoints directory, step or None for the latest) for a workdir, a checkpoints
    directory, or one step directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
    if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
        return os.path.join(path, CHECKPOINT_SUBDIR), None
    if os.path.isdir(os.path.join(path, "meta")) and os.path.basename(path).isdigit():
        return os.path.dirname(path), int(os.path.basename(path))
    if any(n.isdigit() for n in os.listdir(path)):
        return path, None
    raise CheckpointError(
        f"no checkpoint at {path}: expected a workdir (with {CHECKPOINT_SUBDIR}/), a "
        "checkpoints directory, or one step directory"
    )


def load_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    _, config = read_json_items(manager, step)
    return config_lib.from_json(json.dumps(config))


def save_weights(
    workdir: str,
    config: ml_collections.ConfigDict,
    params,
    *,
    ema_params=None,
    step: int = 0,
) -> str:
    """Writes an inference checkpoint (no optimizer state), e.g. from imported weights.

    ``ddpm_jax.load`` and ``sample.py`` restore it like any trained run. Returns its path.
    """
    manager = create_manager(os.path.join(workdir, CHECKPOINT_SUBDIR), async_save=False)
    if step in manager.all_steps():
        raise CheckpointError(
            f"{manager.directory} already holds step {step}; choose an empty workdir"
        )
    params = jax.tree.map(np.asarray, params)
    ema = params if ema_params is None else jax.tree.map(np.asarray, ema_params)
    meta = dict(data_position=0, base_key=None, nonfinite_steps=0)
    save(manager, step, params=params, ema_params=ema, meta=meta, config=config)
    manager.wait_until_finished()
    manager.close()
    return os.path.join(str(manager.directory), str(step))

"""Orbax checkpoints: everything a run needs, committed atomically, restorable onto any mesh.

A checkpoint step directory ``WORKDIR/checkpoints/<step>/`` holds the items

- ``params``, ``ema_params``: the U-Net parameters (plain dicts of float32 arrays);
- ``opt_state``: the optax state (absent in checkpoints made from imported weights);
- ``meta``: JSON with ``step``, ``data_position`` (global batches consumed), ``base_key`` (the
  run's raw PRNG key data) and the non-finite step counters;
- ``config``: the run's config as JSON.

Orbax writes each step to a temporary directory and renames it when complete, so a step that
was being written when the process died is never listed and never restored. Nothing here uses
pickle: arrays are TensorStore/OCDBT files, the rest is JSON. Directories may be local or
``gs://`` (TensorStore and ``etils.epath`` speak both). Everything goes through Orbax's public
``CheckpointManager`` API.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ddpm_jax import config_lib, errors, trees

ARRAY_ITEMS = ("params", "ema_params", "opt_state")
JSON_ITEMS = ("meta", "config")
CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(errors.UserError, RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the problem and the fix."""


# Errors of Orbax's background writers (and of the asyncio loops they run) are logged from their
# threads, often many times and after the save has already failed; the failure itself reaches
# the run as one CheckpointError. Those records are gathered here instead of being printed.
BACKGROUND_ERRORS: list[str] = []


# Orbax's warnings that a read-only manager is read-only: what opening for reading asked for.
_READ_ONLY_NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")


def _gather_background_errors(record: logging.LogRecord) -> bool:
    from_orbax = "orbax" in (record.pathname or "") or record.name == "asyncio"
    if from_orbax and record.levelno >= logging.ERROR:
        BACKGROUND_ERRORS.append(record.getMessage()[:500])
        return False
    return not (from_orbax and record.getMessage().startswith(_READ_ONLY_NOTICES))


logging.getLogger("absl").addFilter(_gather_background_errors)
logging.getLogger("asyncio").addFilter(_gather_background_errors)
_thread_excepthook = threading.excepthook


def _gather_thread_errors(args) -> None:
    frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback else []
    if any("orbax" in f.filename for f in frames):
        BACKGROUND_ERRORS.append(f"{args.exc_type.__name__}: {args.exc_value}"[:500])
        return
    _thread_excepthook(args)


threading.excepthook = _gather_thread_errors


def _handlers() -> dict[str, Any]:
    handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
    return handlers


def _damaged(path: str, what: str, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is damaged ({what}: {e.__class__.__name__}: {str(e)[:200]}); "
        f"move {path} aside to resume from the previous step")


def absolute(path) -> epath.Path:
    """``path`` as an ``epath.Path``; local paths made absolute (``~`` expanded)."""
    p = epath.Path(path)
    return p if "://" in str(path) else p.expanduser().resolve()


def locate(path: str) -> tuple[epath.Path, int | None]:
    """(checkpoints directory, step or None for the latest) for a workdir, a checkpoints
    directory, or one step directory."""
    p = absolute(path)
    if not p.is_dir():
        raise CheckpointError(f"no checkpoint at {p}: the directory does not exist")
    if (p / CHECKPOINT_SUBDIR).is_dir():
        return p / CHECKPOINT_SUBDIR, None
    if (p / "meta").is_dir() and p.name.isdigit():
        return p.parent, int(p.name)
    if any(child.name.isdigit() for child in p.iterdir()):
        return p, None
    raise CheckpointError(
        f"no checkpoint at {p}: expected a workdir (with {CHECKPOINT_SUBDIR}/), a "
        "checkpoints directory, or one step directory")


def check_empty(workdir: str) -> None:
    """Refuses a workdir that already holds committed checkpoints (never written over)."""
    directory = epath.Path(workdir) / CHECKPOINT_SUBDIR
    if directory.is_dir() and any(c.name.isdigit() for c in directory.iterdir()):
        raise CheckpointError(f"{directory} already holds checkpoints; use an empty workdir")


class Checkpointer:
    """The checkpoints directory of one run: save, wait, restore and read back.

    Saves are asynchronous; ``wait`` commits. A failed save (disk full, permissions, bucket
    errors) becomes one ``CheckpointError`` naming the last committed step, which stays intact.
    """

    def __init__(self, directory, *, max_to_keep: int | None = None, read_only: bool = False,
                 async_save: bool = True, path_step: int | None = None):
        self.directory = str(absolute(directory))
        self.path_step = path_step  # the step named by a step directory, if one was opened
        self._saving: int | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save,
            # Temporary folders of saves interrupted by a kill are removed at start-up.
            cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(absolute(directory), options=options,
                                              item_handlers=_handlers())

    @classmethod
    def open(cls, path: str, *, read_only: bool = True) -> Checkpointer:
        """The checkpoints of a workdir, a checkpoints directory or one step directory."""
        directory, step = locate(path)
        return cls(directory, read_only=read_only, path_step=step)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        return str(epath.Path(self.directory) / str(step))

    def resolve_step(self, step: int | None = None) -> int:
        """``step``, else the step directory that was opened, else the latest committed step."""
        steps = self.steps()
        step = step if step is not None else (
            self.path_step if self.path_step is not None else max(steps, default=None))
        if step is None or step not in steps:
            which = f"step {step} " if step is not None else ""
            raise CheckpointError(f"no committed checkpoint {which}in {self.directory} (found "
                                  f"steps {steps})")
        return step

    def read_json(self, step: int, *names: str) -> tuple[Any, ...]:
        """The JSON items ``names`` of a step (``meta``, ``config``), in that order."""
        args = ocp.args.Composite(**{n: ocp.args.JsonRestore() for n in names})
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - a missing or torn JSON file means damage
            raise _damaged(self.step_dir(step), "/".join(names), e) from None
        return tuple(restored[n] for n in names)

    def read_config(self, step: int) -> ml_collections.ConfigDict:
        """The locked config saved with a step."""
        return config_lib.from_dict(self.read_json(step, "config")[0])

    def restore(self, step: int, abstract: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        """(the array items named in ``abstract``, meta) of a committed step, in one call.

        ``abstract`` maps item names to trees of ShapeDtypeStructs with shardings (the target
        mesh, whatever mesh wrote the checkpoint), or of numpy arrays (read onto the host).
        Shapes are checked first, so a mismatch is reported by path before anything is read.
        """
        return self._restore(step, abstract, self._item_metadata(step))

    def _restore(self, step: int, abstract: dict[str, Any], stored: dict[str, Any]):
        path = self.step_dir(step)
        for item, tree in abstract.items():
            if stored.get(item) is None:
                present = sorted(k for k, v in stored.items() if v is not None)
                raise CheckpointError(
                    f"checkpoint {path} has no {item!r} (it holds {present})"
                    + ("; it was made from imported weights and cannot resume training"
                       if item == "opt_state" else ""))
            check_tree(tree, stored[item], path, item)
        args = {item: ocp.args.StandardRestore(tree) for item, tree in abstract.items()}
        args["meta"] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - TensorStore raises many kinds on damaged files
            raise _damaged(path, "arrays or meta", e) from None
        return {item: restored[item] for item in abstract}, restored["meta"]

    def read_arrays(self, step: int, item: str, like=None) -> Any:
        """One array item of a step as numpy arrays on the host (whatever mesh wrote it).

        Nothing is placed on a device and no mesh is needed. ``like`` (arrays or
        ShapeDtypeStructs, e.g. the config's parameter tree) is the tree the item must match,
        checked as ``restore`` checks; by default the item is read as stored.
        """
        return self.read_items(step, item, like={item: like})[item]

    def read_items(self, step: int, *items: str, like: dict | None = None) -> dict[str, Any]:
        """Several array items of a step (``read_arrays`` of each) in one read, the metadata
        read once; ``like`` maps item names to the trees they must match."""
        metadata = self._item_metadata(step)
        host = {}
        for item in items:
            if metadata.get(item) is None:
                raise CheckpointError(f"checkpoint {self.step_dir(step)} has no {item!r}")
            tree = (like or {}).get(item)
            # numpy leaves make Orbax restore numpy arrays (stride-0 views: nothing allocated).
            host[item] = jax.tree.map(
                lambda m: np.broadcast_to(np.zeros((), m.dtype), tuple(m.shape)),
                metadata[item] if tree is None else tree)
        return self._restore(step, host, metadata)[0]

    def _item_metadata(self, step: int) -> dict[str, Any]:
        try:
            metadata = self._manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001 - any failure to read metadata means damage
            raise _damaged(self.step_dir(step), "metadata", e) from None
        out = {}
        for name in ARRAY_ITEMS:
            tree = metadata.get(name) if hasattr(metadata, "get") else None
            out[name] = getattr(tree, "tree", tree)
        return out

    def save(self, step: int, *, params, ema_params, opt_state=None, meta: dict[str, Any],
             config: ml_collections.ConfigDict) -> None:
        """Starts an asynchronous save of one step; ``wait`` commits it."""
        items = dict(
            params=ocp.args.StandardSave(params),
            ema_params=ocp.args.StandardSave(ema_params),
            meta=ocp.args.JsonSave(dict(meta, step=int(step))),
            config=ocp.args.JsonSave(config_lib.to_dict(config)),
        )
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.wait()  # a failure of the previous save is reported as that step's
        self._saving = int(step)
        try:
            self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - disk full, permissions, storage errors
            raise self._save_failed(e) from None

    def wait(self) -> None:
        """Blocks until the last save is committed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - errors of the background save surface here
            raise self._save_failed(e) from None

    def _save_failed(self, e: Exception) -> CheckpointError:
        try:
            committed = [s for s in self.steps() if s != self._saving]
        except Exception:  # noqa: BLE001 - the storage may fail to list as well
            committed = []
        text = " ".join(str(e).split())
        known = re.search(r"No space left on device|Permission denied|Read-only file system|"
                          r"Disk quota exceeded", text)
        reason = known.group(0) if known else f"{e.__class__.__name__}: {text[:200]}"
        intact = (f"the last committed checkpoint (step {max(committed)}, "
                  f"{self.step_dir(max(committed))}) is intact: "
                  "free space or fix the workdir and rerun the same command to resume from it"
                  if committed else "no checkpoint was committed before it: free space or fix "
                  "the workdir and rerun the same command (training starts at step 0)")
        return CheckpointError(f"saving the checkpoint of step {self._saving} failed "
                               f"({reason}); {intact}")

    def close(self) -> None:
        self._manager.close()


def check_tree(expected, stored_tree, path: str, item: str) -> None:
    """Compares the stored tree of ``item`` with ``expected`` (arrays or ShapeDtypeStructs).

    Raises CheckpointError naming the first path whose presence, shape or dtype differs.
    """
    flat_stored, flat_expected = trees.flatten(stored_tree), trees.flatten(expected)
    mismatch = f"checkpoint {path} does not match the config: {item}/"
    for key in sorted(flat_expected.keys() | flat_stored.keys()):
        want, have = flat_expected.get(key), flat_stored.get(key)
        if have is None:
            raise CheckpointError(f"{mismatch}{key} is missing (the config expects shape "
                                  f"{tuple(want.shape)})")
        if want is None:
            raise CheckpointError(f"{mismatch}{key} (shape {tuple(have.shape)}) is not in the "
                                  "model the config builds")
        if tuple(want.shape) != tuple(have.shape):
            raise CheckpointError(f"{mismatch}{key} has shape {tuple(have.shape)} in the "
                                  f"checkpoint but {tuple(want.shape)} in the config")
        if np.dtype(want.dtype) != np.dtype(have.dtype):
            raise CheckpointError(f"{mismatch}{key} has dtype {np.dtype(have.dtype)} in the "
                                  f"checkpoint but {np.dtype(want.dtype)} expected")


def save_weights(workdir: str, config: ml_collections.ConfigDict, params, *, ema_params=None,
                 step: int = 0) -> str:
    """Writes an inference checkpoint (no optimizer state), e.g. from imported weights.

    ``ddpm_jax.load`` and ``sample.py`` restore it like any trained run. Returns its path.
    """
    check_empty(workdir)
    params = jax.tree.map(np.asarray, params)
    ema = params if ema_params is None else jax.tree.map(np.asarray, ema_params)
    meta = dict(data_position=0, base_key=None, nonfinite_steps=0)
    directory = epath.Path(workdir) / CHECKPOINT_SUBDIR
    with Checkpointer(directory, async_save=False) as ckpt:
        ckpt.save(step, params=params, ema_params=ema, meta=meta, config=config)
        ckpt.wait()
        return ckpt.step_dir(step)

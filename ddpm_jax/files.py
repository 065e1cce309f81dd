"""Files that are never torn: atomic writes, JSON read back, and the streamed ``.npz``.

Every file the project writes and later reads goes through ``write_bytes`` (or a helper on top
of it): the bytes go to a temporary name beside the target, ``<name>.tmp-<pid>-<random>``, which
is then renamed over the target, so a reader sees the old file or the new one, never a part
(on ``gs://`` the object appears whole when its upload completes; ``etils.epath`` paths work the
same for both). A write that fails (a full disk, a read-only folder) removes its temporary file
and raises ``WriteError``, one line naming the file; the target is left as it was.

``read_json`` returns None for a missing file and raises ``TornFileError`` (one line naming the
file and the fix) for an empty or unreadable one. JSON is written without NaN or infinity (they
become ``null``), so every file is valid JSON for any reader.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import sys
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from etils import epath

from ddpm_jax import errors

TMP_MARK = ".tmp-"  # temporary files are "<name>.tmp-<pid>-<random>"


class WriteError(errors.UserError, OSError):
    """A file could not be written (full disk, read-only folder); the old file is intact."""


class TornFileError(errors.UserError, ValueError):
    """A file the project wrote is empty or unreadable (a write cut short outside its control)."""


class NpzError(errors.UserError, ValueError):
    """An ``.npz`` that is not a plain uncompressed array as ``write_npz_stream`` writes it."""


def _path(path) -> epath.Path:
    return path if isinstance(path, epath.Path) else epath.Path(path)


def check_writable(folder, what: str, fix: str, error: type[Exception] = WriteError) -> None:
    """Creates ``folder`` if needed and checks that a file can be written in it.

    Raises:
      error: one line naming ``what``, the folder, the reason and ``fix``.
    """
    folder = _path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(20, "a file is in the way")
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test{TMP_MARK}{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise error(f"{what} {folder} is not writable ({e.strerror or e}); {fix}") from None


def tmp_path(path) -> epath.Path:
    """A temporary name beside ``path``, unique to this process and call."""
    path = _path(path)
    return path.parent / f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _failed(path, e: OSError) -> WriteError:
    reason = e.strerror or str(e) or type(e).__name__
    return WriteError(f"could not write {path} ({reason}); free space or choose a writable "
                      "location and rerun (the previous file, if any, is unchanged)")


def write_with(path, write_fn) -> str:
    """Calls ``write_fn(file)`` on a binary file at a temporary name, then renames it to
    ``path``; nothing is left behind if it fails. Returns ``str(path)``."""
    path = _path(path)
    tmp = tmp_path(path)
    try:
        with tmp.open("wb") as f:
            write_fn(f)
        tmp.replace(path)
    except BaseException as e:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, errors.UserError):
            raise _failed(path, e) from None
        raise
    return str(path)


def write_bytes(path, data: bytes) -> str:
    """Writes ``data`` to ``path`` atomically (local or ``gs://``); returns ``str(path)``."""
    return write_with(path, lambda f: f.write(data))


def write_text(path, text: str) -> str:
    return write_bytes(path, text.encode())


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON's null)."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value


def dumps(value: Any, **kwargs) -> str:
    """Strict JSON (NaN and infinity become null)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write_json(path, value: Any) -> str:
    """Writes ``value`` as indented, strict JSON, atomically."""
    return write_text(path, dumps(value, indent=2) + "\n")


def read_json(path, *, fix: str | None = None) -> Any:
    """The JSON in ``path``, or None if there is no such file.

    Raises:
      TornFileError: the file is empty or not JSON; ``fix`` (default: delete it and rerun) is
        the advice given.
    """
    path = _path(path)
    if not path.exists():
        return None
    text = path.read_text()
    try:
        if not text.strip():
            raise ValueError("empty")
        return json.loads(text)
    except ValueError as e:
        what = "is empty" if not text.strip() else f"is not valid JSON ({e})"
        raise TornFileError(f"{path} {what}, a write cut short; "
                            f"{fix or 'delete it and rerun'}") from None


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_npz(path, **arrays: np.ndarray) -> str:
    """``np.savez`` to ``path``, atomically."""
    return write_bytes(path, npz_bytes(**arrays))


def read_npz(path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (never unpickled)."""
    with np.load(io.BytesIO(_path(path).read_bytes()), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def write_npz_stream(path, name: str, shape: tuple[int, ...], dtype,
                     chunks: Iterable[np.ndarray],
                     extra: dict[str, np.ndarray] | None = None) -> str:
    """Writes one array ``name`` of ``shape`` as ``.npz`` from its row chunks, one at a time.

    The file is what ``np.savez`` writes (an uncompressed zip holding ``name.npy``, then the
    small ``extra`` arrays whole), so ``np.load(path)[name]`` reads it without pickle; it is
    renamed into place when complete.

    Raises:
      ValueError: the chunks do not hold ``shape[0]`` rows (nothing is written).
    """
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}

    def write(f) -> None:
        written = 0
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, header)
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=dtype)
                    out.write(chunk.tobytes())
                    written += chunk.shape[0]
            if written != shape[0]:
                raise ValueError(f"wrote {written} rows of {name}, expected {shape[0]}")
            for key, array in (extra or {}).items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as out:
                    np.lib.format.write_array(out, np.ascontiguousarray(array),
                                              allow_pickle=False)

    return write_with(path, write)


def iter_npz_rows(path, name: str, batch: int,
                  count: int | None = None) -> tuple[tuple[int, ...], Iterator[np.ndarray]]:
    """The shape of array ``name`` in an uncompressed ``.npz`` and an iterator over its first
    ``count`` rows (default all), ``batch`` rows at a time: memory is bounded by one batch.

    The file is open only while the iterator runs: it is closed when the rows are used up, when
    the iterator is closed or collected, and at once when a check here fails.

    Raises:
      NpzError: the file is not a zip, does not hold ``name``, is compressed, or holds objects.
    """
    path = _path(path)
    handle = path.open("rb")
    try:
        shape, dtype, offset = _npy_layout(handle, path, name)
    except BaseException:
        handle.close()
        raise
    total = shape[0] if count is None else min(count, shape[0])
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def rows() -> Iterator[np.ndarray]:
        with handle:
            handle.seek(offset)
            for start in range(0, total, batch):
                n = min(batch, total - start)
                data = handle.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise NpzError(f"{path} ends after {start} rows of {name} (a truncated "
                                   "file); delete it and make it again")
                yield np.frombuffer(data, dtype).reshape(n, *shape[1:])

    if total == 0:
        handle.close()
        return tuple(shape), iter(())
    return tuple(shape), rows()


def _npy_layout(handle, path, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of ``name.npy`` stored uncompressed in a zip."""
    member = f"{name}.npy"
    try:
        zf = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise NpzError(f"{path} is not an .npz file (not a zip: empty, truncated or another "
                       "format)") from None
    with zf:
        if member not in zf.namelist() or zf.getinfo(member).compress_type != zipfile.ZIP_STORED:
            raise NpzError(f"{path} holds no uncompressed array {name!r} (as sample.py writes "
                           "it)")
        with zf.open(member) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            header_len = f.tell()
        info = zf.getinfo(member)
    if dtype.hasobject or fortran:
        raise NpzError(f"{path}: {name} is not a plain C-order array (objects are never "
                       "unpickled here)")
    # The member's data start: its local header (30 bytes + name + extra), then the .npy header.
    handle.seek(info.header_offset)
    local = handle.read(30)
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(
        local[28:30], "little")
    return tuple(shape), dtype, start + header_len


# -- folder locks ---------------------------------------------------------------------------------
class LockedError(errors.UserError):
    """A folder is in use by another run (the message names it and what to do)."""


_HELD: dict[str, str] = {}  # lock path -> token, for the locks this process holds


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (tells a reused pid apart); None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the holder, a process on this host, still runs."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _start_time(pid)
    return started is None or holder.get("started") in (None, started)


def _create_exclusive(path: epath.Path, me: dict) -> bool:
    """Creates the lock file holding ``me``; False if it exists already."""
    if "://" in str(path):  # a bucket: write, then read back (the last writer wins)
        if path.exists():
            return False
        write_json(path, me)
        time.sleep(0.5)
        try:
            return (read_json(path) or {}).get("token") == me["token"]
        except TornFileError:
            return False
    tmp = tmp_path(path)
    write_json(tmp, me)
    try:
        os.link(tmp, path)  # atomic, and never replaces an existing lock
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _describe(holder: dict) -> str:
    return (f"{holder.get('program', 'a run')} on host {holder.get('host')} (pid "
            f"{holder.get('pid')}, since {holder.get('since')})")


def _acquire(path: epath.Path, me: dict, *, what: str, take_over: bool, flag: str) -> None:
    for _ in range(5):
        if _create_exclusive(path, me):
            return
        try:
            holder = read_json(path)
        except TornFileError:
            holder = {}
        if holder is None:  # released meanwhile
            continue
        holder = holder if isinstance(holder, dict) else {}
        same_host = holder.get("host") == me["host"]
        if holder and same_host and _alive(holder):
            raise LockedError(f"{what} is in use by {_describe(holder)}; wait for it to end or "
                              f"stop it (lock {path})")
        if holder and not same_host and not take_over:
            raise LockedError(f"{what} is in use by {_describe(holder)}; if that run is gone, "
                              f"rerun with {flag} to take it over (lock {path})")
        reason = ("taken over" if holder and not same_host else
                  "left by a process that no longer runs" if holder else "unreadable")
        print(f"note: lock {path} {reason}" + (f" ({_describe(holder)})" if holder else ""),
              file=sys.stderr, flush=True)
        path.unlink(missing_ok=True)
    raise LockedError(f"could not take the lock {path} of {what}: other runs keep taking it; "
                      "make sure one run uses it")


def _release(path: epath.Path, token: str) -> None:
    try:
        if (read_json(path) or {}).get("token") == token:
            path.unlink(missing_ok=True)
    except (OSError, TornFileError):
        pass


class FolderLock:
    """Holds ``<folder>/.<name>.lock`` while a run uses ``folder``, refusing a second run.

    The lock records the holder (host, pid, the process's start time, program). A lock whose
    holder is a process of this host that no longer runs is taken over (a killed run does not
    block its rerun); one held on another host is refused unless ``take_over`` (the message
    names ``flag``). Only the leader (process 0) takes the lock; the other processes of the
    same run learn the outcome through ``broadcast`` (process 0's int on every process) and
    stop with it. Nested use of the same lock in one process is allowed.
    """

    def __init__(self, folder, name: str, *, what: str, program: str, take_over: bool = False,
                 flag: str = "--take_over_lock", leader: bool = True,
                 broadcast=lambda value: value):
        self.path = _path(folder) / f".{name}.lock"
        self.what, self.program, self.take_over, self.flag = what, program, take_over, flag
        self.leader, self.broadcast = leader, broadcast
        self._token: str | None = None

    def __enter__(self) -> FolderLock:
        if str(self.path) in _HELD:
            return self
        error = None
        if self.leader:
            me = dict(host=socket.gethostname(), pid=os.getpid(),
                      started=_start_time(os.getpid()), program=self.program,
                      since=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                      token=uuid.uuid4().hex)
            try:
                _acquire(self.path, me, what=self.what, take_over=self.take_over,
                         flag=self.flag)
                self._token = me["token"]
                _HELD[str(self.path)] = self._token
            except LockedError as e:
                error = e
        if not self.broadcast(0 if error else 1):
            raise error or LockedError(f"{self.what} is in use by another run (process 0 says "
                                       "which); nothing was started")
        return self

    def __exit__(self, *exc) -> None:
        if self._token is not None:
            _HELD.pop(str(self.path), None)
            _release(self.path, self._token)
            self._token = None

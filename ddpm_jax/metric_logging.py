"""What training writes while it runs: metric rows, TensorBoard events, the progress bar.

``MetricWriter`` owns the files: one JSON object per log step in ``metrics.jsonl``, the same
scalars and every sample grid (as an image at its step) in TensorBoard event files, and the loss
curve. ``MetricLogger`` owns the progress bar, the device-to-host fetch of the metrics (one step
late, so the host never waits for the devices) and the non-finite check. Only process 0 writes.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any

import jax
import numpy as np
from etils import epath

from ddpm_jax import errors, files, images


class NonFiniteError(errors.UserError):
    """A non-finite loss or gradient stopped the run; the last checkpoint is intact."""

    exit_code = 3


def _summary_writer():
    """tensorboardX's ``SummaryWriter`` class, imported without PyTorch.

    tensorboardX imports torch, where installed, only to accept torch tensors; the writer here
    is given numpy arrays, and importing torch would add seconds to every run's start.
    """
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # makes ``import torch`` raise ImportError
        try:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 - only process 0 needs it
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter  # noqa: PLC0415

    return SummaryWriter


class MetricWriter:
    """Scalars as ``metrics.jsonl`` rows and TensorBoard events; grids as TensorBoard images.

    On resume, rows past the restored step are dropped first, so the file reads as if the run
    had never stopped. Local files are appended to; on a bucket (where objects cannot be
    appended to) the file is rewritten whole at each write.
    """

    def __init__(self, workdir: epath.Path, *, resume_step: int, enabled: bool,
                 wandb_project: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._local = "://" not in str(workdir)
        self._rows: list[str] = []
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if wandb_project:
            self._wandb = start_wandb(epath.Path(workdir), wandb_project, config or {})
        if self.path.exists():
            self._rows = self._read_rows(resume_step)
            self._rewrite()
        self._tb = _summary_writer()(str(epath.Path(workdir) / "tensorboard"),
                                 purge_step=resume_step + 1)

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read_rows(self, resume_step: int) -> list[str]:
        """The rows up to ``resume_step``; damaged lines are reported and kept aside in
        ``metrics.jsonl.damaged`` (a run killed mid-write leaves a torn last line)."""
        rows, damaged = [], []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            step = _row_step(line)
            if step is None:
                damaged.append((number, line))
            elif step <= resume_step:
                rows.append(files.dumps(json.loads(line)) + "\n")  # any bare NaN as null
        if damaged:
            aside = self.path.parent / (self.path.name + ".damaged")
            old = aside.read_text() if aside.exists() else ""
            files.write_text(aside, old + "".join(f"{ln}\n" for _, ln in damaged))
            numbers = ", ".join(str(n) for n, _ in damaged[:5])
            print(f"warning: {self.path} line(s) {numbers}{', ...' if len(damaged) > 5 else ''}"
                  f" not JSON rows (a torn write or an edit); left out and kept in {aside}",
                  file=sys.stderr, flush=True)
        return rows

    def _rewrite(self) -> None:
        files.write_text(self.path, "".join(self._rows))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = files.dumps(dict(step=int(step), **scalars)) + "\n"  # NaN as null
        self._rows.append(line)
        if self._local:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._rewrite()
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, int(step))
        if self._wandb is not None:
            self._wandb.log(dict(scalars), step=int(step))

    def write_image(self, step: int, name: str, png_path: str | None) -> None:
        """Adds the PNG at ``png_path`` (a sample grid) to TensorBoard at ``step``."""
        if not self.enabled or png_path is None:
            return
        image = np.asarray(images.read_png(png_path))
        image = image[..., None] if image.ndim == 2 else image
        self._tb.add_image(name, image, int(step), dataformats="HWC")
        self._tb.flush()

    def rows(self) -> list[dict]:
        return [json.loads(ln) for ln in self._rows if ln.strip()]

    def save_loss_curve(self, path: epath.Path) -> str | None:
        rows = [r for r in self.rows() if "loss" in r]
        if not rows:
            return None
        return images.save_loss_curve(str(path), [r["step"] for r in rows],
                                      [r["loss"] for r in rows])

    def save_quality_curve(self, path: epath.Path) -> str | None:
        """The evaluation rows' metrics against step and training seconds (``quality.png``)."""
        rows = self.rows()
        evals = [r for r in rows if "eval_seconds" in r]
        if not evals:
            return None
        return images.save_quality_curve(str(path), evals, _train_seconds(rows))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def start_wandb(workdir: epath.Path, project: str, config: dict):
    """A Weights & Biases run for this workdir (the same run again on resume; its id is kept in
    ``WORKDIR/wandb_id.txt``). ``WANDB_MODE=offline`` keeps it on disk under ``WORKDIR/wandb``.
    """
    try:
        import wandb  # noqa: PLC0415 - the optional wandb extra
    except ImportError:
        raise errors.UserError("config.eval.wandb=True needs the wandb package: pip install "
                               "'ddpm_jax[wandb]' (or set config.eval.wandb=False)") from None
    id_file = workdir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(workdir),
                      config=config, name=workdir.name)


def _train_seconds(rows: list[dict]) -> dict[int, float]:
    """Seconds of training (evaluations left out) at each logged step, from the rows' rates."""
    out, total, last = {}, 0.0, 0
    for r in rows:
        if "steps_per_sec" in r and r["steps_per_sec"] > 0:
            total += (r["step"] - last) / r["steps_per_sec"]
            last = r["step"]
        out[r["step"]] = total
    return out


def _row_step(line: str) -> int | None:
    """The step of a metrics.jsonl row; None for a line that is not one."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


class MetricLogger:
    """Progress bar, metric rows and the non-finite check of the training loop.

    Device metrics are fetched one step late (after the next step is dispatched), so logging
    never leaves the devices idle; the bar counts finished steps, so its rate and ETA are true.
    """

    def __init__(self, writer: MetricWriter, *, total: int, start: int, batch_size: int,
                 log_every: int, skip_nonfinite: bool, enabled: bool):
        from tqdm.auto import tqdm  # noqa: PLC0415

        self.writer, self.batch_size, self.log_every = writer, batch_size, log_every
        self.skip_nonfinite = skip_nonfinite
        self.bar = tqdm(total=total, initial=start, unit="step", disable=not enabled,
                        dynamic_ncols=True, file=sys.stderr)
        self.total, self.clock = total, (time.time(), start)
        self.pending = None
        self.previous = None  # (step, loss) of the last dispatched call

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.flush()  # the last log step
        finally:
            self.close()

    def record(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Called right after the call that ends at ``step`` is dispatched."""
        self._wait_previous()
        self.previous = (step, metrics["loss"])
        self.flush()  # the previous log step: the devices are already busy with this one
        if step % self.log_every == 0 or step >= self.total:
            self.pending = (step, metrics)

    def note(self, text: str) -> None:
        """A line above the progress bar; the steps/s clock restarts after it (an evaluation's
        time is not counted as training time)."""
        self.bar.write(text, file=sys.stderr)
        self.clock = (time.time(), self.clock[1])

    def _wait_previous(self) -> None:
        if self.previous is not None:
            step, loss = self.previous
            loss.block_until_ready()
            self.bar.update(step - self.bar.n)

    def flush(self) -> None:
        """Writes the pending row; stops a run at a non-finite step unless skipping them."""
        if self.pending is None:
            return
        (step, metrics), self.pending = self.pending, None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        rate = (step - self.clock[1]) / max(now - self.clock[0], 1e-9)
        self.clock = (now, step)
        self.writer.write(step, dict(
            loss=m["loss"], grad_norm=m["grad_norm"], lr=m["lr"], steps_per_sec=rate,
            images_per_sec=rate * self.batch_size, nonfinite_steps=m["nonfinite_steps"]))
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{rate * self.batch_size:.0f}")
        self.check_finite(m)

    def check_finite(self, metrics: dict[str, Any]) -> None:
        """Raises NonFiniteError if a step was non-finite, unless ``optim.skip_nonfinite``."""
        m = jax.device_get(metrics)
        if int(m["nonfinite_steps"]) and not self.skip_nonfinite:
            raise NonFiniteError(
                f"non-finite loss or gradient at step {int(m['first_nonfinite_step']) + 1} "
                "(update skipped, nothing saved after it); lower optim.lr or set "
                "optim.skip_nonfinite=True")

    def close(self) -> None:
        self._wait_previous()
        self.bar.close()

"""Training: the train state, the pure sharded train step, EMA, checkpoints and the loop.

The loop, in short::

    state, reader = restore_or_init(...)          # resume from WORKDIR/checkpoints if present
    for step in range(start, num_train_steps):
        batch = make_global_batch(next(reader))   # [B, H, W, C] sharded on the `data` axis
        state, metrics = train_step(state, batch, base_key)
        log / checkpoint / sample / check preemption at their intervals

Randomness: the key of step s is ``fold_in(base_key, s)`` (t, eps and dropout all come from it),
so a run that stops and resumes draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import api, checkpoints, config_lib, diffusion, images, input_pipeline, unet

# Exit codes of train.py (documented in the README).
EXIT_CONFIG = 2  # bad config, data or checkpoint: nothing was trained
EXIT_NONFINITE = 3  # non-finite loss or gradient; the last committed checkpoint is intact
EXIT_PREEMPTED = 143  # SIGTERM / SIGINT: a checkpoint of the current step was committed


class NonFiniteError(RuntimeError):
    pass


class Preempted(Exception):  # noqa: N818 - a control-flow signal, not an error
    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} at step {step}")
        self.signum, self.step = signum, step


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: number of steps taken
    params: Any
    ema_params: Any
    opt_state: Any
    nonfinite_steps: jax.Array  # int32 []: steps whose update was skipped as non-finite
    first_nonfinite_step: jax.Array  # int32 []: -1 if none


# ---------------------------------------------------------------------------------------------
# Optimiser and state.
# ---------------------------------------------------------------------------------------------


def learning_rate_fn(config) -> optax.Schedule:
    """lr(step) = lr * min(step / warmup, 1): linear warm-up, then constant (the original)."""
    lr, warmup = config.optim.lr, config.optim.warmup
    if warmup == 0:
        return optax.constant_schedule(lr)
    return lambda step: lr * jnp.minimum(jnp.asarray(step, jnp.float32) / warmup, 1.0)


def create_optimizer(config) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam (beta1 0.9, beta2 0.999, eps 1e-8 by default)."""
    o = config.optim
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adam(learning_rate_fn(config), b1=o.beta1, b2=o.beta2, eps=o.eps),
    )


def init_train_state(params, tx: optax.GradientTransformation) -> TrainState:
    """EMA starts at the initial parameters, as TF's ExponentialMovingAverage."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
    )


# ---------------------------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------------------------


def make_train_step(config, graphdef, d: diffusion.Diffusion, tx):
    """Returns the pure ``train_step(state, batch, base_key) -> (state, metrics)``.

    batch: float32 ``[B, H, W, C]`` in [-1, 1]. The loss is the batch mean of
    ``diffusion.training_losses``. An update whose loss, gradient or update is not finite is
    not applied (the state keeps its values and counts the step), so the state never holds
    non-finite values; the loop decides whether to stop (``optim.skip_nonfinite``).
    """
    decay = config.optim.ema_decay
    lr_fn = learning_rate_fn(config)

    def train_step(state: TrainState, batch: jax.Array, base_key: jax.Array):
        key = jax.random.fold_in(base_key, state.step)
        loss_key, dropout_key = jax.random.split(key)

        def loss_fn(params):
            model_fn = lambda x, t: unet.apply(graphdef, params, x, t, dropout_key=dropout_key)
            return jnp.mean(diffusion.training_losses(d, model_fn, batch, loss_key))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA: ema <- decay * ema + (1 - decay) * params, every step.
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(
            optax.global_norm(updates))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            ema_params=keep(ema, state.ema_params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where(
                (state.first_nonfinite_step < 0) & ~finite, state.step,
                state.first_nonfinite_step),
        )
        metrics = dict(
            loss=loss,
            grad_norm=grad_norm,
            lr=lr_fn(state.step),
            nonfinite_steps=new_state.nonfinite_steps,
            first_nonfinite_step=new_state.first_nonfinite_step,
        )
        return new_state, metrics

    return train_step


def compile_train_step(train_step, mesh, state: TrainState):
    """jit over the mesh: state replicated (and donated), batch sharded on ``data``."""
    replicated = NamedSharding(mesh, P())
    state_sharding = jax.tree.map(lambda _: replicated, state)
    return jax.jit(
        train_step,
        in_shardings=(
            state_sharding,  # state: replicated on every device
            NamedSharding(mesh, P("data")),  # batch: split over the data axis
            replicated,  # base_key
        ),
        out_shardings=(state_sharding, replicated),  # new state, scalar metrics
        donate_argnums=(0,),  # the old state's buffers are reused for the new one
    )


# ---------------------------------------------------------------------------------------------
# Set-up helpers.
# ---------------------------------------------------------------------------------------------


def check_workdir(workdir: str) -> str:
    """Creates ``workdir`` and checks that a file can be written there."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise config_lib.ConfigError(
            f"workdir {workdir} is not writable ({e.strerror}); choose another --workdir"
        ) from None
    return workdir


def check_resume_config(saved: dict, config: ml_collections.ConfigDict, path: str) -> None:
    """A run resumes only with the settings that define its model, process and data."""
    current = json.loads(config_lib.to_json(config))
    fixed = ["model", "diffusion", "data.dataset", "data.image_size", "data.channels",
             "data.random_flip", "data.split", "seed", "training.batch_size"]
    for key in fixed:
        a, b = _lookup(saved, key), _lookup(current, key)
        if a != b:
            diffs = _diff(a, b, key)
            raise checkpoints.CheckpointError(
                f"the checkpoint in {path} was made with a different config ({diffs}); use a new "
                "--workdir or the saved settings"
            )


def _lookup(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _diff(a, b, key: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys()):
            if a.get(k) != b.get(k):
                return _diff(a.get(k), b.get(k), f"{key}.{k}")
    return f"{key}: checkpoint {a!r}, config {b!r}"


def abstract_state(config, tx, sharding, params=None) -> TrainState:
    """Shapes and shardings of the train state, without allocating it.

    ``params``: the abstract parameters, when already built (``unet.abstract_model``).
    """
    if params is None:
        _, params = unet.abstract_model(config)
    state = jax.eval_shape(lambda p: init_train_state(p, tx), params)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        state)


def restore_state(manager, step: int, abstract: TrainState) -> tuple[TrainState, dict]:
    """The train state and meta of a committed step, placed as ``abstract`` says."""
    restored = checkpoints.restore(manager, step, dict(
        params=abstract.params, ema_params=abstract.ema_params, opt_state=abstract.opt_state))
    meta = restored["meta"]
    replicated = abstract.step.sharding
    scalar = lambda v: jax.device_put(jnp.asarray(v, jnp.int32), replicated)
    state = TrainState(
        step=scalar(meta["step"]),
        params=restored["params"],
        ema_params=restored["ema_params"],
        opt_state=restored["opt_state"],
        nonfinite_steps=scalar(meta.get("nonfinite_steps", 0)),
        first_nonfinite_step=scalar(meta.get("first_nonfinite_step", -1)),
    )
    return state, meta


def save_state(manager, state: TrainState, *, data_position: int, base_key, config) -> None:
    step = int(jax.device_get(state.step))
    meta = dict(
        data_position=int(data_position),
        base_key=np.asarray(jax.random.key_data(base_key)).tolist(),
        nonfinite_steps=int(jax.device_get(state.nonfinite_steps)),
        first_nonfinite_step=int(jax.device_get(state.first_nonfinite_step)),
    )
    checkpoints.save(manager, step, params=state.params, ema_params=state.ema_params,
                     opt_state=state.opt_state, meta=meta, config=config)


# ---------------------------------------------------------------------------------------------
# Logging and preemption.
# ---------------------------------------------------------------------------------------------


class MetricWriter:
    """Scalars as one JSON object per log step in ``metrics.jsonl`` and as TensorBoard events.

    Only process 0 writes. On resume, lines past the restored step are dropped first, so the
    file reads as if the run had never stopped.
    """

    def __init__(self, workdir: str, *, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = [ln for ln in f if _row_step(ln) <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(self.path + ".tmp", self.path)
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - only process 0 needs it

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(step=int(step), **scalars)) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, int(step))

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(ln) for ln in f if ln.strip()]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl row; a torn last line (killed mid-write) counts as past."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class PreemptionHandler:
    """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and exits.

    With several processes, JAX's preemption sync point makes all of them stop at the same
    step (``jax.distributed`` installs its own notifier).
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if jax.process_count() > 1:
            return self  # jax.distributed's preemption notifier owns SIGTERM
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None


def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when the environment describes several processes."""
    env = os.environ
    multi = (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if multi:
        jax.distributed.initialize()


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


class Run:
    """The pieces of one training run, all checked and built before anything compiles."""

    def __init__(self, config, workdir):
        config_lib.validate(config)
        self.config = config
        self.workdir = check_workdir(workdir)
        self.is_main = jax.process_index() == 0
        self.mesh = api.create_mesh()
        input_pipeline.check_batch_divisible(
            config.training.batch_size, self.mesh.size, jax.process_count())
        self.manager = checkpoints.create_manager(
            os.path.join(self.workdir, checkpoints.CHECKPOINT_SUBDIR),
            max_to_keep=config.training.max_to_keep)
        self.replicated = NamedSharding(self.mesh, P())
        self.tx = create_optimizer(config)
        self.diffusion = diffusion.Diffusion.from_config(config)
        self.graphdef, self._abstract_params = unet.abstract_model(config)
        self.resume_step = self.manager.latest_step()
        meta = {}
        if self.resume_step is not None:
            path = checkpoints.step_dir(self.manager, self.resume_step)
            meta, saved_config = checkpoints.read_json_items(self.manager, self.resume_step)
            check_resume_config(saved_config, config, path)
        # The reader validates the dataset (name, prepared, image size) before any compile.
        self.reader = None
        try:
            self.reader = input_pipeline.create_train_reader(
                config, start_position=int(meta.get("data_position", 0)))
            self.state, self.base_key = self._restore_or_init()
        except BaseException:
            self.manager.close()
            if self.reader is not None:
                self.reader.close()
            raise

    def _restore_or_init(self):
        c = self.config
        if self.resume_step is None:
            params = unet.split(unet.create_model(c, seed=c.seed))[1]
            state = jax.device_put(init_train_state(params, self.tx), self.replicated)
            return state, jax.device_put(jax.random.key(c.seed), self.replicated)
        abstract = abstract_state(c, self.tx, self.replicated, self._abstract_params)
        state, meta = restore_state(self.manager, self.resume_step, abstract)
        key = jax.random.wrap_key_data(np.asarray(meta["base_key"], np.uint32))
        return state, jax.device_put(key, self.replicated)

    def save(self) -> None:
        """Starts an asynchronous save; a failed write names the last committed step."""
        try:
            save_state(self.manager, self.state, data_position=self.reader.position,
                       base_key=self.base_key, config=self.config)
        except Exception as e:  # noqa: BLE001 - disk full, permissions, storage errors
            raise self._save_failed(e) from None

    def wait_for_save(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - errors of the background save surface here
            raise self._save_failed(e) from None

    def _save_failed(self, e: Exception) -> checkpoints.CheckpointError:
        committed = [s for s in self.manager.all_steps() if s != int(self.state.step)]
        return checkpoints.CheckpointError(
            f"saving the checkpoint of step {int(self.state.step)} failed "
            f"({e.__class__.__name__}: {e}); the last committed checkpoint "
            f"({max(committed, default='none')}) is intact: free space or fix the workdir "
            "and rerun the same command to resume from it")

    def check_finite(self, metrics: dict[str, Any]) -> None:
        """Stops the run at a non-finite step unless ``optim.skip_nonfinite``."""
        count = int(metrics["nonfinite_steps"])
        if count and not self.config.optim.skip_nonfinite:
            first = int(metrics["first_nonfinite_step"])
            raise NonFiniteError(
                f"non-finite loss or gradient at step {first + 1} (update skipped, nothing "
                f"saved after it); lower optim.lr or set optim.skip_nonfinite=True")

    def close(self) -> None:
        try:
            self.wait_for_save()
        finally:
            self.manager.close()
            self.reader.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (or resumes) the run of ``config`` in ``workdir``; returns the final state."""
    run = Run(config, workdir)
    try:
        with PreemptionHandler() as preemption:
            _train_loop(run, preemption)
    finally:
        run.close()
    return run.state


class ProgressLog:
    """Progress bar, metric rows and the non-finite check of the loop.

    Device metrics are fetched one step late (after the next step is dispatched), so logging
    never leaves the devices idle.
    """

    def __init__(self, run: Run, start: int):
        from tqdm.auto import tqdm  # noqa: PLC0415

        self.run, self.batch_size = run, run.config.training.batch_size
        self.log_every = run.config.training.log_every
        self.writer = MetricWriter(run.workdir, resume_step=start, enabled=run.is_main)
        self.bar = tqdm(total=run.config.training.num_train_steps, initial=start, unit="step",
                        disable=not run.is_main, dynamic_ncols=True, file=sys.stderr)
        self.clock = (time.time(), start)
        self.pending = None
        self.previous = None  # the loss of the last dispatched step

    def step_done(self, step: int, metrics: dict[str, jax.Array], *, last: bool) -> None:
        """Called right after step ``step`` is dispatched.

        Waits for the previous step only (one step stays queued on the devices), so the bar
        counts finished steps and its rate and ETA are true.
        """
        if self.previous is not None:
            self.previous.block_until_ready()
            self.bar.update(1)
        self.previous = metrics["loss"]
        self.flush()  # the previous log step: the devices are already busy with this one
        if step % self.log_every == 0 or last:
            self.pending = (step, metrics)

    def flush(self) -> None:
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
        self.run.check_finite(m)

    def close(self) -> None:
        if self.previous is not None:
            self.previous.block_until_ready()
            self.bar.update(1)
        self.bar.close()
        self.writer.close()


def _train_loop(run: Run, preemption: PreemptionHandler) -> None:
    c, t = run.config, run.config.training
    start = run.resume_step or 0
    if run.is_main:
        with open(os.path.join(run.workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(c))
        print(f"{'Resuming' if start else 'Starting'} at step {start}: "
              f"{unet.count_params(run.state.params):,} parameters, {run.mesh.size} device(s), "
              f"global batch {t.batch_size}, workdir {run.workdir}", file=sys.stderr, flush=True)
    sampler = api.DDPM(c, run.graphdef, run.state.ema_params, mesh=run.mesh)
    train_step = compile_train_step(
        make_train_step(c, run.graphdef, run.diffusion, run.tx), run.mesh, run.state)
    log = ProgressLog(run, start)
    try:
        for step in range(start, t.num_train_steps):
            batch = input_pipeline.make_global_batch(next(run.reader), run.mesh)
            run.state, metrics = train_step(run.state, batch, run.base_key)
            s = step + 1
            log.step_done(s, metrics, last=s == t.num_train_steps)
            stop = preemption.should_stop(s)
            if s % t.checkpoint_every == 0 or stop:
                log.flush()
                run.check_finite(metrics)  # a checkpoint never follows an unreported NaN
                run.save()
            if stop:
                run.wait_for_save()
                raise Preempted(preemption.signum, s)
            if s % t.sample_every == 0 and s != t.num_train_steps:
                _write_samples(run, sampler, s)
        log.flush()
    finally:
        log.close()
    final = int(jax.device_get(run.state.step))
    if run.manager.latest_step() != final:
        run.save()
    run.wait_for_save()
    grid = _write_samples(run, sampler, final)
    _summary(run, log.writer, grid, final)


def _write_samples(run: Run, sampler: api.DDPM, step: int) -> str | None:
    """A grid of EMA samples (the same noise every time) as samples/step_<N>.png."""
    sampler.params = run.state.ema_params
    n = run.config.training.num_sample_images
    s = run.config.sampling
    imgs = sampler.sample(jax.random.key(run.config.seed + 1), n, sampler=s.sampler,
                          num_steps=s.num_steps, eta=s.eta)
    if not run.is_main:
        return None
    return images.save_grid(os.path.join(run.workdir, "samples", f"step_{step:07d}.png"), imgs)


def _summary(run: Run, writer: MetricWriter, grid: str | None, step: int) -> None:
    if not run.is_main:
        return
    rows = writer.read()
    curve = None
    if rows:
        curve = images.save_loss_curve(os.path.join(run.workdir, "loss.png"),
                                       [r["step"] for r in rows], [r["loss"] for r in rows])
    ckpt = checkpoints.step_dir(run.manager, step)
    print(
        f"\nTrained to step {step}.\n  checkpoint:   {ckpt}\n  samples:      {grid}\n"
        f"  loss curve:   {curve}\n  metrics:      {writer.path}\n"
        f"  tensorboard:  tensorboard --logdir {os.path.join(run.workdir, 'tensorboard')}\n"
        f"  sample more:  python sample.py --workdir={run.workdir} --num_samples=64",
        flush=True,
    )

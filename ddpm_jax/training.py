"""Training: the train state, the pure sharded train step, EMA, and the loop.

The loop, in short (``train_and_evaluate``)::

    for step in range(start, num_train_steps, k):             # k = training.steps_per_dispatch
        batch = batches.next()                                 # uint8, split over `data`
        state, metrics = train_step(state, batch, base_key)    # k steps in one compiled call
        logger.record(step + k, metrics)                       # one step late: never waits
        after_step(step + k, state)                            # checkpoint, grid, preemption

Set-up (config checks, workdir, mesh, checkpoints, reader, state) is a few plain functions that
return values, closed together by one ``contextlib.ExitStack``.

Randomness: the key of step s is ``fold_in(base_key, s)`` (t, eps and dropout all come from it),
so a run that stops and resumes draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import (
    checkpoints,
    config_lib,
    diffusion,
    distributed,
    errors,
    evaluation,
    files,
    images,
    input_pipeline,
    metric_logging,
    sampling,
    sharding,
    unet,
    xla_cpu,
)

NonFiniteError = metric_logging.NonFiniteError


class Preempted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """SIGTERM / SIGINT stopped the run after committing a checkpoint of ``step``."""

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


def learning_rate_fn(optim: config_lib.OptimizerSpec) -> optax.Schedule:
    """lr(step) = lr * min(step / warmup, 1): linear warm-up, then constant (the original).

    With ``optim.schedule = "cosine"`` the rate then falls as a half cosine from lr at the end
    of the warm-up to 0 at ``training.num_train_steps`` (for short runs).
    """
    lr, warmup = optim.lr, optim.warmup
    cosine = optim.schedule == "cosine"
    if warmup == 0 and not cosine:
        return optax.constant_schedule(lr)
    total = optim.num_train_steps

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        rate = lr * jnp.minimum(s / warmup, 1.0) if warmup else jnp.float32(lr)
        if cosine:
            done = jnp.clip((s - warmup) / max(total - warmup, 1), 0.0, 1.0)
            rate = rate * 0.5 * (1.0 + jnp.cos(jnp.pi * done))
        return rate

    return schedule


def ema_decay_fn(optim: config_lib.OptimizerSpec):
    """decay(step): ``optim.ema_decay``, or with ``optim.ema_warmup`` TF's
    ExponentialMovingAverage with ``num_updates``: ``min(decay, (1 + step) / (10 + step))``, so
    the average forgets the initial parameters quickly in a short run."""
    decay = optim.ema_decay
    if not optim.ema_warmup:
        return lambda step: decay
    return lambda step: jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def create_optimizer(optim: config_lib.OptimizerSpec) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam (beta1 0.9, beta2 0.999, eps 1e-8 by default)."""
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.adam(learning_rate_fn(optim), b1=optim.beta1, b2=optim.beta2, eps=optim.eps),
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


def abstract_state(abstract_params, tx) -> TrainState:
    """Shapes and dtypes of the train state (ShapeDtypeStructs), without allocating it."""
    return jax.eval_shape(lambda p: init_train_state(p, tx), abstract_params)


def create_train_state(model: unet.ModelSpec, seed: int, tx,
                       mesh: jax.sharding.Mesh) -> TrainState:
    """The initial state of the network ``model`` initialised from ``seed``, created already
    laid out as ``sharding.train_state_shardings`` says."""
    def init():
        return init_train_state(unet.split(unet.create_model(model, seed=seed))[1], tx)

    shardings = sharding.train_state_shardings(mesh, jax.eval_shape(init))
    # Runs once: compiled fast on CPU (the same bits as the default compilation).
    return jax.jit(init, out_shardings=shardings,
                   compiler_options=xla_cpu.run_once_options())()


# ---------------------------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------------------------


LABEL_DROP_STREAM = 0x6E756C6C  # "null": the label drops' key, fold_in(key of the step, this)


def drop_labels(labels: jax.Array, num_classes: int, prob: float, key: jax.Array) -> jax.Array:
    """Each label replaced by the null class ``num_classes`` with probability ``prob``
    (classifier-free guidance's training, Ho and Salimans 2021)."""
    drop = jax.random.bernoulli(key, prob, labels.shape)
    return jnp.where(drop, jnp.int32(num_classes), labels.astype(jnp.int32))


def make_train_step(sections: config_lib.Sections, graphdef, d: diffusion.Diffusion, tx):
    """Returns the pure ``train_step(state, batch, base_key) -> (state, metrics)`` of a
    config's sections (``config_lib.validate``).

    batch: uint8 ``[B, H, W, C]``, scaled to [-1, 1] here (on the devices); for a
    class-conditional model the tuple (images, int32 labels ``[B]``), each label dropped to the
    null class with probability ``model.cond_drop_prob`` from ``fold_in(key of the step,
    LABEL_DROP_STREAM)``, so a resumed run drops the same labels. The loss is the batch
    mean of ``diffusion.training_losses``. An update whose loss, gradient or update is not finite
    is not applied (the state keeps its values and counts the step), so the state never holds
    non-finite values; the loop decides whether to stop (``optim.skip_nonfinite``). The logged
    ``lr`` is the one Adam applied: the schedule at the count of applied updates.
    """
    optim, model = sections.optimizer, sections.model
    decay_fn, lr_fn = ema_decay_fn(optim), learning_rate_fn(optim)
    image = (model.image_size, model.image_size, model.in_ch)
    num_classes = model.num_classes
    drop_prob = float(model.cond_drop_prob) if num_classes else 0.0

    def train_step(state: TrainState, batch, base_key: jax.Array):
        key = jax.random.fold_in(base_key, state.step)
        loss_key, dropout_key = jax.random.split(key)
        labels = None
        if num_classes:
            batch, labels = batch
            labels = drop_labels(labels, num_classes, drop_prob,
                                 jax.random.fold_in(key, LABEL_DROP_STREAM))
        chex.assert_shape(batch, (None, *image))  # at trace time: before the U-Net sees it
        chex.assert_type(batch, jnp.uint8)
        x0 = images.to_model_space(batch)

        def loss_fn(params):
            model_fn = lambda x, t: unet.apply(graphdef, params, x, t, labels=labels,
                                               dropout_key=dropout_key)
            return jnp.mean(diffusion.training_losses(d, model_fn, x0, loss_key))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA: ema <- decay * ema + (1 - decay) * params, every step.
        decay = decay_fn(state.step.astype(jnp.float32))
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
            lr=lr_fn(state.step - state.nonfinite_steps),
            nonfinite_steps=new_state.nonfinite_steps,
            first_nonfinite_step=new_state.first_nonfinite_step,
        )
        return new_state, metrics

    return train_step


def make_multi_step(train_step):
    """k train steps in one call: batches ``[k, B, H, W, C]``; the metrics of the last step.

    One loop over the stacked batches whose trip count the compiler does not see, so the step
    inside compiles the same whatever ``k`` is: k calls with k = 1 and one call with k give the
    same state bit for bit. (A step compiled inside a loop is not bit-identical to the same step
    compiled alone: XLA fuses them differently. On XLA:CPU, jaxlib 0.10, the weight gradients of
    convolutions inside a loop also run about 40x slower; ``steps_per_dispatch`` is for
    accelerators.)
    """

    def multi_step(state, batches, base_key):
        count = jax.tree.leaves(batches)[0].shape[0]
        trips = jax.lax.optimization_barrier(jnp.int32(count))  # opaque to XLA

        def body(i, carry):
            batch = jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, i, 0, False), batches)
            return train_step(carry[0], batch, base_key)

        first = jax.tree.map(lambda b: b[0], batches)
        metrics = jax.eval_shape(train_step, state, first, base_key)[1]
        zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)
        return jax.lax.fori_loop(0, trips, body, (state, zeros))

    return multi_step


def compile_train_step(train_step, mesh, state, *, steps_per_dispatch: int = 1):
    """jit over the mesh: state replicated (and donated), batch split over ``data``."""
    state_shardings = sharding.train_state_shardings(mesh, state)
    batch = sharding.data_sharding(mesh) if steps_per_dispatch == 1 else NamedSharding(
        mesh, P(None, sharding.DATA))  # [k, B, ...]: the batch axis split
    replicated = sharding.replicated(mesh)
    step = train_step if steps_per_dispatch == 1 else make_multi_step(train_step)
    return jax.jit(
        step,
        compiler_options=xla_cpu.compiler_options("train"),  # fast XLA:CPU convs (None else)
        in_shardings=(
            state_shardings,  # state: replicated on every device
            batch,  # batch: split over the data axis
            replicated,  # base_key
        ),
        out_shardings=(state_shardings, replicated),  # new state, scalar metrics
        donate_argnums=(0,),  # the old state's buffers are reused for the new one
    )


# ---------------------------------------------------------------------------------------------
# Set-up: plain functions that return values.
# ---------------------------------------------------------------------------------------------


def prepare_workdir(workdir: str) -> epath.Path:
    """Creates ``workdir`` (local or ``gs://``) and checks that a file can be written there."""
    path = checkpoints.absolute(workdir)
    writable_folder(path, "workdir", "choose another --workdir")
    return path


def writable_folder(folder: epath.Path, what: str, fix: str) -> None:
    """``files.check_writable`` as a ConfigError."""
    files.check_writable(folder, what, fix, config_lib.ConfigError)


def lock_workdir(path: epath.Path, *, take_over: bool = False) -> files.FolderLock:
    """The lock that makes a run own its workdir (taken by process 0 for every process)."""
    return files.FolderLock(path, "train", what=f"workdir {path}", program="train.py",
                            take_over=take_over, leader=jax.process_index() == 0,
                            broadcast=distributed.broadcast_int)


class AlreadyTrained(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The workdir's checkpoint is at ``training.num_train_steps`` already (its state)."""

    def __init__(self, message: str, state: TrainState):
        super().__init__(message)
        self.state = state


_RESUME_FIXED = ("model", "diffusion", "data.dataset", "data.image_size", "data.channels",
                 "data.random_flip", "data.split", "seed", "training.batch_size")


def check_resume_config(saved: dict, config: ml_collections.ConfigDict, path: str) -> None:
    """A run resumes only with the settings that define its model, process and data."""
    current = config_lib.to_dict(config)
    for key in _RESUME_FIXED:
        diffs = config_lib.differences(config_lib.lookup(saved, key, None),
                                       config_lib.lookup(current, key, None), key)
        if diffs:
            name, a, b = diffs[0]
            raise checkpoints.CheckpointError(
                f"the checkpoint in {path} was made with a different config ({name}: checkpoint "
                f"{a!r}, config {b!r}); use a new --workdir or the saved settings")


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: its state, base key, data position and step."""

    state: TrainState
    base_key: jax.Array
    data_position: int
    step: int


def fresh_start(model: unet.ModelSpec, seed: int, tx, mesh) -> Start:
    """Step 0: initial parameters from ``seed`` (``config.seed``), the base key ``key(seed)``."""
    key = sharding.put(jax.random.key(seed), sharding.replicated(mesh))
    return Start(create_train_state(model, seed, tx, mesh), key, 0, 0)


def restore_start(config, ckpt: checkpoints.Checkpointer, step: int, abstract: TrainState,
                  mesh) -> Start:
    """The committed checkpoint ``step`` of the run, checked against ``config``, on ``mesh``."""
    check_resume_config(config_lib.to_dict(ckpt.read_config(step)), config, ckpt.step_dir(step))
    placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, sharding.train_state_shardings(mesh, abstract))
    items, meta = ckpt.restore(step, dict(params=placed.params, ema_params=placed.ema_params,
                                          opt_state=placed.opt_state))
    replicated = sharding.replicated(mesh)
    scalar = lambda v: sharding.put(np.int32(v), replicated)
    state = TrainState(step=scalar(meta["step"]), **items,
                       nonfinite_steps=scalar(meta.get("nonfinite_steps", 0)),
                       first_nonfinite_step=scalar(meta.get("first_nonfinite_step", -1)))
    key = jax.random.wrap_key_data(np.asarray(meta["base_key"], np.uint32))
    return Start(state, sharding.put(key, replicated), int(meta["data_position"]), step)


def save_state(ckpt: checkpoints.Checkpointer, state: TrainState, *, data_position: int,
               base_key, config, **extra_meta) -> None:
    """Starts an asynchronous save of ``state`` with everything a resume needs."""
    meta = dict(
        data_position=int(data_position),
        base_key=np.asarray(jax.random.key_data(base_key)).tolist(),
        nonfinite_steps=int(jax.device_get(state.nonfinite_steps)),
        first_nonfinite_step=int(jax.device_get(state.first_nonfinite_step)),
        **extra_meta,
    )
    ckpt.save(int(jax.device_get(state.step)), params=state.params, ema_params=state.ema_params,
              opt_state=state.opt_state, meta=meta, config=config)


class Batches:
    """Global batches for the devices: ``k`` reader batches stacked, assembled over the mesh."""

    def __init__(self, reader: input_pipeline.Reader, mesh, rows: np.ndarray, k: int):
        self.reader, self.mesh, self.rows, self.k = reader, mesh, rows, k

    def next(self):
        """The images (and, with labels, the tuple of images and labels) of the next step(s)."""
        global_batch = self.reader.spec.global_batch
        place = lambda a: sharding.make_global_batch(a, self.mesh, self.rows, global_batch)
        if self.k == 1:
            return jax.tree.map(place, next(self.reader))
        read = [next(self.reader) for _ in range(self.k)]
        stacked = jax.tree.map(lambda *a: np.stack(a, axis=1), *read)  # [b, k, ...]
        # [k, B, ...], B still split over `data`
        return jax.tree.map(lambda a: jnp.swapaxes(place(a), 0, 1), stacked)


# ---------------------------------------------------------------------------------------------
# Preemption.
# ---------------------------------------------------------------------------------------------


class PreemptionHandler:
    """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and exits.

    With several processes, SIGTERM (what a TPU maintenance event sends to every host) goes
    through JAX's preemption sync point, which makes every process stop at the same step; SIGINT
    keeps its default there (one interrupted process ends, and the others with it).
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> PreemptionHandler:
        if jax.process_count() == 1:  # else jax.distributed's notifier owns SIGTERM
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
                self.signum = signal.SIGTERM
        return self.signum is not None


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What the loop needs, built by ``setup``."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: jax.sharding.Mesh
    ckpt: checkpoints.Checkpointer
    batches: Batches
    start: Start
    train_step: Callable
    write_grid: Callable[[TrainState, int], str | None]
    is_main: bool
    evaluator: evaluation.Evaluator | None = None
    best: checkpoints.Checkpointer | None = None  # WORKDIR/best/: the best step by a metric
    best_value: float | None = None


def setup(config, workdir: str, stack: contextlib.ExitStack, *,
          take_over_lock: bool = False) -> Run:
    """Checks and builds everything before anything compiles; ``stack`` closes it all.

    The workdir is locked first (a second run on it is refused). The data is opened (and so
    checked) before the initial state is compiled; a resumed run first checks the saved config,
    then restores, then opens the data at the saved position.

    Raises:
      AlreadyTrained: the latest checkpoint is at ``training.num_train_steps``.
    """
    sections = config_lib.validate(config)
    eval_plan = evaluation.plan(config)  # a missing weight file is refused here, in one line
    for warning in config_lib.warnings(config, backend=jax.default_backend()):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    path = prepare_workdir(workdir)
    stack.enter_context(lock_workdir(path, take_over=take_over_lock))
    writable_folder(path / checkpoints.CHECKPOINT_SUBDIR, "checkpoints folder",
                    "move what is in the way, or choose another --workdir")
    mesh = sharding.create_mesh()
    rows = sharding.process_rows(mesh, config.training.batch_size)
    ckpt = stack.enter_context(checkpoints.Checkpointer(
        path / checkpoints.CHECKPOINT_SUBDIR, max_to_keep=config.training.max_to_keep))
    tx = create_optimizer(sections.optimizer)
    d = diffusion.Diffusion.from_spec(sections.process)
    graphdef, abstract_params = unet.abstract_model(sections.model)
    abstract = abstract_state(abstract_params, tx)
    latest = ckpt.latest_step()
    _check_steps(latest, config.training.num_train_steps, path)
    if latest is None:
        reader = stack.enter_context(input_pipeline.create_train_reader(
            sections.data, rows, seed=config.seed, global_batch=config.training.batch_size))
        start = fresh_start(sections.model, config.seed, tx, mesh)
    else:
        start = restore_start(config, ckpt, latest, abstract, mesh)
        if latest == config.training.num_train_steps:
            raise AlreadyTrained(f"{path} is trained to training.num_train_steps={latest} "
                                 "already; raise it to train further (nothing was changed)",
                                 start.state)
        reader = stack.enter_context(input_pipeline.create_train_reader(
            sections.data, rows, seed=config.seed, global_batch=config.training.batch_size,
            position=start.data_position))
    k = config.training.steps_per_dispatch
    train_step = compile_train_step(make_train_step(sections, graphdef, d, tx), mesh, abstract,
                                    steps_per_dispatch=k)
    run = Run(config, path, mesh, ckpt, Batches(reader, mesh, rows, k), start, train_step,
              make_grid_writer(config, graphdef, d, mesh, path), jax.process_index() == 0)
    if eval_plan is not None:
        run.evaluator = evaluation.Evaluator(eval_plan, config, graphdef, d, mesh)
        if eval_plan.best_metric:
            run.best = stack.enter_context(checkpoints.Checkpointer(
                path / BEST_SUBDIR, max_to_keep=1))
            best_step = run.best.latest_step()
            if best_step is not None:
                (meta,) = run.best.read_json(best_step, "meta")
                if meta.get("best_metric") == eval_plan.best_metric:
                    run.best_value = meta.get("best_value")
    return run


BEST_SUBDIR = "best"


def _check_steps(latest: int | None, total: int, path: epath.Path) -> None:
    if latest is not None and latest > total:
        raise checkpoints.CheckpointError(
            f"the checkpoint in {path} is at step {latest}, past training.num_train_steps="
            f"{total}; raise it to train further, or use another --workdir (nothing was changed)")


def make_grid_writer(config, graphdef, d, mesh, workdir: epath.Path):
    """``write(state, step)``: a grid of EMA samples (the same noise each time) as
    ``samples/step_<N>.png``, returning its path on process 0. A class-conditional model's grid
    cycles through the classes, guided with w = ``sampling.guidance``."""
    spec = sampling.spec_from_config(config)
    n = config.training.num_sample_images
    shape = (sharding.padded_size(n, mesh), config.data.image_size, config.data.image_size,
             config.data.channels)
    num_classes = config_lib.num_classes(config)
    model_args = None
    if num_classes:  # row i shows class i % K, guided by sampling.guidance
        labels = np.arange(shape[0], dtype=np.int32) % num_classes
        model_args = sampling.guidance_args(sharding.put(labels, sharding.data_sharding(mesh)),
                                            config.sampling.guidance)
    sample_fn = sampling.get_sampling_fn(
        graphdef, spec, shape, mesh,
        *(() if model_args is None else (sampling.guided_network_fn,)))

    def write(state: TrainState, step: int) -> str | None:
        grid = sharding.to_host(sample_fn(state.ema_params, d, jax.random.key(config.seed + 1),
                                          None, spec.eta, model_args))
        if jax.process_index() != 0:
            return None
        return images.save_grid(str(workdir / "samples" / f"step_{step:07d}.png"), grid[:n])

    return write


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       take_over_lock: bool = False) -> TrainState:
    """Trains (or resumes) the run of ``config`` in ``workdir``; returns the final state.

    A workdir already trained to ``training.num_train_steps`` is left as it is (one line; its
    restored state is returned). A refusal at set-up leaves no new, empty workdir behind.
    """
    existed = checkpoints.absolute(workdir).exists()
    try:
        with contextlib.ExitStack() as stack:
            run = setup(config, workdir, stack, take_over_lock=take_over_lock)
            preemption = stack.enter_context(PreemptionHandler())
            ev = config.get("eval")
            writer = stack.enter_context(metric_logging.MetricWriter(
                run.workdir, resume_step=run.start.step, enabled=run.is_main,
                wandb_project=ev.wandb_project if ev is not None and ev.wandb else None,
                config=config_lib.to_dict(config)))
            return train_loop(run, writer, preemption)
    except AlreadyTrained as e:
        print(f"{e}", file=sys.stderr, flush=True)
        return e.state
    except errors.UserError:
        if not existed and jax.process_index() == 0:
            _remove_if_empty(checkpoints.absolute(workdir))
        raise


def _remove_if_empty(path: epath.Path) -> None:
    """Removes a local folder tree that holds no file (what a refused start created)."""
    if "://" in str(path) or not path.is_dir():
        return
    if not any(names for _, _, names in os.walk(path)):
        path.rmtree()


def _announce(run: Run) -> None:
    c, start = run.config, run.start.step
    files.write_text(run.workdir / "config.json", config_lib.to_json(c))
    print(f"{'Resuming' if start else 'Starting'} at step {start}: "
          f"{unet.count_params(run.start.state.params):,} parameters, {run.mesh.size} device(s)"
          f" in {jax.process_count()} process(es), global batch {c.training.batch_size}, "
          f"workdir {run.workdir}", file=sys.stderr, flush=True)


def train_loop(run: Run, writer: metric_logging.MetricWriter,
               preemption: PreemptionHandler) -> TrainState:
    """The loop of the module docstring; returns the final state."""
    tc = run.config.training
    k, state, key = tc.steps_per_dispatch, run.start.state, run.start.base_key
    if run.is_main:
        _announce(run)
    logger = metric_logging.MetricLogger(
        writer, total=tc.num_train_steps, start=run.start.step, batch_size=tc.batch_size,
        log_every=tc.log_every, skip_nonfinite=run.config.optim.skip_nonfinite,
        enabled=run.is_main)
    with logger:
        for step in range(run.start.step, tc.num_train_steps, k):
            state, metrics = run.train_step(state, run.batches.next(), key)
            logger.record(step + k, metrics)
            _after_step(run, logger, preemption, state, metrics, step + k)
    _finish(run, writer, state)
    return state


def _evaluate(run: Run, logger, state: TrainState, step: int) -> None:
    """The evaluation row of ``step`` (before its checkpoint, so that a run killed between the
    two evaluates the step again on resume), and the best checkpoint."""
    logger.flush()  # the loss rows of earlier steps come first
    row = run.evaluator(state.ema_params, step)
    logger.writer.write(step, row)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items())
    if run.is_main:
        logger.note(f"evaluation at step {step}: {shown}")
    metric = run.evaluator.plan.best_metric
    if run.best is not None and evaluation.is_better(metric, row[metric], run.best_value):
        run.best_value = row[metric]
        save_state(run.best, state, data_position=run.batches.reader.position,
                   base_key=run.start.base_key, config=run.config, best_metric=metric,
                   best_value=row[metric])


def _after_step(run: Run, logger, preemption, state: TrainState, metrics, step: int) -> None:
    """Evaluation, checkpoint, preemption and sample grid at their intervals."""
    tc = run.config.training
    if run.evaluator is not None and run.evaluator.due(step):
        _evaluate(run, logger, state, step)
    stop = preemption.should_stop(step)
    if step % tc.checkpoint_every == 0 or stop:
        logger.flush()
        logger.check_finite(metrics)  # a checkpoint never follows an unreported non-finite step
        save_state(run.ckpt, state, data_position=run.batches.reader.position,
                   base_key=run.start.base_key, config=run.config)
    if stop:
        run.ckpt.wait()
        raise Preempted(preemption.signum, step)
    if step % tc.sample_every == 0 and step < tc.num_train_steps:
        grid = run.write_grid(state, step)
        if grid is not None:
            logger.writer.write_image(step, "samples", grid)


def _finish(run: Run, writer: metric_logging.MetricWriter, state: TrainState) -> None:
    """The last checkpoint and grid, and the summary of where everything is."""
    final = int(jax.device_get(state.step))
    if run.ckpt.latest_step() != final:
        save_state(run.ckpt, state, data_position=run.batches.reader.position,
                   base_key=run.start.base_key, config=run.config)
    run.ckpt.wait()
    if run.best is not None:
        run.best.wait()
    grid = run.write_grid(state, final)
    if not run.is_main:
        return
    writer.write_image(final, "samples", grid)
    curve = writer.save_loss_curve(run.workdir / "loss.png")
    lines = [f"\nTrained to step {final}.", f"  checkpoint:   {run.ckpt.step_dir(final)}"]
    if run.best is not None and run.best.latest_step() is not None:
        lines.append(f"  best:         {run.best.step_dir(run.best.latest_step())} "
                     f"({run.evaluator.plan.best_metric} {run.best_value:.4g})")
    lines += [f"  samples:      {grid}", f"  loss curve:   {curve}"]
    evals = [r for r in writer.rows() if "eval_seconds" in r]
    if evals:
        quality = writer.save_quality_curve(run.workdir / "quality.png")
        last = evals[-1]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                          if k not in ("step", "eval_seconds"))
        lines += [f"  quality:      {shown} (step {last['step']}, "
                  f"{run.evaluator.plan.num_samples} samples, {run.evaluator.plan.spec.sampler}"
                  f"{'' if run.evaluator.plan.spec.num_steps is None else '-'}"
                  f"{run.evaluator.plan.spec.num_steps or ''}, {last['eval_seconds']:.1f} s)",
                  f"  quality plot: {quality}"]
    lines += [f"  metrics:      {writer.path}",
              f"  tensorboard:  tensorboard --logdir {run.workdir / 'tensorboard'}",
              f"  sample more:  python sample.py --workdir={run.workdir} --num_samples=64"]
    print("\n".join(lines), flush=True)

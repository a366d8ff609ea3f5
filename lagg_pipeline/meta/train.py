"""The outer loop: AdamW on PES estimates, MLflow logging, atomic checkpoints, resume.

Everything a run carries between outer steps lives in one :class:`MetaTrainState` of
arrays, saved whole every ``save_iter`` steps, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from lagg_pipeline.checkpoint import CheckpointManager
from lagg_pipeline.meta.devices import any_process, host_copy, is_leader, particle_devices, particle_sharding
from lagg_pipeline.meta.family import make_estimator
from lagg_pipeline.meta.pes import PESData, PESState

_LOG_EVERY = 10  # outer steps per MLflow batch: logging must not dominate


class MetaTrainingDiverged(RuntimeError):
    """Meta-parameters became non-finite, or every particle diverged: the run stops before
    saving the bad state, so the last checkpoint is the last good one."""


class Preempted(RuntimeError):
    """SIGTERM arrived (SLURM and submitit send it before preemption): a checkpoint of the
    last finished outer step was written, so ``resume=true`` continues from there."""


@contextlib.contextmanager
def _sigterm_requested():
    """A flag set by SIGTERM for the duration of the block (main thread only)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


class MetaTrainState(NamedTuple):
    meta_params: Any
    opt_state: Any
    pes: PESState | tuple[PESState, ...]  # one per task of a family
    key: jax.Array
    outer_step: jax.Array  # int32


def meta_learning_rate(schedule_cfg, num_outer_steps: int):
    """The paper's warmup-cosine schedule (optax semantics: decay_steps includes warmup)."""
    if schedule_cfg.name == "constant":
        return optax.constant_schedule(schedule_cfg.peak_value)
    # The reference passes decay_steps = num_outer_steps - warmup; short CPU runs keep at
    # least one cosine step so the schedule stays defined.
    decay_steps = max(num_outer_steps - schedule_cfg.warmup_steps, schedule_cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=schedule_cfg.init_value, peak_value=schedule_cfg.peak_value,
        warmup_steps=schedule_cfg.warmup_steps, decay_steps=decay_steps,
        end_value=schedule_cfg.end_value, exponent=schedule_cfg.exponent)


class MetaTrainer:
    """Owns the PES estimator, the meta-optimizer and the jitted outer step.

    ``data`` holds the training split and, with ``meta_loss_split=outer_valid``, the split the
    meta-loss is measured on; it enters the jitted step as an argument. For a task family
    (``meta_tasks``), ``task`` is a list and ``data`` a tuple, one entry per task
    (:func:`lagg_pipeline.meta.family.meta_problem` builds both). ``start``: the meta-parameters
    ``meta_init=saved`` starts from (a saved aggregator's, of the aggregator's own shapes).
    """

    def __init__(self, cfg, task, data: PESData | tuple[PESData, ...], aggregator, start=None):
        self.cfg, self.aggregator, self.data = cfg, aggregator, data
        self.start = None if start is None else self._checked_start(start)
        self.schedule = meta_learning_rate(cfg.schedule, cfg.num_outer_steps)
        self.optimizer = optax.adamw(self.schedule, weight_decay=cfg.weight_decay)
        self.pes = make_estimator(cfg, task, aggregator,
                                  lambda pairs: particle_sharding(particle_devices(cfg.pes_devices, pairs)))
        self._placement, self.jitted_step = None, None
        self._compiling: Future | None = None

    def step(self, state: MetaTrainState):
        """One outer step (jitted; the data go in as arguments).

        The state goes in where the step leaves it (:meth:`state_shardings`): a fresh or restored
        state sits on one device, the step's outputs over the particle devices, and jit compiles
        anew for every new placement of its inputs, so the first two steps each compiled."""
        if self._compiling is not None:  # the same executable: a second compile must not start beside it
            compiling, self._compiling = self._compiling, None
            compiling.result()
        jitted, state = self._placed(state)
        return jitted(state, self.data)

    def compile_in_background(self) -> None:
        """Start compiling the outer step in a thread, from the shapes :meth:`init` gives, so that
        the compile (XLA's, with the GIL released) overlaps what a job does before its first step:
        the init, a restore, MLflow's run. :meth:`step` waits for it and finds the executable in
        jit's cache (no second trace or compile); an error in the compile is raised there."""
        jitted, shapes = self._jitted_for_shapes()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile-outer-step")
        self._compiling = pool.submit(lambda: jitted.lower(shapes, self.data).compile())
        pool.shutdown(wait=False)  # the thread ends with the compile

    def compile(self) -> float:
        """Compile the outer step from init's shapes without running anything (into XLA's
        persistent cache when one is enabled, where a later job's step finds it); the seconds it took."""
        start = time.perf_counter()
        jitted, shapes = self._jitted_for_shapes()
        jitted.lower(shapes, self.data).compile()
        return time.perf_counter() - start

    def _jitted_for_shapes(self):
        """(the jitted step, :meth:`abstract_state` placed where the step keeps the state)."""
        shapes = self.abstract_state()
        jitted = self._jitted(shapes)
        if self._placement is not None:
            shapes = jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
                                  shapes, self._placement)
        return jitted, shapes

    def _placed(self, state: MetaTrainState):
        """(the jitted step, ``state`` where the step keeps it), the step built on first use."""
        jitted = self._jitted(state)
        return jitted, state if self._placement is None else jax.device_put(state, self._placement)

    def _jitted(self, state):
        """The jitted step, built on first use for ``state``'s layout (arrays or their shapes)."""
        if self.jitted_step is None:
            self._placement = self.state_shardings(state)
            self.jitted_step = (jax.jit(self._step) if self._placement is None else
                                jax.jit(self._step, out_shardings=(self._placement, self._placement.outer_step)))
        return self.jitted_step

    def state_shardings(self, state: MetaTrainState) -> MetaTrainState | None:
        """Where the outer step keeps ``state``: each PES's members over its particle devices and
        everything else on every one of them; None on one device, and with several processes
        (whose arrays span them) or particle meshes that differ."""
        estimators = getattr(self.pes, "members", (self.pes,))
        shardings = [pes.particle_sharding for pes in estimators]
        if (jax.process_count() > 1 or None in shardings
                or len({tuple(s.mesh.devices.flat) for s in shardings}) > 1):
            return None
        everywhere = NamedSharding(shardings[0].mesh, PartitionSpec())

        def placed(pes_state: PESState, particles) -> PESState:
            return jax.tree.map(lambda _: everywhere, pes_state)._replace(
                rounds=jax.tree.map(lambda _: particles, pes_state.rounds))

        pes = (placed(state.pes, shardings[0]) if isinstance(state.pes, PESState)
               else tuple(map(placed, state.pes, shardings)))
        return jax.tree.map(lambda _: everywhere, state)._replace(pes=pes)

    def init(self) -> MetaTrainState:
        # Jitted, bitwise equal to running it op by op, where each op of the fresh particles' init
        # compiled on its own: 8.4 s of CPU before the first step (digits, 2-core machine), 4.8 jitted.
        k_meta, k_pes, k_next = jax.random.split(jax.random.PRNGKey(self.cfg.seed), 3)
        meta_params = jax.jit(self.aggregator.init_meta_params)(k_meta) if self.start is None else self.start
        if self.cfg.meta_init == "averaging":
            meta_params = self.aggregator.averaging_meta_params(meta_params, self.cfg.meta_init_scale)
        pes, opt_state = jax.jit(lambda m, k, d: (self.pes.init(m, k, d), self.optimizer.init(m)))(
            meta_params, k_pes, self.data)
        return MetaTrainState(meta_params, opt_state, pes, k_next, jnp.int32(0))

    def _checked_start(self, start):
        """``start`` as arrays of the fresh meta-parameters' dtypes; ValueError (one line) when it is
        laid out for another variant, K or width."""
        self.aggregator.check_compatible(start)
        fresh = jax.eval_shape(self.aggregator.init_meta_params, jax.random.PRNGKey(0))
        return jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), start, fresh)

    def abstract_state(self) -> MetaTrainState:
        """:meth:`init`'s shapes and dtypes, computed without running it (``meta_init=averaging``
        rewires values, not shapes)."""
        def shapes(key):
            k_meta, k_pes, k_next = jax.random.split(key, 3)
            meta_params = self.aggregator.init_meta_params(k_meta)
            return MetaTrainState(meta_params, self.optimizer.init(meta_params),
                                  self.pes.init(meta_params, k_pes, self.data), k_next, jnp.int32(0))

        return jax.eval_shape(shapes, jax.random.PRNGKey(self.cfg.seed))

    def _step(self, state: MetaTrainState, data: PESData):
        key, k_est = jax.random.split(state.key)
        grad, pes_state, metrics = self.pes.estimate(state.meta_params, state.pes, k_est, data)
        updates, opt_state = self.optimizer.update(grad, state.opt_state, state.meta_params)
        meta_params = optax.apply_updates(state.meta_params, updates)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(meta_params)]))
        metrics = {**metrics, "meta_grad_norm": optax.global_norm(grad),
                   "meta_learning_rate": self.schedule(state.outer_step), "meta_params_finite": finite}
        return MetaTrainState(meta_params, opt_state, pes_state, key, state.outer_step + 1), metrics


def _check_health(metrics: dict, outer_step: int, checkpoints: CheckpointManager) -> None:
    last = checkpoints.latest_path()
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    if not metrics.pop("meta_params_finite"):
        raise MetaTrainingDiverged(f"meta-parameters became non-finite at outer step {outer_step}; {keep}; "
                                   f"lower the meta-learning rate (schedule.peak_value) or pes_std")
    if metrics["diverged_fraction"] == 1.0:
        raise MetaTrainingDiverged(f"every particle's inner training diverged at outer step {outer_step}; {keep}; "
                                   f"lower local_learning_rate")
    # A family's mean hides one task whose particles all diverged: its estimate is noise from then on.
    tasks = [key.split("/", 1)[1] for key, value in metrics.items()
             if key.startswith("diverged_fraction/") and value == 1.0]
    if tasks:
        raise MetaTrainingDiverged(f"every particle of meta task {', '.join(tasks)} diverged at outer step {outer_step} "
                                   f"(the family's other tasks did not); {keep}; lower local_learning_rate, or "
                                   f"meta-train without {', '.join(tasks)}")


def run_meta_training(trainer: MetaTrainer, checkpoints: CheckpointManager, run, *, metadata: dict,
                      state: MetaTrainState | None = None, progress: bool = True, logged_through: int = 0):
    """Outer steps until num_outer_steps; returns (final state, meta-loss history).

    Steps up to ``logged_through`` are already in MLflow (a resumed run redoes the steps
    after its checkpoint, bit for bit) and are not logged again.
    """
    cfg = trainer.cfg
    state = state if state is not None else trainer.init()
    start = int(state.outer_step)
    history, pending = [], {}

    def flush():
        run.log_metrics({k: (np.array(s), np.array(v)) for k, (s, v) in pending.items()})
        pending.clear()

    with tqdm(total=cfg.num_outer_steps, initial=start, desc="meta-train", unit="outer step",
              disable=not progress) as bar, _sigterm_requested() as sigterm:
        for outer_step in range(start + 1, cfg.num_outer_steps + 1):
            t0 = time.perf_counter()
            state, metrics = trainer.step(state)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            metrics["seconds_per_outer_step"] = time.perf_counter() - t0
            _check_health(metrics, outer_step, checkpoints)
            history.append(metrics["meta_loss"])
            if outer_step > logged_through:
                for name, value in metrics.items():
                    steps, values = pending.setdefault(name, ([], []))
                    steps.append(outer_step)
                    values.append(value)
            bar.set_postfix(meta_loss=f"{metrics['meta_loss']:.4f}", refresh=False)  # shown by update()
            bar.update(1)
            # Processes stop together: one that checkpoints alone waits forever in the gather.
            stop = any_process(sigterm.is_set())
            if outer_step % cfg.save_iter == 0 or outer_step == cfg.num_outer_steps or stop:
                host_state = host_copy(state)  # with several processes, every one gathers; process 0 writes
                if is_leader():
                    # Metrics first: a kill between the two then leaves MLflow ahead of the checkpoint
                    # (a resume redoes those steps bit for bit and skips logging them), never behind it.
                    flush()
                    path = checkpoints.save(outer_step, host_state, metadata)
                    run.log_artifact(path, "checkpoints")
                if stop and outer_step < cfg.num_outer_steps:
                    raise Preempted(f"SIGTERM at outer step {outer_step}: checkpoint {checkpoints.path(outer_step)} "
                                    f"written; continue with resume=true")
            elif outer_step % _LOG_EVERY == 0:
                flush()
    flush()
    return state, history


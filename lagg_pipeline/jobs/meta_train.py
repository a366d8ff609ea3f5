"""mode=meta_train (and the first half of mode=auto): meta-train or resume, export the
meta-parameters; jobs of one sweep share a meta-training."""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from lagg_pipeline import tracking
from lagg_pipeline.data.partition import partition_label
from lagg_pipeline.errors import UserError
from lagg_pipeline.jobs.common import command_line, end_status, jax_tree, output_dir, start_job_run


META_KEYS = ("num_grads", "num_local_steps", "local_batch_size", "local_learning_rate", "hidden_size",
             "num_tasks", "trunc_length", "pes_std", "num_inner_steps", "truncation_schedule_min_length",
             "num_outer_steps", "weight_decay", "seed", "meta_loss_split")


def meta_run_name(cfg, start_sha256: str | None = None) -> str:
    """Names a meta-training run by what determines it (with ``meta_init=saved``, the digest of
    the file it starts from), so resume=true finds it again."""
    import hashlib

    what = {k: cfg[k] for k in META_KEYS}
    what.update(optimizer=cfg.optimizer.name, task=OmegaConf.to_container(cfg.task),
                schedule=OmegaConf.to_container(cfg.schedule))
    # Settings added later enter the name only when not at their default, so that earlier
    # meta-trainings keep their names (and resume=true finds them).
    if cfg.partition.name != "iid":
        what.update(partition=OmegaConf.to_container(cfg.partition))
    if cfg.meta_init == "averaging":
        what.update(meta_init=cfg.meta_init, meta_init_scale=cfg.meta_init_scale)
    elif cfg.meta_init == "saved":
        what.update(meta_init=cfg.meta_init, start=start_sha256)
    if cfg.meta_tasks:
        what.update(meta_tasks=list(cfg.meta_tasks))
    if cfg.meta_loss_train_weight:
        what.update(meta_loss_train_weight=cfg.meta_loss_train_weight)
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.optimizer.name}_{cfg.task.name}_K{cfg.num_grads}_H{cfg.num_local_steps}_{digest}"


def meta_params_metadata(cfg, **extra) -> dict:
    return {"variant": cfg.optimizer.name, "num_grads": cfg.num_grads, "hidden_size": cfg.hidden_size,
            "num_local_steps": cfg.num_local_steps, "local_learning_rate": cfg.local_learning_rate,
            "local_batch_size": cfg.local_batch_size, "meta_loss_split": cfg.meta_loss_split,
            "task": cfg.task.name, "partition": partition_label(cfg.partition), "meta_init": cfg.meta_init,
            **({"started_from": cfg.pretrained or cfg.checkpoint} if cfg.meta_init == "saved" else {}),
            **({"meta_tasks": list(cfg.meta_tasks)} if cfg.meta_tasks else {}),
            **({"meta_loss_train_weight": cfg.meta_loss_train_weight} if cfg.meta_loss_train_weight else {}), **extra}


def sweep_dir() -> str | None:
    """The folder of the --multirun sweep this job belongs to (None for a single run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return None
    return str(Path(hydra_cfg.sweep.dir).resolve()) if hydra_cfg.mode == RunMode.MULTIRUN else None


def meta_train(cfg, splits, task, aggregator):
    """Meta-train (or resume), export the meta-parameters; returns (meta_params, run).

    Jobs of one sweep that share a meta-training (they differ only in benchmark keys) take
    turns on a lock beside its checkpoint folder: the first trains, the others reuse its
    export, so no job redoes it or touches another's checkpoints."""
    from lagg_pipeline.meta.devices import is_leader
    from lagg_pipeline.meta.family import meta_problem

    start, digest = None, None
    if cfg.meta_init == "saved":
        from lagg_pipeline.jobs.saved import load_meta_params

        start, _, digest = load_meta_params(cfg)
    name = meta_run_name(cfg, digest)
    directory = Path(cfg.checkpoint_dir or "outputs/checkpoints") / name
    if not is_leader():
        return _follow_meta_training(cfg, *meta_problem(cfg, splits, task), aggregator, directory, start)
    with tracking.exclusive(directory.parent / f".{name}.lock"):
        sweep = sweep_dir()
        reused = _reuse_from_sweep(cfg, splits, directory, sweep) if sweep and not cfg.resume else None
        if reused is not None:
            return reused
        return _meta_train_locked(cfg, splits, task, aggregator, name, directory, sweep, start)


def _trainer(cfg, task, data, aggregator, start):
    from lagg_pipeline.meta.train import MetaTrainer

    try:
        return MetaTrainer(cfg, task, data, aggregator, start)
    except ValueError as err:  # a saved start laid out for another K or width
        raise UserError(f"meta_init=saved: {cfg.pretrained or cfg.checkpoint}: {err}") from None


def _follow_meta_training(cfg, task, data, aggregator, directory: Path, start):
    """A process other than 0 of a multi-process meta-training: the same steps on its share of
    the particles. It reads the checkpoint a resume starts from (``checkpoint_dir`` must be on a
    file system every process sees) and writes nothing: process 0 records and saves."""
    from lagg_pipeline.checkpoint import CheckpointManager
    from lagg_pipeline.meta.train import run_meta_training

    manager = CheckpointManager(directory, keep=cfg.checkpoints_to_keep)
    trainer = _trainer(cfg, task, data, aggregator, start)
    resume = cfg.resume and manager.latest_step() is not None
    state = manager.restore_newest_valid(trainer.init())[0] if resume else None
    state, _ = run_meta_training(trainer, manager, tracking.NullRun(), metadata={}, state=state, progress=False)
    return state.meta_params, tracking.NullRun()


def _reuse_from_sweep(cfg, splits, directory: Path, sweep: str):
    from lagg_pipeline.checkpoint import CheckpointError, load_params

    export = directory / "meta_params.npz"
    try:
        meta_params, metadata = load_params(export) if export.is_file() else (None, {})
    except CheckpointError:
        return None
    if metadata.get("sweep_dir") != sweep or metadata.get("outer_steps") != cfg.num_outer_steps:
        return None
    print(f"reusing this sweep's meta-training {directory.name} ({export})")
    run = start_job_run(cfg, cfg.optimizer.name, splits, meta_run=directory.name,
                        reused_meta_training=metadata.get("mlflow_run_id"))
    return jax_tree(meta_params), run


def _meta_train_locked(cfg, splits, task, aggregator, name: str, directory: Path, sweep: str | None, start):
    import shutil

    from lagg_pipeline.checkpoint import CheckpointError, CheckpointManager, save_params
    from lagg_pipeline.meta.family import meta_problem
    from lagg_pipeline.meta.train import run_meta_training
    from lagg_pipeline.report.plots import plot_meta_loss

    manager = CheckpointManager(directory, keep=cfg.checkpoints_to_keep)
    trainer = _trainer(cfg, *meta_problem(cfg, splits, task), aggregator, start)
    # The step's compile (seconds) runs while the init, a restore and MLflow's run are set up.
    trainer.compile_in_background()
    state, run = None, None
    if cfg.resume and manager.latest_step() is not None:
        try:
            state, saved, step, problems = manager.restore_newest_valid(trainer.init())
        except CheckpointError as err:
            raise UserError(f"resume=true: {err}") from None
        for problem in problems:
            print(f"skipping an unusable checkpoint: {problem}")
        run = tracking.resume_run(cfg.tracking, saved["mlflow_run_id"]) if saved.get("mlflow_run_id") else None
        print(f"resuming {name} at outer step {int(state.outer_step)} from {manager.path(step)}")
    elif cfg.resume:
        print(f"resume=true: no checkpoint of {name} under {directory}; starting from scratch")
    elif manager.latest_step() is not None:  # a fresh start never overwrites an older run
        shutil.move(str(directory), f"{directory}.{time.strftime('%Y%m%d-%H%M%S')}")
        manager = CheckpointManager(directory, keep=cfg.checkpoints_to_keep)
    run = run or start_job_run(cfg, cfg.optimizer.name, splits, meta_run=name)
    metadata = {"config": OmegaConf.to_container(cfg, resolve=True), "mlflow_run_id": run.run_id,
                **meta_params_metadata(cfg)}
    logged_through = (run.last_step("meta_loss") or 0) if state is not None else 0
    try:
        state, history = run_meta_training(trainer, manager, run, metadata=metadata, state=state,
                                           progress=cfg.progress, logged_through=logged_through)
        out = output_dir()
        seconds = run.metric_total("seconds_per_outer_step")  # over every session of a resumed run
        exported = save_params(out / "meta_params.npz", state.meta_params,
                               meta_params_metadata(cfg, outer_steps=int(state.outer_step), meta_run=name,
                                                    command=command_line(), meta_train_seconds=seconds,
                                                    sweep_dir=sweep, mlflow_run_id=run.run_id,
                                                    **tracking.git_info()))
        shutil.copy(exported, directory / "meta_params.npz")
        run.log_artifact(exported, "meta_params")
        if history:
            first = int(state.outer_step) - len(history)
            run.log_artifact(plot_meta_loss(history, first, out / "meta_loss.png"), "plots")
        print(f"meta-parameters: {exported} (and {directory / 'meta_params.npz'})")
    except BaseException as err:
        run.end(end_status(err))  # KILLED stays resumable: resume=true reopens this run
        raise
    return jax_tree(state.meta_params), run


def meta_train_job(cfg, splits, task) -> None:
    """mode=meta_train: meta-train (or resume) and export; no benchmark."""
    from lagg_pipeline.jobs.common import learned_aggregator

    _, run = meta_train(cfg, splits, task, learned_aggregator(cfg))
    run.end()

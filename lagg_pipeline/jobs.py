"""What one Hydra job does, dispatched on ``mode``: benchmark, meta-train, import."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from lagg_pipeline import tracking
from lagg_pipeline.config import LEARNED_OPTIMIZERS, SHORTHANDS, ConfigError, partition_label, validate
from lagg_pipeline.errors import UserError


FEDAVG = {"name": "fedavg", "_target_": "lagg_pipeline.aggregators.hand.fedavg"}


def end_status(err: BaseException) -> str:
    """MLflow's status for a run ended by ``err``: KILLED when stopped from outside (Ctrl-C,
    SIGTERM), FAILED otherwise; never FINISHED."""
    from lagg_pipeline.meta.train import Preempted

    return "KILLED" if isinstance(err, (KeyboardInterrupt, Preempted)) else "FAILED"


def output_dir() -> Path:
    """Hydra's run directory, or a fresh one under outputs/ when called outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        path = Path("outputs/runs") / time.strftime("%Y-%m-%d/%H-%M-%S")
        path.mkdir(parents=True, exist_ok=True)
        return path


def load_task(cfg):
    """The task's data splits (on the device) and its model."""
    from lagg_pipeline.data import DataUnavailableError, load_splits
    from lagg_pipeline.data.partition import describe, partition_splits
    from lagg_pipeline.tasks import make_task

    try:
        splits = load_splits(cfg.task.dataset, image_size=cfg.task.image_size, data_dir=cfg.data_dir)
    except DataUnavailableError as err:
        raise UserError(str(err)) from None
    splits = partition_splits(splits, cfg.partition)
    if cfg.partition.name != "iid":
        print(f"partition {partition_label(cfg.partition)}: "
              + ", ".join(f"{k.removeprefix('partition_')}={v:g}" for k, v in describe(splits.train).items()))
    return splits, make_task(cfg.task, tuple(splits.train.x.shape[1:]), splits.num_classes)


def hand_server_update(optimizer_cfg):
    """Instantiate a hand-designed server update from its ``_target_`` config."""
    from hydra.utils import instantiate

    args = {k: v for k, v in OmegaConf.to_container(optimizer_cfg, resolve=True).items() if k != "name"}
    try:
        return instantiate(args)
    except Exception as err:  # instantiate wraps the constructor's ValueError
        cause = err.__cause__ or err
        raise ConfigError(f"optimizer={optimizer_cfg.name}: {str(cause).splitlines()[0]}") from None


def run_tags(cfg, **extra):
    return {"optimizer": cfg.optimizer.name, "task": cfg.task.name, "H": cfg.num_local_steps,
            "K": cfg.num_grads, "seed": cfg.seed, "mode": cfg.mode, "partition": partition_label(cfg.partition),
            **extra}


def run_title(cfg, name: str) -> str:
    """A run's name: method, task, H, K and (when not i.i.d.) the partition."""
    where = "" if cfg.partition.name == "iid" else f" {partition_label(cfg.partition)}"
    return f"{name} {cfg.task.name} H={cfg.num_local_steps} K={cfg.num_grads}{where}"


def log_partition(run, splits) -> None:
    """The partition's client sizes and label skew, as metrics of the run (nothing for iid)."""
    from lagg_pipeline.data.partition import ClientSplit, describe

    if isinstance(splits.train, ClientSplit):
        run.log_metrics({k: ([0], [v]) for k, v in describe(splits.train).items()})


def start_job_run(cfg, method: str, splits, **extra_tags):
    """An MLflow run of ``method`` for this job: the flattened config, the partition's numbers
    and Hydra's files attached."""
    run = tracking.start_run(cfg.tracking, cfg.tracking.run_name or run_title(cfg, method),
                             run_tags(cfg, **extra_tags), parent_run_id=cfg.tracking.parent_run_id)
    run.log_params(tracking.flatten(OmegaConf.to_container(cfg, resolve=True)))
    log_partition(run, splits)
    run.log_artifact(output_dir() / ".hydra", "hydra")
    return run


def log_benchmark(run, result, out: Path) -> None:
    """Curves (mean and std over seeds, step = round), final metrics, plot and raw arrays.

    MLflow refuses non-finite values: a run that diverged keeps the finite part of its
    curves and is tagged ``diverged`` (with the round), so it never looks like missing data."""
    from lagg_pipeline.report import diverged_at, plot_curves, summary

    rounds = np.arange(1, result.train_loss.shape[1] + 1)
    series = {"train_loss": (rounds, result.train_loss.mean(0)),
              "train_loss_std": (rounds, result.train_loss.std(0))}
    for name in ("test_loss", "test_accuracy", "outer_valid_loss"):
        values = getattr(result, name)
        series[name] = (result.eval_rounds, values.mean(0))
        series[f"{name}_std"] = (result.eval_rounds, values.std(0))
    series["seconds_per_round"] = ([0], [result.seconds_per_round])
    series["compile_seconds"] = ([0], [result.compile_seconds])
    for name, (mean, std) in summary(result).items():
        series[f"final_{name}"] = ([0], [mean])
        series[f"final_{name}_std"] = ([0], [std])
    run.log_metrics(series)
    first_bad = diverged_at(result)
    run.set_tags({"diverged": first_bad is not None, **({"diverged_at_round": first_bad} if first_bad else {})})
    np.savez(out / f"{result.name}_curves.npz", **{k: v for k, v in result._asdict().items() if k != "name"})
    run.log_artifact(out / f"{result.name}_curves.npz", "curves")
    run.log_artifact(plot_curves([result], out / f"{result.name}_loss_vs_rounds.png"), "plots")


def benchmark(cfg, server_update, name: str, splits, task, *, run=None, **tags):
    """Run the benchmark protocol for one server update and record it."""
    from lagg_pipeline.benchmark import run_benchmark

    out = output_dir()
    own_run = run is None
    run = run or start_job_run(cfg, name, splits, **tags)
    try:
        result = run_benchmark(task, splits, server_update, name=name, num_grads=cfg.num_grads,
                               num_local_steps=cfg.num_local_steps, local_batch_size=cfg.local_batch_size,
                               local_learning_rate=cfg.local_learning_rate, num_runs=cfg.num_runs,
                               num_rounds=cfg.num_rounds, eval_every=cfg.eval_every, seed=cfg.seed,
                               progress=cfg.progress)
        run.set_tags({"method": name})
        log_benchmark(run, result, out)
    except BaseException as err:
        if own_run:
            run.end(end_status(err))
        raise
    if own_run:
        run.end()
    return result


def finish(results, out: Path, run=None) -> dict:
    """Print the summary table, save the comparison plot; return final metrics."""
    from lagg_pipeline.report import format_summary, plot_curves, summary

    table = format_summary(results)
    print(table)
    (out / "summary.txt").write_text(table + "\n")
    plot = plot_curves(results, out / "loss_vs_rounds.png")
    print(f"plot: {plot}")
    final = {r.name: {k: float(m) for k, (m, _) in summary(r).items()} for r in results}
    (out / "summary.json").write_text(json.dumps(final, indent=2))
    if run is not None:
        run.log_artifact(plot, "plots")
        run.log_artifact(out / "summary.txt")
    return final


def learned_aggregator(cfg):
    from lagg_pipeline.aggregators.learned import LearnedAggregator

    return LearnedAggregator(cfg.optimizer.name, cfg.num_grads, cfg.hidden_size)


META_KEYS = ("num_grads", "num_local_steps", "local_batch_size", "local_learning_rate", "hidden_size",
             "num_tasks", "trunc_length", "pes_std", "num_inner_steps", "truncation_schedule_min_length",
             "num_outer_steps", "weight_decay", "seed", "meta_loss_split")


def meta_run_name(cfg) -> str:
    """Names a meta-training run by what determines it, so resume=true finds it again."""
    import hashlib

    what = {k: cfg[k] for k in META_KEYS}
    what.update(optimizer=cfg.optimizer.name, task=OmegaConf.to_container(cfg.task),
                schedule=OmegaConf.to_container(cfg.schedule))
    # Settings added later enter the name only when not at their default, so that earlier
    # meta-trainings keep their names (and resume=true finds them).
    if cfg.partition.name != "iid":
        what.update(partition=OmegaConf.to_container(cfg.partition))
    if cfg.meta_init != "random":
        what.update(meta_init=cfg.meta_init, meta_init_scale=cfg.meta_init_scale)
    if cfg.meta_tasks:
        what.update(meta_tasks=list(cfg.meta_tasks))
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.optimizer.name}_{cfg.task.name}_K{cfg.num_grads}_H{cfg.num_local_steps}_{digest}"


def meta_params_metadata(cfg, **extra) -> dict:
    return {"variant": cfg.optimizer.name, "num_grads": cfg.num_grads, "hidden_size": cfg.hidden_size,
            "num_local_steps": cfg.num_local_steps, "local_learning_rate": cfg.local_learning_rate,
            "local_batch_size": cfg.local_batch_size, "meta_loss_split": cfg.meta_loss_split,
            "task": cfg.task.name, "partition": partition_label(cfg.partition), "meta_init": cfg.meta_init,
            **({"meta_tasks": list(cfg.meta_tasks)} if cfg.meta_tasks else {}), **extra}


def command_line() -> str:
    """This job's command, as the user could type it again (keys that do not change the
    result, such as resume= and progress=, left out)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        overrides = []
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("resume", "progress")]
    return " ".join(["python -m lagg_pipeline", *kept])


def sweep_dir() -> str | None:
    """The folder of the --multirun sweep this job belongs to (None for a single run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return None
    return str(Path(hydra_cfg.sweep.dir).resolve()) if hydra_cfg.mode == RunMode.MULTIRUN else None


@contextlib.contextmanager
def exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (waits for another process holding it)."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def meta_train(cfg, splits, task, aggregator):
    """Meta-train (or resume), export the meta-parameters; returns (meta_params, run).

    Jobs of one sweep that share a meta-training (they differ only in benchmark keys) take
    turns on a lock beside its checkpoint folder: the first trains, the others reuse its
    export, so no job redoes it or touches another's checkpoints."""
    from lagg_pipeline.meta.devices import is_leader
    from lagg_pipeline.meta.family import meta_problem

    name = meta_run_name(cfg)
    directory = Path(cfg.checkpoint_dir or "outputs/checkpoints") / name
    if not is_leader():
        return _follow_meta_training(cfg, *meta_problem(cfg, splits, task), aggregator, directory)
    with exclusive(directory.parent / f".{name}.lock"):
        sweep = sweep_dir()
        reused = _reuse_from_sweep(cfg, splits, directory, sweep) if sweep and not cfg.resume else None
        if reused is not None:
            return reused
        return _meta_train_locked(cfg, splits, task, aggregator, name, directory, sweep)


def _follow_meta_training(cfg, task, data, aggregator, directory: Path):
    """A process other than 0 of a multi-process meta-training: the same steps on its share of
    the particles. It reads the checkpoint a resume starts from (``checkpoint_dir`` must be on a
    file system every process sees) and writes nothing: process 0 records and saves."""
    from lagg_pipeline.checkpoint import CheckpointManager
    from lagg_pipeline.meta.train import MetaTrainer, run_meta_training

    manager = CheckpointManager(directory, keep=cfg.checkpoints_to_keep)
    trainer = MetaTrainer(cfg, task, data, aggregator)
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


def _meta_train_locked(cfg, splits, task, aggregator, name: str, directory: Path, sweep: str | None):
    import shutil

    from lagg_pipeline.checkpoint import CheckpointError, CheckpointManager, save_params
    from lagg_pipeline.meta.family import meta_problem
    from lagg_pipeline.meta.train import MetaTrainer, run_meta_training
    from lagg_pipeline.report import plot_meta_loss

    manager = CheckpointManager(directory, keep=cfg.checkpoints_to_keep)
    trainer = MetaTrainer(cfg, *meta_problem(cfg, splits, task), aggregator)
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


def jax_tree(tree):
    import jax.numpy as jnp
    from jax import tree as jtree

    return jtree.map(jnp.asarray, tree)


def load_meta_params(cfg):
    """(meta_params, metadata) from checkpoint=<file or MLflow artifact URI> or pretrained=<name>."""
    from lagg_pipeline import pretrained

    location = str(pretrained.path(cfg.optimizer.name, cfg.pretrained)) if cfg.pretrained else cfg.checkpoint
    if location is None:
        raise ConfigError(f"mode=benchmark optimizer={cfg.optimizer.name} needs checkpoint=<meta_params.npz "
                          f"or MLflow artifact URI>")
    if "://" in location or location.startswith("runs:/"):
        import mlflow

        try:
            location = mlflow.artifacts.download_artifacts(artifact_uri=location,
                                                           tracking_uri=tracking.tracking_uri(cfg.tracking.uri))
        except Exception as err:  # MlflowException, OSError: the run, the file or the server is missing
            raise UserError(f"checkpoint={cfg.checkpoint}: cannot download it: {str(err).splitlines()[0]}") from None
    meta_params, metadata = read_saved(location, cfg.optimizer.name, UserError)
    return jax_tree(meta_params), metadata


def read_saved(location, variant: str, error: type[Exception]):
    """(meta_params, metadata) of a local meta-parameter file holding ``variant``; ``error``
    (one line) when it is missing, unreadable or holds another variant."""
    from lagg_pipeline.checkpoint import CheckpointError, load_params

    if not Path(location).is_file():
        raise error(f"checkpoint={location}: no such file")
    try:
        meta_params, metadata = load_params(location)
    except CheckpointError as err:
        raise error(f"checkpoint={location}: {err}") from None
    if metadata.get("variant") not in (None, variant):
        raise error(f"checkpoint={location} holds {metadata['variant']} meta-parameters, not optimizer={variant}")
    return meta_params, metadata


TRAINED_WITH = ("num_grads", "num_local_steps", "local_learning_rate", "local_batch_size", "hidden_size")


def command_line_keys() -> set[str]:
    """The config keys this job's command line set (H= and k= count as their keys)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:
        return set()
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return {SHORTHANDS.get(k, k) for k in keys}


def adopt_training_settings(cfg, metadata: dict):
    """SPEC 5: a learned aggregator is evaluated with the K, H and gamma it was meta-trained
    with, unless the command line sets them."""
    given = command_line_keys()
    changes = {k: metadata[k] for k in TRAINED_WITH if k in metadata and k not in given and cfg[k] != metadata[k]}
    if not changes:
        return cfg
    print("benchmarking with the settings these meta-parameters were trained with: "
          + ", ".join(f"{k}={v}" for k, v in changes.items()))
    cfg = cfg.copy()
    for key, value in changes.items():
        cfg[key] = value
    return cfg


def checked_server_update(aggregator, meta_params):
    try:
        return aggregator.server_update(meta_params)
    except ValueError as err:  # incompatible K, width or layout: one line, no shape traceback
        raise UserError(str(err)) from None


def check_inputs(cfg, given: set[str]) -> None:
    """Refuse, before Hydra creates anything, the inputs a job names that cannot work: a
    missing, garbled or incompatible saved aggregator, a legacy file the importer refuses,
    an unreachable tracking server. ``given``: the keys the command line sets."""
    import os

    name = cfg.optimizer.name
    if cfg.mode == "import_legacy":
        from lagg_pipeline.legacy import LegacyFormatError, read_legacy

        try:
            read_legacy(cfg.legacy_path, name, cfg.num_grads, cfg.hidden_size)
        except (LegacyFormatError, ValueError, OSError) as err:
            raise ConfigError(f"legacy_path={cfg.legacy_path}: {str(err).splitlines()[0]}") from None
    location = cfg.checkpoint
    if name in LEARNED_OPTIMIZERS and cfg.mode == "benchmark" and not (location or cfg.pretrained):
        raise ConfigError(f"mode=benchmark optimizer={name} needs checkpoint=<meta_params.npz or MLflow artifact "
                          f"URI> or pretrained=<name>")
    if name in LEARNED_OPTIMIZERS and location and "://" not in location and not location.startswith("runs:/"):
        meta_params, metadata = read_saved(location, name, ConfigError)
        from lagg_pipeline.aggregators.learned import LearnedAggregator

        setting = {k: cfg[k] if k in given else metadata.get(k, cfg[k]) for k in ("num_grads", "hidden_size")}
        try:
            LearnedAggregator(name, setting["num_grads"], setting["hidden_size"]).server_update(jax_tree(meta_params))
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"checkpoint={location}: {str(err).splitlines()[0]}") from None
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if cfg.tracking.enabled and uri and uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except OSError as err:
            raise ConfigError(f"tracking uri {uri} is unreachable ({err}); start the server, fix "
                              f"MLFLOW_TRACKING_URI / tracking.uri, or run with tracking=off") from None


def import_legacy_job(cfg):
    from lagg_pipeline.legacy import LegacyFormatError, import_legacy

    out = Path(cfg.output_path or output_dir() / "meta_params.npz")
    try:
        path = import_legacy(cfg.legacy_path, out, cfg.optimizer.name, cfg.num_grads, cfg.hidden_size)
    except (LegacyFormatError, ValueError, OSError) as err:
        raise UserError(f"legacy_path={cfg.legacy_path}: {err}") from None
    print(f"imported {cfg.legacy_path} -> {path}\n"
          f"benchmark it with: python -m lagg_pipeline mode=benchmark optimizer={cfg.optimizer.name} "
          f"num_grads={cfg.num_grads} checkpoint={path}")
    return str(path)


def run_job(cfg):
    """Entry of every Hydra job (also of each job of a --multirun sweep)."""
    validate(cfg)
    name = cfg.optimizer.name
    learned = name in LEARNED_OPTIMIZERS
    if cfg.pretrained == "list":
        from lagg_pipeline import pretrained

        print(pretrained.describe())
        return None
    if cfg.mode == "import_legacy":
        return import_legacy_job(cfg)
    if not learned and cfg.mode == "meta_train":
        raise ConfigError(f"mode=meta_train needs a learned optimizer ({', '.join(LEARNED_OPTIMIZERS)}); "
                          f"optimizer={name} is hand-designed")
    if cfg.mode == "select_tuned":
        return select_tuned_job(cfg)
    if cfg.mode == "report":
        from lagg_pipeline.comparison import report_job

        return report_job(cfg, output_dir())
    if cfg.distributed.enabled:
        from lagg_pipeline.meta.devices import particle_devices, start_distributed

        start_distributed(cfg.distributed)  # before the data reach a device
        try:  # the device count is known only now
            particle_devices(cfg.pes_devices, 2 * cfg.num_tasks)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    from lagg_pipeline import xla_cache

    xla_cache.enable(cfg.compile_cache_dir)
    splits, task = load_task(cfg)
    if not learned:
        cfg = with_tuned_values(cfg)
        result = benchmark(cfg, hand_server_update(cfg.optimizer), name, splits, task)
        return finish([result], output_dir())[name]["outer_valid_loss"]

    if cfg.mode == "benchmark" or cfg.checkpoint or cfg.pretrained:  # a saved aggregator: benchmark it
        meta_params, metadata = load_meta_params(cfg)
        cfg = adopt_training_settings(cfg, metadata)
        aggregator = learned_aggregator(cfg)
        server_update = checked_server_update(aggregator, meta_params)
        run = start_job_run(cfg, name, splits, checkpoint=cfg.pretrained or cfg.checkpoint)
        method = f"{name}@{cfg.pretrained}" if cfg.pretrained else name  # the report tells them apart
        shipped = None
    else:
        aggregator = learned_aggregator(cfg)
        meta_params, run = meta_train(cfg, splits, task, aggregator)
        if cfg.mode == "meta_train":
            run.end()
            return None
        server_update = aggregator.server_update(meta_params)
        method, shipped = name, shipped_counterpart(cfg)
    try:
        results = [benchmark(cfg, server_update, method, splits, task, run=run)]
        if shipped is not None:  # what a longer meta-training gives, beside this short one
            shipped_cfg = cfg.copy()
            shipped_cfg.pretrained = shipped
            shipped_params, metadata = load_meta_params(shipped_cfg)
            shipped_cfg = adopt_training_settings(shipped_cfg, metadata)
            results.append(benchmark(shipped_cfg, checked_server_update(aggregator, shipped_params),
                                     f"{name}@{shipped}", splits, task, baseline_for=run.run_id))
        if cfg.with_fedavg:
            baseline_cfg = cfg.copy()
            baseline_cfg.optimizer = OmegaConf.create(FEDAVG)
            baseline_cfg = with_tuned_values(baseline_cfg)  # FedAvg at its own best gamma: a fair baseline
            results.append(benchmark(baseline_cfg, hand_server_update(baseline_cfg.optimizer), "fedavg", splits,
                                     task, baseline_for=run.run_id))
        final = finish(results, output_dir(), run)
    except BaseException as err:
        run.end(end_status(err))
        raise
    run.end()
    return final[method]["outer_valid_loss"]


def with_tuned_values(cfg):
    """Apply the recorded tuned values of this task/optimizer/H/K (tuned=true), saying which."""
    from lagg_pipeline import tuning

    if not cfg.tuned:
        return cfg
    cfg, applied, tuned_over = tuning.apply(cfg, command_line_keys(),
                                            root=Path(cfg.tuned_dir) if cfg.tuned_dir else None)
    if applied:
        clients = partition_label(cfg.partition)
        where = "" if clients == "iid" else (f" over clients {clients}" if tuned_over == clients else
                                             f" on i.i.d. data (none tuned over clients {clients})")
        print(f"{cfg.optimizer.name}: tuned values for {cfg.task.name} H={cfg.num_local_steps} K={cfg.num_grads}{where} "
              f"(conf/tuned_hparams; tuned=false turns them off): " + ", ".join(f"{k}={v}" for k, v in applied.items()))
    return cfg


def select_tuned_job(cfg):
    """mode=select_tuned: write the best grid point per task/optimizer/H/K of the tuning experiment."""
    from lagg_pipeline import tuning

    experiment = cfg.tracking.experiment if "tracking.experiment" in command_line_keys() else "tuning"
    client, _ = tracking.client(cfg.tracking)
    root = Path(cfg.tuned_dir) if cfg.tuned_dir else tuning.tuned_root()
    try:
        written = tuning.select(client, experiment, root)
    except LookupError as err:
        raise UserError(str(err)) from None
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"no finished grid runs of hand-designed optimizers in experiment {experiment}")
    return [str(p) for p in written]


def shipped_counterpart(cfg) -> str | None:
    """The shipped pretrained aggregator of this variant meta-trained like this job (task, K, H,
    meta-loss split, clients, start), if there is one."""
    from lagg_pipeline import pretrained

    return pretrained.matching(cfg.optimizer.name, cfg.task.name, cfg.num_grads, cfg.num_local_steps,
                               cfg.meta_loss_split, partition_label(cfg.partition), cfg.meta_init)

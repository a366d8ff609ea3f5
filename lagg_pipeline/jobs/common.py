"""What every job shares: its run folder and MLflow run (name, tags), the task, the
command line it was given, the aggregators a config describes."""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from lagg_pipeline import tracking
from lagg_pipeline.config import SHORTHANDS, ConfigError
from lagg_pipeline.data.partition import partition_label
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


def learned_aggregator(cfg):
    from lagg_pipeline.aggregators.learned import LearnedAggregator

    return LearnedAggregator(cfg.optimizer.name, cfg.num_grads, cfg.hidden_size)


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


def command_line_keys() -> set[str]:
    """The config keys this job's command line set (H= and k= count as their keys)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:
        return set()
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return {SHORTHANDS.get(k, k) for k in keys}


def recipe_keys(recipe: str | None) -> set[str]:
    """The config keys an ``experiment=`` recipe sets (dotted; its group overrides left out)."""
    if recipe is None:
        return set()
    from importlib import resources

    node = OmegaConf.create(resources.files("lagg_pipeline.conf").joinpath(f"experiment/{recipe}.yaml").read_text())
    plain = {k: v for k, v in OmegaConf.to_container(node).items() if k not in ("defaults", "hydra")}
    return set(tracking.flatten(plain))


def chosen_keys() -> set[str]:
    """The keys the user chose for this job: on the command line or through its ``experiment=`` recipe."""
    from hydra.core.hydra_config import HydraConfig

    try:
        recipe = HydraConfig.get().runtime.choices.get("experiment")
    except ValueError:
        return set()
    return command_line_keys() | recipe_keys(recipe)


def jax_tree(tree):
    import jax.numpy as jnp
    from jax import tree as jtree

    return jtree.map(jnp.asarray, tree)

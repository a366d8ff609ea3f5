"""The typed configuration schema and its one-line validation errors.

Hydra composes ``conf/`` on top of :class:`Config` (registered in the ConfigStore as
``base_config``), so types are enforced at composition; :func:`validate` adds the value
checks (ranges, names, data sizes) that must pass before any compute starts.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lagg_pipeline.errors import ConfigError  # noqa: F401  (the schema's modules import it from here)

MODES = ("auto", "benchmark", "meta_train", "warm", "import_legacy", "select_tuned", "report", "recommend")
HAND_OPTIMIZERS = ("fedavg", "slowmo", "sgd", "adam", "fedavgm", "diloco", "fedadam", "fedyogi")
LEARNED_OPTIMIZERS = ("lagg_a", "lopt_a", "lagg", "lopt")
MODELS = ("mlp", "conv")
META_LOSS_SPLITS = ("train", "outer_valid", "resplit")
META_INITS = ("random", "averaging", "saved")
CONFIG_PACKAGE = "lagg_pipeline.conf"  # conf/, installed as a package
SHORTHANDS = {"H": "num_local_steps", "k": "num_grads"}  # the H/ and k/ config groups set these keys


@dataclass
class TaskConfig:
    name: str = MISSING
    dataset: str = MISSING
    model: str = "mlp"
    hidden_sizes: list[int] = field(default_factory=list)
    image_size: Optional[int] = None  # resize images to image_size x image_size


@dataclass
class ScheduleConfig:
    """Meta-learning-rate schedule (optax.warmup_cosine_decay_schedule or constant)."""

    name: str = "warmup_cosine"
    init_value: float = 3e-10
    peak_value: float = 3e-3
    warmup_steps: int = 100
    end_value: float = 1e-3
    exponent: float = 1.0


@dataclass
class PartitionConfig:
    """How the training split is divided among clients (lagg_pipeline/data/partition.py)."""

    name: str = "iid"  # iid (no clients: every worker samples the whole split), dirichlet, shards
    num_clients: int = 64  # M; each round picks num_grads (K) of them
    alpha: float = 0.1  # dirichlet: concentration of each client's class proportions
    shards_per_client: int = 2  # shards: label-sorted shards per client
    seed: int = 0  # the partition's own seed (the same clients for every run seed)


@dataclass
class DistributedConfig:
    """Meta-training over several processes (hosts) with JAX's own runtime
    (``jax.distributed.initialize``); the PES particles are split over every process's devices."""

    enabled: bool = False
    coordinator_address: Optional[str] = None  # host:port of process 0; null: detected (SLURM, Open MPI, ...)
    num_processes: Optional[int] = None  # null: detected from the cluster environment
    process_id: Optional[int] = None  # this process, 0..num_processes-1; null: detected


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # MLFLOW_TRACKING_URI wins; default: sqlite under outputs/
    experiment: str = "lagg_pipeline"
    parent_run_id: Optional[str] = None  # set by the launcher for --multirun sweeps
    run_name: Optional[str] = None


@dataclass
class Config:
    mode: str = "auto"
    # Each optimizer file holds its own constructor arguments, so this node is free-form.
    optimizer: Any = MISSING
    task: TaskConfig = field(default_factory=TaskConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # Client simulator (SPEC 1).
    num_grads: int = 8
    num_local_steps: int = 4
    local_batch_size: int = 128
    local_learning_rate: float = 0.5
    # Hand-designed server updates (SPEC 2).
    learning_rate: float = 1e-3
    beta: float = 0.95
    slowmo_learning_rate: float = 0.1
    # Benchmark (SPEC 5).
    num_runs: int = 5
    num_rounds: int = 300
    eval_every: int = 25
    seed: int = 0
    with_fedavg: bool = True  # benchmark (tuned) FedAvg beside a learned optimizer
    fedavg_local_learning_rate: Optional[float] = None  # that FedAvg's gamma; null: its tuned one
    tuned: bool = True  # apply conf/tuned_hparams/<task>/<optimizer>.yaml (keys the user chose win)
    data_dir: Optional[str] = None
    compile_cache_dir: Optional[str] = "~/.cache/lagg_pipeline/xla"  # XLA's persistent cache; null: off
    progress: bool = True
    skip_finished: bool = False  # a benchmark whose settings finished before in the experiment is not rerun
    # Learned aggregators and meta-training (SPEC 3-4).
    hidden_size: int = 32
    num_tasks: int = 8
    trunc_length: int = 50
    pes_std: float = 0.01
    num_inner_steps: int = 1000
    truncation_schedule_min_length: int = 100
    meta_loss_split: str = "train"  # outer_valid: a fixed held-out split; resplit: fresh per episode (SPEC 4)
    meta_loss_train_weight: float = 0.0  # w: a held-out meta-loss becomes w * train loss + (1 - w) * held-out
    meta_tasks: list[str] = field(default_factory=list)  # meta-train over these conf/task entries (a family)
    meta_init: str = "random"  # SPEC 3.3's random network; "averaging": as normalised worker averaging;
    # "saved": from the aggregator named by pretrained= or checkpoint= (mode=meta_train continues it)
    meta_init_scale: float = 10.0  # meta_init=averaging: the first steps' size, in units of STEP_MULT per element
    num_outer_steps: int = 200
    pes_devices: Optional[int] = None  # devices the PES particles are spread over (None: all that fit)
    weight_decay: float = 1e-4
    save_iter: int = 25
    checkpoints_to_keep: int = 10
    resume: bool = False
    checkpoint: Optional[str] = None  # meta_params.npz or an MLflow artifact URI to benchmark
    pretrained: Optional[str] = None  # a shipped aggregator to benchmark (pretrained=list lists them)
    checkpoint_dir: Optional[str] = None  # default outputs/checkpoints/<meta-run name>
    legacy_path: Optional[str] = None
    output_path: Optional[str] = None
    # mode=report / mode=select_tuned / mode=recommend
    report_dir: Optional[str] = None  # also write the report here (e.g. docs/results)
    results_archive: Optional[str] = None  # committed per-group curves: merged into the report, then rewritten
    readme: Optional[str] = None  # splice the report's tables into this file's Results markers
    headline: Optional[str] = None  # and a short table of their verdicts into this file's headline markers
    tuned_dir: Optional[str] = None  # where tuned values are read and written; default: conf/tuned_hparams


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def _validate_distributed(cfg) -> None:
    dist = cfg.distributed
    if not dist.enabled:
        return
    _require(cfg.mode == "meta_train" and cfg.optimizer.name in LEARNED_OPTIMIZERS,
             f"distributed.enabled=true is not allowed with mode={cfg.mode} optimizer={cfg.optimizer.name}; "
             f"several processes share a meta-training: mode=meta_train with {', '.join(LEARNED_OPTIMIZERS)}")
    _require(dist.num_processes is None or dist.num_processes >= 1,
             f"distributed.num_processes={dist.num_processes} is not allowed; it must be >= 1 or null (detected)")
    _require(dist.process_id is None or (dist.num_processes is not None and 0 <= dist.process_id < dist.num_processes),
             f"distributed.process_id={dist.process_id} is not allowed; it must be in [0, distributed.num_processes"
             f"={dist.num_processes}) or null (detected)")
    _require(dist.coordinator_address is None or re.fullmatch(r"[^:\s]+:\d+", dist.coordinator_address),
             f"distributed.coordinator_address={dist.coordinator_address} is not allowed; it must be host:port "
             f"or null (detected)")


def task_names() -> list[str]:
    """The options of the ``task`` config group (file stems of conf/task/)."""
    from importlib import resources

    return sorted(f.name[:-5] for f in resources.files(CONFIG_PACKAGE).joinpath("task").iterdir()
                  if f.name.endswith(".yaml"))


def _validate_family(cfg) -> None:
    """``meta_tasks`` names known tasks once each and divides the particles (and devices) evenly."""
    if not cfg.meta_tasks:
        return
    names, count = task_names(), len(cfg.meta_tasks)
    for name in cfg.meta_tasks:
        _require(name in names, f"meta_tasks: {name} is not a task; choose from: {', '.join(names)}")
    _require(len(set(cfg.meta_tasks)) == count, f"meta_tasks={list(cfg.meta_tasks)} names a task twice")
    _require(cfg.num_tasks % count == 0, f"num_tasks={cfg.num_tasks} is not allowed with {count} meta_tasks; it "
             f"must be a multiple of {count} (each task gets num_tasks / {count} particle pairs)")
    _require(cfg.pes_devices is None or cfg.num_tasks // count % cfg.pes_devices == 0,
             f"pes_devices={cfg.pes_devices} is not allowed: it must divide each of the {count} meta_tasks' particle pairs")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(cfg, *keys: str) -> None:
    for key in keys:
        value = cfg[key]
        _require(value > 0, f"{key}={value} is not allowed; it must be > 0")


def validate(cfg) -> None:
    """Refuse values no run can use, with one line naming the key and what is allowed."""
    from lagg_pipeline.data import DATASETS, split_sizes

    _require(cfg.mode in MODES, f"mode={cfg.mode} is not allowed; choose one of: {', '.join(MODES)}")
    name = cfg.optimizer.get("name")
    allowed = HAND_OPTIMIZERS + LEARNED_OPTIMIZERS
    _require(name in allowed, f"optimizer={name} is not allowed; choose one of: {', '.join(allowed)}")
    _positive(cfg, "num_grads", "num_local_steps", "local_batch_size", "local_learning_rate",
              "learning_rate", "slowmo_learning_rate", "num_runs", "num_rounds", "eval_every",
              "hidden_size", "num_tasks", "trunc_length", "pes_std", "num_inner_steps",
              "truncation_schedule_min_length", "num_outer_steps", "save_iter",
              "checkpoints_to_keep", "meta_init_scale")
    _require(cfg.trunc_length >= 2, f"trunc_length={cfg.trunc_length} is not allowed; it must be >= 2 (a "
             f"one-round truncation that resets has no unmasked step, so its PES estimate is undefined)")
    starts_saved = cfg.meta_init == "saved"  # pretrained= / checkpoint= is where a meta-training starts
    _require(not cfg.resume or (cfg.mode in ("auto", "meta_train")
                                and (starts_saved or (cfg.checkpoint is None and cfg.pretrained is None))),
             f"resume=true is not allowed with mode={cfg.mode}"
             f"{' and a saved aggregator' if cfg.checkpoint or cfg.pretrained else ''}; it continues a meta-training "
             f"(mode=auto or meta_train with a learned optimizer)")
    _require(cfg.mode != "warm" or (name in LEARNED_OPTIMIZERS and not cfg.checkpoint and not cfg.pretrained),
             f"mode=warm is not allowed with optimizer={name}"
             f"{' and a saved aggregator' if cfg.checkpoint or cfg.pretrained else ''}; it compiles a meta-training "
             f"step: a learned optimizer ({', '.join(LEARNED_OPTIMIZERS)}) without checkpoint= or pretrained=")
    _require(cfg.mode != "warm" or cfg.compile_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR"),
             "mode=warm is not allowed with compile_cache_dir=null; it fills XLA's persistent compilation cache")
    _validate_distributed(cfg)
    # With several processes the device count is known only after jax.distributed starts.
    if name in LEARNED_OPTIMIZERS and cfg.pes_devices is not None and not cfg.distributed.enabled:
        from lagg_pipeline.meta.devices import particle_devices

        try:
            particle_devices(cfg.pes_devices, cfg.num_tasks)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    _require(cfg.meta_loss_split in META_LOSS_SPLITS,
             f"meta_loss_split={cfg.meta_loss_split} is not allowed; choose one of: {', '.join(META_LOSS_SPLITS)}")
    weight = cfg.meta_loss_train_weight
    _require(0 <= weight <= 1 and (weight == 0 or cfg.meta_loss_split != "train"),
             f"meta_loss_train_weight={weight} is not allowed with meta_loss_split={cfg.meta_loss_split}; it must be "
             f"in [0, 1] and mixes the training loss into a held-out meta-loss (outer_valid or resplit)")
    trains = (name in LEARNED_OPTIMIZERS and cfg.mode in ("auto", "meta_train", "warm")
              and (starts_saved or not (cfg.checkpoint or cfg.pretrained)))
    _require(cfg.meta_loss_split != "resplit" or cfg.partition.name == "iid" or not trains,
             f"meta_loss_split=resplit is not allowed with partition={cfg.partition.name}; it re-divides the whole "
             f"pool per episode: meta-train over clients with meta_loss_split=train or outer_valid")
    _validate_family(cfg)
    _require(cfg.meta_init in META_INITS,
             f"meta_init={cfg.meta_init} is not allowed; choose one of: {', '.join(META_INITS)}")
    _require(cfg.meta_init != "averaging" or cfg.hidden_size >= 2,
             f"hidden_size={cfg.hidden_size} is not allowed with meta_init=averaging; it must be >= 2")
    _require(cfg.fedavg_local_learning_rate is None or cfg.fedavg_local_learning_rate > 0,
             f"fedavg_local_learning_rate={cfg.fedavg_local_learning_rate} is not allowed; it must be > 0 or null")
    _require(0 <= cfg.beta < 1, f"beta={cfg.beta} is not allowed; it must be in [0, 1)")
    _require(cfg.weight_decay >= 0, f"weight_decay={cfg.weight_decay} is not allowed; it must be >= 0")
    _require(cfg.truncation_schedule_min_length <= cfg.num_inner_steps,
             f"truncation_schedule_min_length={cfg.truncation_schedule_min_length} is not allowed; "
             f"it must be <= num_inner_steps={cfg.num_inner_steps}")
    from lagg_pipeline.data.partition import check_partition

    try:
        check_partition(cfg.partition, cfg.num_grads, cfg.task.dataset)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    task = cfg.task
    _require(task.dataset in DATASETS,
             f"task.dataset={task.dataset} is not allowed; choose one of: {', '.join(DATASETS)}")
    _require(task.model in MODELS, f"task.model={task.model} is not allowed; choose one of: {', '.join(MODELS)}")
    _require(all(h > 0 for h in task.hidden_sizes),
             f"task.hidden_sizes={list(task.hidden_sizes)} is not allowed; sizes must be > 0")
    _require(task.image_size is None or task.image_size > 0,
             f"task.image_size={task.image_size} is not allowed; it must be > 0 or null")
    _require(task.model != "conv" or len(DATASETS[task.dataset].image_shape) == 3,
             f"task.model=conv is not allowed for {task.dataset}, whose examples are not images; use mlp")
    _require(task.image_size is None or len(DATASETS[task.dataset].image_shape) == 3,
             f"task.image_size={task.image_size} is not allowed for {task.dataset}, whose examples are not images; "
             f"it must be null")
    n_train = split_sizes(task.dataset)["train"]
    _require(cfg.local_batch_size <= n_train,
             f"local_batch_size={cfg.local_batch_size} is not allowed; it must be <= {n_train}, "
             f"the size of {task.dataset}'s train split")
    _require(cfg.schedule.name in ("warmup_cosine", "constant"),
             f"schedule={cfg.schedule.name} is not allowed; choose one of: warmup_cosine, constant")
    if name in LEARNED_OPTIMIZERS and cfg.schedule.name == "warmup_cosine":
        _require(cfg.num_outer_steps > cfg.schedule.warmup_steps,
                 f"num_outer_steps={cfg.num_outer_steps} is not allowed with a warmup-cosine schedule; it must "
                 f"be > schedule.warmup_steps={cfg.schedule.warmup_steps} (or use schedule=constant)")
    if cfg.pretrained is not None and cfg.pretrained != "list":
        from lagg_pipeline import pretrained

        shipped = pretrained.names(name) if name in LEARNED_OPTIMIZERS else []
        _require(name in LEARNED_OPTIMIZERS,
                 f"pretrained={cfg.pretrained} is not allowed with optimizer={name}; shipped aggregators are "
                 f"learned: optimizer={', '.join(sorted({v for v, _ in pretrained.available()}))}")
        _require(cfg.pretrained in shipped, f"pretrained={cfg.pretrained} is not allowed for optimizer={name}; "
                 f"choose one of: {', '.join(shipped) or '(none shipped)'} (pretrained=list describes them)")
        _require(cfg.checkpoint is None, "pretrained and checkpoint are both set; give one of them")
    if cfg.mode == "import_legacy":
        _require(cfg.legacy_path is not None, "legacy_path is required with mode=import_legacy")
        _require(name in LEARNED_OPTIMIZERS,
                 f"optimizer={name} is not allowed with mode=import_legacy; choose one of: "
                 f"{', '.join(LEARNED_OPTIMIZERS)}")

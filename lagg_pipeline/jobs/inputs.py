"""Checks of what a job names (saved aggregators, legacy files, the tracking server) and of
keys it would accept without using them; run by the command line before Hydra creates anything."""
from __future__ import annotations

from lagg_pipeline.config import LEARNED_OPTIMIZERS, ConfigError
from lagg_pipeline.errors import UserError
from lagg_pipeline.jobs.common import jax_tree
from lagg_pipeline.jobs.saved import adopted_settings, read_saved


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def refuse_unused_keys(cfg) -> None:
    """A key the job would not use is refused, never silently ignored."""
    name = cfg.optimizer.name
    learned = name in LEARNED_OPTIMIZERS
    saved = "pretrained" if cfg.pretrained not in (None, "list") else "checkpoint" if cfg.checkpoint else None
    if cfg.mode == "meta_train":
        _require(learned, f"mode=meta_train needs a learned optimizer ({', '.join(LEARNED_OPTIMIZERS)}); "
                          f"optimizer={name} is hand-designed")
        _require(saved is None or cfg.meta_init == "saved",
                 f"{saved}={saved and cfg[saved]} is not used by mode=meta_train with meta_init={cfg.meta_init}; "
                 f"meta_init=saved continues meta-training from it, mode=benchmark benchmarks it")
    _require(cfg.meta_init != "saved" or (cfg.mode == "meta_train" and saved is not None),
             f"meta_init=saved is not allowed with mode={cfg.mode}"
             f"{'' if saved else ' and neither pretrained= nor checkpoint='}; it starts mode=meta_train from the "
             f"aggregator named by pretrained=<name> or checkpoint=<meta_params.npz>")
    _require(learned or cfg.checkpoint is None,
             f"checkpoint={cfg.checkpoint} is not used by optimizer={name}, a hand-designed optimizer without "
             f"meta-parameters; checkpoint= is for {', '.join(LEARNED_OPTIMIZERS)}")
    _require(cfg.fedavg_local_learning_rate is None or (learned and cfg.with_fedavg and cfg.mode != "meta_train"),
             f"fedavg_local_learning_rate={cfg.fedavg_local_learning_rate} is not used here; it sets the gamma of "
             f"the FedAvg baseline beside a benchmarked learned optimizer (with_fedavg=true)"
             + ("; for this optimizer use local_learning_rate" if not learned else ""))
    benchmarks_saved = saved is not None or cfg.mode == "benchmark"
    _require(not (cfg.skip_finished and learned and not benchmarks_saved),
             f"skip_finished=true is not used when optimizer={name} meta-trains (mode={cfg.mode}); it skips the "
             f"benchmark of a hand-designed optimizer or of a saved aggregator (pretrained=, checkpoint=) whose "
             f"settings finished before in the MLflow experiment")
    _require(not (cfg.skip_finished and learned and cfg.with_fedavg),
             f"skip_finished=true with optimizer={name} needs with_fedavg=false: the FedAvg run beside it is a "
             f"benchmark of its own (run optimizer=fedavg with skip_finished=true for it)")
    _require(not cfg.skip_finished or cfg.tracking.enabled,
             "skip_finished=true needs tracking.enabled=true (it looks for the finished runs in the MLflow "
             "experiment); set skip_finished=false to run without tracking")


def check_data(cfg) -> None:
    """Every dataset the job reads (its task's and, for a family, each member's) is readable here:
    a public one that is not prepared stops the job before anything is written (UserError)."""
    if cfg.mode in ("report", "select_tuned", "recommend"):
        return
    from lagg_pipeline.data.splits import DataUnavailableError, require_available

    datasets = {cfg.task.dataset: ""}
    if cfg.meta_tasks:
        from lagg_pipeline.meta.family import task_config

        datasets.update({task_config(t).dataset: f"meta_tasks: {t}: " for t in cfg.meta_tasks if t != cfg.task.name})
    for dataset, where in datasets.items():
        try:
            require_available(dataset, cfg.data_dir)
        except DataUnavailableError as err:
            raise UserError(f"{where}{err}") from None


def check_inputs(cfg, given: set[str]) -> None:
    """Refuse, before Hydra creates anything, the inputs a job names that cannot work: a
    missing, garbled or incompatible saved aggregator (or one whose own K, H, gamma, B no run
    here can use), a legacy file the importer refuses, an unreachable tracking server, a key
    the job would not use. ``given``: the keys the command line sets."""
    import os

    refuse_unused_keys(cfg)
    check_data(cfg)
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
    if cfg.pretrained not in (None, "list"):
        from lagg_pipeline import pretrained

        location = str(pretrained.path(name, cfg.pretrained))
    if name in LEARNED_OPTIMIZERS and location and "://" not in location and not location.startswith("runs:/"):
        meta_params, metadata = read_saved(location, name, ConfigError)
        # A benchmark runs with the settings it was meta-trained with; meta_init=saved trains it with these.
        adopted = cfg if cfg.meta_init == "saved" else adopted_settings(cfg, metadata, given)[0]
        from lagg_pipeline.aggregators.learned import LearnedAggregator

        try:
            LearnedAggregator(name, adopted.num_grads, adopted.hidden_size).server_update(jax_tree(meta_params))
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

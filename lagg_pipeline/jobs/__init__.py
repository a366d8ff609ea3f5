"""What one Hydra job does, one module per mode; :func:`run_job` dispatches on ``mode``.

``auto`` is a benchmark for a hand-designed optimizer or a saved aggregator, and a
meta-training followed by a benchmark otherwise."""
from __future__ import annotations

from lagg_pipeline.config import LEARNED_OPTIMIZERS, ConfigError, validate


def run_job(cfg):
    """Entry of every Hydra job (also of each job of a --multirun sweep)."""
    from lagg_pipeline.jobs.inputs import refuse_unused_keys

    validate(cfg)
    refuse_unused_keys(cfg)
    if cfg.pretrained == "list":
        from lagg_pipeline import pretrained

        print(pretrained.describe())
        return None
    if cfg.mode == "import_legacy":
        from lagg_pipeline.jobs.import_legacy import import_legacy_job

        return import_legacy_job(cfg)
    if cfg.mode == "select_tuned":
        from lagg_pipeline.jobs.select_tuned import select_tuned_job

        return select_tuned_job(cfg)
    if cfg.mode == "report":
        from lagg_pipeline.jobs.report import report_job

        return report_job(cfg)
    if cfg.mode == "recommend":
        from lagg_pipeline.jobs.recommend import recommend_job

        return recommend_job(cfg)
    from lagg_pipeline.jobs import benchmark

    if cfg.optimizer.name not in LEARNED_OPTIMIZERS:
        cfg = benchmark.with_tuned_values(cfg)
        done = benchmark.finished_before(cfg) if cfg.skip_finished else None  # before any data is read
        return done if done is not None else benchmark.hand_job(cfg, *prepare(cfg))
    splits, task = prepare(cfg)
    if cfg.mode == "warm":
        from lagg_pipeline.jobs.warm import warm_job

        return warm_job(cfg, splits, task)
    if cfg.mode == "meta_train":
        from lagg_pipeline.jobs.meta_train import meta_train_job

        return meta_train_job(cfg, splits, task)
    return benchmark.learned_job(cfg, splits, task)


def prepare(cfg):
    """Join the other processes (if any), enable XLA's cache, load the task: (splits, task)."""
    from lagg_pipeline import xla_cache
    from lagg_pipeline.jobs.common import load_task

    if cfg.distributed.enabled:
        from lagg_pipeline.meta.devices import particle_devices, start_distributed

        start_distributed(cfg.distributed)  # before the data reach a device
        try:  # the device count is known only now
            particle_devices(cfg.pes_devices, 2 * cfg.num_tasks)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    xla_cache.enable(cfg.compile_cache_dir)
    return load_task(cfg)

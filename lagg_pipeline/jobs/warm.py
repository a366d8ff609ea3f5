"""mode=warm: compile the meta-training step a configuration would run into XLA's persistent
cache, and run nothing. A later job with the same settings on this machine loads the step
instead of compiling it; ``make install`` warms ``make run``'s, the first wait a new user meets."""
from __future__ import annotations

import jax

from lagg_pipeline.jobs.common import learned_aggregator


def warm_job(cfg, splits, task) -> float:
    """Compile (no MLflow run, no checkpoint, no output but one line); the compile's seconds."""
    from lagg_pipeline.meta.family import meta_problem
    from lagg_pipeline.meta.train import MetaTrainer

    trainer = MetaTrainer(cfg, *meta_problem(cfg, splits, task), learned_aggregator(cfg))
    seconds = trainer.compile()  # from init's shapes: nothing is computed
    print(f"warm: compiled the {cfg.optimizer.name} meta-training step on {cfg.task.name} (K={cfg.num_grads}, "
          f"H={cfg.num_local_steps}) in {seconds:.1f} s into {jax.config.jax_compilation_cache_dir}; a job with "
          f"these settings loads it instead")
    return seconds

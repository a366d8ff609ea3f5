"""skip_finished=true: a benchmark whose settings already finished in the job's MLflow experiment
is not run again (a hand-designed optimizer's, or a saved aggregator's with the same file).

A tuning grid or the Results' baselines take hours on 2 cores and are cut by sessions, schedulers
and preemption; with this set (the grid recipes and ``make results`` set it), running the same
sweep again runs only the points that have not finished. "The same" is every key of the job's
config that can change its numbers (seeds, rounds, tuned values as applied, ...), compared with
the params the finished run logged; a run logged before a key existed differs and runs again.
The code's version is not compared: after a change to what a benchmark computes, run with
``skip_finished=false``.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from lagg_pipeline import tracking
from lagg_pipeline.report.identity import NOT_SETTINGS, NOT_SETTINGS_PREFIXES

# The report's bookkeeping keys, less those that make a different point to run: the seeds (the
# report pools over them) and where the meta-parameters come from (the file's digest decides too).
IGNORED = NOT_SETTINGS - {"seed", "num_runs", "pretrained", "checkpoint", "with_fedavg", "fedavg_local_learning_rate"}


def _settings(params: dict) -> dict[str, str]:
    return {k: v for k, v in params.items() if k not in IGNORED and not k.startswith(NOT_SETTINGS_PREFIXES)}


def settings_of(cfg) -> dict[str, str]:
    """The job's settings as its run logs them (strings, as :meth:`tracking.Run.log_params` writes)."""
    flat = tracking.flatten(OmegaConf.to_container(cfg, resolve=True))
    return _settings({k: str(v)[:6000] for k, v in flat.items()})


def finished_run(cfg, method: str, digest: str | None = None):
    """The newest FINISHED run of ``method`` in the job's experiment with exactly this job's settings
    (and, for a saved aggregator, the same meta-parameter file: its sha256 ``digest``), or None."""
    client, experiment_id = tracking.client(cfg.tracking)
    query = (f"attributes.status = 'FINISHED' and tags.method = '{method}' and tags.task = '{cfg.task.name}' "
             f"and tags.H = '{cfg.num_local_steps}' and tags.K = '{cfg.num_grads}'")
    if digest is not None:
        query += f" and tags.meta_params_sha256 = '{digest}'"
    wanted = settings_of(cfg)
    for run in client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"],
                                 max_results=50000):
        if _settings(run.data.params) == wanted and "final_outer_valid_loss" in run.data.metrics:
            return run
    return None

"""mode=benchmark (and the benchmark half of mode=auto): run the protocol for a server update,
record it, print the comparison."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from lagg_pipeline.data.partition import partition_label
from lagg_pipeline.jobs.common import (FEDAVG, chosen_keys, end_status, hand_server_update, learned_aggregator,
                                       output_dir, run_title, start_job_run)


def log_benchmark(run, result, out: Path) -> None:
    """Curves (mean and std over seeds, step = round), final metrics, plot and raw arrays.

    MLflow refuses non-finite values: a run that diverged keeps the finite part of its
    curves and is tagged ``diverged`` (with the round), so it never looks like missing data."""
    from lagg_pipeline import tuning
    from lagg_pipeline.report.plots import plot_curves
    from lagg_pipeline.report.run_summary import diverged_at, summary

    rounds = np.arange(1, result.train_loss.shape[1] + 1)
    series = {"train_loss": (rounds, result.train_loss.mean(0)),
              "train_loss_std": (rounds, result.train_loss.std(0))}
    for name in ("test_loss", "test_accuracy", "outer_valid_loss", "outer_valid_accuracy"):
        values = getattr(result, name)
        series[name] = (result.eval_rounds, values.mean(0))
        series[f"{name}_std"] = (result.eval_rounds, values.std(0))
    series["seconds_per_round"] = ([0], [result.seconds_per_round])
    series["compile_seconds"] = ([0], [result.compile_seconds])
    for name, (mean, std) in summary(result).items():
        series[f"final_{name}"] = ([0], [mean])
        series[f"final_{name}_std"] = ([0], [std])
    series[tuning.DIVERGED_SEEDS] = ([0], [tuning.diverged_seeds(result)])  # the tuning never picks such a point
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
    from lagg_pipeline.report.plots import plot_curves
    from lagg_pipeline.report.run_summary import format_summary, summary

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


def with_tuned_values(cfg, given: set[str] | None = None, how_to_change: str = "tuned=false turns them off"):
    """Apply the recorded tuned values of this task/optimizer/H/K (tuned=true), saying which.
    ``given``: the keys that keep their value (default: those the user chose)."""
    from lagg_pipeline import tuning

    if not cfg.tuned:
        return cfg
    cfg, applied, tuned_over = tuning.apply(cfg, chosen_keys() if given is None else given,
                                            root=Path(cfg.tuned_dir) if cfg.tuned_dir else None)
    if applied:
        clients = partition_label(cfg.partition)
        where = "" if clients == "iid" else (f" over clients {clients}" if tuned_over == clients else
                                             f" on i.i.d. data (none tuned over clients {clients})")
        print(f"{cfg.optimizer.name}: tuned values for {cfg.task.name} H={cfg.num_local_steps} K={cfg.num_grads}{where} "
              f"(conf/tuned_hparams; {how_to_change}): " + ", ".join(f"{k}={v}" for k, v in applied.items()))
    return cfg


def fedavg_baseline_config(cfg):
    """FedAvg beside a learned aggregator, at the same K and H. Its gamma is its own tuned one
    (the learned aggregator's gamma is no choice for FedAvg) unless fedavg_local_learning_rate sets it."""
    baseline = cfg.copy()
    baseline.optimizer = OmegaConf.create(FEDAVG)
    if cfg.fedavg_local_learning_rate is not None:
        baseline.local_learning_rate = cfg.fedavg_local_learning_rate
        print(f"fedavg baseline: local_learning_rate={baseline.local_learning_rate} (fedavg_local_learning_rate)")
        return baseline
    before = baseline.local_learning_rate
    baseline = with_tuned_values(baseline, chosen_keys() - {"local_learning_rate"},
                                 "fedavg_local_learning_rate= sets the baseline's gamma")
    if baseline.local_learning_rate == before:
        print(f"fedavg baseline: local_learning_rate={before}, this job's (no tuned value applies; "
              f"fedavg_local_learning_rate= sets it)")
    return baseline


def finished_before(cfg, method: str | None = None, digest: str | None = None) -> float | None:
    """skip_finished=true: the outer-valid loss of a finished run of ``method`` (default: the
    optimizer) with this job's settings and meta-parameter file (``digest``), said; or None."""
    from lagg_pipeline.jobs.finished import finished_run

    method = method or cfg.optimizer.name
    done = finished_run(cfg, method, digest)
    if done is None:
        return None
    print(f"{run_title(cfg, method)}: these settings finished in run {done.info.run_id} of experiment "
          f"{cfg.tracking.experiment}; not run again (skip_finished=false runs it anew)")
    return done.data.metrics["final_outer_valid_loss"]


def hand_job(cfg, splits, task):
    """A hand-designed optimizer at the values in ``cfg`` (its tuned ones applied by the caller,
    :func:`with_tuned_values`): benchmark it; returns its outer-valid loss."""
    name = cfg.optimizer.name
    result = benchmark(cfg, hand_server_update(cfg.optimizer), name, splits, task)
    return finish([result], output_dir())[name]["outer_valid_loss"]


def learned_job(cfg, splits, task):
    """A learned optimizer: benchmark the saved aggregator named by checkpoint= or pretrained=,
    or meta-train one first (then also the recommended shipped aggregator); beside it FedAvg. Returns its outer-valid loss."""
    from lagg_pipeline.jobs.meta_train import meta_train
    from lagg_pipeline.jobs.saved import (adopt_training_settings, checked_server_update, load_meta_params,
                                          shipped_counterpart)

    name = cfg.optimizer.name
    if cfg.mode == "benchmark" or cfg.checkpoint or cfg.pretrained:
        meta_params, metadata, digest = load_meta_params(cfg)
        cfg = adopt_training_settings(cfg, metadata)
        method = f"{name}@{cfg.pretrained}" if cfg.pretrained else name  # the report tells them apart
        done = finished_before(cfg, method, digest) if cfg.skip_finished else None
        if done is not None:
            return done
        aggregator = learned_aggregator(cfg)
        server_update = checked_server_update(aggregator, meta_params)
        run = start_job_run(cfg, name, splits, checkpoint=cfg.pretrained or cfg.checkpoint, meta_params_sha256=digest)
        shipped = None
    else:
        aggregator = learned_aggregator(cfg)
        meta_params, run = meta_train(cfg, splits, task, aggregator)
        server_update = aggregator.server_update(meta_params)
        method, shipped = name, shipped_counterpart(cfg)
    try:
        results = [benchmark(cfg, server_update, method, splits, task, run=run)]
        if shipped is not None:  # what a longer meta-training gives, beside this short one
            shipped_cfg = cfg.copy()
            shipped_cfg.pretrained = shipped
            shipped_params, metadata, digest = load_meta_params(shipped_cfg)
            shipped_cfg = adopt_training_settings(shipped_cfg, metadata)
            results.append(benchmark(shipped_cfg, checked_server_update(aggregator, shipped_params),
                                     f"{name}@{shipped}", splits, task, baseline_for=run.run_id,
                                     meta_params_sha256=digest))
        if cfg.with_fedavg:
            baseline = fedavg_baseline_config(cfg)
            results.append(benchmark(baseline, hand_server_update(baseline.optimizer), "fedavg", splits, task,
                                     baseline_for=run.run_id))
        final = finish(results, output_dir(), run)
    except BaseException as err:
        run.end(end_status(err))
        raise
    run.end()
    return final[method]["outer_valid_loss"]

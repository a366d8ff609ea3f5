"""mode=report: gather (the store's runs and the committed results) -> judge -> render -> write,
once each and in that order (:mod:`lagg_pipeline.report`); every output is checked before the
first run is read."""
from __future__ import annotations

from pathlib import Path

from lagg_pipeline.errors import UserError
from lagg_pipeline.jobs.common import output_dir
from lagg_pipeline.report import archive
from lagg_pipeline.report.judge import judge_groups
from lagg_pipeline.report.render import render
from lagg_pipeline.report.write import check, write


def report_job(cfg) -> str:
    return run_report(cfg, output_dir())


def run_report(cfg, out: Path) -> str:
    """Build, print, save and log the comparison of ``tracking.experiment``."""
    from lagg_pipeline import tracking

    targets = check(cfg, out)
    notes: list[str] = []
    note = lambda line: (print(line), notes.append(line))
    groups = archive.gather(cfg, note)
    if not groups:
        raise UserError(f"experiment {cfg.tracking.experiment} has no finished benchmark runs to report")
    rendered = render(judge_groups(groups), targets, notes)
    write(targets, rendered, f"Comparison: MLflow experiment {cfg.tracking.experiment}")
    if cfg.results_archive:
        archive.save(Path(cfg.results_archive), groups)
        print(f"updated the committed results in {cfg.results_archive}")
    print(rendered.report)
    run = tracking.start_run(cfg.tracking, f"report {cfg.tracking.experiment}", {"kind": "report"})
    run.log_artifact(out, "report")
    run.end()
    print(f"report: {out / 'report.md'}")
    return rendered.report

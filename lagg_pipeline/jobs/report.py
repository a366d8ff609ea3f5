"""mode=report: the comparison of an experiment's runs (:mod:`lagg_pipeline.comparison` collects
them, :mod:`lagg_pipeline.results_page` judges and writes them); with ``readme=`` the full
Results page is rewritten, with ``headline=`` also a short table of its verdicts (the README's)."""
from __future__ import annotations

import os
from pathlib import Path

from lagg_pipeline.jobs.common import output_dir

HEADLINE_BEGIN, HEADLINE_END = "<!-- headline:begin -->", "<!-- headline:end -->"


def report_job(cfg) -> str:
    from lagg_pipeline.comparison import BEGIN, END, check_markers, splice_readme
    from lagg_pipeline.errors import UserError
    from lagg_pipeline.results_page import headline

    if cfg.headline:
        if not cfg.readme:
            raise UserError("headline= summarises the Results page that readme= writes; set both")
        check_markers(Path(cfg.headline), HEADLINE_BEGIN, HEADLINE_END)  # before anything is written
    text = write_report(cfg, output_dir())
    if cfg.headline:
        page = Path(cfg.readme).read_text()
        results = page.split(BEGIN, 1)[1].split(END, 1)[0]
        link = Path(cfg.readme).resolve().relative_to(Path(cfg.headline).resolve().parent)
        splice_readme(Path(cfg.headline), headline(results, str(link)), HEADLINE_BEGIN, HEADLINE_END)
        print(f"updated the headline of {cfg.headline}")
    return text


def write_report(cfg, out: Path) -> str:
    """Build, print, save and log the comparison of ``tracking.experiment``."""
    from lagg_pipeline import results_page, tracking
    from lagg_pipeline.comparison import check_markers, collect, open_experiment, splice_readme
    from lagg_pipeline.errors import UserError

    if cfg.readme:  # before anything is written
        check_markers(Path(cfg.readme))
    client, _ = open_experiment(cfg.tracking)
    notes: list[str] = []
    groups = collect(client, cfg.tracking.experiment, warn=lambda line: (print(line), notes.append(line)))
    if not groups:
        raise UserError(f"experiment {cfg.tracking.experiment} has no finished benchmark runs to report")
    pages = results_page.judge_all(groups)  # a group without a common evaluation fails here, before writing
    targets = [out] + ([Path(cfg.report_dir)] if cfg.report_dir else [])
    for target in targets:
        text = results_page.markdown(pages, target, notes=notes)
        (target / "report.md").write_text(f"# Comparison: MLflow experiment {cfg.tracking.experiment}\n\n{text}")
    print(text)
    if cfg.readme:
        prefix = os.path.relpath(targets[-1], Path(cfg.readme).resolve().parent) + "/"
        shipped = ("Shipped aggregators (meta-training time on this project's 2-core machine, from each "
                   "file's metadata):\n\n" + results_page.shipped_table() + "\n\n")
        splice_readme(Path(cfg.readme), shipped + results_page.markdown(pages, targets[-1], image_prefix=prefix,
                                                                        notes=notes))
        print(f"updated the Results section of {cfg.readme}")
    run = tracking.start_run(cfg.tracking, f"report {cfg.tracking.experiment}", {"kind": "report"})
    run.log_artifact(out, "report")
    run.end()
    print(f"report: {out / 'report.md'}")
    return text

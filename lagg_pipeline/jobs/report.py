"""mode=report: the comparison of an experiment's runs (lagg_pipeline.comparison); with
``readme=`` the full Results page is rewritten, with ``headline=`` also a short table of its
verdicts (the README's)."""
from __future__ import annotations

from pathlib import Path

from lagg_pipeline.jobs.common import output_dir

HEADLINE_BEGIN, HEADLINE_END = "<!-- headline:begin -->", "<!-- headline:end -->"


def report_job(cfg) -> str:
    from lagg_pipeline.comparison import BEGIN, END, check_markers, report_job as comparison_report, splice_readme
    from lagg_pipeline.errors import UserError
    from lagg_pipeline.results_page import headline

    if cfg.headline:
        if not cfg.readme:
            raise UserError("headline= summarises the Results page that readme= writes; set both")
        check_markers(Path(cfg.headline), HEADLINE_BEGIN, HEADLINE_END)  # before anything is written
    text = comparison_report(cfg, output_dir())
    if cfg.headline:
        page = Path(cfg.readme).read_text()
        results = page.split(BEGIN, 1)[1].split(END, 1)[0]
        link = Path(cfg.readme).resolve().relative_to(Path(cfg.headline).resolve().parent)
        splice_readme(Path(cfg.headline), headline(results, str(link)), HEADLINE_BEGIN, HEADLINE_END)
        print(f"updated the headline of {cfg.headline}")
    return text

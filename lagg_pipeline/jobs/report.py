"""mode=report: the comparison of an experiment's runs (lagg_pipeline.comparison); with
``readme=`` the full Results page is rewritten, with ``headline=`` also a short table of its
verdicts (the README's)."""
from __future__ import annotations

import re
from pathlib import Path

from lagg_pipeline.jobs.common import output_dir

HEADLINE_BEGIN, HEADLINE_END = "<!-- headline:begin -->", "<!-- headline:end -->"
_LOWEST = "lowest train loss at every reported round from 100 on"


def report_job(cfg) -> str:
    from lagg_pipeline.comparison import BEGIN, END, report_job as comparison_report, splice_readme
    from lagg_pipeline.errors import UserError

    text = comparison_report(cfg, output_dir())
    if cfg.headline:
        if not cfg.readme:
            raise UserError("headline= summarises the Results page that readme= writes; set both")
        page = Path(cfg.readme).read_text()
        results = page.split(BEGIN, 1)[1].split(END, 1)[0]
        link = Path(cfg.readme).resolve().relative_to(Path(cfg.headline).resolve().parent)
        splice_readme(Path(cfg.headline), headline(results, str(link)), HEADLINE_BEGIN, HEADLINE_END)
        print(f"updated the headline of {cfg.headline}")
    return text


def headline(results: str, link: str) -> str:
    """One row per comparison of the generated Results, read from its verdict lines: which learned
    aggregators have the lowest train loss from round 100 on, which end with a lower held-out
    loss than the best baseline, and which match that baseline at every evaluation."""
    rows = ["| comparison | lowest train loss of all from round 100 | lower final held-out loss than the best "
            "baseline | matches it at every evaluation |", "|---|---|---|---|"]
    for section in re.split(r"^### ", results, flags=re.M)[1:]:
        title = section.splitlines()[0]
        verdicts = re.findall(r"^- \*\*(.+?)\*\*: (.*)$", section, flags=re.M)
        if not verdicts:
            continue
        best = re.search(r"(?:matches or beats|vs) (\w+)(?:'s| \()", verdicts[0][1])
        lowest = [m for m, v in verdicts if v.startswith(_LOWEST)]
        matching = [m for m, v in verdicts if "matches or beats" in v]
        below = [m for m, v in verdicts if m in matching or _ends_below(v)]
        anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        name = title.split(":")[0] if "clients:" not in title else ":".join(title.split(":")[:2])
        rows.append(f"| [{name}]({link}#{anchor}) | {', '.join(lowest) or 'none'} | {', '.join(below) or 'none'} "
                    f"| {', '.join(matching) or 'none'}{f' (best: {best.group(1)})' if best else ''} |")
    return "\n".join(rows)


def _ends_below(verdict: str) -> bool:
    found = re.search(r"outer-valid loss ([\d.e+-]+) at the last round vs \w+'s ([\d.e+-]+)", verdict)
    return bool(found) and float(found.group(1)) < float(found.group(2))

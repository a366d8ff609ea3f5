"""Render: the judged groups as the report's markdown, the Results page's block, the README's
headline and the plots (into the job's own folder; :mod:`write` puts them where they belong)."""
from __future__ import annotations

from typing import Sequence

from lagg_pipeline.report import headline, page
from lagg_pipeline.report.judge import Judged
from lagg_pipeline.report.write import Rendered, Targets

SHIPPED = "Shipped aggregators (meta-training time on this project's 2-core machine, from each file's metadata):"


def render(judged: list[Judged], targets: Targets, notes: Sequence[str] = ()) -> Rendered:
    images = page.plot(judged, targets.folders[0])
    results = ""
    if targets.readme:
        results = (f"{SHIPPED}\n\n{headline.shipped_table()}\n\n"
                   + page.markdown(judged, targets.image_prefix, notes))
    return Rendered(page.markdown(judged, "", notes), results,
                    headline.headline(judged, targets.link) if targets.headline else "", images)

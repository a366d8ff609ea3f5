"""Write: the report's files and the generated blocks of the docs. :func:`check` runs before any
run is read, so a bad ``readme=`` or ``headline=`` costs nothing and leaves every file as it was;
:func:`write` is the only stage that changes a file outside the job's own folder."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

from lagg_pipeline.errors import UserError
from lagg_pipeline.markers import check_markers, splice

RESULTS = ("<!-- results:begin -->", "<!-- results:end -->")
HEADLINE = ("<!-- headline:begin -->", "<!-- headline:end -->")


class Targets(NamedTuple):
    """Where a report goes, checked."""

    folders: list[Path]  # the job's own folder, then report_dir if given
    readme: Path | None  # the Results page whose generated block is replaced
    headline: Path | None  # the README whose headline block is replaced
    link: str  # the Results page relative to the headline's folder
    image_prefix: str  # the plots' folder relative to the Results page


def check(cfg, out: Path) -> Targets:
    """Every output checked before anything is read or written (one-line errors)."""
    readme = Path(cfg.readme) if cfg.readme else None
    headline = Path(cfg.headline) if cfg.headline else None
    if readme:
        check_markers(readme, *RESULTS)
    link = ""
    if headline:
        if readme is None:
            raise UserError("headline= summarises the Results page that readme= writes; set both")
        check_markers(headline, *HEADLINE)
        folder = headline.resolve().parent
        if not readme.resolve().is_relative_to(folder):
            raise UserError(f"readme={readme} lies outside {folder}, the folder of headline={headline}: the "
                            f"headline's links could not reach it; put the Results page under that folder")
        link = readme.resolve().relative_to(folder).as_posix()
    folders = [out] + ([Path(cfg.report_dir)] if cfg.report_dir else [])
    prefix = os.path.relpath(folders[-1].resolve(), readme.resolve().parent) + "/" if readme else ""
    return Targets(folders, readme, headline, link, prefix)


class Rendered(NamedTuple):
    report: str  # report.md's text (images beside it)
    results: str  # the Results page's generated block (images under the prefix)
    headline: str  # the README's headline block ("" without headline=)
    images: list[Path]  # written into the job's own folder by render


def write(targets: Targets, rendered: Rendered, title: str) -> None:
    """report.md (and the plots) into every folder; the Results page's and the README's blocks."""
    for folder in targets.folders:
        folder.mkdir(parents=True, exist_ok=True)
        for image in rendered.images:
            if image.parent.resolve() != folder.resolve():
                shutil.copy2(image, folder / image.name)
        (folder / "report.md").write_text(f"# {title}\n\n{rendered.report}")
    if targets.readme:
        splice(targets.readme, rendered.results, *RESULTS)
        print(f"updated the Results section of {targets.readme}")
    if targets.headline:
        splice(targets.headline, rendered.headline, *HEADLINE)
        print(f"updated the headline of {targets.headline}")

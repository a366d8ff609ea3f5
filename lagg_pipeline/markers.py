"""Generated blocks in markdown files: the text between a begin and an end marker is replaced
whole, so no number there is typed by hand (the report's pages, the bench's tables)."""
from __future__ import annotations

from pathlib import Path

from lagg_pipeline.errors import UserError


def check_markers(path: Path, begin: str, end: str) -> None:
    """A one-line error unless ``path`` exists and holds the ``begin`` ... ``end`` markers."""
    if not path.is_file():
        raise UserError(f"readme={path}: no such file")
    content = path.read_text()
    if begin not in content or end not in content or content.index(begin) > content.index(end):
        raise UserError(f"readme={path} has no {begin} ... {end} markers to put the results between")


def splice(path: Path, text: str, begin: str, end: str) -> None:
    """Replace what lies between the ``begin`` and ``end`` markers of ``path`` with ``text``."""
    check_markers(path, begin, end)
    head, rest = path.read_text().split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")

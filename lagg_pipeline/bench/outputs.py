"""Where a bench command's numbers go: a table between a markdown file's markers, a JSON file."""
from __future__ import annotations

import json
from pathlib import Path

from lagg_pipeline.markers import splice


def write_outputs(text: str, numbers: dict, command: str, readme, json_path, begin: str, end: str) -> None:
    """``text`` spliced between ``readme``'s markers (as ``$ command`` output) and ``numbers``
    dumped to ``json_path``; each only when given."""
    if readme:
        splice(Path(readme), f"```\n$ {command}\n{text}\n```", begin, end)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(numbers, f, indent=2)

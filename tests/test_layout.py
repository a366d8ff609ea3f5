"""The package's shape: no import circle (lazy imports count), no oversized module, the
layering kept, and every relative link of the README and docs/ resolving."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lagg_pipeline"
MAX_LINES = 300
# Low modules may not import high ones: data, aggregators, errors and tracking sit at the
# bottom; only the jobs (the composition root) and the command line import jobs.
LOW = ("lagg_pipeline.errors", "lagg_pipeline.data", "lagg_pipeline.aggregators", "lagg_pipeline.tracking")
HIGH = ("lagg_pipeline.jobs", "lagg_pipeline.cli", "lagg_pipeline.report", "lagg_pipeline.meta",
        "lagg_pipeline.benchmark", "lagg_pipeline.simulator")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere, inside functions too}."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from pkg import module" imports that module, "from module import name" the module
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules}
        graph[name] = found - {name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_circle():
    assert cycle(imports()) is None, " -> ".join(cycle(imports()))


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_low_modules_import_nothing_high():
    # a package __init__ re-exporting its children is no layering breach
    offenders = {(low, target) for low, targets in imports().items() if low.startswith(LOW)
                 for target in targets if target.startswith(HIGH)}
    assert not offenders


def test_no_module_exceeds_the_size_limit():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}


# Packages that read one way: each imports only itself and the core modules below it.
CORE = ("lagg_pipeline.errors", "lagg_pipeline.markers", "lagg_pipeline.config", "lagg_pipeline.tracking",
        "lagg_pipeline.data", "lagg_pipeline.aggregators", "lagg_pipeline.tasks", "lagg_pipeline.simulator",
        "lagg_pipeline.benchmark", "lagg_pipeline.xla_cache", "lagg_pipeline.xla_flags")
SELF_CONTAINED = {"lagg_pipeline.bench": CORE + ("lagg_pipeline.meta",),
                  "lagg_pipeline.report": CORE + ("lagg_pipeline.tuning", "lagg_pipeline.pretrained")}


@pytest.mark.parametrize("package", sorted(SELF_CONTAINED))
def test_self_contained_packages_import_only_core_modules(package):
    assert (PACKAGE / package.split(".")[-1] / "__init__.py").is_file()
    allowed = (package,) + SELF_CONTAINED[package]
    offenders = {(name, target) for name, targets in imports().items() if within(name, (package,))
                 for target in targets if not within(target, allowed)}
    assert not offenders


def test_the_report_reads_one_way():
    """collect -> judge -> render -> write: no stage imports a later one (recommend reads judgements only)."""
    order = ["curves", "identity", "collect", "judge", "recommend", "sentences", "plots", "page", "headline",
             "write", "render"]
    graph = imports()
    for i, stage in enumerate(order):
        later = {f"lagg_pipeline.report.{s}" for s in order[i + 1:]}
        assert not graph[f"lagg_pipeline.report.{stage}"] & later, stage


def test_judging_imports_no_jax():
    """The verdict is numpy arithmetic: importing it (and what it imports) starts no JAX."""
    import subprocess
    import sys

    code = "import sys, lagg_pipeline.report.judge, lagg_pipeline.report.recommend; print('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def within(module: str, packages: tuple[str, ...]) -> bool:
    """Whether ``module`` is one of ``packages`` or inside one (lagg_pipeline.benchmark is not in .bench)."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_every_mode_has_its_own_job_module():
    from lagg_pipeline.config import MODES

    jobs = {p.stem for p in (PACKAGE / "jobs").glob("*.py")}
    assert {m for m in MODES if m != "auto"} <= jobs


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M)}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(target)
    assert not broken


def test_the_readme_fits_on_a_few_screens():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


def test_setup_cfg_lists_every_package():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed

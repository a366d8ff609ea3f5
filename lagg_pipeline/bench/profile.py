"""Per-op profile of a PES outer step: which XLA ops take its time (``make bench-profile``).

One compiled PES outer step of LAgg-A (the bench's default shape) runs under ``jax.profiler``;
XLA's CPU runtime records every executed op (thunk) in the trace. Each op's self time (its
duration minus the ops nested in it, e.g. a while loop's body) is summed per op and per kind,
where the kind comes from the op's HLO in the compiled module: matmuls (dot / YNNPACK
fusions), random bits and integer hashing (threefry, the data sampler's Feistel network),
gathers and slicing, reductions, layout copies, other elementwise fusions (feature
construction, SGD updates, losses), and control flow. The summary says where the step's time
goes; the raw trace (``DIR/<task>/plugins/profile``) opens in Perfetto or TensorBoard.
"""
from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

import jax

from lagg_pipeline import xla_flags

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.-]+) = (?P<type>.+?) (?P<opcode>[a-z][a-z0-9-]*)\(")
_COMPUTATION = re.compile(r"^%(?P<name>[\w.-]+) .*\{$")
_CALLS = re.compile(r"calls=%([\w.-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
CONTROL = {"while", "conditional", "call"}


def _source_resolver(text: str):
    """``source(frame id) -> "file.py:line function"``: the innermost frame in this package,
    from the stack-frame tables XLA prints ahead of the module's computations."""
    tables, table = {name: {} for name in _TABLES}, None
    for line in text.splitlines():
        if line in _TABLES:
            table = line
        elif not line.strip() or line.startswith(("%", "ENTRY")):
            table = None
        elif table:
            number, rest = line.split(" ", 1)
            fields = dict(re.findall(r"(\w+)=(\d+)", rest))
            tables[table][int(number)] = fields or rest.strip('"')

    def location(frame: int):
        loc = tables["FileLocations"][int(tables["StackFrames"][frame]["file_location_id"])]
        return (tables["FileNames"][int(loc["file_name_id"])],
                tables["FunctionNames"][int(loc["function_name_id"])].rsplit(".", 1)[-1], loc["line"])

    def source(frame: int) -> str:
        for _ in range(64):  # a printed parent id p names frame p - 1; frame 0 ends the chain
            if frame not in tables["StackFrames"]:
                return ""
            path, function, line = location(frame)
            if "lagg_pipeline/" in path and "site-packages" not in path:
                return f"{path.split('lagg_pipeline/', 1)[1]}:{line} {function}"
            frame = int(tables["StackFrames"][frame]["parent_frame_id"]) - 1
        return ""

    return source


def parse_hlo(text: str) -> dict[str, dict]:
    """{instruction name: {"opcode", "type", "ops" (opcodes it runs, fused ones included),
    "op_name", "source"}} of a compiled module's text."""
    source = _source_resolver(text)
    computations, current = collections.defaultdict(list), None
    instructions = {}
    for line in text.splitlines():
        computation = _COMPUTATION.match(line)
        if computation:
            current = computation.group("name")
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        calls, op_name, frame = _CALLS.search(line), _OP_NAME.search(line), _FRAME.search(line)
        instructions[match.group("name")] = {
            "opcode": match.group("opcode"), "type": match.group("type"),
            "calls": calls.group(1) if calls else None,
            "op_name": op_name.group(1) if op_name else "",
            "source": source(int(frame.group(1))) if frame else ""}
        computations[current].append(match.group("opcode"))
    for info in instructions.values():
        fused = computations.get(info["calls"], []) if info["opcode"] == "fusion" else []
        info["ops"] = set(fused) | {info["opcode"]}
    return instructions


def op_kind(info: dict) -> str:
    """The kind of work one executed HLO op does (see the module docstring)."""
    ops = info["ops"]
    if info["opcode"] in CONTROL:
        return "control flow"
    if ops & {"dot", "convolution"}:
        return "matmul"
    if ops & {"shift-right-logical", "shift-left", "xor"} or info["type"].startswith("u32"):
        return "random bits / hashing"
    if ops & {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}:
        return "gather / slicing"
    if ops & {"reduce", "reduce-window"}:
        return "reduction"
    if ops <= {"copy", "transpose", "bitcast", "concatenate", "slice", "broadcast", "pad", "tuple",
               "get-tuple-element", "parameter", "fusion"}:
        return "copy / layout"
    return "elementwise"


def self_times(trace_events: list[dict]) -> dict[str, float]:
    """{event name: summed self time in µs}: each complete event minus the events nested in it
    on the same thread."""
    by_thread = collections.defaultdict(list)
    for event in trace_events:
        if event.get("ph") == "X" and "dur" in event:
            by_thread[(event.get("pid"), event.get("tid"))].append(event)
    totals = collections.Counter()
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [end, name, child time]
        for event in events:
            while stack and event["ts"] >= stack[-1][0]:
                _, name, child = stack.pop()
                totals[name] -= child
            if stack:
                stack[-1][2] += event["dur"]
            totals[event["name"]] += event["dur"]
            stack.append([event["ts"] + event["dur"], event["name"], 0.0])
        for _, name, child in stack:
            totals[name] -= child
    return dict(totals)


def _read_trace(directory: Path) -> list[dict]:
    path = max(directory.glob("plugins/profile/*/*perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(path) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def summarise(instructions: dict, times_us: dict, steps: int) -> dict:
    """Per-kind and per-op seconds per outer step, from the trace's self times."""
    by_kind, by_op, by_source = collections.Counter(), collections.Counter(), collections.Counter()
    for name, micros in times_us.items():
        info = instructions.get(name)
        if info is None:  # runtime bookkeeping, not an HLO op
            continue
        seconds = micros / 1e6 / steps
        by_kind[op_kind(info)] += seconds
        by_op[(name, op_kind(info), info["type"].split("{")[0], info["source"])] += seconds
        by_source[info["source"]] += seconds
    return {"by_kind": dict(by_kind.most_common()), "by_source": dict(by_source.most_common(15)),
            "top_ops": [{"op": n, "kind": k, "shape": shape, "source": s, "seconds": t}
                        for (n, k, shape, s), t in by_op.most_common(25)]}


def profile_pes_step(name: str, out_dir: Path, steps: int = 1) -> dict:
    """Trace ``steps`` compiled PES outer steps of task ``name`` into ``out_dir``; their summary."""
    from lagg_pipeline.bench import yardstick as bench

    task, splits = bench.load_task(name)
    trainer = bench.pes_trainer(task, splits.train)
    state = trainer.init()
    compiled = jax.jit(trainer._step).lower(state, trainer.data).compile()
    state, metrics = compiled(state, trainer.data)  # warm-up: the first run allocates
    jax.block_until_ready(metrics)
    with jax.profiler.trace(str(out_dir), create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = compiled(state, trainer.data)
            jax.block_until_ready(metrics)
    summary = summarise(parse_hlo(compiled.as_text()), self_times(_read_trace(out_dir)), steps)
    summary["traced_seconds_per_step"] = sum(summary["by_kind"].values())
    return summary


def format_summary(name: str, summary: dict, top: int = 12) -> str:
    """The per-kind, per-source and per-op shares of one task's PES step as text."""
    total = summary["traced_seconds_per_step"]
    share = lambda s: f"{s:>8.3g} {100 * s / total:>5.1f}%"
    lines = [f"{name}: PES outer step, {total:.3g} s of XLA ops (traced)", f"  {'kind':<40} {'s/step':>8} {'share':>6}"]
    lines += [f"  {kind:<40} {share(s)}" for kind, s in summary["by_kind"].items()]
    lines += ["", f"  {'source (innermost line of this package)':<40} {'s/step':>8} {'share':>6}"]
    lines += [f"  {source or '(no source)':<40} {share(s)}" for source, s in list(summary["by_source"].items())[:top]]
    lines += ["", f"  {'op':<30} {'kind':<22} {'shape':<22} {'s/step':>8} {'share':>6}  source"]
    lines += [f"  {op['op']:<30} {op['kind']:<22} {op['shape']:<22} {share(op['seconds'])}  {op['source']}"
              for op in summary["top_ops"][:top]]
    return "\n".join(lines)


def profile_tasks(names: list[str], out_dir: str) -> dict:
    """Profile every task's PES step; print the summaries and write DIR/profile.json."""
    out = Path(out_dir)
    summaries = {}
    for name in names:
        summaries[name] = profile_pes_step(name, out / name)
        print(format_summary(name, summaries[name]), "\n", flush=True)
    (out / "profile.json").write_text(json.dumps(summaries, indent=2))
    return summaries


def main(argv=None) -> dict:
    xla_flags.apply()  # a command-line entry point: set before JAX starts its backend
    import argparse

    from lagg_pipeline.bench.yardstick import TASKS

    parser = argparse.ArgumentParser(prog="python -m lagg_pipeline.bench.profile",
                                     description="Per-op profile of one PES outer step per task.")
    parser.add_argument("out_dir", help="where the traces and profile.json go")
    parser.add_argument("--tasks", default="digits_mlp,mnist1d_mlp", help="comma-separated subset of " + ", ".join(TASKS))
    args = parser.parse_args(argv)
    return profile_tasks(args.tasks.split(","), args.out_dir)


if __name__ == "__main__":
    main()

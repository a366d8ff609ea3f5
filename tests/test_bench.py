"""The speed yardstick: analytic FLOPs, a tiny run that yields every documented key, the profiler's parsing."""
import json

import numpy as np
import pytest

from lagg_pipeline.bench import profile as bench_profile
from lagg_pipeline.bench import yardstick as bench


def test_flop_counts_by_hand():
    # digits MLP 64 -> 32 -> 10: K*H*B = 4096 examples x 6 x (64*32 + 32*10)
    assert bench.round_flops((8, 8, 1), [32]) == 4096 * 6 * (64 * 32 + 32 * 10)
    # LAgg-A at K=8: 2,410 parameters x 2 x (46*32 + 32*32 + 32*2); LOpt-A's input is 39 wide
    assert bench.lagg_a_flops((8, 8, 1), [32]) == 2410 * 2 * (46 * 32 + 32 * 32 + 64)
    assert bench.lopt_a_flops((8, 8, 1), [32]) == 2410 * 2 * (39 * 32 + 32 * 32 + 64)
    assert bench.DEFAULT.pes_rounds == 800


def test_tiny_bench_writes_every_measure(tmp_path):
    path = tmp_path / "bench.json"
    bench.main(["--tasks", "digits_mlp", "--rounds", "3", "--repeats", "1", "--outer-steps", "0",
                "--json", str(path)])
    numbers = json.loads(path.read_text())
    assert numbers["matmul_gflops"] > 1
    for measure in ("fedavg_round", "lagg_a_round", "lopt_a_round"):
        for suffix in ("seconds", "compile_seconds", "gflop", "fraction_of_matmul_limit"):
            assert numbers[f"digits_mlp.{measure}_{suffix}"] > 0, (measure, suffix)
        # the share of the limit is FLOPs / (probe rate x time); "< 1" would fail whenever other
        # jobs slow the probe down more than the tiny round
        assert numbers[f"digits_mlp.{measure}_fraction_of_matmul_limit"] == pytest.approx(
            numbers[f"digits_mlp.{measure}_gflop"] / numbers["matmul_gflops"] / numbers[f"digits_mlp.{measure}_seconds"])
    assert numbers["digits_mlp.lagg_a_round_over_fedavg_round"] == (
        numbers["digits_mlp.lagg_a_round_seconds"] / numbers["digits_mlp.fedavg_round_seconds"])


HLO = """HloModule jit__step

FileNames
1 "/x/lagg_pipeline/tasks.py"
2 "/x/site-packages/haiku/basic.py"

FunctionNames
1 "forward"
2 "Linear.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=36 end_line=36 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=180 end_line=180 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}

%fused_computation.1 (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %ynn_fusion = f32[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(_step)/dot_general" stack_frame_id=2}
  %bits = u32[4]{0} shift-right-logical(%c, %c)
  ROOT %exponential.1 = f32[4,2]{1,0} exponential(%ynn_fusion), metadata={op_name="jit(_step)/exp"}
}
"""


def test_profile_kinds_sources_and_self_times():
    ops = bench_profile.parse_hlo(HLO)
    assert bench_profile.op_kind(ops["ynn_fusion"]) == "matmul"
    assert bench_profile.op_kind(ops["bits"]) == "random bits / hashing"
    assert bench_profile.op_kind(ops["exponential.1"]) == "elementwise"
    # the innermost frame of this package (XLA prints each parent id one above the frame it names)
    assert ops["ynn_fusion"]["source"] == "tasks.py:36 forward"
    # a while loop of 10 µs holding ops of 3 + 4 µs keeps 3 µs of its own
    events = [{"ph": "X", "pid": 1, "tid": 1, "name": n, "ts": ts, "dur": d}
              for n, ts, d in (("while.1", 0, 10), ("ynn_fusion", 1, 3), ("exponential.1", 5, 4))]
    times = bench_profile.self_times(events)
    assert times == {"while.1": 3, "ynn_fusion": 3, "exponential.1": 4}
    summary = bench_profile.summarise(ops, times, steps=1)
    assert summary["by_kind"] == {"elementwise": 4e-6, "matmul": 3e-6}


def test_exponent_fits_are_exact_on_power_laws():
    from lagg_pipeline.bench import scaling as bench_scaling

    x = [8, 16, 32]
    assert abs(bench_scaling.fit_exponent(x, [3e-3 * v ** 1.5 for v in x]) - 1.5) < 1e-9
    assert [round(e, 9) for e in bench_scaling.local_exponents(x, [1, 2, 8])] == [1.0, 2.0]


@pytest.mark.slow  # three PES compiles: ~2.5 min on the shared 2-core machine
def test_quick_scaling_sweep_table_plot_and_mlflow(tmp_path):
    from lagg_pipeline.bench import scaling as bench_scaling

    # two axes keep it to three compiled PES steps
    result = bench_scaling.main(["--quick", "--axes", "K,hidden", "--rounds", "2", "--repeats", "1",
                                 "--outer-steps", "1", "--out", str(tmp_path), "--mlflow"])
    # the base point is measured once but listed under every axis
    assert [(r["axis"], r[r["axis"]]) for r in result["rows"]] == [("K", 2), ("K", 4), ("hidden", 4), ("hidden", 8)]
    assert result["rows"][0] == {**result["rows"][2], "axis": "K"}
    assert [r["params"] for r in result["rows"][2:]] == [(64 * 4 + 4) + (4 * 10 + 10), (64 * 8 + 8) + (8 * 10 + 10)]
    for axis in ("K", "hidden"):
        for measure in bench_scaling.MEASURES:
            # two points: the fit is their local exponent (tiny shapes time overhead, not compute)
            exponent = result["exponents"][f"{axis}.{measure}"]
            assert np.isfinite(exponent)
            assert exponent == pytest.approx(result["exponents"][f"{axis}.{measure}.local"][0])
    table = (tmp_path / "scaling.md").read_text()
    assert table.count("\n| ") == 1 + 4 + 1 + 2  # header, 4 rows; header, 2 exponent rows
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert (tmp_path / "outputs" / "mlflow.db").exists()

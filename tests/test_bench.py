"""The speed yardstick: analytic FLOPs, and a tiny run that yields every documented key."""
import json

from lagg_pipeline import bench


def test_flop_counts_by_hand():
    # digits MLP 64 -> 32 -> 10: K*H*B = 4096 examples x 6 x (64*32 + 32*10)
    assert bench.round_flops((8, 8, 1), [32]) == 4096 * 6 * (64 * 32 + 32 * 10)
    # LAgg-A at K=8: 2,410 parameters x 2 x (46*32 + 32*32 + 32*2)
    assert bench.lagg_a_flops((8, 8, 1), [32]) == 2410 * 2 * (46 * 32 + 32 * 32 + 64)


def test_tiny_bench_writes_every_measure(tmp_path):
    path = tmp_path / "bench.json"
    bench.main(["--tasks", "digits_mlp", "--rounds", "3", "--repeats", "1", "--outer-steps", "0",
                "--json", str(path)])
    numbers = json.loads(path.read_text())
    assert numbers["matmul_gflops"] > 1
    for measure in ("fedavg_round", "lagg_a_round"):
        for suffix in ("seconds", "compile_seconds", "gflop", "fraction_of_matmul_limit"):
            assert numbers[f"digits_mlp.{measure}_{suffix}"] > 0, (measure, suffix)
        # nothing runs faster than the machine's own matmul rate
        assert numbers[f"digits_mlp.{measure}_fraction_of_matmul_limit"] < 1
    assert numbers["digits_mlp.lagg_a_round_over_fedavg_round"] == (
        numbers["digits_mlp.lagg_a_round_seconds"] / numbers["digits_mlp.fedavg_round_seconds"])

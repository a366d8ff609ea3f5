"""Committed results: a group's curves round-trip exactly, measured rows replace archived ones,
and the report judges archived groups beside the store's."""
import json

import numpy as np
import pytest

from lagg_pipeline.errors import UserError
from lagg_pipeline.report import archive
from lagg_pipeline.report.curves import Curves, GroupKey

KEY = GroupKey("mnist1d_large_mlp", 8, 4, 1000, 128, "iid")
SKEWED = GroupKey("mnist1d_mlp", 8, 4, 1000, 128, "dirichlet(alpha=0.1, M=64)")


def row(method, optimizer, level, valid_acc=True, shipped=None, seconds=None, tuned_rounds=None):
    rng = np.random.default_rng(len(method))
    train = (level + rng.random((3, 20))).astype(np.float32).astype(np.float64)
    evals = np.array([0, 10, 20])
    metric = lambda base: (base + rng.random((3, 3))).astype(np.float32).astype(np.float64)
    return Curves(method, optimizer, "local_learning_rate=0.5", optimizer == "fedavg", train, evals, metric(1.0),
                  metric(0.5), metric(0.9), metric(0.5) if valid_acc else None, shipped, seconds, tuned_rounds)


def test_a_group_round_trips_exactly_and_its_file_is_named_by_every_setting(tmp_path):
    rows = [row("lagg_a@x", "lagg_a", 0.1, shipped="lagg_a@x", seconds=812.5),
            row("fedavg", "fedavg", 0.3, valid_acc=False, tuned_rounds=1000)]
    path = archive.save_group(tmp_path, SKEWED, rows)
    assert path.name == "mnist1d_mlp_K8_H4_R1000_B128_dirichlet_alpha_0.1_M_64.npz"
    key, back = archive.load_group(path)
    assert key == SKEWED and [r.method for r in back] == ["lagg_a@x", "fedavg"]
    for a, b in zip(rows, back):
        for field in archive.FIELDS:
            assert getattr(a, field) == getattr(b, field)
        for name in archive.ARRAYS:
            if getattr(a, name) is None:
                assert getattr(b, name) is None
            else:
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_file_written_before_wall_times_and_tuning_horizons_were_kept_reads_them_as_not_recorded(tmp_path):
    path = archive.save_group(tmp_path, KEY, [row("fedavg", "fedavg", 0.3, seconds=60.0)])
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(arrays["__rows__"].tobytes().decode())
    del meta["rows"][0]["run_seconds"], meta["rows"][0]["tuned_rounds"]
    arrays["__rows__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez_compressed(path, **arrays)
    (back,) = archive.load_group(path)[1]
    assert back.run_seconds is None and back.tuned_rounds is None


def test_the_wall_time_line_sums_what_was_recorded_and_says_what_was_not():
    from lagg_pipeline.report import judge, page

    (j,) = judge.judge_groups({KEY: [row("lagg_a@x", "lagg_a", 0.1, seconds=600.0),
                                     row("fedavg", "fedavg", 0.3, seconds=1200.0), row("slowmo", "slowmo", 0.3)]})
    section = "\n".join(page.section(j, ""))
    assert "Wall time of its runs: 30 min (1 of 3 not recorded)." in section


def test_the_cost_table_ends_with_the_sum_over_groups_of_what_was_recorded():
    from lagg_pipeline.report import judge, page

    other = KEY._replace(H=8)
    judged = judge.judge_groups({KEY: [row("lagg_a@x", "lagg_a", 0.1, seconds=600.0), row("fedavg", "fedavg", 0.3, seconds=1200.0)],
                                 other: [row("lagg_a@x", "lagg_a", 0.1, seconds=1800.0), row("fedavg", "fedavg", 0.3)]})
    lines = page.cost_table(judged)
    grids = page.tuning_minutes(KEY) + page.tuning_minutes(other)
    assert len(lines) == 2 + 3 and lines[-1].startswith("| **all groups** |  |")
    assert lines[-1].endswith(f"| {page._minutes(grids)} | 60 min (1 of 4 not recorded) |")
    assert len(page.cost_table(judged[:1])) == 2 + 1  # one group: no sum line


def test_a_group_over_clients_counts_only_the_grids_run_over_those_clients():
    from lagg_pipeline import tuning
    from lagg_pipeline.report import page
    from lagg_pipeline.report.collect import BASELINE_ORDER

    entries = [tuning.lookup(SKEWED.task, name, SKEWED.H, SKEWED.K, None, SKEWED.partition) for name in BASELINE_ORDER]
    over_clients = [e for e in entries if e["partition"] == SKEWED.partition]  # the rest fall back to i.i.d.
    assert len(over_clients) == 4  # `make tune-federated`: fedavg, fedavgm, fedadam, diloco
    assert page.tuning_minutes(SKEWED) == [e["grid_minutes"] * 60 for e in over_clients]


def test_measured_rows_replace_archived_ones_and_the_rest_is_kept(tmp_path):
    old = {KEY: [row("fedavg", "fedavg", 0.9), row("slowmo", "slowmo", 0.9)], SKEWED: [row("fedavg", "fedavg", 0.9)]}
    archive.save(tmp_path, old)
    measured = {KEY: [row("fedavg", "fedavg", 0.2), row("lagg_a@y", "lagg_a", 0.1)]}
    groups, kept = archive.merge(archive.load(tmp_path), measured)
    assert set(groups) == {KEY, SKEWED} and kept == {KEY: ["slowmo"], SKEWED: ["fedavg"]}
    assert [r.method for r in groups[KEY]] == ["lagg_a@y", "fedavg", "slowmo"]  # the report's order: learned first
    fedavg = next(r for r in groups[KEY] if r.method == "fedavg")
    np.testing.assert_array_equal(fedavg.train_loss, measured[KEY][0].train_loss)  # the new measurement wins


def test_a_measured_namesake_that_relabels_an_archived_row_replaces_it():
    """A second step size of one shipped aggregator relabels both rows by γ: the archived row, under its old
    label, is the same method as the measured one at γ=0.5 and must not stand beside it."""
    shipped = lambda gamma: row("lagg_a@x", "lagg_a", 0.1, shipped="lagg_a@x")._replace(
        settings=f"local_learning_rate={gamma}, meta-params: shipped x")
    archived = {KEY: [shipped(0.5), row("fedavg", "fedavg", 0.3)]}
    measured = {KEY: [shipped(0.5)._replace(method="lagg_a@x (local_learning_rate=0.5)"),
                      shipped(1.0)._replace(method="lagg_a@x (local_learning_rate=1.0)")]}
    groups, kept = archive.merge(archived, measured)
    assert [r.method for r in groups[KEY]] == ["lagg_a@x (local_learning_rate=0.5)", "lagg_a@x (local_learning_rate=1.0)",
                                               "fedavg"] and kept == {KEY: ["fedavg"]}


def test_a_measured_row_that_shares_an_archived_label_but_not_its_identity_stands_beside_it():
    """One shipped aggregator measured at a second step size in a later store is labelled there
    without one (it has no namesake in that store): it must not replace the archived row at the
    first step size, and the two rows are told apart by what differs."""
    shipped = lambda gamma: row("lagg_a@x", "lagg_a", 0.1, shipped="lagg_a@x")._replace(
        settings=f"local_learning_rate={gamma}, meta-params: shipped x")
    stale_fedavg = row("fedavg", "fedavg", 0.3)._replace(settings="local_learning_rate=9.0")
    groups, kept = archive.merge({KEY: [shipped(1.0), stale_fedavg]}, {KEY: [shipped(2.0), row("fedavg", "fedavg", 0.2)]})
    assert [r.method for r in groups[KEY]] == ["lagg_a@x (local_learning_rate=1.0)", "lagg_a@x (local_learning_rate=2.0)",
                                               "fedavg"] and kept == {KEY: ["lagg_a@x"]}
    assert groups[KEY][2].settings == "local_learning_rate=0.5"  # a re-measured baseline replaces its namesake


def test_merging_again_keeps_the_labels_an_earlier_merge_gave():
    """The archive keeps the labels a merge gave two step sizes of one shipped aggregator; a later
    store that measures one of them again, labelled there without a suffix, must meet its archived
    namesake by the plain label: the same two labels come out, not a suffixed and a bare one."""
    shipped = lambda gamma: row("lagg_a@x", "lagg_a", 0.1, shipped="lagg_a@x")._replace(
        settings=f"local_learning_rate={gamma}, meta-params: shipped x")
    first, _ = archive.merge({KEY: [shipped(1.0)]}, {KEY: [shipped(2.0)]})
    labels = ["lagg_a@x (local_learning_rate=1.0)", "lagg_a@x (local_learning_rate=2.0)"]
    assert [r.method for r in first[KEY]] == labels
    again, kept = archive.merge(first, {KEY: [shipped(2.0)]})
    assert [r.method for r in again[KEY]] == labels and kept == {KEY: [labels[0]]}
    assert archive.merge(again, {})[0][KEY] == again[KEY]  # and from the archive alone, unchanged
    alone = row("lagg_a@y", "lagg_a", 0.1, shipped="lagg_a@y")._replace(
        method="lagg_a@y (local_learning_rate=0.5)")  # a suffix with no namesake left stays
    assert archive.merge({KEY: [alone]}, {})[0][KEY] == [alone]


def test_an_archived_baseline_is_tuned_only_at_the_values_the_tuned_files_record_now():
    """A grid run later replaces a tuned value: the row archived at the old value (stored as tuned)
    is then an untuned baseline, like a measured row at that value; a row at today's value is tuned,
    with the horizon it was chosen at."""
    from lagg_pipeline import tuning

    entry = tuning.lookup(KEY.task, "fedavg", KEY.H, KEY.K)
    gamma = entry["values"]["local_learning_rate"]
    at = lambda value, stored: row("fedavg", "fedavg", 0.3)._replace(
        settings=f"local_learning_rate={value}", tuned=stored, tuned_rounds=300 if stored else None)
    groups, _ = archive.merge({KEY: [at(gamma * 3, True), at(gamma, False)._replace(method="fedavg (today)")]}, {})
    stale, today = groups[KEY][0], groups[KEY][1]
    assert stale.method == "fedavg" and (stale.tuned, stale.tuned_rounds) == (False, None)
    assert (today.tuned, today.tuned_rounds) == (True, entry["rounds"])
    learned = row("lagg_a@x", "lagg_a", 0.1, shipped="lagg_a@x")
    assert archive.merge({KEY: [learned]}, {})[0][KEY] == [learned]


def test_an_unreadable_archive_file_is_one_line(tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="results archive file .*broken.npz is unreadable"):
        archive.load(tmp_path)
    assert archive.load(tmp_path / "absent") == {}


@pytest.mark.parametrize("store", ["missing", "without the experiment"])
def test_without_a_store_or_experiment_yet_the_report_and_recommendation_judge_the_archive_alone(tmp_path, store, monkeypatch):
    """A fresh clone regenerates the report from the committed results; without an archive the
    same store is a one-line error."""
    from test_verdict import report_cfg

    from lagg_pipeline import pretrained, tracking
    from lagg_pipeline.jobs.recommend import recommend_job
    from lagg_pipeline.jobs.report import run_report

    if store != "missing":
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking.tracking_uri(None)).create_experiment("other")
    folder = tmp_path / "data"
    shipped = "lagg_a@mnist1d_large_k8_h4_mix"
    archive.save(folder, {KEY: [row(shipped, "lagg_a", 0.1, shipped=shipped), row("fedavg", "fedavg", 0.3)]})
    with pytest.raises(UserError, match="no MLflow store|no such experiment"):
        run_report(report_cfg(), tmp_path / "none")
    text = run_report(report_cfg(results_archive=str(folder)), tmp_path / "out")
    assert "### mnist1d_large_mlp, K=8, H=4, B=128: 1000 rounds, 3 seeds" in text
    assert "judged from the committed results" in text and "read from the committed results" not in text
    recommended = tmp_path / "recommended.yaml"
    monkeypatch.setattr(pretrained, "recommended_file", lambda: recommended)
    (entry,) = recommend_job(report_cfg(results_archive=str(folder)))
    assert entry["name"] == "mnist1d_large_k8_h4_mix" and recommended.is_file()


def test_the_report_judges_archived_groups_beside_measured_ones_then_rewrites_the_archive(tmp_path):
    from test_verdict import curves, log_run, report_cfg

    from lagg_pipeline.jobs.report import run_report

    log_run(curves("fedavg", test_loss=0.3, accuracy=0.9))  # digits_mlp, K=8, H=4, B=128, 300 rounds
    measured_key = GroupKey("digits_mlp", 8, 4, 300, 128, "iid")
    folder = tmp_path / "data"
    archive.save(folder, {KEY: [row("lagg_a@x", "lagg_a", 0.1, shipped="lagg_a@x"), row("fedavg", "fedavg", 0.3)]})
    text = run_report(report_cfg(results_archive=str(folder)), tmp_path / "out")
    assert "### mnist1d_large_mlp, K=8, H=4, B=128: 1000 rounds, 3 seeds" in text  # judged from the archive
    assert "### digits_mlp, K=8, H=4, B=128: 300 rounds, 2 seeds" in text
    assert "lagg_a@x, fedavg read from the committed results" in text
    groups = archive.load(folder)
    assert set(groups) == {KEY, measured_key} and [r.method for r in groups[measured_key]] == ["fedavg"]


def test_a_gap_of_exactly_half_a_point_meets_the_accuracy_margin_read_from_the_store_or_the_archive(tmp_path):
    """5 seeds over 800 examples: accuracies on a 1/4000 grid, the learned row exactly 0.5 points
    below the baseline at every evaluation. Float rounding used to decide such ties either way, and
    differently in float64 (the store's curves) and float32 (the archive's), so a group rebuilt from
    the archive changed its verdict."""
    from lagg_pipeline.report import judge

    evals = np.array([0, 100, 200, 300])
    best = np.array([0.5, 0.8785, 0.9035, 0.9260])
    curves = lambda method, optimizer, acc, level: Curves(
        method, optimizer, "", optimizer == "fedavg", np.full((5, 300), level), evals, np.full((5, 4), 0.4),
        np.tile(acc, (5, 1)), np.full((5, 4), 0.4), np.tile(acc, (5, 1)))
    rows = [curves("lagg_a@x", "lagg_a", best - 0.005, 0.1), curves("fedavg", "fedavg", best, 0.3)]
    _, from_archive = archive.load_group(archive.save_group(tmp_path, KEY, rows))
    for group in (rows, from_archive):
        for split in ("test", "outer_valid"):
            (verdict,) = judge.judge(group, split).verdicts
            assert verdict.checks["accuracy"].ok.tolist() == [True, True, True], split
    one_more_example = [rows[0]._replace(outer_valid_accuracy=np.tile(best - 0.005 - 1 / 4000, (5, 1))), rows[1]]
    (verdict,) = judge.judge(one_more_example, "outer_valid").verdicts
    assert not verdict.checks["accuracy"].ok.any()

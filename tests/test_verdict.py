"""The report's real path on adversarial stores: MLflow runs -> collect -> judge -> render -> write."""
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lagg_pipeline import tracking, tuning
from lagg_pipeline.benchmark import BenchmarkResult
from lagg_pipeline.errors import UserError
from lagg_pipeline.jobs.benchmark import log_benchmark
from lagg_pipeline.jobs.report import run_report
from lagg_pipeline.report import collect, headline, judge, sentences
from lagg_pipeline.report import page as page_tables
from lagg_pipeline.report.write import RESULTS

EXPERIMENT = "results"
FIXTURE_OPTIMIZERS = ("fedavg", "fedadam", "slowmo")


@pytest.fixture(autouse=True)
def _no_per_run_plots(monkeypatch):
    """Each run's own plot is not what the report reads; drawing it would dominate the test time."""
    from lagg_pipeline.report import plots

    monkeypatch.setattr(plots, "plot_curves", lambda results, path: Path(path))


@pytest.fixture(autouse=True)
def _tuned_at_the_fixtures_values(tmp_path, monkeypatch):
    """The fixture baselines ran at local_learning_rate=0.5: recorded as their tuned value, chosen
    at the 300 rounds they are judged over."""
    root = tmp_path / "tuned"
    for optimizer in FIXTURE_OPTIMIZERS:
        (root / "digits_mlp").mkdir(parents=True, exist_ok=True)
        (root / "digits_mlp" / f"{optimizer}.yaml").write_text(
            "H4_K8:\n  values: {local_learning_rate: 0.5}\n  rounds: 300\n")
    monkeypatch.setattr(tuning, "tuned_root", lambda: root)


def tracking_cfg(experiment=EXPERIMENT):
    return OmegaConf.create({"enabled": True, "uri": None, "experiment": experiment, "parent_run_id": None,
                             "run_name": None})


def curves(name, rounds=300, every=50, seeds=2, train=1.0, test_loss=0.5, accuracy=0.9, outer_valid=0.4,
           valid_accuracy=None):
    """Seed curves: train loss ``train``/sqrt(round); evaluation metrics constant (or [E] arrays);
    outer-valid accuracy the test accuracy unless given."""
    r = np.arange(1, rounds + 1)
    evals = np.unique(np.append(np.arange(0, rounds + 1, every), rounds))
    full = lambda v: np.broadcast_to(np.asarray(v, dtype=float), (seeds, len(evals))).copy()
    return BenchmarkResult(name, np.tile(train / np.sqrt(r), (seeds, 1)), evals, full(test_loss), full(accuracy),
                           full(outer_valid), full(accuracy if valid_accuracy is None else valid_accuracy), 1e-3, 0.5)


def log_run(result, *, optimizer=None, seed=0, params=None, upload=True, batch=128):
    """A benchmark run as a job records it: the flattened config as params, curves via log_benchmark."""
    optimizer = optimizer or result.name.split("@")[0]
    S, R = result.train_loss.shape
    every = int(result.eval_rounds[1] - result.eval_rounds[0])
    run = tracking.start_run(tracking_cfg(), result.name, {"optimizer": optimizer, "task": "digits_mlp", "H": 4,
                                                           "K": 8, "seed": seed, "method": result.name,
                                                           "partition": "iid"})
    run.log_params({"num_rounds": R, "num_runs": S, "eval_every": every, "seed": seed, "local_learning_rate": 0.5,
                    "num_grads": 8, "num_local_steps": 4, "local_batch_size": batch, "optimizer.name": optimizer,
                    "tracking.experiment": EXPERIMENT, "progress": False, "pretrained": None, "checkpoint": None,
                    "hidden_size": 32, **(params or {})})
    if not upload:  # an artifact upload that failed (tolerated by the job)
        run.log_artifact = lambda *args, **kwargs: None
    out = Path(f"art_{run.run_id}")
    out.mkdir()
    log_benchmark(run, result, out)
    run.end()
    return run


def collected(warn=print):
    client, _ = tracking.client(tracking_cfg())
    return collect.collect(client, EXPERIMENT, warn)


def judged():
    (group,) = judge.judge_groups(collected())
    return group


def lines(group, split="test"):
    return sentences.lines(getattr(group, "test" if split == "test" else "valid"))


def line_of(group, method, split="test"):
    (line,) = [l for l in lines(group, split) if l.startswith(f"- **{method}** ")]
    return line


def test_runs_that_differ_in_a_setting_are_separate_rows_labelled_by_it():
    log_run(curves("fedavg", train=1.0), seed=0, params={"local_learning_rate": 0.5})
    log_run(curves("fedavg", train=3.0), seed=1, params={"local_learning_rate": 0.01})
    log_run(curves("fedavg", train=1.0), seed=2, params={"local_learning_rate": 0.5, "tracking.experiment": "x",
                                                          "progress": True})  # bookkeeping: pooled
    (rows,) = collected().values()
    assert [c.method for c in rows] == ["fedavg (local_learning_rate=0.01)", "fedavg (local_learning_rate=0.5)"]
    assert [c.train_loss.shape[0] for c in rows] == [2, 4]
    np.testing.assert_allclose(rows[0].train_loss[:, 0], 3.0)


def test_two_checkpoints_benchmarked_with_the_same_seed_are_two_rows(tmp_path):
    files = []
    for i in (1, 2):
        files.append(tmp_path / f"meta_params_{i}.npz")
        np.savez(files[-1], w=np.full(3, float(i)))
    log_run(curves("fedavg"))
    log_run(curves("lagg_a", train=0.5), params={"checkpoint": str(files[0])})
    log_run(curves("lagg_a", train=0.7), params={"checkpoint": str(files[1])})
    (rows,) = collected().values()
    learned = [c for c in rows if c.learned]
    assert len(learned) == 2 and all(c.method.startswith("lagg_a (meta-params sha256 ") for c in learned)
    assert sorted(c.train_loss[0, 0] for c in learned) == [0.5, 0.7]
    assert all("meta-params: sha256 " in c.settings for c in learned)


def test_evaluations_are_aligned_by_round_not_by_index():
    # fedavg evaluates every 25 rounds, lagg_a every 50: lagg_a is judged at its own evaluations among fedavg's
    acc = np.linspace(0.5, 0.98, 13)
    log_run(curves("fedavg", every=25, accuracy=acc))
    log_run(curves("lagg_a", every=50, train=0.5, accuracy=acc[::2]))
    group = judged()
    np.testing.assert_array_equal(group.test.rounds, np.arange(25, 301, 25))
    (v,) = group.test.verdicts
    np.testing.assert_array_equal(v.judged, [100, 150, 200, 250, 300])
    line = line_of(group, "lagg_a")
    assert line.startswith("- **lagg_a** holds on the test split.")
    assert "(2) test accuracy within 0.5 points of the best baseline's at 5 of 5 evaluations" in line
    # reaching fedavg's final accuracy: both at round 300
    assert group.test.targets["accuracy"].reached == {"lagg_a": 300, "fedavg": 300}


def test_a_row_without_an_evaluation_among_the_baselines_is_noted_not_judged():
    # jobs always evaluate at the last round, so only curves from elsewhere can miss each other
    log_run(curves("fedavg", rounds=60, every=25))
    (rows,) = collected().values()
    other = rows[0]._replace(method="lagg_a", optimizer="lagg_a", eval_rounds=np.array([0, 30, 45, 55]))
    j = judge.judge([other, rows[0]])
    assert not j.verdicts
    assert "- lagg_a: none of its evaluations (rounds 30, 45, 55) is among the baselines' (rounds 25, 50, 60): not " \
           "judged; rerun it with their eval_every." in sentences.lines(j)


def test_each_metric_has_its_own_best_baseline_at_each_round():
    # fedavg has the lowest test loss, fedadam the best accuracy: a learned method at fedavg's
    # numbers is 5 points below fedadam, which the old single reference missed
    log_run(curves("fedavg", test_loss=0.30, accuracy=0.90))
    log_run(curves("fedadam", train=1.2, test_loss=0.31, accuracy=0.95))
    log_run(curves("lagg_a@x", train=0.5, test_loss=0.34, accuracy=0.90),
            params={"pretrained": "x"})
    line = line_of(judged(), "lagg_a@x")
    assert line.startswith("- **lagg_a@x** does not hold on the test split.")
    assert "(1) train loss below every baseline's at 5 of 5 evaluations;" in line
    assert ("(2) test accuracy within 0.5 points of the best baseline's at 0 of 5 evaluations; misses 5, first at "
            "round 100: 0.9 vs fedadam's 0.95, 5 points below") in line
    assert ("(3) test loss within 10% of the best baseline's at 0 of 5 evaluations; misses 5, first at round 100: "
            "0.34 vs fedavg's 0.3, 1.13× it") in line
    assert ("generalisation gap at round 300 (test − outer-valid loss, the split it was tuned/meta-trained on): "
            "-0.06, the baselines' -0.1 to -0.09.") in line


def test_beside_other_baselines_each_learned_method_is_also_judged_against_fedavg_alone():
    """The goal on tasks outside the meta-training family is tuned FedAvg's: a second line per method."""
    log_run(curves("fedavg", test_loss=0.30, accuracy=0.90))
    log_run(curves("fedadam", train=1.2, test_loss=0.25, accuracy=0.95))
    log_run(curves("lagg_a@x", train=0.5, test_loss=0.32, accuracy=0.90), params={"pretrained": "x"})
    page = judged()
    (alone,) = [l for l in lines(page) if l.startswith("- **lagg_a@x**, against tuned FedAvg alone, ")]
    assert alone.startswith("- **lagg_a@x**, against tuned FedAvg alone, holds on the test split.")
    assert "(2) test accuracy within 0.5 points of the best baseline's at 5 of 5 evaluations" in alone
    assert "(3) test loss within 10% of the best baseline's at 5 of 5 evaluations" in alone
    assert "rounds to fedavg's final test accuracy 0.9" in alone  # its own target: FedAvg's
    # FedAvg has it at the first evaluation: no finer ratio can be read off the grid, and the line says so
    assert "(1× the fastest baseline, fedavg at 50, the first evaluation)" in alone
    # the verdict against every baseline is unchanged, and is the one the headline reads
    assert line_of(page, "lagg_a@x").startswith("- **lagg_a@x** does not hold on the test split.")
    assert "0.32 vs fedadam's 0.25" in line_of(page, "lagg_a@x")
    table = headline.headline([page], "r.md").splitlines()
    x = "lagg_a@x (not shipped)"  # a label of a shipped aggregator whose file the package lacks
    link = ("[digits_mlp, K=8, H=4, B=128](r.md#digits_mlp-k8-h4-b128-300-rounds-2-seeds) | "
            "1,069 epochs (3.6 a round; the paper's: 26): small-data regime")  # 8*4*128 of digits' 1,150 a round
    assert table[2] == (f"| {link} | 2 tuned baselines | {x} | no | **5/5** | 0/5 | 0/5 | never | {x} (5/5, 0/5, "
                        f"0/5) |")
    assert table[4].startswith("Against FedAvg alone") and len(table) == 9
    assert table[8] == f"| {link} | tuned FedAvg (1 row) | {x} | yes | **5/5** | **5/5** | **5/5** | 50 (1×) | {x} (5/5, 5/5, 5/5) |"


def test_fedavg_alone_is_not_judged_twice():
    log_run(curves("fedavg", test_loss=0.30, accuracy=0.90))
    log_run(curves("lagg_a@x", train=0.5, test_loss=0.32, accuracy=0.90), params={"pretrained": "x"})
    assert not [l for l in lines(judged()) if "against tuned FedAvg alone" in l]


def test_a_baseline_counts_with_its_finite_seeds_and_is_marked():
    best = curves("fedadam", seeds=3, test_loss=0.2, accuracy=0.97)
    best.train_loss[1, 40:] = np.nan  # one of three seeds diverged
    best.test_loss[1, 1:] = np.nan
    best.test_accuracy[1, 1:] = 0.1
    log_run(best)
    log_run(curves("fedavg", test_loss=0.3, accuracy=0.9))
    log_run(curves("lagg_a@x", train=0.5, test_loss=0.21, accuracy=0.95),
            params={"pretrained": "x"})
    page = judged()
    assert "- fedadam: 1 of 3 seeds diverged; counted with its 2 finite seeds (marked †)." in lines(page)
    table = "\n".join(page_tables.held_out_table(page.test))
    (row,) = [r for r in table.splitlines() if r.startswith("| fedadam |")]
    assert "| 3, 1 diverged † | 0.97 ± 0 | 0.97 ± 0 | 0.97 ± 0 | 0.2 ± 0 |" in row
    line = line_of(page, "lagg_a@x")  # the finite seeds' 0.97 is the reference, not a NaN that drops out
    assert "at 0 of 5 evaluations; misses 5, first at round 100: 0.95 vs fedadam's 0.97, 2 points below" in line
    assert "(3) test loss within 10% of the best baseline's at 5 of 5 evaluations" in line


def test_a_learned_methods_diverged_seed_counts_against_it():
    log_run(curves("fedavg", test_loss=0.3))
    learned = curves("lagg_a@x", train=0.5, test_loss=0.3)
    learned.train_loss[0, 200:] = np.nan
    learned.test_loss[0, 5:] = np.nan
    log_run(learned, params={"pretrained": "x"})
    page = judged()
    line = line_of(page, "lagg_a@x")
    assert "1 of 2 seeds diverged, counted against it (infinite loss, zero accuracy)." in line
    # seed 0 diverges after round 200: the seed mean is infinite from the evaluation at 250 on
    assert ("(1) train loss below every baseline's at 3 of 5 evaluations; misses 2, first at round 250: diverged vs "
            "fedavg's 0.06383, counted as infinite;") in line
    assert "(3) test loss within 10% of the best baseline's at 3 of 5 evaluations; misses 2, first at round 250" in line
    assert "| **lagg_a@x** | local_learning_rate=0.5, meta-params: shipped x | 2, 1 diverged (against it) |" in \
        "\n".join(page_tables.held_out_table(page.test))


def test_time_to_target_survives_a_diverged_fedavg():
    fedavg = curves("fedavg")
    fedavg.train_loss[:, 10:] = np.nan  # every seed
    log_run(fedavg)
    log_run(curves("fedadam", train=1.0, accuracy=np.linspace(0.5, 0.95, 7)))
    log_run(curves("lagg_a@x", train=0.5, accuracy=np.linspace(0.5, 0.96, 7)),
            params={"pretrained": "x"})
    page = judged()
    assert "- fedavg: 2 of 2 seeds diverged; no finite seed, so it is nobody's reference." in lines(page)
    value, owner, reached, _ = page.test.targets["train"]
    assert owner == "fedadam" and value == pytest.approx(np.mean(1 / np.sqrt(np.arange(291, 301))))
    # 0.5/sqrt(r) averaged over 10 rounds first reaches fedadam's final value near round 75
    smoothed = judge.trailing_mean(0.5 / np.sqrt(np.arange(1, 301)))
    assert reached == {"lagg_a@x": int(np.argmax(smoothed <= value)) + 1, "fedadam": 300, "fedavg": None}
    assert page.test.targets["accuracy"].reached["lagg_a@x"] == 300 and \
        page.test.targets["accuracy"].owner == "fedadam"
    table = "\n".join(page_tables.target_table(page.test))
    assert f"| **lagg_a@x** | 300 | 1 | {reached['lagg_a@x']} | {reached['lagg_a@x'] / 300:.2g} |" in table
    assert "| fedavg | > 300 | — | > 300 | — |" in table


def test_runs_under_100_rounds_are_judged_from_their_first_evaluation():
    log_run(curves("fedavg", rounds=60, every=20))
    log_run(curves("lagg_a@x", rounds=60, every=20, train=0.5), params={"pretrained": "x"})
    page = judged()
    assert lines(page)[0].startswith("Verdict on the test split, at the 3 evaluations from the first "
                                              "evaluation, round 20 (the runs are shorter than 100 rounds) to round 60")
    assert "at 3 of 3 evaluations" in line_of(page, "lagg_a@x")


def test_a_finished_run_without_curves_is_left_out_with_a_warning(capsys):
    log_run(curves("fedavg"))
    lost = log_run(curves("fedadam"), upload=False)
    (rows,) = collected().values()
    assert [c.method for c in rows] == ["fedavg"]
    assert f"warning: run {lost.run_id} (fedadam, seed 0) is finished but has no readable " \
           f"curves/fedadam_curves.npz: left out of the report" in capsys.readouterr().out


def report_cfg(**overrides):
    return OmegaConf.create({"tracking": {"enabled": True, "uri": None, "experiment": EXPERIMENT,
                                          "parent_run_id": None, "run_name": None},
                             "report_dir": None, "readme": None, "headline": None, "results_archive": None,
                             **overrides})


def pages(tmp_path):
    """A README with a headline block and a Results page below its folder."""
    readme, results = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    results.parent.mkdir(parents=True)
    readme.write_text("intro\n<!-- headline:begin -->\nOLD HEADLINE\n<!-- headline:end -->\ntail\n")
    results.write_text(f"intro\n{RESULTS[0]}\nOLD NUMBERS\n{RESULTS[1]}\ntail\n")
    return readme, results


def test_report_job_writes_the_page_and_splices_the_readme_and_headline(tmp_path):
    log_run(curves("fedavg", test_loss=0.3, accuracy=0.9))
    log_run(curves("lagg_a@x", train=0.5, test_loss=0.3, accuracy=0.9), params={"pretrained": "x"})
    readme, results = pages(tmp_path)
    text = run_report(report_cfg(readme=str(results), headline=str(readme), report_dir=str(tmp_path / "docs" / "rep")),
                      tmp_path / "out")
    assert text.startswith(page_tables.SPLITS)
    assert "### digits_mlp, K=8, H=4, B=128: 300 rounds, 2 seeds" in text and \
        "- **lagg_a@x** holds on the test split." in text
    assert "Scorecard on the test split, judged against tuned fedavg only:" in text
    assert "Training length: 1,069 epochs (3.6 a round; the paper's: 26): small-data regime." in text
    assert "| **lagg_a@x** (chosen) | yes | **5/5** | **5/5** | **5/5** | 50 (1×) | 0/2 | tuned fedavg only |" in text
    assert "| method | settings | seeds | test acc r100 | test acc r250 | test acc r300 | test loss r100 |" in text
    content = results.read_text()
    assert "OLD NUMBERS" not in content and content.endswith("tail\n") and "(rep/digits_mlp_K8_H4_B128_R300.png)" in content
    assert (tmp_path / "docs" / "rep" / "digits_mlp_K8_H4_B128_R300.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "digits_mlp_K8_H4_B128_R300.png").is_file()
    row = readme.read_text().splitlines()[4]
    assert row == ("| [digits_mlp, K=8, H=4, B=128](docs/results.md#digits_mlp-k8-h4-b128-300-rounds-2-seeds) | "
                   "1,069 epochs (3.6 a round; the paper's: 26): small-data regime | tuned fedavg only | lagg_a@x (not shipped) | yes | **5/5** | **5/5** | **5/5** | 50 (1×) | lagg_a@x (not "
                   "shipped) (5/5, 5/5, 5/5) |")


def test_the_report_job_gathers_judges_renders_and_writes_once_each_in_order(tmp_path, monkeypatch):
    from lagg_pipeline.jobs import report as job

    log_run(curves("fedavg"))
    calls = []
    for module, name in ((job.archive, "gather"), (job, "judge_groups"), (job, "render"), (job, "write")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    run_report(report_cfg(), tmp_path / "out")
    assert calls == ["gather", "judge_groups", "render", "write"]


def test_a_readme_outside_the_headlines_folder_fails_before_anything_is_written(tmp_path):
    log_run(curves("fedavg"))
    readme, results = pages(tmp_path / "inner")
    outside = tmp_path / "results.md"
    outside.write_text(results.read_text())
    with pytest.raises(UserError, match=r"^readme=.*results.md lies outside .*inner, the folder of headline="):
        run_report(report_cfg(readme=str(outside), headline=str(readme), report_dir=str(tmp_path / "rep")),
                   tmp_path / "out")
    assert "OLD HEADLINE" in readme.read_text() and "OLD NUMBERS" in outside.read_text()
    assert not (tmp_path / "rep").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("readme_text", [None, "no markers here\n"])
def test_a_bad_readme_fails_before_anything_is_written(tmp_path, readme_text):
    log_run(curves("fedavg"))
    readme = tmp_path / "README.md"
    if readme_text is not None:
        readme.write_text(readme_text)
    with pytest.raises(UserError, match="no such file" if readme_text is None else "has no <!-- results:begin -->"):
        run_report(report_cfg(readme=str(readme), report_dir=str(tmp_path / "rep")), tmp_path / "out")
    assert not (tmp_path / "rep").exists() and not (tmp_path / "out").exists()


def test_an_unknown_experiment_lists_the_existing_ones_and_creates_nothing():
    log_run(curves("fedavg"))
    client, _ = tracking.client(tracking_cfg())
    before = sorted(e.name for e in client.search_experiments())
    with pytest.raises(UserError, match=r"tracking.experiment=reslts: no such experiment .*choose one of: "
                                        r"Default, results$"):
        run_report(report_cfg(tracking={**tracking_cfg(), "experiment": "reslts"}), Path("out"))
    assert sorted(e.name for e in client.search_experiments()) == before


def test_a_missing_store_is_a_one_line_error_and_is_not_created():
    with pytest.raises(UserError, match="no MLflow store at .*mlflow.db"):
        collect.open_experiment(tracking_cfg())
    assert not Path("outputs/mlflow.db").exists()


def test_runs_at_another_batch_size_are_their_own_group():
    log_run(curves("fedavg"))
    log_run(curves("lagg_a@x", train=0.5), params={"pretrained": "x"}, batch=256)
    groups = collected()
    assert sorted((k.B, [c.method for c in rows]) for k, rows in groups.items()) == [(128, ["fedavg"]),
                                                                                      (256, ["lagg_a@x"])]
    assert "B=256" in page_tables.title(judge.judge_groups(groups)[1])


def test_against_fedavg_alone_survives_several_fedavg_rows_and_reads_the_tuned_one():
    log_run(curves("fedavg", test_loss=0.30, accuracy=0.90))  # lr 0.5: the tuned value
    log_run(curves("fedavg", test_loss=0.20, accuracy=0.97), params={"local_learning_rate": 2.0})  # untuned
    log_run(curves("fedadam", train=1.2, test_loss=0.25, accuracy=0.95))
    log_run(curves("lagg_a@x", train=0.5, test_loss=0.32, accuracy=0.90), params={"pretrained": "x"})
    group = judged()
    (v,) = group.test.alone
    assert v.fedavg_alone == "tuned" and v.against == ["fedavg (local_learning_rate=0.5)"]
    assert line_of(group, "lagg_a@x").startswith("- **lagg_a@x** does not hold")
    assert [l for l in lines(group) if l.startswith("- **lagg_a@x**, against tuned FedAvg alone, holds")]
    assert page_tables.against(group.test) == "3 baselines (2 tuned)"
    assert "| fedavg (local_learning_rate=2.0) (untuned) |" in "\n".join(page_tables.held_out_table(group.test))


def test_a_baseline_tuned_at_a_shorter_horizon_than_judged_is_named_so(tmp_path):
    (tmp_path / "tuned" / "digits_mlp" / "fedadam.yaml").write_text(
        "H4_K8:\n  values: {local_learning_rate: 0.5}\n  rounds: 100\n")
    (tmp_path / "tuned" / "digits_mlp" / "slowmo.yaml").write_text("H4_K8:\n  values: {local_learning_rate: 0.5}\n")
    log_run(curves("fedavg", test_loss=0.30, accuracy=0.90))
    log_run(curves("fedadam", train=1.2, test_loss=0.25, accuracy=0.95))
    log_run(curves("lagg_a@x", train=0.5, test_loss=0.32, accuracy=0.90), params={"pretrained": "x"})
    group = judged()
    assert [s.curves.tuned_rounds for s in group.test.reference] == [300, 100]
    assert page_tables.against(group.test) == "2 tuned baselines (1 of them at 100 rounds)"
    held_out = "\n".join(page_tables.held_out_table(group.test))
    assert "| fedadam (tuned at 100 rounds) |" in held_out and "| fedavg |" in held_out
    log_run(curves("slowmo", train=1.1), params={"local_learning_rate": 0.5})  # its file records no horizon
    assert page_tables.against(judged().test) == \
        "3 tuned baselines (2 of them at 100 rounds or an unrecorded horizon)"
    (tmp_path / "tuned" / "digits_mlp" / "fedavg.yaml").write_text(
        "H4_K8:\n  values: {local_learning_rate: 0.5}\n  rounds: 100\n")
    assert page_tables.against(judged().test) == "3 baselines tuned at 100 rounds or an unrecorded horizon"


def test_a_lone_fedavg_tuned_at_a_shorter_horizon_says_so(tmp_path):
    (tmp_path / "tuned" / "digits_mlp" / "fedavg.yaml").write_text(
        "H4_K8:\n  values: {local_learning_rate: 0.5}\n  rounds: 100\n")
    log_run(curves("fedavg", test_loss=0.30, accuracy=0.90))
    log_run(curves("lagg_a@x", train=0.5, test_loss=0.32, accuracy=0.90), params={"pretrained": "x"})
    assert page_tables.against(judged().test) == "fedavg only, tuned at 100 rounds"


def test_an_untuned_fedavg_is_never_called_tuned():
    log_run(curves("fedavg", test_loss=0.30, accuracy=0.90), params={"local_learning_rate": 2.0})
    log_run(curves("fedadam", train=1.2, test_loss=0.25, accuracy=0.95))
    log_run(curves("lagg_a@x", train=0.5, test_loss=0.32, accuracy=0.90), params={"pretrained": "x"})
    group = judged()
    assert [l for l in lines(group) if l.startswith("- **lagg_a@x**, against FedAvg alone (untuned), holds")]
    assert not [l for l in lines(group) if "tuned FedAvg" in l]
    table = headline.headline([group], "r.md")
    assert "| untuned FedAvg (1 row) |" in table and "| 2 baselines (1 tuned) |" in table


def test_a_sparse_row_does_not_shrink_the_evaluations_the_others_are_judged_at():
    log_run(curves("fedavg", every=50))
    log_run(curves("slowmo", every=50, train=1.1))
    log_run(curves("fedadam", every=100, train=1.2))  # a sparse baseline: left out of the reference, said so
    log_run(curves("lagg_a@x", every=50, train=0.5), params={"pretrained": "x"})
    log_run(curves("lopt_a@y", every=100, train=0.5), params={"pretrained": "y"})  # a sparse learned row
    group = judged()
    np.testing.assert_array_equal(group.test.rounds, [50, 100, 150, 200, 250, 300])
    assert [s.name for s in group.test.reference] == ["fedavg", "slowmo"]
    judged_at = {v.name: v.judged.tolist() for v in group.test.verdicts}
    assert judged_at == {"lagg_a@x": [100, 150, 200, 250, 300], "lopt_a@y": [100, 200, 300]}
    assert ("- fedadam: evaluated at 3 rounds, where the other baselines share 6: left out of the reference so that "
            "it shrinks nobody's evaluations.") in lines(group)


def test_collect_skips_a_run_missing_a_tag_or_a_curve_key_with_a_warning(monkeypatch):
    log_run(curves("fedavg"))
    untagged = log_run(curves("fedadam"))
    client, _ = tracking.client(tracking_cfg())
    client.delete_tag(untagged.run_id, "seed")
    real = np.savez
    monkeypatch.setattr(np, "savez", lambda path, **arrays: real(path, **{k: v for k, v in arrays.items()
                                                                         if k != "test_loss"}))
    partial = log_run(curves("slowmo"))
    warnings = []
    (rows,) = collected(warnings.append).values()
    assert [c.method for c in rows] == ["fedavg"]
    assert warnings == [f"warning: run {untagged.run_id} (fedadam) lacks seed: left out of the report",
                        f"warning: run {partial.run_id} (slowmo, seed 0) is finished but its curves lack test_loss: "
                        f"left out of the report"]


def test_the_headline_says_from_which_round_the_chosen_aggregator_meets_each_criterion_in_the_papers_regime():
    from lagg_pipeline.report.curves import Curves, GroupKey

    rounds, r = np.arange(0, 1001, 50), np.arange(1, 1001, dtype=float)
    flat = lambda value: np.full((2, len(rounds)), value)
    accuracy = np.where(rounds < 300, 0.85, 0.91) * np.ones((2, 1))  # below the margin until round 300
    row = lambda method, optimizer, train, acc, shipped=None: Curves(
        method, optimizer, "", shipped is None, np.stack([train] * 2), rounds, flat(0.3), acc, flat(0.3), acc, shipped)
    name = "lagg_a@mnist1d_large_k8_h4_mix"  # a shipped file: the verdict on outer-valid may choose it
    key = GroupKey("mnist1d_large_mlp", 8, 4, 1000, 128, "iid")
    groups = {key: [row(name, "lagg_a", 0.5 / np.sqrt(r), accuracy, shipped=name),
                    row("fedavg", "fedavg", 1 / np.sqrt(r), flat(0.9))]}
    text = headline.headline(judge.judge_groups(groups), "r.md")
    line = next(l for l in text.splitlines() if l.startswith("- **mnist1d_large_mlp"))
    assert line.startswith(f"- **mnist1d_large_mlp, K=8, H=4, B=128**, {name}: (1) train loss at every evaluation, "
                           f"(2) test accuracy from round 300 on, (3) test loss at every evaluation; at round 1000: "
                           f"test accuracy 0.910 vs 0.900 (fedavg), test loss 0.3 vs 0.3 (fedavg), train loss ")
    small = {key._replace(task="digits_mlp"): groups[key]}  # the small-data regime: the table alone
    assert "- **" not in headline.headline(judge.judge_groups(small), "r.md")


def test_the_headline_scores_the_chosen_namesake_not_the_row_its_label_starts_with():
    """A shipped file run at two local learning rates: the outer-valid verdict chooses the γ=1.0 row, and the
    headline's scorecard and standing line are that row's, not the plain γ=0.5 row's."""
    from lagg_pipeline.report.curves import Curves, GroupKey

    rounds, r = np.arange(0, 1001, 50), np.arange(1, 1001, dtype=float)
    flat = lambda value: np.full((2, len(rounds)), value)
    late = np.where(rounds < 300, 0.85, 0.91) * np.ones((2, 1))  # below the margin until round 300
    row = lambda method, optimizer, train, acc, shipped=None: Curves(
        method, optimizer, "", shipped is None, np.stack([train] * 2), rounds, flat(0.3), acc, flat(0.3), acc, shipped)
    name = "lagg_a@mnist1d_large_k8_h4_mix"
    key = GroupKey("mnist1d_large_mlp", 8, 4, 1000, 128, "iid")
    groups = {key: [row(name, "lagg_a", 0.5 / np.sqrt(r), late, shipped=name),
                    row(f"{name} (local_learning_rate=1.0)", "lagg_a", 0.5 / np.sqrt(r), flat(0.91), shipped=name),
                    row("fedavg", "fedavg", 1 / np.sqrt(r), flat(0.9))]}
    text = headline.headline(judge.judge_groups(groups), "r.md")
    chosen = f"{name} (local_learning_rate=1.0)"
    (table_row,) = [l for l in text.splitlines() if l.startswith("| [mnist1d_large_mlp") and "1 row" not in l]
    assert f"| {chosen} | yes | **19/19** | **19/19** | **19/19** |" in table_row
    line = next(l for l in text.splitlines() if l.startswith("- **mnist1d_large_mlp"))
    assert line.startswith(f"- **mnist1d_large_mlp, K=8, H=4, B=128**, {chosen}: (1) train loss at every evaluation, "
                           f"(2) test accuracy at every evaluation,")


def test_a_criterion_missed_at_the_last_evaluation_says_so():
    check = judge.Check(np.array([True, False, True, False]), *(np.zeros(4),) * 2, ["x"] * 4, np.zeros(4))
    assert headline.since(check, np.array([100, 150, 200, 250])) == "at 2 of 4, not at the last"
    assert headline.since(check._replace(ok=np.array([False, True, True, True])), np.array([100, 150, 200, 250])) \
        == "from round 150 on"


def test_an_accuracy_equal_to_the_target_but_for_float_rounding_reaches_it():
    """The archive keeps float32 curves: a seed mean equal to the final one, summed from other
    seeds' fractions, can read 1e-8 lower. That tie reaches the target, whichever file was read."""
    target = 0.9294
    fedavg = [0.5, 0.8, target - 3e-8, target - 2e-8, target, target, target]  # rounds 0, 50, ..., 300
    log_run(curves("fedavg", accuracy=fedavg))
    log_run(curves("lagg_a@x", train=0.5, accuracy=[0.5, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95]), params={"pretrained": "x"})
    targets = judged().test.targets["accuracy"]
    assert targets.owner == "fedavg" and targets.reached == {"lagg_a@x": 100, "fedavg": 100}

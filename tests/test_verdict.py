"""The report's real path on adversarial stores: MLflow runs -> collect -> rows -> verdict on the test split."""
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lagg_pipeline import comparison, results_page, tracking, verdict
from lagg_pipeline.benchmark import BenchmarkResult
from lagg_pipeline.errors import UserError
from lagg_pipeline.jobs.benchmark import log_benchmark
from lagg_pipeline.jobs.report import write_report

EXPERIMENT = "results"


@pytest.fixture(autouse=True)
def _no_per_run_plots(monkeypatch):
    """Each run's own plot is not what the report reads; drawing it would dominate the test time."""
    from lagg_pipeline import report

    monkeypatch.setattr(report, "plot_curves", lambda results, path: Path(path))


def tracking_cfg(experiment=EXPERIMENT):
    return OmegaConf.create({"enabled": True, "uri": None, "experiment": experiment, "parent_run_id": None,
                             "run_name": None})


def curves(name, rounds=300, every=50, seeds=2, train=1.0, test_loss=0.5, accuracy=0.9, outer_valid=0.4):
    """Seed curves: train loss ``train``/sqrt(round); evaluation metrics constant (or [E] arrays)."""
    r = np.arange(1, rounds + 1)
    evals = np.unique(np.append(np.arange(0, rounds + 1, every), rounds))
    full = lambda v: np.broadcast_to(np.asarray(v, dtype=float), (seeds, len(evals))).copy()
    return BenchmarkResult(name, np.tile(train / np.sqrt(r), (seeds, 1)), evals, full(test_loss), full(accuracy),
                           full(outer_valid), full(accuracy), 1e-3, 0.5)


def log_run(result, *, optimizer=None, seed=0, params=None, upload=True):
    """A benchmark run as a job records it: the flattened config as params, curves via log_benchmark."""
    optimizer = optimizer or result.name.split("@")[0]
    S, R = result.train_loss.shape
    every = int(result.eval_rounds[1] - result.eval_rounds[0])
    run = tracking.start_run(tracking_cfg(), result.name, {"optimizer": optimizer, "task": "digits_mlp", "H": 4,
                                                           "K": 8, "seed": seed, "method": result.name,
                                                           "partition": "iid"})
    run.log_params({"num_rounds": R, "num_runs": S, "eval_every": every, "seed": seed, "local_learning_rate": 0.5,
                    "num_grads": 8, "num_local_steps": 4, "local_batch_size": 128, "optimizer.name": optimizer,
                    "tracking.experiment": EXPERIMENT, "progress": False, "pretrained": None, "checkpoint": None,
                    "hidden_size": 32, **(params or {})})
    if not upload:  # an artifact upload that failed (tolerated by the job)
        run.log_artifact = lambda *args, **kwargs: None
    out = Path(f"art_{run.run_id}")
    out.mkdir()
    log_benchmark(run, result, out)
    run.end()
    return run


def collected():
    client, _ = tracking.client(tracking_cfg())
    return comparison.collect(client, EXPERIMENT)


def judged():
    (page,) = results_page.judge_all(collected())
    return page


def line_of(page, method):
    (line,) = [l for l in page.judgement.lines if l.startswith(f"- **{method}** ")]
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
    # fedavg evaluates every 25 rounds, lagg_a every 50: compared at the rounds both have
    acc = np.linspace(0.5, 0.98, 13)
    log_run(curves("fedavg", every=25, accuracy=acc))
    log_run(curves("lagg_a", every=50, train=0.5, accuracy=acc[::2]))
    page = judged()
    np.testing.assert_array_equal(page.judgement.rounds, [50, 100, 150, 200, 250, 300])
    np.testing.assert_array_equal(page.judgement.judged, [100, 150, 200, 250, 300])
    line = line_of(page, "lagg_a")
    assert line.startswith("- **lagg_a** holds on the test split.")
    assert "(2) test accuracy within 0.5 points of the best baseline's at 5 of 5 evaluations" in line
    # reaching fedavg's final accuracy: both at round 300 (the first common evaluation it holds at)
    assert page.judgement.targets["accuracy"][2] == {"lagg_a": 300, "fedavg": 300}


def test_no_common_evaluation_is_a_one_line_error():
    # jobs always evaluate at the last round, so only curves from elsewhere can miss each other
    log_run(curves("fedavg", rounds=60, every=25))
    (rows,) = collected().values()
    other = rows[0]._replace(method="lagg_a", optimizer="lagg_a", eval_rounds=np.array([0, 30, 45]))
    with pytest.raises(UserError, match="no evaluation round common to all methods .lagg_a: every 30; fedavg: every "
                                        "25.: rerun with one eval_every"):
        verdict.judge([other, rows[0]], "digits")


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
    (alone,) = [l for l in page.judgement.lines if l.startswith("- **lagg_a@x**, against tuned FedAvg alone, ")]
    assert alone.startswith("- **lagg_a@x**, against tuned FedAvg alone, holds on the test split.")
    assert "(2) test accuracy within 0.5 points of the best baseline's at 5 of 5 evaluations" in alone
    assert "(3) test loss within 10% of the best baseline's at 5 of 5 evaluations" in alone
    assert "rounds to fedavg's final test accuracy 0.9" in alone  # its own target: FedAvg's
    # FedAvg has it at the first evaluation: no finer ratio can be read off the grid, and the line says so
    assert "(1× the fastest baseline, fedavg at 50, the first evaluation)" in alone
    # the verdict against every baseline is unchanged, and is the one the headline reads
    assert line_of(page, "lagg_a@x").startswith("- **lagg_a@x** does not hold on the test split.")
    assert "0.32 vs fedadam's 0.25" in line_of(page, "lagg_a@x")
    table = results_page.headline(results_page.markdown([page], Path("rep")), "r.md").splitlines()
    x = "lagg_a@x (not shipped)"  # a label of a shipped aggregator whose file the package lacks
    assert table[2].endswith(f"| none | **5/5** {x} | 0/5 {x} | 0/5 {x} | never |")
    assert table[4] == "Against tuned FedAvg alone:" and len(table) == 9
    assert table[8].endswith(f"| {x} | **5/5** {x} | **5/5** {x} | **5/5** {x} | 1× {x} |")


def test_fedavg_alone_is_not_judged_twice():
    log_run(curves("fedavg", test_loss=0.30, accuracy=0.90))
    log_run(curves("lagg_a@x", train=0.5, test_loss=0.32, accuracy=0.90), params={"pretrained": "x"})
    assert not [l for l in judged().judgement.lines if "against tuned FedAvg alone" in l]


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
    assert "- fedadam: 1 of 3 seeds diverged; counted with its 2 finite seeds (marked †)." in page.judgement.lines
    table = "\n".join(results_page.held_out_table(page.judgement))
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
        "\n".join(results_page.held_out_table(page.judgement))


def test_time_to_target_survives_a_diverged_fedavg():
    fedavg = curves("fedavg")
    fedavg.train_loss[:, 10:] = np.nan  # every seed
    log_run(fedavg)
    log_run(curves("fedadam", train=1.0, accuracy=np.linspace(0.5, 0.95, 7)))
    log_run(curves("lagg_a@x", train=0.5, accuracy=np.linspace(0.5, 0.96, 7)),
            params={"pretrained": "x"})
    page = judged()
    assert "- fedavg: 2 of 2 seeds diverged; no finite seed, so it is nobody's reference." in page.judgement.lines
    value, owner, reached = page.judgement.targets["train"]
    assert owner == "fedadam" and value == pytest.approx(np.mean(1 / np.sqrt(np.arange(291, 301))))
    # 0.5/sqrt(r) averaged over 10 rounds first reaches fedadam's final value near round 75
    smoothed = verdict.trailing_mean(0.5 / np.sqrt(np.arange(1, 301)))
    assert reached == {"lagg_a@x": int(np.argmax(smoothed <= value)) + 1, "fedadam": 300, "fedavg": None}
    assert page.judgement.targets["accuracy"][2]["lagg_a@x"] == 300 and \
        page.judgement.targets["accuracy"][1] == "fedadam"
    table = "\n".join(results_page.target_table(page.judgement))
    assert f"| **lagg_a@x** | 300 | 1 | {reached['lagg_a@x']} | {reached['lagg_a@x'] / 300:.2g} |" in table
    assert "| fedavg | > 300 | — | > 300 | — |" in table


def test_runs_under_100_rounds_are_judged_from_their_first_evaluation():
    log_run(curves("fedavg", rounds=60, every=20))
    log_run(curves("lagg_a@x", rounds=60, every=20, train=0.5), params={"pretrained": "x"})
    page = judged()
    assert page.judgement.lines[0].startswith("Verdict on the test split, at the 3 evaluations from the first "
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
                             "report_dir": None, "readme": None, **overrides})


def test_report_job_writes_the_page_and_splices_the_readme(tmp_path):
    log_run(curves("fedavg", test_loss=0.3, accuracy=0.9))
    log_run(curves("lagg_a@x", train=0.5, test_loss=0.3, accuracy=0.9),
            params={"pretrained": "x"})
    readme = tmp_path / "page.md"
    readme.write_text(f"intro\n{comparison.BEGIN}\nOLD NUMBERS\n{comparison.END}\ntail\n")
    text = write_report(report_cfg(readme=str(readme), report_dir=str(tmp_path / "rep")), tmp_path / "out")
    assert text.startswith(results_page.SPLITS)
    assert "### digits_mlp, K=8, H=4: 300 rounds, 2 seeds" in text and "- **lagg_a@x** holds on the test split." in text
    assert "| method | settings | seeds | test acc r100 | test acc r250 | test acc r300 | test loss r100 |" in text
    content = readme.read_text()
    assert "OLD NUMBERS" not in content and content.endswith("tail\n") and "(rep/digits_mlp_K8_H4_R300.png)" in content
    assert (tmp_path / "rep" / "digits_mlp_K8_H4_R300.png").stat().st_size > 10_000
    assert results_page.headline(text, "results.md").splitlines()[2] == (
        "| [digits_mlp, K=8, H=4](results.md#digits_mlp-k8-h4-300-rounds-2-seeds) | lagg_a@x (not shipped) | **5/5** "
        "lagg_a@x (not shipped) | **5/5** lagg_a@x (not shipped) | **5/5** lagg_a@x (not shipped) | 1× lagg_a@x (not "
        "shipped) |")


def test_the_headline_reads_each_criterion_from_the_verdict_lines():
    page = ("### mnist1d_mlp, K=8, H=4, clients: dirichlet(alpha=0.1, M=64): 1000 rounds, 5 seeds\n\n"
            "- **a** does not hold on the test split. (1) train loss below every baseline's at 19 of 19 evaluations; "
            "(2) test accuracy within 0.5 points of the best baseline's at 17 of 19 evaluations; misses 2, first at "
            "round 850: 0.976 vs diloco's 0.9811, 0.51 points below; (3) test loss within 10% of the best baseline's "
            "at 19 of 19 evaluations; (4) time to target: ...\n"
            "- **b** holds on the test split. (1) train loss below every baseline's at 3 of 3 evaluations; (2) test "
            "accuracy within 0.5 points of the best baseline's at 3 of 3 evaluations; (3) test loss within 10% of "
            "the best baseline's at 3 of 3 evaluations; (4) time to target: 150 rounds to fedavg (local_learning_rate=1.0)'s "
            "final test accuracy 0.631 (1.5× the fastest baseline, fedavg at 100), ...\n\n### digits_mlp, K=8, H=8: 1000 rounds, 5 seeds\n"
            "No learned method ran in this group: nothing to judge.\n")
    (row,) = results_page.headline(page, "results.md").splitlines()[2:]
    assert row == ("| [mnist1d_mlp, K=8, H=4, clients: dirichlet(alpha=0.1, M=64)](results.md#mnist1d_mlp-k8-h4-clients-"
                   "dirichletalpha01-m64-1000-rounds-5-seeds) | b | **19/19** a | 17/19 a | **19/19** a | 1.5× b |")


def test_the_headline_names_shipped_aggregators_first_and_marks_retired_ones():
    line = ("- **{}** does not hold on the test split. (1) train loss below every baseline's at 4 of 5 evaluations; "
            "(2) test accuracy within 0.5 points of the best baseline's at 5 of 5 evaluations; (3) ...\n")
    row = lambda *names: results_page.headline("### digits_mlp, K=8, H=4: 300 rounds, 2 seeds\n\n" + "".join(
        line.format(n) for n in names), "r.md").splitlines()[2]
    assert "| 4/5 lagg_a@family_k8_h4, lagg_a@gone (not shipped) |" in row("lagg_a@gone", "lagg_a@family_k8_h4")
    assert "| 4/5 lagg_a@family_k8_h4, lagg_a (meta-trained here) +1 |" in row(
        "lagg_a@gone", "lagg_a@family_k8_h4", "lagg_a (meta-trained here)")


@pytest.mark.parametrize("readme_text", [None, "no markers here\n"])
def test_a_bad_readme_fails_before_anything_is_written(tmp_path, readme_text):
    log_run(curves("fedavg"))
    readme = tmp_path / "README.md"
    if readme_text is not None:
        readme.write_text(readme_text)
    with pytest.raises(UserError, match="no such file" if readme_text is None else "has no <!-- results:begin -->"):
        write_report(report_cfg(readme=str(readme), report_dir=str(tmp_path / "rep")), tmp_path / "out")
    assert not (tmp_path / "rep").exists() and not (tmp_path / "out").exists()


def test_an_unknown_experiment_lists_the_existing_ones_and_creates_nothing():
    log_run(curves("fedavg"))
    client, _ = tracking.client(tracking_cfg())
    before = sorted(e.name for e in client.search_experiments())
    with pytest.raises(UserError, match=r"tracking.experiment=reslts: no such experiment .*choose one of: "
                                        r"Default, results$"):
        write_report(report_cfg(tracking={**tracking_cfg(), "experiment": "reslts"}), Path("out"))
    assert sorted(e.name for e in client.search_experiments()) == before


def test_a_missing_store_is_a_one_line_error_and_is_not_created():
    with pytest.raises(UserError, match="no MLflow store at .*mlflow.db"):
        comparison.open_experiment(tracking_cfg())
    assert not Path("outputs/mlflow.db").exists()

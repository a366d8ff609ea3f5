"""What a job runs with: the FedAvg baseline's gamma, recipe keys against tuned values."""
import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from lagg_pipeline import config
from lagg_pipeline.jobs import benchmark
from lagg_pipeline.jobs.common import chosen_keys


@pytest.fixture()
def hydra_job():
    """compose(overrides) as the Hydra job of that command line would see it (HydraConfig set)."""
    config.register()
    GlobalHydra.instance().clear()

    def job(*overrides):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    with initialize_config_module("lagg_pipeline.conf", version_base="1.3"):
        yield job
    GlobalHydra.instance().clear()


@pytest.fixture()
def tuned_fedavg(tmp_path):
    root = tmp_path / "tuned"
    (root / "digits_mlp").mkdir(parents=True)
    (root / "digits_mlp" / "fedavg.yaml").write_text("H4_K8:\n  values: {local_learning_rate: 1.0}\n")
    return str(root)


def test_the_fedavg_baseline_runs_at_its_own_tuned_gamma_not_the_learned_ones(hydra_job, tuned_fedavg, capsys):
    cfg = hydra_job("optimizer=lagg_a", "local_learning_rate=0.3", f"tuned_dir={tuned_fedavg}")
    baseline = benchmark.fedavg_baseline_config(cfg)
    assert baseline.optimizer.name == "fedavg" and baseline.local_learning_rate == 1.0
    assert cfg.local_learning_rate == 0.3  # the learned aggregator keeps the gamma the user gave it
    assert "fedavg_local_learning_rate=" in capsys.readouterr().out  # the output names the key that sets it
    cfg = hydra_job("optimizer=lagg_a", "local_learning_rate=0.3", "fedavg_local_learning_rate=0.2",
                    f"tuned_dir={tuned_fedavg}")
    assert benchmark.fedavg_baseline_config(cfg).local_learning_rate == 0.2
    assert "local_learning_rate=0.2 (fedavg_local_learning_rate)" in capsys.readouterr().out


def test_values_a_recipe_sets_win_over_tuned_values(hydra_job, tuned_fedavg):
    cfg = hydra_job("experiment=paper_fmnist", "task=digits_mlp", "optimizer=fedavg", f"tuned_dir={tuned_fedavg}")
    assert {"local_learning_rate", "num_local_steps", "num_outer_steps"} <= chosen_keys()
    assert benchmark.with_tuned_values(cfg).local_learning_rate == 0.5  # the recipe's, not the tuned 1.0
    cfg = hydra_job("task=digits_mlp", "optimizer=fedavg", f"tuned_dir={tuned_fedavg}")
    assert benchmark.with_tuned_values(cfg).local_learning_rate == 1.0


def test_a_recipes_keys_leave_out_its_group_choices():
    from lagg_pipeline.jobs.common import recipe_keys

    keys = recipe_keys("paper_fmnist")
    assert "num_rounds" in keys and not {"defaults", "task", "hydra"} & keys
    assert recipe_keys(None) == set()


@pytest.fixture()
def job_in_hydra(hydra_job, tmp_path):
    """``run_job`` of a command line's overrides as its Hydra job runs it, in a run folder of its own."""
    from lagg_pipeline.jobs import run_job

    def run(*overrides):
        folder = tmp_path / "runs" / str(len(list(tmp_path.glob("runs/*"))))
        (folder / ".hydra").mkdir(parents=True)
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        cfg.hydra.runtime.output_dir = str(folder)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return run_job(cfg)

    return run


@pytest.fixture()
def benchmark_calls(monkeypatch):
    """The keyword arguments of every benchmark protocol run from here on."""
    import lagg_pipeline.benchmark as protocol

    real, calls = protocol.run_benchmark, []
    monkeypatch.setattr(protocol, "run_benchmark", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


def test_a_finished_baseline_is_not_run_again_with_skip_finished(job_in_hydra, benchmark_calls, monkeypatch, capsys):
    """A sweep run again (after a session ended, a preemption) runs only the points not finished yet."""
    job = job_in_hydra
    tiny = ["optimizer=fedavg", "task=digits_mlp", "num_rounds=4", "eval_every=2", "num_runs=1", "progress=false",
            "skip_finished=true", "tracking.experiment=tuning"]
    first = job(*tiny)
    with monkeypatch.context() as no_data:  # nor is the dataset read
        no_data.setattr("lagg_pipeline.jobs.prepare", lambda cfg: pytest.fail("read the data of a finished point"))
        assert job(*tiny, "progress=true") == first  # bookkeeping differs: still the same
    assert len(benchmark_calls) == 1
    assert "these settings finished in run " in capsys.readouterr().out
    job(*tiny, "seed=1")  # another seed is another point
    job(*tiny[:-2], "skip_finished=false", "tracking.experiment=tuning")
    job(*tiny[:-1], "tracking.experiment=other")  # another experiment holds nothing finished
    assert [k["seed"] for k in benchmark_calls] == [0, 1, 0, 0]


@pytest.mark.parametrize("overrides, says", [
    (["optimizer=lagg_a"], "not used when optimizer=lagg_a meta-trains \\(mode=auto\\)"),
    (["optimizer=lagg_a", "mode=meta_train"], "not used when optimizer=lagg_a meta-trains"),
    (["optimizer=lopt_a", "pretrained=family_k8_h4_mix"], "needs with_fedavg=false"),
    (["optimizer=fedavg", "tracking.enabled=false"], "needs tracking.enabled=true .*set skip_finished=false"),
])
def test_skip_finished_where_it_cannot_apply_is_one_line(hydra_job, overrides, says):
    from lagg_pipeline.jobs.inputs import refuse_unused_keys

    with pytest.raises(config.ConfigError, match=says):
        refuse_unused_keys(hydra_job(*overrides, "skip_finished=true"))


def test_a_saved_aggregators_finished_benchmark_is_skipped_until_its_file_changes(job_in_hydra, benchmark_calls,
                                                                                   tmp_path, capsys):
    """make results runs the shipped aggregators with skip_finished too; a file saved anew at the same
    place (its sha256, recorded on the run) is another aggregator and runs again."""
    import shutil

    import mlflow

    from lagg_pipeline import pretrained

    job = job_in_hydra
    saved = tmp_path / "saved.npz"
    shutil.copy(pretrained.path("lagg_a", "family_k8_h4"), saved)
    args = ["optimizer=lagg_a", f"checkpoint={saved}", "with_fedavg=false", "skip_finished=true", "task=digits_mlp",
            "num_rounds=4", "eval_every=2", "num_runs=1", "progress=false"]
    first = job(*args)
    assert job(*args) == first and len(benchmark_calls) == 1
    assert "these settings finished in run " in capsys.readouterr().out
    shutil.copy(pretrained.path("lagg_a", "family_k8_h4_mix"), saved)
    job(*args)
    assert len(benchmark_calls) == 2
    digests = {r.data.tags["meta_params_sha256"] for r in mlflow.search_runs(search_all_experiments=True,
                                                                              output_format="list")}
    assert len(digests) == 2

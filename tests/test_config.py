"""The real configs compose, and bad input is refused in one line before any compute."""
import pytest
from hydra import compose, initialize_config_module

from lagg_pipeline import cli
from lagg_pipeline.config import HAND_OPTIMIZERS, validate


def composed(*overrides):
    cli.config_module.register()
    with initialize_config_module("lagg_pipeline.conf", version_base="1.3"):
        return compose("config", overrides=cli.quote_numeric_choices(list(overrides), cli.config_groups()))


def test_groups_match_the_documented_options():
    groups = cli.config_groups()
    assert groups["H"] == ["16", "32", "4", "8"]
    assert groups["k"] == ["16", "32", "8"]
    assert set(HAND_OPTIMIZERS) <= set(groups["optimizer"])
    assert {"digits_mlp", "mnist5k_mlp", "small_image_mlp_fmst", "image_mlp_fmst", "conv_c10"} <= set(groups["task"])


@pytest.mark.parametrize("optimizer", HAND_OPTIMIZERS)
def test_every_hand_optimizer_composes_and_validates(optimizer):
    cfg = composed(f"optimizer={optimizer}")
    validate(cfg)
    assert cfg.optimizer.name == optimizer


def test_shorthand_groups_set_h_and_k():
    cfg = composed("H=16", "k=32")
    assert (cfg.num_local_steps, cfg.num_grads) == (16, 32)
    assert composed("H=8", "num_local_steps=2").num_local_steps == 2  # a plain key wins


def test_optimizer_arguments_follow_top_level_keys():
    cfg = composed("optimizer=slowmo", "beta=0.5", "local_learning_rate=0.3")
    assert (cfg.optimizer.beta, cfg.optimizer.local_learning_rate) == (0.5, 0.3)


@pytest.mark.parametrize("argv, expected", [
    (["num_grads=abc"], "num_grads=abc is not allowed"),
    (["foo=1"], "unknown key 'foo'"),
    (["num_grad=4"], "did you mean 'num_grads'?"),
    (["optimizer=nope"], "optimizer=nope is not allowed; choose one of: adam"),
    (["task=nope"], "task=nope is not allowed; choose one of:"),
    (["H=5"], "H=5 is not allowed; choose one of: 16, 32, 4, 8"),
    (["num_local_steps=0"], "num_local_steps=0 is not allowed; it must be > 0"),
    (["local_learning_rate=-0.1"], "local_learning_rate=-0.1 is not allowed; it must be > 0"),
    (["learning_rate=0"], "learning_rate=0.0 is not allowed; it must be > 0"),
    (["local_batch_size=5000"], "local_batch_size=5000 is not allowed; it must be <= "),
    (["mode=train"], "mode=train is not allowed; choose one of: auto, benchmark"),
    (["--multirun", "local_learning_rate=0.5,-1"], "local_learning_rate=-1.0 is not allowed"),
    (["optimizer=fedadam", "optimizer.server_learning_rate=-1"], "server_learning_rate=-1"),
])
def test_bad_input_is_one_line_and_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err


@pytest.mark.parametrize("search, keys", [
    ("fedavg_grid", {"local_learning_rate", "num_local_steps"}),
    ("slowmo_grid", {"slowmo_learning_rate", "local_learning_rate", "beta"}),
    ("data_parallel_grid", {"optimizer", "learning_rate"}),
])
def test_hparams_search_grids_compose_into_valid_jobs(search, keys):
    cli.config_module.register()
    with initialize_config_module("lagg_pipeline.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params) == keys
    for key, values in params.items():  # every grid value passes the same checks as a CLI override
        for value in str(values).split(","):
            job = composed(f"hparams_search={search}", f"{key}={value}")
            validate(job)


@pytest.mark.parametrize("experiment", ["paper_fmnist", "paper_fmnist_baselines"])
def test_experiment_recipes_set_the_paper_settings(experiment):
    cfg = composed(f"experiment={experiment}")
    validate(cfg)
    assert cfg.task.name == "image_mlp_fmst"
    assert (cfg.num_grads, cfg.num_local_steps, cfg.local_batch_size, cfg.num_runs, cfg.num_rounds) == (8, 4, 128, 10, 1000)
    if experiment == "paper_fmnist":
        assert (cfg.num_outer_steps, cfg.num_tasks, cfg.trunc_length, cfg.pes_std) == (5000, 8, 50, 0.01)
        assert (cfg.schedule.peak_value, cfg.schedule.warmup_steps, cfg.schedule.end_value) == (3e-3, 100, 1e-3)

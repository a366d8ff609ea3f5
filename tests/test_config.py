"""The real configs compose, and bad input is refused in one line before any compute."""
import pytest
from hydra import compose, initialize_config_module

from lagg_pipeline import cli
from lagg_pipeline.cli import check_optimizer
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
    assert {"digits_mlp", "mnist5k_mlp", "mnist1d_mlp", "small_image_mlp_fmst", "image_mlp_fmst",
            "conv_c10"} <= set(groups["task"])


@pytest.mark.parametrize("optimizer", HAND_OPTIMIZERS)
def test_every_hand_optimizer_composes_and_validates(optimizer):
    cfg = composed(f"optimizer={optimizer}")
    validate(cfg)
    assert cfg.optimizer.name == optimizer


def test_shorthand_groups_set_h_and_k():
    cfg = composed("H=16", "k=32")
    assert (cfg.num_local_steps, cfg.num_grads) == (16, 32)
    assert composed("H=8", "num_local_steps=2").num_local_steps == 2  # a plain key wins


def test_tuned_is_a_key_not_a_group():
    assert "tuned_hparams" not in cli.config_groups() and "tuned" not in cli.config_groups()
    assert composed("optimizer=fedavg", "tuned=false").tuned is False
    assert composed("optimizer=fedavg").tuned is True


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
    (["--multirun", "sweeper=optuna", "local_learning_rate=interval(-1, 2)"],
     "local_learning_rate=-1.0 is not allowed; it must be > 0"),
    (["--multirun", "sweeper=optuna", "num_rounds=tag(log, interval(0.5, 20))"], "num_rounds=0.5 is not allowed"),
    (["optimizer=fedadam", "optimizer.server_learning_rate=-1"], "server_learning_rate=-1"),
    (["optimizer=fedavgm", "optimizer.momentum=1.0"], "optimizer=fedavgm: momentum=1.0 is not allowed; it must be in [0, 1)"),
    (["optimizer=diloco", "optimizer.momentum=1.5"], "momentum=1.5 is not allowed; it must be in [0, 1)"),
    (["optimizer=fedadam", "optimizer.b2=1.0"], "b2=1.0 is not allowed; it must be in [0, 1)"),
    (["optimizer=fedyogi", "optimizer.b1=1.0"], "b1=1.0 is not allowed; it must be in [0, 1)"),
    (["trunc_length=1"], "trunc_length=1 is not allowed; it must be >= 2"),
    (["mode=benchmark", "resume=true", "optimizer=fedavg"], "resume=true is not allowed with mode=benchmark"),
    (["pes_devices=64"], "pes_devices=64 is not allowed; it must be between 1 and the"),  # more than the 16 particles
    (["meta_loss_split=test"], "meta_loss_split=test is not allowed; choose one of: train, outer_valid, resplit"),
    (["pretrained=nope"], "pretrained=nope is not allowed for optimizer=lagg_a; choose one of:"),
    (["optimizer=fedavg", "pretrained=x"], "pretrained=x is not allowed with optimizer=fedavg"),
    (["task=mnist1d_mlp", "task.image_size=8"], "task.image_size=8 is not allowed for mnist1d"),
    (["task=mnist1d_mlp", "task.model=conv"], "task.model=conv is not allowed for mnist1d"),
    (["optimizer=fedavg", "distributed.enabled=true"],
     "distributed.enabled=true is not allowed with mode=auto optimizer=fedavg; several processes share a "
     "meta-training: mode=meta_train with lagg_a"),
    (["mode=meta_train", "distributed.enabled=true", "distributed.num_processes=2", "distributed.process_id=2"],
     "distributed.process_id=2 is not allowed; it must be in [0, distributed.num_processes=2)"),
    (["mode=meta_train", "distributed.enabled=true", "distributed.coordinator_address=localhost"],
     "distributed.coordinator_address=localhost is not allowed; it must be host:port"),
    (["mode=meta_train", "distributed.enabled=true", "distributed.num_processes=0"],
     "distributed.num_processes=0 is not allowed; it must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err


@pytest.mark.parametrize("search", cli.config_groups()["hparams_search"])
def test_hparams_search_grids_compose_into_valid_jobs(search):
    cli.config_module.register()
    with initialize_config_module("lagg_pipeline.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params
    for key, values in params.items():  # every grid value passes the same checks as a CLI override
        for value in str(values).split(","):
            job = composed(f"hparams_search={search}", f"{key}={value}")
            validate(job)
            check_optimizer(job)
            if not search.startswith("paper_"):  # tuning grids: their own experiment, no tuned values
                assert job.optimizer.name == search and not job.tuned
                assert job.tracking.experiment == "tuning"


@pytest.mark.parametrize("experiment", ["paper_fmnist", "paper_fmnist_baselines"])
def test_experiment_recipes_set_the_paper_settings(experiment):
    cfg = composed(f"experiment={experiment}")
    validate(cfg)
    assert cfg.task.name == "image_mlp_fmst"
    assert (cfg.num_grads, cfg.num_local_steps, cfg.local_batch_size, cfg.num_runs, cfg.num_rounds) == (8, 4, 128, 10, 1000)
    if experiment == "paper_fmnist":
        assert (cfg.num_outer_steps, cfg.num_tasks, cfg.trunc_length, cfg.pes_std) == (5000, 8, 50, 0.01)
        assert (cfg.schedule.peak_value, cfg.schedule.warmup_steps, cfg.schedule.end_value) == (3e-3, 100, 1e-3)


@pytest.mark.parametrize("argv", [["H=8", "k=16"], ["--multirun", "H=8,16", "k=16"], ["H=8", "k=16", "num_rounds=5,7"]])
def test_the_command_line_checks_compose_numeric_group_choices(argv):
    """What the program itself does before compute (quoting, then composing each variant)."""
    flags, overrides = cli.split_argv(argv)
    cfg = cli.preflight(cli.quote_numeric_choices(overrides, cli.config_groups()))
    assert (cfg.num_local_steps, cfg.num_grads) == (8, 16)


@pytest.mark.parametrize("experiment", sorted(cli.config_groups()["experiment"]))
@pytest.mark.parametrize("h, k", [("8", "16"), ("16", "32")])
def test_shorthands_on_the_command_line_win_over_a_recipe(experiment, h, k):
    cfg = composed(f"experiment={experiment}", f"H={h}", f"k={k}")
    assert (cfg.num_local_steps, cfg.num_grads) == (int(h), int(k))
    assert composed(f"experiment={experiment}", f"H={h}", "num_local_steps=2").num_local_steps == 2

"""The outer loop: checkpoints hold everything, and resuming equals never stopping."""
import jax
import numpy as np
import pytest

from lagg_pipeline.aggregators.learned import LearnedAggregator
from lagg_pipeline.checkpoint import CheckpointManager
from lagg_pipeline.meta.train import MetaTrainer, meta_learning_rate, run_meta_training
from lagg_pipeline.tracking import NullRun
from test_pes import DATA, linear_task, tiny_cfg


def make_trainer(cfg):
    aggregator = LearnedAggregator(cfg.optimizer.name, cfg.num_grads, cfg.hidden_size)
    return MetaTrainer(cfg, linear_task(), DATA, aggregator)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    cfg = tiny_cfg(optimizer="lopt_a", num_outer_steps=6, save_iter=2, trunc_length=4,
                   schedule={"name": "warmup_cosine", "warmup_steps": 2})
    straight, _ = run_meta_training(make_trainer(cfg), CheckpointManager(tmp_path / "a"), NullRun(),
                                    metadata={}, progress=False)

    trainer = make_trainer(cfg)
    step, calls = trainer.step, []

    def dies_in_step_5(state):
        calls.append(1)
        if len(calls) == 5:
            raise Interrupt
        return step(state)

    trainer.step = dies_in_step_5
    manager = CheckpointManager(tmp_path / "b")
    with pytest.raises(Interrupt):
        run_meta_training(trainer, manager, NullRun(), metadata={"note": "x"}, progress=False)
    assert manager.latest_step() == 4

    fresh = make_trainer(cfg)
    state, metadata = manager.restore(fresh.init())
    assert int(state.outer_step) == 4 and metadata["note"] == "x"
    resumed, history = run_meta_training(fresh, manager, NullRun(), metadata={}, state=state, progress=False)
    assert len(history) == 2 and int(resumed.outer_step) == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_keeps_the_newest_and_points_to_latest(tmp_path):
    cfg = tiny_cfg(num_outer_steps=5, save_iter=1, checkpoints_to_keep=2, trunc_length=2)
    manager = CheckpointManager(tmp_path, keep=cfg.checkpoints_to_keep)
    run_meta_training(make_trainer(cfg), manager, NullRun(), metadata={}, progress=False)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.npz")) == ["ckpt_00000004.npz", "ckpt_00000005.npz"]
    assert (tmp_path / "latest").read_text() == "ckpt_00000005.npz"


def test_paper_schedule_warms_up_then_decays_to_the_end_value():
    cfg = tiny_cfg(num_outer_steps=5000, schedule={"name": "warmup_cosine", "warmup_steps": 100,
                                                  "init_value": 3e-10, "peak_value": 3e-3, "end_value": 1e-3})
    schedule = meta_learning_rate(cfg.schedule, cfg.num_outer_steps)
    assert float(schedule(0)) < 1e-9
    np.testing.assert_allclose(float(schedule(100)), 3e-3, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(4900)), 1e-3, rtol=1e-5)
    assert 1e-3 < float(schedule(2000)) < 3e-3


class RecordingRun:
    """Collects what meta-training logs, as MLflow would."""

    def __init__(self):
        self.steps = {}

    def log_metrics(self, series):
        for name, (steps, _) in series.items():
            self.steps.setdefault(name, []).extend(int(s) for s in steps)

    def log_artifact(self, *args):
        pass


def test_resumed_run_logs_each_outer_step_once(tmp_path, monkeypatch):
    monkeypatch.setattr("lagg_pipeline.meta.train._LOG_EVERY", 1)  # step 4 reaches MLflow, ckpt is at 3
    cfg = tiny_cfg(num_outer_steps=7, save_iter=3, trunc_length=2)
    trainer, run = make_trainer(cfg), RecordingRun()
    step = trainer.step

    def dies_in_step_5(state):
        if int(state.outer_step) == 4:
            raise Interrupt
        return step(state)

    trainer.step = dies_in_step_5
    manager = CheckpointManager(tmp_path)
    with pytest.raises(Interrupt):
        run_meta_training(trainer, manager, run, metadata={}, progress=False)
    assert run.steps["meta_loss"] == [1, 2, 3, 4] and manager.latest_step() == 3

    fresh = make_trainer(cfg)
    state, _ = manager.restore(fresh.init())
    run_meta_training(fresh, manager, run, metadata={}, state=state, progress=False,
                      logged_through=max(run.steps["meta_loss"]))
    assert run.steps["meta_loss"] == list(range(1, 8))
    assert run.steps["seconds_per_outer_step"] == list(range(1, 8))


def test_a_kill_right_after_a_checkpoint_loses_no_logged_step(tmp_path):
    """Metrics reach MLflow before the checkpoint that a resume starts from is written, so a
    process killed just after writing checkpoint 6 never resumes past steps MLflow lacks."""
    cfg = tiny_cfg(num_outer_steps=9, save_iter=3, trunc_length=2)
    trainer, run = make_trainer(cfg), RecordingRun()
    manager = CheckpointManager(tmp_path)
    save = manager.save

    def killed_after_writing_6(step, tree, metadata=None):
        path = save(step, tree, metadata)
        if step == 6:
            raise Interrupt  # as SIGKILL here: nothing after the write runs
        return path

    manager.save = killed_after_writing_6
    with pytest.raises(Interrupt):
        run_meta_training(trainer, manager, run, metadata={}, progress=False)
    assert manager.latest_step() == 6 and run.steps["meta_loss"] == list(range(1, 7))

    fresh = make_trainer(cfg)
    state, _ = CheckpointManager(tmp_path).restore(fresh.init())
    run_meta_training(fresh, CheckpointManager(tmp_path), run, metadata={}, state=state, progress=False,
                      logged_through=max(run.steps["meta_loss"]))
    assert run.steps["meta_loss"] == list(range(1, 10))


def test_sigterm_checkpoints_the_finished_step_and_resume_equals_uninterrupted(tmp_path):
    import os
    import signal

    from lagg_pipeline.meta.train import Preempted

    cfg = tiny_cfg(optimizer="lopt_a", num_outer_steps=6, save_iter=4, trunc_length=4)
    straight, _ = run_meta_training(make_trainer(cfg), CheckpointManager(tmp_path / "a"), NullRun(),
                                    metadata={}, progress=False)
    trainer = make_trainer(cfg)
    step, calls = trainer.step, []

    def terminated_during_step_3(state):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends before preemption
        return step(state)

    trainer.step = terminated_during_step_3
    manager = CheckpointManager(tmp_path / "b")
    with pytest.raises(Preempted, match="SIGTERM at outer step 3"):
        run_meta_training(trainer, manager, NullRun(), metadata={}, progress=False)
    assert manager.latest_step() == 3  # the step in flight finished and was saved, off the save_iter grid
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    fresh = make_trainer(cfg)
    state, _ = manager.restore(fresh.init())
    resumed, _ = run_meta_training(fresh, manager, NullRun(), metadata={}, state=state, progress=False)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_falls_back_past_truncated_and_garbled_checkpoints(tmp_path):
    from lagg_pipeline.checkpoint import CheckpointError

    cfg = tiny_cfg(num_outer_steps=4, save_iter=1, trunc_length=2)
    manager = CheckpointManager(tmp_path)
    run_meta_training(make_trainer(cfg), manager, NullRun(), metadata={}, progress=False)
    template = make_trainer(cfg).init()
    newest = manager.path(4).read_bytes()
    manager.path(4).write_bytes(newest[: len(newest) // 2])  # truncated mid-write by a crash
    manager.path(3).write_bytes(b"garbage" * 100)
    state, _, step, problems = manager.restore_newest_valid(template)
    assert step == 2 and int(state.outer_step) == 2
    assert len(problems) == 2 and "ckpt_00000004.npz" in problems[0] and "ckpt_00000003.npz" in problems[1]
    for older in (1, 2):
        manager.path(older).write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        manager.restore_newest_valid(template)


def test_diverging_inner_training_gives_a_finite_ceiling_loss_and_stops_the_run(tmp_path):
    from lagg_pipeline.meta.train import MetaTrainingDiverged

    cfg = tiny_cfg(num_outer_steps=3, save_iter=1, trunc_length=3, local_learning_rate=1e8)
    trainer = make_trainer(cfg)
    _, metrics = trainer.step(trainer.init())
    assert np.isfinite(float(metrics["meta_loss"]))
    np.testing.assert_allclose(float(metrics["meta_loss"]), 1.5 * np.log(3), rtol=1e-6)  # the ceiling
    manager = CheckpointManager(tmp_path)
    with pytest.raises(MetaTrainingDiverged, match="every particle's inner training diverged at outer step 1"):
        run_meta_training(make_trainer(cfg), manager, NullRun(), metadata={}, progress=False)
    assert manager.latest_step() is None


def test_non_finite_meta_parameters_stop_before_the_bad_state_is_saved(tmp_path):
    from lagg_pipeline.meta.train import MetaTrainingDiverged

    cfg = tiny_cfg(num_outer_steps=4, save_iter=1, trunc_length=2)
    trainer = make_trainer(cfg)
    step = trainer.step

    def poisoned_after_step_2(state):
        state, metrics = step(state)
        if int(state.outer_step) == 3:
            state = state._replace(meta_params=jax.tree.map(lambda p: p * np.nan, state.meta_params))
            metrics = {**metrics, "meta_params_finite": False}
        return state, metrics

    state = trainer.init()
    assert bool(step(state)[1]["meta_params_finite"])
    nan_state = state._replace(meta_params=jax.tree.map(lambda p: p * np.nan, state.meta_params))
    assert not bool(step(nan_state)[1]["meta_params_finite"])  # the jitted check itself
    trainer.step = poisoned_after_step_2
    manager = CheckpointManager(tmp_path)
    with pytest.raises(MetaTrainingDiverged, match="non-finite at outer step 3; the last good checkpoint is .*ckpt_00000002"):
        run_meta_training(trainer, manager, NullRun(), metadata={}, progress=False)
    assert manager.latest_step() == 2


def test_a_family_stops_when_one_task_fully_diverged_and_names_it(tmp_path):
    """The family's mean (0.5 here) would let it run on with one task's estimate pure noise."""
    from lagg_pipeline.meta.train import MetaTrainingDiverged, _check_health

    metrics = {"meta_params_finite": True, "diverged_fraction": 0.5, "diverged_fraction/digits_mlp": 0.0,
               "diverged_fraction/mnist1d_mlp_small": 1.0}
    with pytest.raises(MetaTrainingDiverged, match="every particle of meta task mnist1d_mlp_small diverged at "
                                                   "outer step 7 .the family's other tasks did not"):
        _check_health(dict(metrics), 7, CheckpointManager(tmp_path))
    _check_health({**metrics, "diverged_fraction/mnist1d_mlp_small": 0.75}, 7, CheckpointManager(tmp_path))


@pytest.mark.parametrize("meta_init", ["random", "averaging"])
def test_a_step_compiled_in_the_background_is_the_step_compiled_in_place(meta_init):
    """The background compile works from init's shapes; the first step then finds the executable
    (one compile, no second) and every step's result is bitwise the in-place one's."""
    cfg = tiny_cfg(optimizer="lagg_a", trunc_length=4, meta_init=meta_init)
    background, in_place = make_trainer(cfg), make_trainer(cfg)
    background.compile_in_background()
    states = [background.init(), in_place.init()]
    for _ in range(3):
        (states[0], m0), (states[1], m1) = background.step(states[0]), in_place.step(states[1])
    for a, b in zip(jax.tree.leaves((states[0], m0)), jax.tree.leaves((states[1], m1))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert background.jitted_step._cache_size() == 1


def test_an_error_in_the_background_compile_is_raised_by_the_first_step():
    trainer = make_trainer(tiny_cfg(optimizer="lagg_a"))

    class Unlowerable:
        def lower(self, *_):
            raise RuntimeError("out of memory while compiling")

    trainer._jitted = lambda state: Unlowerable()
    trainer.compile_in_background()
    with pytest.raises(RuntimeError, match="out of memory while compiling"):
        trainer.step(trainer.init())


def test_a_saved_start_is_where_meta_training_starts_and_a_misfit_is_one_line():
    cfg = tiny_cfg(optimizer="lagg_a", meta_init="saved")
    aggregator = LearnedAggregator("lagg_a", cfg.num_grads, cfg.hidden_size)
    saved = jax.tree.map(np.asarray, aggregator.init_meta_params(jax.random.PRNGKey(7)))
    trainer = MetaTrainer(cfg, linear_task(), DATA, aggregator, saved)
    state = trainer.init()
    for got, want in zip(jax.tree.leaves(state.meta_params), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(got, want)
    fresh = make_trainer(tiny_cfg(optimizer="lagg_a")).init()
    assert not all(map(np.array_equal, jax.tree.leaves(fresh.meta_params), jax.tree.leaves(saved)))
    # Everything but the meta-parameters is a fresh run's: the particles' models and the key.
    np.testing.assert_array_equal(state.key, fresh.key)
    stepped, _ = trainer.step(state)  # and the outer step moves the saved values
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(stepped.meta_params),
                                                             jax.tree.leaves(saved))]
    assert 0 < max(moved) <= 2 * cfg.schedule.peak_value  # one AdamW step of the constant rate

    wider = LearnedAggregator("lagg_a", cfg.num_grads, 2 * cfg.hidden_size).init_meta_params(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=f"hidden size {2 * cfg.hidden_size} .* hidden_size={cfg.hidden_size}$"):
        MetaTrainer(cfg, linear_task(), DATA, aggregator, wider)


def test_a_saved_start_names_its_meta_training_by_the_file():
    from lagg_pipeline.jobs.meta_train import meta_params_metadata, meta_run_name

    task = {"task": {"name": "digits_mlp", "dataset": "digits"}}
    cfg = tiny_cfg(optimizer="lagg_a", meta_init="saved", pretrained="family_k8_h4_mix", **task)
    random = tiny_cfg(optimizer="lagg_a", **task)
    assert meta_run_name(cfg, "aa") != meta_run_name(cfg, "bb")  # resume=true never mixes two starts
    assert meta_run_name(cfg, "aa") != meta_run_name(random)
    assert meta_params_metadata(cfg)["started_from"] == "family_k8_h4_mix"
    assert "started_from" not in meta_params_metadata(random)


def test_any_saved_step_of_a_meta_training_reads_as_its_meta_parameters(tmp_path):
    from lagg_pipeline.config import ConfigError
    from lagg_pipeline.jobs.meta_train import meta_params_metadata
    from lagg_pipeline.jobs.saved import read_saved

    cfg = tiny_cfg(optimizer="lagg_a", num_outer_steps=4, save_iter=2, task={"name": "digits_mlp",
                                                                              "dataset": "digits"})
    manager = CheckpointManager(tmp_path)
    final, _ = run_meta_training(make_trainer(cfg), manager, NullRun(), metadata=meta_params_metadata(cfg),
                                 progress=False)
    at_2, _ = manager.restore(make_trainer(cfg).init(), step=2)
    for step, state in ((2, at_2), (4, final)):
        meta_params, metadata = read_saved(manager.path(step), "lagg_a", ConfigError)
        assert metadata["outer_steps"] == step and metadata["num_grads"] == cfg.num_grads
        for got, want in zip(jax.tree.leaves(meta_params), jax.tree.leaves(state.meta_params)):
            np.testing.assert_array_equal(got, np.asarray(want))
    assert not all(map(np.array_equal, jax.tree.leaves(at_2.meta_params), jax.tree.leaves(final.meta_params)))
    with pytest.raises(ConfigError, match="holds lagg_a meta-parameters, not optimizer=lopt_a"):
        read_saved(manager.path(2), "lopt_a", ConfigError)

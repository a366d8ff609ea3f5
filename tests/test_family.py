"""Per-episode train/validation division (meta_loss_split=resplit) and task-family PES."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from lagg_pipeline.aggregators.learned import LearnedAggregator
from lagg_pipeline.config import Config, ConfigError, validate
from lagg_pipeline.data import Split, Splits, episode_split
from lagg_pipeline.meta.family import FamilyPES, make_estimator, pes_data
from lagg_pipeline.meta.train import MetaTrainer
from lagg_pipeline.simulator import draw_round
from lagg_pipeline.tasks import Task


def indexed_splits(n_train=40, n_inner=5, n_outer=5, n_test=10):
    """Splits whose x holds each example's own id, so positions can be traced back."""
    ids = iter(range(10_000))
    split = lambda n: Split(jnp.array([[next(ids)] for _ in range(n)], jnp.float32), jnp.zeros(n, jnp.int32))
    return Splits(split(n_train), split(n_inner), split(n_outer), split(n_test), 3)


def test_each_episode_divides_the_pool_into_disjoint_train_and_valid_parts_never_outer_valid_or_test():
    splits = indexed_splits()
    pool = episode_split.pool_of(splits)
    assert pool.y.shape[0] == 45  # train + inner-valid
    num_train, num_valid = episode_split.sizes(45)
    assert (num_train, num_valid) == (40, 5)  # the training part is the train split's size
    test_ids = set(np.asarray(splits.test.x[:, 0]).astype(int))
    test_ids |= set(np.asarray(splits.outer_valid.x[:, 0]).astype(int))  # chooses aggregators: never fitted on
    layouts = []
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        valid_ids = set(np.asarray(episode_split.valid_split(pool, key).x[:, 0]).astype(int))
        # two whole epochs of the episode's training stream
        x, _, counter = episode_split.train_batch(pool, key, jnp.int32(0), 2 * num_train)
        train_ids = np.asarray(x[:, 0]).astype(int)
        assert len(valid_ids) == num_valid
        assert not valid_ids & set(train_ids)  # never trained on what it is scored on
        assert set(train_ids) | valid_ids == set(range(45))  # the whole pool, nothing else
        assert not (set(train_ids) | valid_ids) & test_ids
        assert sorted(train_ids[:num_train]) == sorted(train_ids[num_train:])  # an epoch: each once
        assert int(counter) == 2 * num_train
        layouts.append(valid_ids)
    assert layouts[0] != layouts[1] and layouts[1] != layouts[2]  # a fresh division per episode


def test_round_batches_from_a_pool_come_from_the_training_part_and_resume_exactly():
    pool = episode_split.pool_of(indexed_splits())
    key = jax.random.PRNGKey(7)
    x1, _, c1 = draw_round(pool, key, jnp.int32(0), 2, 2, 3)
    x2, _, c2 = draw_round(pool, key, c1, 2, 2, 3)
    assert x1.shape == (2, 2, 3, 1) and int(c1) == 12 and int(c2) == 24
    whole, _, _ = episode_split.train_batch(pool, key, jnp.int32(0), 24)
    np.testing.assert_array_equal(np.concatenate([x1.reshape(-1), x2.reshape(-1)]), whole[:, 0])
    valid_ids = set(np.asarray(episode_split.valid_split(pool, key).x[:, 0]).astype(int))
    assert not valid_ids & set(np.asarray(whole[:, 0]).astype(int))


def softmax_task(name, dim, classes=3):
    def init(key):
        return {"w": 0.1 * jax.random.normal(key, (dim, classes)), "b": jnp.zeros(classes)}

    def apply(params, x):
        return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]

    return Task(name, init, apply, classes)


def synthetic_splits(seed, n, dim, classes=3):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (n, dim))
    y = jnp.argmax(x @ jax.random.normal(kw, (dim, classes)), axis=-1).astype(jnp.int32)
    part = lambda lo, hi: Split(x[lo:hi], y[lo:hi])
    a, b = n * 8 // 10, n * 9 // 10
    return Splits(part(0, a), part(a, b), part(b, n), part(0, 8), classes)


def family_cfg(**overrides):
    base = {"optimizer": {"name": "lagg_a"}, "num_grads": 2, "num_local_steps": 2, "local_batch_size": 4,
            "local_learning_rate": 0.3, "hidden_size": 8, "num_tasks": 4, "trunc_length": 5,
            "num_inner_steps": 30, "truncation_schedule_min_length": 10, "num_outer_steps": 3,
            "meta_loss_split": "resplit", "schedule": {"name": "constant", "peak_value": 3e-3}}
    return OmegaConf.merge(OmegaConf.structured(Config), base, overrides)


def test_family_meta_gradient_is_the_mean_of_each_tasks_own_estimate_over_its_meta_loss():
    cfg = family_cfg()
    tasks = [softmax_task("a", 4), softmax_task("b", 6)]
    data = tuple(pes_data(cfg, synthetic_splits(seed, 60, dim)) for seed, dim in ((0, 4), (1, 6)))
    aggregator = LearnedAggregator("lagg_a", cfg.num_grads, cfg.hidden_size)
    family = make_estimator(cfg, tasks, aggregator, lambda members: None)
    assert isinstance(family, FamilyPES) and [p.num_tasks for p in family.members] == [2, 2]
    meta_params = aggregator.init_meta_params(jax.random.PRNGKey(0))
    k_init, k_est = jax.random.split(jax.random.PRNGKey(1))
    state = family.init(meta_params, k_init, data)
    grad, next_state, metrics = jax.jit(family.estimate)(meta_params, state, k_est, data)

    # Each task alone, with the keys the family hands it.
    alone = []
    for pes, s, k, d in zip(family.members, state, jax.random.split(k_est, 2), data):
        g, s_next, m = jax.jit(pes.estimate)(meta_params, s, k, d)
        alone.append(jax.tree.map(lambda x: x / m["meta_loss"], g))
        np.testing.assert_allclose(metrics[f"meta_loss/{pes.task.name}"], m["meta_loss"], rtol=1e-6)
    expected = jax.tree.map(lambda a, b: (a + b) / 2, *alone)
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grad))
    np.testing.assert_allclose(metrics["meta_loss"], (metrics["meta_loss/a"] + metrics["meta_loss/b"]) / 2,
                               rtol=1e-6)


def test_family_meta_training_runs_and_steps_reproducibly():
    cfg = family_cfg()
    tasks = [softmax_task("a", 4), softmax_task("b", 6)]
    data = tuple(pes_data(cfg, synthetic_splits(seed, 60, dim)) for seed, dim in ((0, 4), (1, 6)))
    trainer = MetaTrainer(cfg, tasks, data, LearnedAggregator("lagg_a", cfg.num_grads, cfg.hidden_size))
    first, m1 = trainer.step(trainer.init())
    again, m2 = trainer.step(trainer.init())
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(float(m1["meta_loss"])) and set(m1) >= {"meta_loss/a", "meta_loss/b"}


def test_single_task_resplit_scores_the_episode_validation_part():
    cfg = family_cfg(num_tasks=2)
    task = softmax_task("a", 4)
    splits = synthetic_splits(0, 60, 4)
    data = pes_data(cfg, splits)
    assert isinstance(data.train, episode_split.EpisodePool) and data.meta is None
    pes = make_estimator(cfg, task, LearnedAggregator("lagg_a", 2, 8), lambda members: None)
    state = pes.init(LearnedAggregator("lagg_a", 2, 8).init_meta_params(jax.random.PRNGKey(0)),
                     jax.random.PRNGKey(1), data)
    member = jax.tree.map(lambda x: x[0], state.rounds)
    valid = episode_split.valid_split(data.train, member.data_key)
    # the round's score is the updated weights' loss on exactly this episode's validation part
    _, score = pes._round(LearnedAggregator("lagg_a", 2, 8).init_meta_params(jax.random.PRNGKey(0)), member,
                          data)
    assert valid.y.shape[0] == (48 + 6) // 9 and np.isfinite(float(score))  # a ninth of train + inner-valid


@pytest.mark.parametrize("split", ["resplit", "outer_valid"])
def test_a_mixed_meta_loss_is_the_weighted_sum_of_the_training_and_held_out_losses(split):
    """meta_loss_train_weight=w scores a round by w * (the train split's score) + (1 - w) * (the
    held-out score), each computed by the estimator that uses it alone, on the same member."""
    task, splits = softmax_task("a", 4), synthetic_splits(0, 60, 4)
    aggregator = LearnedAggregator("lagg_a", 2, 8)
    meta_params = aggregator.init_meta_params(jax.random.PRNGKey(0))
    data = pes_data(family_cfg(meta_loss_split=split), splits)

    def score(weight, scored_split=split):
        pes = make_estimator(family_cfg(num_tasks=2, meta_loss_split=scored_split, meta_loss_train_weight=weight),
                             task, aggregator, lambda members: None)
        member = jax.tree.map(lambda x: x[0], pes.init(meta_params, jax.random.PRNGKey(1), data).rounds)
        next_state, loss = jax.jit(pes._round)(meta_params, member, data)
        return float(loss), next_state

    held_out, state_held = score(0.0)
    train, state_train = score(0.0, "train")
    mixed, state_mixed = score(0.25)
    assert abs(train - held_out) > 1e-3  # the two scores differ, so the mix is visible
    np.testing.assert_allclose(mixed, 0.25 * train + 0.75 * held_out, rtol=1e-6)
    np.testing.assert_allclose(score(1.0)[0], train, rtol=1e-6)
    for a, b, c in zip(*map(jax.tree.leaves, (state_held, state_train, state_mixed))):
        np.testing.assert_array_equal(a, b)  # the score only: the training round is the same
        np.testing.assert_array_equal(a, c)


def test_a_mixed_meta_loss_names_its_own_meta_training_and_records_its_weight():
    from lagg_pipeline.jobs.meta_train import meta_params_metadata, meta_run_name

    base = family_cfg(task={"name": "digits_mlp", "dataset": "digits"})
    mixed = family_cfg(task={"name": "digits_mlp", "dataset": "digits"}, meta_loss_train_weight=0.5)
    assert meta_run_name(base) != meta_run_name(mixed)
    assert "meta_loss_train_weight" not in meta_params_metadata(base)  # earlier files and names unchanged
    assert meta_params_metadata(mixed)["meta_loss_train_weight"] == 0.5


@pytest.mark.parametrize("overrides, message", [
    ({"meta_tasks": ["digits_mlp", "no_such_task"]}, "meta_tasks: no_such_task is not a task; choose from:"),
    ({"meta_tasks": ["digits_mlp", "digits_mlp"]}, "names a task twice"),
    ({"meta_tasks": ["digits_mlp", "mnist1d_mlp_small", "mnist1d_mlp_deep"]},
     "num_tasks=8 is not allowed with 3 meta_tasks; it must be a multiple of 3"),
    ({"meta_loss_split": "resplit", "partition": {"name": "dirichlet"}},
     "meta_loss_split=resplit is not allowed with partition=dirichlet; it re-divides the whole pool per episode: "
     "meta-train over clients with meta_loss_split=train or outer_valid"),
    ({"meta_loss_train_weight": 0.5}, "meta_loss_train_weight=0.5 is not allowed with meta_loss_split=train; it "
     "must be in [0, 1] and mixes the training loss into a held-out meta-loss (outer_valid or resplit)"),
    ({"meta_loss_split": "resplit", "meta_loss_train_weight": 1.5}, "meta_loss_train_weight=1.5 is not allowed"),
])
def test_family_and_resplit_settings_are_refused_in_one_line(overrides, message):
    """Only where they would be used: a job that meta-trains (the resplit default must not stop
    a hand-designed benchmark over clients)."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config),
                          {"optimizer": {"name": "lagg_a"}, "task": {"name": "digits_mlp", "dataset": "digits"}},
                          overrides)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_resplit_over_clients_is_fine_where_nothing_is_meta_trained():
    for job in ({"optimizer": {"name": "fedavg"}}, {"optimizer": {"name": "lagg_a"}, "mode": "benchmark",
                                                    "pretrained": "family_k8_h4"}):
        validate(OmegaConf.merge(OmegaConf.structured(Config), {"task": {"name": "digits_mlp", "dataset": "digits"}},
                                 {"meta_loss_split": "resplit", "partition": {"name": "dirichlet"}}, job))

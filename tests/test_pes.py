"""Truncated PES: episode bookkeeping, agreement with finite differences, and learning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from lagg_pipeline.aggregators.learned import LearnedAggregator
from lagg_pipeline.config import Config
from lagg_pipeline.data import Split
from lagg_pipeline.meta.pes import PES, PESData
from lagg_pipeline.meta.train import MetaTrainer
from lagg_pipeline.meta.truncation import Episode, advance, initial_episodes, normalize_meta_loss, sample_lengths
from lagg_pipeline.tasks import Task


def linear_task(dim=4, classes=3):
    """Softmax regression: a tiny convex inner problem."""

    def init(key):
        return {"w": 0.1 * jax.random.normal(key, (dim, classes)), "b": jnp.zeros(classes)}

    def apply(params, x):
        return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]

    return Task("linear", init, apply, classes)


def synthetic_split(n=64, dim=4, classes=3):
    kx, kw = jax.random.split(jax.random.PRNGKey(42))
    x = jax.random.normal(kx, (n, dim, 1, 1))
    y = jnp.argmax(x.reshape(n, dim) @ jax.random.normal(kw, (dim, classes)), axis=-1).astype(jnp.int32)
    return Split(x, y)


DATA = PESData(synthetic_split())


def tiny_cfg(**overrides):
    base = {"optimizer": {"name": overrides.pop("optimizer", "lopt")}, "num_grads": 2, "num_local_steps": 2,
            "local_batch_size": 8, "local_learning_rate": 0.3, "hidden_size": 8, "num_tasks": 4,
            "trunc_length": 5, "num_inner_steps": 40, "truncation_schedule_min_length": 10,
            "num_outer_steps": 8, "schedule": {"name": "constant", "peak_value": 3e-3}}
    return OmegaConf.merge(OmegaConf.structured(Config), base, overrides)


def test_lengths_are_log_uniform_within_bounds():
    lengths = np.asarray(sample_lengths(jax.random.PRNGKey(0), (20000,), 100, 1000))
    assert lengths.min() >= 100 and lengths.max() < 1000
    # log-uniform: the median is near sqrt(100 * 1000) ~ 316, not the midpoint 550.
    assert 290 < np.median(lengths) < 345


def test_initial_offsets_are_staggered_and_resets_happen_at_the_end():
    episode = initial_episodes(jax.random.PRNGKey(1), 64, 100, 1000)
    assert len(np.unique(np.asarray(episode.step))) > 40
    assert np.all(np.asarray(episode.step) < 1000)
    episode = Episode(jnp.array([3, 5, 9]), jnp.array([5, 5, 10]))
    nxt, is_reset = advance(episode, jax.random.PRNGKey(2), 100, 1000)
    np.testing.assert_array_equal(is_reset, [False, True, False])
    np.testing.assert_array_equal(nxt.step, [4, 0, 10])
    assert nxt.length[0] == 5 and nxt.length[2] == 10 and 100 <= int(nxt.length[1]) < 1000


def test_meta_loss_is_clipped_and_nan_is_the_maximum():
    top = 1.5 * np.log(10)
    out = normalize_meta_loss(jnp.array([-1.0, 0.5, 100.0, jnp.nan, jnp.inf]), 10)
    np.testing.assert_allclose(out, [0.0, 0.5, top, top, top], rtol=1e-6)


def _pes(num_tasks, trunc_length, variant="lopt"):
    aggregator = LearnedAggregator(variant, num_grads=2, hidden_size=8)
    pes = PES(linear_task(), aggregator, num_tasks=num_tasks, trunc_length=trunc_length,
              pes_std=0.01, min_length=1000, max_length=1001, num_grads=2, num_local_steps=2,
              local_batch_size=8, local_learning_rate=0.3)
    return aggregator, pes


def test_pes_agrees_with_finite_differences_of_the_truncated_objective():
    num_tasks, T = 128, 4
    aggregator, pes = _pes(num_tasks, T)
    theta = aggregator.init_meta_params(jax.random.PRNGKey(0))
    # Episodes that cannot end inside the window: the objective is the plain T-round loss.
    state = pes.init(theta, jax.random.PRNGKey(1), DATA)
    state = state._replace(episode=Episode(jnp.zeros(num_tasks, jnp.int32), jnp.full(num_tasks, 1000, jnp.int32)))

    def objective(meta):
        meta_2N = jax.tree.map(lambda p: jnp.broadcast_to(p, (2 * num_tasks, *p.shape)), meta)
        return jnp.mean(pes.unroll(meta_2N, state, DATA)[1].loss)

    grad = jax.jit(jax.grad(objective))(theta)
    objective = jax.jit(objective)
    norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grad)))
    u = jax.tree.map(lambda g: g / norm, grad)
    h = 0.05
    shifted = lambda s: jax.tree.map(lambda p, d: p + s * h * d, theta, u)
    slope = (objective(shifted(1.0)) - objective(shifted(-1.0))) / (2 * h)
    assert abs(float(slope) - float(norm)) < 0.1 * float(norm), "autodiff and finite differences disagree"

    estimate, _, _ = jax.jit(pes.estimate)(theta, state, jax.random.PRNGKey(3), DATA)
    along = sum(jnp.sum(e * d) for e, d in zip(jax.tree.leaves(estimate), jax.tree.leaves(u)))
    assert float(slope) > 0 or float(slope) < 0  # a real, non-zero slope to compare against
    assert np.sign(float(along)) == np.sign(float(slope))
    assert 0.6 < float(along) / float(slope) < 1.4, (float(along), float(slope))


def test_resets_are_masked_and_restart_the_accumulator():
    num_tasks, T = 3, 6
    aggregator, pes = _pes(num_tasks, T)
    theta = aggregator.init_meta_params(jax.random.PRNGKey(0))
    state = pes.init(theta, jax.random.PRNGKey(1), DATA)
    # Particle 0 ends after 2 more rounds, the others run on.
    state = state._replace(episode=Episode(jnp.array([8, 0, 0], jnp.int32), jnp.array([10, 1000, 1000], jnp.int32)))
    meta_2N = jax.tree.map(lambda p: jnp.broadcast_to(p, (2 * num_tasks, *p.shape)), theta)
    new_state, out = jax.jit(pes.unroll)(meta_2N, state, DATA)
    np.testing.assert_array_equal(out.mask[:, 0], [1, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(out.finished[:, 0], [0, 0, 1, 1, 1, 1])
    assert np.all(out.mask[:, 1:] == 1) and not np.any(out.finished[:, 1:])
    assert int(new_state.episode.step[0]) == 3  # reset at step 3, then 3 rounds of the new episode
    state = state._replace(accumulator=jax.tree.map(jnp.ones_like, state.accumulator))
    _, after, _ = jax.jit(pes.estimate)(theta, state, jax.random.PRNGKey(5), DATA)
    # xi <- xi + eps, then the particle that reset keeps only this window's eps.
    xi = np.asarray(jax.tree.leaves(after.accumulator)[0])
    eps = xi[1] - 1.0  # particles 1 and 2 did not reset: 1 + eps
    assert np.all(np.abs(xi[0]) < 0.1)  # ~ N(0, 0.01^2), not 1 + eps
    assert np.all(np.abs(eps) < 0.1) and np.any(eps != 0)


def test_the_flat_estimate_equals_the_per_leaf_formula():
    """PES keeps eps, xi and the estimate as one [N, P] array (tree order); leaf by leaf, the
    members are theta +/- eps and the estimate mean_i(a_i xi_i + b_i eps_i) / (2 std^2)."""
    num_tasks, T = 3, 6
    aggregator, pes = _pes(num_tasks, T)
    theta = aggregator.init_meta_params(jax.random.PRNGKey(0))
    state = pes.init(theta, jax.random.PRNGKey(1), DATA)
    state = state._replace(episode=Episode(jnp.array([8, 0, 0], jnp.int32), jnp.array([10, 1000, 1000], jnp.int32)),
                           accumulator=jax.tree.map(lambda a: jnp.full_like(a, 0.02), state.accumulator))
    key = jax.random.PRNGKey(5)
    eps_NxP = pes.perturbations(theta, key)
    leaves, treedef = jax.tree.flatten(theta)
    assert eps_NxP.shape == (num_tasks, sum(p.size for p in leaves))
    cuts = np.cumsum([0] + [p.size for p in leaves])
    eps = treedef.unflatten([eps_NxP[:, a:b].reshape(num_tasks, *p.shape) for a, b, p in zip(cuts, cuts[1:], leaves)])
    meta_2N = jax.tree.map(lambda p, e: jnp.concatenate([p + e, p - e]), theta, eps)
    for got, want in zip(jax.tree.leaves(pes.antithetic(theta, eps_NxP)), jax.tree.leaves(meta_2N)):
        np.testing.assert_array_equal(got, want)

    grad, after, _ = jax.jit(pes.estimate)(theta, state, key, DATA)
    _, out = jax.jit(pes.unroll)(meta_2N, state, DATA)
    diff = np.asarray(out.loss[:, :num_tasks] - out.loss[:, num_tasks:])
    mask, finished = np.asarray(out.mask), np.asarray(out.finished)
    a = (diff * (1 - finished) * mask).sum(0) / mask.sum(0)
    b = (diff * finished * mask).sum(0) / mask.sum(0)
    assert a[0] != 0 and b[0] != 0 and b[1] == 0  # particle 0 reset inside the window, 1 and 2 did not
    for g, xi0, e, xi1 in zip(*(jax.tree.leaves(t) for t in (grad, state.accumulator, eps, after.accumulator))):
        xi, e = np.asarray(xi0 + e), np.asarray(e)
        shape = (num_tasks, *(1,) * (xi.ndim - 1))
        want = np.mean(a.reshape(shape) * xi + b.reshape(shape) * e, axis=0) / (2 * pes.std ** 2)
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
        # the reset particle keeps eps only (to float32 rounding: XLA fuses the draw into each use)
        np.testing.assert_allclose(xi1, np.concatenate([e[:1], xi[1:]]), rtol=1e-6, atol=1e-8)


def test_meta_training_makes_the_learned_update_train_faster():
    """A few outer steps on the tiny task: the learned update reaches a lower inner loss."""
    cfg = tiny_cfg(num_outer_steps=30, schedule={"name": "constant", "peak_value": 3e-2})
    aggregator = LearnedAggregator("lopt", cfg.num_grads, cfg.hidden_size)
    trainer = MetaTrainer(cfg, linear_task(), DATA, aggregator)
    state = trainer.init()

    def inner_loss(meta_params):
        eval_pes = PES(linear_task(), aggregator, num_tasks=16, trunc_length=30,
                       pes_std=0.01, min_length=1000, max_length=1001, num_grads=2, num_local_steps=2,
                       local_batch_size=8, local_learning_rate=0.3)
        s = eval_pes.init(meta_params, jax.random.PRNGKey(7), DATA)
        s = s._replace(episode=Episode(jnp.zeros(16, jnp.int32), jnp.full(16, 1000, jnp.int32)))
        meta_2N = jax.tree.map(lambda p: jnp.broadcast_to(p, (32, *p.shape)), meta_params)
        return float(jnp.mean(eval_pes.unroll(meta_2N, s, DATA)[1].loss[-5:]))

    before = inner_loss(state.meta_params)
    for _ in range(cfg.num_outer_steps):
        state, metrics = trainer.step(state)
    after = inner_loss(state.meta_params)
    assert np.isfinite(float(metrics["meta_loss"]))
    assert after < before - 0.01, (before, after)


def test_outer_valid_meta_loss_scores_the_updated_weights_on_that_split():
    """meta_loss_split=outer_valid: each round's meta-loss is the loss of the weights after the
    round's update on the held-out split (whole, since it is smaller than a round's batch)."""
    num_tasks = 2
    aggregator = LearnedAggregator("lopt", num_grads=2, hidden_size=8)
    pes = PES(linear_task(), aggregator, num_tasks=num_tasks, trunc_length=1, pes_std=0.01, min_length=1000,
              max_length=1001, num_grads=2, num_local_steps=2, local_batch_size=8, local_learning_rate=0.3,
              meta_loss_split="outer_valid")
    held_out = synthetic_split(n=20)._replace(y=jnp.zeros(20, jnp.int32))  # labels unlike the train split's
    data = PESData(synthetic_split(), held_out)
    theta = aggregator.init_meta_params(jax.random.PRNGKey(0))
    state = pes.init(theta, jax.random.PRNGKey(1), data)
    state = state._replace(episode=Episode(jnp.zeros(num_tasks, jnp.int32), jnp.full(num_tasks, 1000, jnp.int32)))
    meta_2N = jax.tree.map(lambda p: jnp.broadcast_to(p, (2 * num_tasks, *p.shape)), theta)
    after, out = jax.jit(pes.unroll)(meta_2N, state, data)
    for member in range(2 * num_tasks):
        params = jax.tree.map(lambda x: x[member], after.rounds.params)
        expected = linear_task().loss(params, held_out.x, held_out.y)
        np.testing.assert_allclose(out.loss[0, member], expected, rtol=1e-5)
    _, train_out = jax.jit(_pes(num_tasks, 1)[1].unroll)(meta_2N, state, DATA)
    assert not np.allclose(out.loss, train_out.loss)  # a different objective, not the training loss


def _outer_valid_pes(num_tasks, train, held_out):
    aggregator = LearnedAggregator("lopt", num_grads=2, hidden_size=8)
    pes = PES(linear_task(), aggregator, num_tasks=num_tasks, trunc_length=2, pes_std=0.01, min_length=1000,
              max_length=1001, num_grads=2, num_local_steps=2, local_batch_size=8, local_learning_rate=0.3,
              meta_loss_split="outer_valid")
    data = PESData(train, held_out)
    theta = aggregator.init_meta_params(jax.random.PRNGKey(0))
    return pes, data, theta, pes.init(theta, jax.random.PRNGKey(1), data)


def test_batched_outer_valid_meta_loss_draws_a_fresh_round_sized_batch_each_round():
    """A held-out split larger than a round (Fashion-MNIST's): each round scores a round-sized
    batch of it, drawn at the training stream's position, so the two rounds see different batches."""
    from lagg_pipeline.data import sample_batch
    from lagg_pipeline.data.partition import stream_position

    held_out = synthetic_split(n=200)  # a round draws 2 * 2 * 8 = 32 examples
    pes, data, theta, state = _outer_valid_pes(2, synthetic_split(), held_out)
    assert held_out.y.shape[0] > pes.round_size
    meta_2N = jax.tree.map(lambda p: jnp.broadcast_to(p, (4, *p.shape)), theta)
    _, out = jax.jit(pes.unroll)(meta_2N, state, data)
    assert np.all(np.isfinite(out.loss)) and not np.allclose(out.loss[0], out.loss[1])
    member = jax.tree.map(lambda x: x[0], state.rounds)
    trained, loss = pes._round(theta, member, data)
    x, y = sample_batch(held_out, jax.random.fold_in(trained.data_key, 2**31 - 1),
                        stream_position(trained.data_counter), pes.round_size)
    np.testing.assert_allclose(loss, linear_task().loss(trained.params, x, y), rtol=1e-5)
    assert not np.isclose(loss, linear_task().loss(trained.params, held_out.x, held_out.y))
    grad, _, metrics = jax.jit(pes.estimate)(theta, state, jax.random.PRNGKey(3), data)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad)) and np.isfinite(metrics["meta_loss"])


def test_meta_loss_batch_stream_is_keyed_apart_from_every_client_stream(monkeypatch):
    """Under a partition, client m's stream is fold_in(key, m) and the selection fold_in(key, M):
    the held-out batch must use neither (it used fold_in(key, 1), client 1's)."""
    from lagg_pipeline.data.partition import assign, client_split
    from lagg_pipeline.meta import pes as pes_module

    train = synthetic_split(n=64)
    clients = client_split(train, assign(np.asarray(train.y), "dirichlet", num_clients=8, alpha=1.0,
                                         shards_per_client=2, seed=0))
    pes, data, theta, state = _outer_valid_pes(2, clients, synthetic_split(n=200))
    used = []
    real = pes_module.sample_batch
    monkeypatch.setattr(pes_module, "sample_batch", lambda split, key, *a: used.append(key) or real(split, key, *a))
    member = jax.tree.map(lambda x: x[0], state.rounds)
    pes._round(theta, member, data)
    (key,) = used
    taken = [jax.random.fold_in(member.data_key, m) for m in range(9)] + [member.data_key]
    assert not any(np.array_equal(key, k) for k in taken)


def _member_alone(pes, meta_2N, state, data, rounds):
    """Every member's rounds with each member drawing its own examples (the unroll before it drew
    each pair's once): (normalised losses [T, 2N], member states [2N])."""
    def body(members, _):
        return jax.vmap(lambda m, s: pes._round(m, s, data))(meta_2N, members)

    members, losses = jax.jit(lambda r: jax.lax.scan(body, r, None, length=rounds))(state.rounds)
    return normalize_meta_loss(losses, pes.task.num_classes), members


@pytest.mark.parametrize("meta_loss_split", ["train", "resplit"])
def test_pairs_drawing_their_examples_once_equal_each_member_drawing_its_own(meta_loss_split):
    from lagg_pipeline.data.episode_split import EpisodePool

    num_tasks, T = 3, 4
    aggregator = LearnedAggregator("lagg_a", num_grads=2, hidden_size=8)
    pes = PES(linear_task(), aggregator, num_tasks=num_tasks, trunc_length=T, pes_std=0.01, min_length=1000,
              max_length=1001, num_grads=2, num_local_steps=2, local_batch_size=8, local_learning_rate=0.3,
              meta_loss_split=meta_loss_split)
    split = synthetic_split(n=64)
    data = PESData(EpisodePool(split.x, split.y) if meta_loss_split == "resplit" else split)
    theta = aggregator.init_meta_params(jax.random.PRNGKey(0))
    state = pes.init(theta, jax.random.PRNGKey(1), data)
    state = state._replace(episode=Episode(jnp.zeros(num_tasks, jnp.int32), jnp.full(num_tasks, 1000, jnp.int32)))
    meta_2N = pes.antithetic(theta, pes.perturbations(theta, jax.random.PRNGKey(2)))
    after, out = jax.jit(pes.unroll)(meta_2N, state, data)
    losses, members = _member_alone(pes, meta_2N, state, data, T)
    np.testing.assert_array_equal(out.loss, losses)
    for got, want in zip(jax.tree.leaves(after.rounds), jax.tree.leaves(members)):  # two programs: XLA fuses
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)  # them apart, to float32 rounding


def test_after_resets_both_members_of_a_pair_still_read_the_stream_the_pair_drew_for():
    """Resets give a pair a fresh stream: the members' own (key, counter) must follow it, so a
    member running on alone draws what the unroll draws for its pair."""
    num_tasks = 3
    aggregator, pes = _pes(num_tasks, 6)
    theta = aggregator.init_meta_params(jax.random.PRNGKey(0))
    state = pes.init(theta, jax.random.PRNGKey(1), DATA)
    state = state._replace(episode=Episode(jnp.array([8, 9, 0], jnp.int32), jnp.array([10, 10, 1000], jnp.int32)))
    meta_2N = jax.tree.map(lambda p: jnp.broadcast_to(p, (2 * num_tasks, *p.shape)), theta)
    after, out = jax.jit(pes.unroll)(meta_2N, state, DATA)
    assert np.asarray(out.finished[-1]).tolist() == [True, True, False]
    for leaf in jax.tree.leaves((after.rounds.data_key, after.rounds.data_counter)):
        np.testing.assert_array_equal(leaf[:num_tasks], leaf[num_tasks:])
    # the rounds after the last reset, replayed member by member, give the unroll's next truncation
    again, next_out = jax.jit(pes.unroll)(meta_2N, after, DATA)
    losses, _ = _member_alone(pes, meta_2N, after, DATA, 2)
    np.testing.assert_array_equal(next_out.loss[:2], losses)

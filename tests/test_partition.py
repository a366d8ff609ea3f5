"""Heterogeneous clients: partitions, per-client streams, partial participation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from lagg_pipeline.aggregators.hand import fedavg
from lagg_pipeline.benchmark import run_benchmark
from lagg_pipeline.config import Config, ConfigError, PartitionConfig, validate
from lagg_pipeline.data import Split, Splits
from lagg_pipeline.data.partition import (ClientCounters, assign, client_indices, client_split, describe,
                                          init_counter, partition_splits, sample_clients)
from lagg_pipeline.meta.pes import PES, PESData
from lagg_pipeline.aggregators.learned import LearnedAggregator
from lagg_pipeline.simulator import make_round_step

from test_pes import linear_task, synthetic_split

LABELS = np.repeat(np.arange(10), 100)[np.random.default_rng(0).permutation(1000)]


def _histograms(clients, labels=LABELS):
    return np.stack([np.bincount(labels[c], minlength=10) for c in clients])


@pytest.mark.parametrize("scheme", ["dirichlet", "shards"])
def test_partition_covers_every_example_exactly_once(scheme):
    clients = assign(LABELS, scheme, num_clients=16, alpha=0.3, shards_per_client=2, seed=3)
    assert len(clients) == 16 and min(len(c) for c in clients) >= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(clients)), np.arange(len(LABELS)))


def test_dirichlet_skew_follows_alpha():
    flat = _histograms(assign(LABELS, "dirichlet", num_clients=10, alpha=1e5, shards_per_client=2, seed=0))
    skewed = _histograms(assign(LABELS, "dirichlet", num_clients=10, alpha=0.05, shards_per_client=2, seed=0))
    np.testing.assert_array_equal(flat.sum(1), 100)  # equal client sizes
    # alpha -> inf: every client's class histogram is close to the global (uniform) one.
    assert np.abs(flat / 100 - 0.1).max() < 0.1
    # alpha small: most of a client's examples come from one or two classes.
    top2 = np.sort(skewed, axis=1)[:, -2:].sum(1) / skewed.sum(1)
    assert top2.mean() > 0.8
    assert (skewed / 100).max(1).mean() > 3 * (flat / 100).max(1).mean()


def test_shards_give_each_client_few_classes():
    clients = assign(LABELS, "shards", num_clients=20, alpha=1.0, shards_per_client=2, seed=1)
    classes = (_histograms(clients) > 0).sum(1)
    assert classes.max() <= 2 and classes.min() >= 1  # 50 shards of one class each (100 per class)


def test_partition_is_deterministic_in_its_seed():
    a = assign(LABELS, "dirichlet", num_clients=8, alpha=0.5, shards_per_client=2, seed=7)
    b = assign(LABELS, "dirichlet", num_clients=8, alpha=0.5, shards_per_client=2, seed=7)
    c = assign(LABELS, "dirichlet", num_clients=8, alpha=0.5, shards_per_client=2, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _toy_clients(sizes):
    """A split whose x is each example's own position; clients own consecutive blocks of ``sizes``."""
    n = sum(sizes)
    split = Split(jnp.arange(n, dtype=jnp.float32)[:, None], jnp.zeros(n, jnp.int32))
    bounds = np.cumsum([0, *sizes])
    return client_split(split, [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]), bounds


def _owner(bounds, positions):
    return np.searchsorted(bounds, positions, side="right") - 1


def test_each_round_picks_k_distinct_clients_and_reads_only_their_examples():
    train, bounds = _toy_clients([5, 9, 3, 12, 7, 6])
    counter = init_counter(train)
    draw = jax.jit(lambda c: sample_clients(train, jax.random.PRNGKey(0), c, 3, 4))
    seen = np.zeros(6)
    for _ in range(60):
        x, _, counter = draw(counter)
        owners = _owner(bounds, np.asarray(x)[..., 0].astype(int))  # [K, per_client]
        assert np.all(owners == owners[:, :1])  # each worker's examples are one client's
        picked = owners[:, 0]
        assert len(set(picked)) == 3
        seen[picked] += 1
    assert seen.min() > 15  # every client takes part (60 rounds x 3 of 6: 30 each on average)
    # Counters count what each client drew: 4 examples per participation.
    np.testing.assert_array_equal(counter.per_client_M, 4 * seen)
    assert int(counter.total) == 60 * 3 * 4


def test_a_client_with_fewer_examples_than_a_round_wraps_its_own_data_without_replacement():
    train, bounds = _toy_clients([3, 5])
    counter = init_counter(train)
    draw = jax.jit(lambda c: sample_clients(train, jax.random.PRNGKey(1), c, 2, 7))
    streams = {0: [], 1: []}
    for _ in range(6):
        x, _, counter = draw(counter)
        for row in np.asarray(x)[..., 0].astype(int):
            streams[int(_owner(bounds, row[:1])[0])].extend(row)
    for m, size in ((0, 3), (1, 5)):
        stream = np.array(streams[m])
        assert len(stream) == 42
        for epoch in range(len(stream) // size):  # each pass over the client is a permutation of it
            np.testing.assert_array_equal(np.sort(stream[epoch * size:(epoch + 1) * size]),
                                          np.arange(bounds[m], bounds[m + 1]))


def test_iid_partition_leaves_the_splits_and_the_stream_unchanged():
    split = synthetic_split()
    splits = Splits(split, split, split, split, 3)
    assert partition_splits(splits, PartitionConfig()) is splits
    assert isinstance(init_counter(split), jax.Array) and init_counter(split).shape == ()


def test_rounds_over_clients_are_a_pure_function_of_the_state():
    """Resume needs the whole client stream (selection and per-client positions) in the state."""
    split = synthetic_split(n=96)
    train = client_split(split, assign(np.asarray(split.y), "dirichlet", num_clients=6, alpha=0.5,
                                       shards_per_client=2, seed=0))
    step = jax.jit(make_round_step(linear_task(), fedavg(), num_grads=2, num_local_steps=2, local_batch_size=8,
                                   local_learning_rate=0.3))
    from lagg_pipeline.benchmark import init_round_states

    state = jax.tree.map(lambda x: x[0], init_round_states(linear_task(), fedavg(), 0, 1, train))
    assert isinstance(state.data_counter, ClientCounters)
    states = [state]
    for _ in range(6):
        states.append(step(states[-1], train)[0])
    resumed = states[3]
    for _ in range(3):
        resumed = step(jax.tree.map(np.asarray, resumed), train)[0]  # through host memory, as a checkpoint
    jax.tree.map(np.testing.assert_array_equal, resumed, states[6])


def test_benchmark_and_pes_run_over_clients():
    split = synthetic_split(n=96)
    train = client_split(split, assign(np.asarray(split.y), "shards", num_clients=8, alpha=1.0,
                                       shards_per_client=1, seed=0))
    splits = Splits(train, split, split, split, 3)
    result = run_benchmark(linear_task(), splits, fedavg(), name="fedavg", num_grads=4, num_local_steps=2,
                           local_batch_size=8, local_learning_rate=0.3, num_runs=2, num_rounds=20, eval_every=10,
                           seed=0, progress=False)
    assert np.all(np.isfinite(result.train_loss)) and result.test_loss[:, -1].mean() < result.test_loss[:, 0].mean()
    aggregator = LearnedAggregator("lagg_a", num_grads=4, hidden_size=8)
    pes = PES(linear_task(), aggregator, num_tasks=2, trunc_length=3, pes_std=0.01, min_length=4, max_length=6,
              num_grads=4, num_local_steps=2, local_batch_size=8, local_learning_rate=0.3)
    theta = aggregator.init_meta_params(jax.random.PRNGKey(0))
    data = PESData(train)
    state = pes.init(theta, jax.random.PRNGKey(1), data)
    estimate = jax.jit(pes.estimate)
    for k in range(3):  # episodes of 4-5 rounds: fresh particles appear with fresh client counters
        grad, state, metrics = estimate(theta, state, jax.random.PRNGKey(2 + k), data)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))
    assert np.any(np.asarray(state.rounds.data_counter.per_client_M) > 0)


def test_describe_reports_sizes_and_skew():
    split = Split(jnp.zeros((1000, 1)), jnp.asarray(LABELS, jnp.int32))
    train = client_split(split, assign(LABELS, "shards", num_clients=20, alpha=1.0, shards_per_client=1, seed=0))
    numbers = describe(train)
    assert numbers["partition_min_client_size"] == numbers["partition_max_client_size"] == 50
    assert numbers["partition_mean_dominant_class_fraction"] == 1.0
    assert numbers["partition_mean_classes_per_client"] == 1.0
    assert sum(len(c) for c in client_indices(train)) == 1000


def _cfg(**partition):
    return OmegaConf.merge(OmegaConf.structured(Config),
                           {"optimizer": {"name": "fedavg"}, "task": {"name": "digits_mlp", "dataset": "digits",
                                                                      "hidden_sizes": [32]},
                            "partition": partition})


@pytest.mark.parametrize("partition, message", [
    ({"name": "labels"}, "partition=labels is not allowed; choose one of: iid, dirichlet, shards"),
    ({"name": "dirichlet", "num_clients": 4}, "partition.num_clients=4 is not allowed; it must be >= num_grads=8"),
    ({"name": "dirichlet", "alpha": 0.0}, "partition.alpha=0.0 is not allowed; it must be > 0"),
    ({"name": "shards", "shards_per_client": 0}, "partition.shards_per_client=0 is not allowed"),
    ({"name": "shards", "num_clients": 2000}, "1150 training examples allow at most 575 clients"),
])
def test_partition_values_are_checked(partition, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(_cfg(**partition))


def test_iid_rounds_draw_the_documented_stream_bit_for_bit():
    """partition=iid: a round's K x H x B examples are exactly the stream positions the sampler
    documents (a plain-Python reference, written before clients existed), worker k the k-th block."""
    from lagg_pipeline.simulator import draw_round
    from test_data import N, _reference_indices

    split = Split(jnp.arange(N, dtype=jnp.float32)[:, None], jnp.arange(N, dtype=jnp.int32))
    key, counter = jax.random.PRNGKey(3), 2 * N - 7  # a round that crosses an epoch boundary
    x, y, after = jax.jit(draw_round, static_argnums=(3, 4, 5))(split, key, jnp.int32(counter), 2, 3, 5)
    np.testing.assert_array_equal(y, _reference_indices(key, counter, 30).reshape(2, 3, 5))
    np.testing.assert_array_equal(x[..., 0], y)
    assert int(after) == counter + 30

"""Heterogeneous clients: the training split divided among M clients, K of them per round.

``iid`` is the paper's setting: every worker draws from the whole split (no clients). The
other schemes give each of ``num_clients`` clients its own examples, every training example
to exactly one client:

- ``dirichlet``: label skew after Hsu et al. (2019), "Measuring the effects of non-identical
  data distribution for federated visual classification": client m draws class proportions
  q_m ~ Dir(alpha * 1_C) and fills its N/M examples class by class from q_m, renormalised
  over the classes that still have examples. Small alpha: a few classes per client;
  alpha -> inf: the global class histogram.
- ``shards``: McMahan et al. (2017): the split sorted by label is cut into M * s equal shards
  and each client gets s of them at random (at most s classes each).

Each round samples K distinct clients of the M (partial participation); a selected client's
H local steps draw from its own examples only, without replacement within each pass over
them and wrapping around when it holds fewer than H*B (:mod:`lagg_pipeline.data.sampler`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lagg_pipeline.data.sampler import half_bits, next_counter, stream_indices
from lagg_pipeline.data.splits import Split, Splits

PARTITIONS = ("iid", "dirichlet", "shards")


def partition_label(partition) -> str:
    """A short name of the partition, used in tags, run names and the report."""
    if partition.name == "dirichlet":
        return f"dirichlet(alpha={partition.alpha:g}, M={partition.num_clients})"
    if partition.name == "shards":
        return f"shards({partition.shards_per_client}/client, M={partition.num_clients})"
    return "iid"


def partition_slug(label: str) -> str:
    """"dirichlet(alpha=0.1, M=64)" -> "_dirichlet_alpha0.1_M64"; nothing for iid (file and entry names)."""
    if label == "iid":
        return ""
    return "_" + "_".join("".join(ch for ch in part if ch.isalnum() or ch in ".")
                          for part in label.replace("(", " ").split())


def check_partition(part, num_grads: int, dataset: str) -> None:
    """ValueError (one line naming the key) for a partition config no run can use."""
    from lagg_pipeline.data.splits import DATASETS, split_sizes

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    require(part.name in PARTITIONS, f"partition={part.name} is not allowed; choose one of: {', '.join(PARTITIONS)}")
    if part.name == "iid":
        return
    require(part.alpha > 0, f"partition.alpha={part.alpha} is not allowed; it must be > 0")
    require(part.shards_per_client >= 1,
            f"partition.shards_per_client={part.shards_per_client} is not allowed; it must be >= 1")
    require(part.num_clients >= num_grads,
            f"partition.num_clients={part.num_clients} is not allowed; it must be >= num_grads={num_grads} "
            f"(each round picks num_grads distinct clients)")
    if dataset in DATASETS:
        n_train = split_sizes(dataset)["train"]
        per_client = part.shards_per_client if part.name == "shards" else 1
        require(part.num_clients * per_client <= n_train,
                f"partition.num_clients={part.num_clients} is not allowed with partition={part.name}; "
                f"{dataset}'s {n_train} training examples allow at most {n_train // per_client} clients")


class ClientSplit(NamedTuple):
    """A training split held by M clients. Client m owns examples
    ``index_N[offset_M[m] : offset_M[m] + size_M[m]]`` of ``x``/``y``."""

    x: jax.Array
    y: jax.Array
    index_N: jax.Array  # int32 [N]: the split's positions grouped by client (a permutation)
    offset_M: jax.Array  # int32 [M]
    size_M: jax.Array  # int32 [M], every entry >= 1
    half_bits_M: jax.Array  # uint32 [M]: each client's Feistel half width (sampler.half_bits)


class ClientCounters(NamedTuple):
    """The data-stream position of a run over a :class:`ClientSplit`."""

    total: jax.Array  # int32: examples drawn by all clients so far (keys the client selection)
    per_client_M: jax.Array  # int32 [M]: examples client m has drawn from its own stream


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers summing to ``total`` in proportion to ``weights`` (largest remainders)."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[: total - counts.sum()]] += 1
    return counts


def dirichlet_assignment(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per-client example indices, label-skewed by Dir(alpha) class proportions (Hsu et al.).

    A client's class counts are its proportions times its size, rounded (no sampling noise on
    top of the Dirichlet draw, so alpha -> inf gives every client the global histogram)."""
    num_classes = int(labels.max()) + 1
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    taken = np.zeros(num_classes, dtype=np.int64)
    sizes = np.full(num_clients, len(labels) // num_clients)
    sizes[: len(labels) % num_clients] += 1
    clients = []
    for m in range(num_clients):
        proportions = rng.dirichlet(np.full(num_classes, alpha))
        counts = np.zeros(num_classes, dtype=np.int64)
        while counts.sum() < sizes[m]:
            left = np.array([len(p) for p in pools]) - taken - counts
            weights = np.where(left > 0, proportions, 0.0)
            if weights.sum() <= 1e-12 * proportions.sum():  # the classes it favours ran out: take what is left
                weights = left.astype(float)
            counts += np.minimum(_apportion(int(sizes[m] - counts.sum()), weights), left)
        clients.append(np.concatenate([pools[c][taken[c]:taken[c] + counts[c]] for c in range(num_classes)]))
        taken += counts
    return clients


def shards_assignment(labels: np.ndarray, num_clients: int, shards_per_client: int,
                      rng: np.random.Generator) -> list[np.ndarray]:
    """Per-client example indices: s label-sorted shards each (McMahan et al.)."""
    by_label = np.argsort(labels, kind="stable")
    shards = np.array_split(by_label, num_clients * shards_per_client)
    order = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in order]


def assign(labels: np.ndarray, scheme: str, *, num_clients: int, alpha: float, shards_per_client: int,
           seed: int) -> list[np.ndarray]:
    """Each client's indices into ``labels`` (a partition of all of them), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    if scheme == "dirichlet":
        return dirichlet_assignment(labels, num_clients, alpha, rng)
    if scheme == "shards":
        return shards_assignment(labels, num_clients, shards_per_client, rng)
    raise ValueError(f"partition={scheme} has no clients; choose one of: {', '.join(PARTITIONS[1:])}")


def client_split(split: Split, clients: list[np.ndarray]) -> ClientSplit:
    sizes = np.array([len(c) for c in clients], dtype=np.int32)
    if sizes.min() < 1:
        raise ValueError("every client must hold at least one example")
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    bits = np.array([half_bits(int(n)) for n in sizes], dtype=np.uint32)
    return ClientSplit(split.x, split.y, jnp.asarray(np.concatenate(clients).astype(np.int32)),
                       jnp.asarray(offsets), jnp.asarray(sizes), jnp.asarray(bits))


def partition_splits(splits: Splits, partition_cfg) -> Splits:
    """``splits`` with the training split divided among clients (unchanged for ``iid``)."""
    if partition_cfg.name == "iid":
        return splits
    clients = assign(np.asarray(splits.train.y), partition_cfg.name, num_clients=partition_cfg.num_clients,
                     alpha=partition_cfg.alpha, shards_per_client=partition_cfg.shards_per_client,
                     seed=partition_cfg.seed)
    return splits._replace(train=client_split(splits.train, clients))


def init_counter(train) -> jax.Array | ClientCounters:
    """The start of a run's data stream over ``train`` (a Split or a ClientSplit)."""
    if isinstance(train, ClientSplit):
        return ClientCounters(jnp.int32(0), jnp.zeros(train.size_M.shape, jnp.int32))
    return jnp.int32(0)


def stream_position(counter) -> jax.Array:
    """The scalar examples-drawn count of either kind of counter."""
    return counter.total if isinstance(counter, ClientCounters) else counter


def sample_clients(train: ClientSplit, key: jax.Array, counter: ClientCounters, num_grads: int,
                   per_client: int) -> tuple[jax.Array, jax.Array, ClientCounters]:
    """One round's data: K distinct clients, ``per_client`` examples from each one's own stream.

    Returns (x [K, per_client, ...], y [K, per_client], next counter). Client m's stream is
    keyed by ``fold_in(key, m)``; the selection by the round's position in the whole stream.
    """
    num_clients = train.size_M.shape[0]
    # fold_in(key, M) differs from every client's stream key fold_in(key, m), m < M.
    selection_key = jax.random.fold_in(jax.random.fold_in(key, num_clients), counter.total)
    clients_K = jax.random.choice(selection_key, num_clients, (num_grads,), replace=False)

    def draw(m):
        local = stream_indices(jax.random.fold_in(key, m), counter.per_client_M[m], per_client,
                               train.size_M[m], train.half_bits_M[m])
        return train.index_N[train.offset_M[m] + local]

    idx_KxC = jax.vmap(draw)(clients_K)
    per_client_M = counter.per_client_M.at[clients_K].set(
        jax.vmap(lambda m: next_counter(counter.per_client_M[m], per_client, train.size_M[m]))(clients_K))
    total = next_counter(counter.total, num_grads * per_client, train.y.shape[0])
    return train.x[idx_KxC], train.y[idx_KxC], ClientCounters(total, per_client_M)


def client_indices(train: ClientSplit) -> list[np.ndarray]:
    """Each client's positions in the split, back from the device arrays."""
    index, offsets, sizes = (np.asarray(a) for a in (train.index_N, train.offset_M, train.size_M))
    return [index[o:o + n] for o, n in zip(offsets, sizes)]


def describe(train: ClientSplit) -> dict[str, float]:
    """Summary numbers of a partition, logged with the run: client sizes and label skew."""
    labels = np.asarray(train.y)
    num_classes = int(labels.max()) + 1
    histograms = np.stack([np.bincount(labels[c], minlength=num_classes) for c in client_indices(train)])
    dominant = histograms.max(axis=1) / histograms.sum(axis=1)
    return {"partition_min_client_size": float(histograms.sum(axis=1).min()),
            "partition_max_client_size": float(histograms.sum(axis=1).max()),
            "partition_mean_dominant_class_fraction": float(dominant.mean()),
            "partition_mean_classes_per_client": float((histograms > 0).sum(axis=1).mean())}

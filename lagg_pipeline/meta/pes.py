"""Truncated Persistent Evolution Strategies over vmapped antithetic particles.

N particles, each an inner training run, are unrolled in antithetic pairs with
meta-parameters theta + eps_i and theta - eps_i that share data and random keys. One
truncation of T rounds for all 2N members is a single ``lax.scan`` over rounds with a
``vmap`` over members inside, so it compiles to one computation (SPEC section 4).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lagg_pipeline.config import META_LOSS_SPLITS
from lagg_pipeline.data import Split, episode_split, sample_batch
from lagg_pipeline.data.partition import ClientSplit, init_counter, stream_position
from lagg_pipeline.data.sampler import next_counter
from lagg_pipeline.meta.truncation import Episode, advance, initial_episodes, normalize_meta_loss
from lagg_pipeline.simulator import RoundState, make_round_step, round_indices, round_size, stream_size

MetaParams = Any


class PESData(NamedTuple):
    """The splits a truncation reads, passed into jit as arguments (never embedded constants)."""

    train: Split | episode_split.EpisodePool  # a pool with meta_loss_split=resplit
    meta: Split | None = None  # the split the meta-loss is measured on, when a fixed one


class PESState(NamedTuple):
    """What the particles carry from one truncation to the next."""

    rounds: RoundState  # stacked [2N]: members 0..N-1 use theta + eps, N..2N-1 theta - eps
    episode: Episode  # [N], shared by both members of a pair
    accumulator: MetaParams  # xi, leaves [N, ...]: the perturbations of the current episodes
    key: jax.Array  # resets draw their model inits, data streams and lengths from it


class Truncation(NamedTuple):
    """Per-round outputs of one truncation, each [T, ...]."""

    loss: jax.Array  # [T, 2N] normalised meta-loss of every member
    mask: jax.Array  # [T, N] 0 on reset steps
    finished: jax.Array  # [T, N] the particle has reset at or before this step
    step_size: jax.Array  # [T, 2N] mean |step| of the aggregator


class Streams(NamedTuple):
    """The antithetic pairs' data streams inside an unroll, [N] (both members of a pair share one)."""

    key: jax.Array
    counter: Any  # int32 [N], or ClientCounters over a ClientSplit
    valid: jax.Array | None  # [N, num_valid] the episode's validation indices with resplit


class Draws(NamedTuple):
    """One round's example indices of one stream (see PES._draws)."""

    train: jax.Array | None  # None over clients: the round draws its own
    valid: jax.Array | None  # the episode's validation indices with resplit


def _stack_pair(tree):
    return jax.tree.map(lambda x: jnp.concatenate([x, x]), tree)


def _flat(tree, *lead: int) -> jax.Array:
    """[*lead, P]: the leaves (each with leading axes ``lead``) flattened and joined in tree order."""
    return jnp.concatenate([x.reshape(*lead, -1) for x in jax.tree.leaves(tree)], axis=-1)


def _unflat(like, flat_xP: jax.Array):
    """``_flat``'s inverse: [..., P] cut into ``like``'s leaves, each [..., *leaf shape]."""
    leaves, treedef = jax.tree.flatten(like)
    parts = jnp.split(flat_xP, np.cumsum([p.size for p in leaves])[:-1], axis=-1)
    return treedef.unflatten([part.reshape(*flat_xP.shape[:-1], *p.shape) for part, p in zip(parts, leaves)])


def _where(cond_P, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond_P.reshape(-1, *(1,) * (x.ndim - 1)), x, y), a, b)


class PES:
    """The truncated-PES estimator for one learned aggregator on one task.

    ``aggregator`` provides ``init_meta_params`` and ``server_update(meta_params)``, whose
    state records the last round's ``mean_abs_step``; ``task`` and the :class:`PESData` given
    to :meth:`unroll` / :meth:`estimate` define the inner problem (SPEC sections 1 and 6).
    ``meta_loss_split="train"`` scores each round by its training loss; ``"outer_valid"`` by
    the loss of the updated weights on ``data.meta`` (SPEC 4, ``meta_loss_split``);
    ``"resplit"`` by their loss on the episode's own validation part of ``data.train``, an
    :class:`~lagg_pipeline.data.episode_split.EpisodePool` divided anew by every episode.
    ``meta_loss_train_weight`` w > 0 scores a held-out split by w * training loss + (1 - w) *
    held-out loss: the held-out loss alone does not reward training speed.
    """

    def __init__(self, task, aggregator, *, num_tasks: int, trunc_length: int,
                 pes_std: float, min_length: int, max_length: int, num_grads: int,
                 num_local_steps: int, local_batch_size: int, local_learning_rate: float,
                 meta_loss_split: str = "train", meta_loss_train_weight: float = 0.0, particle_sharding=None):
        if meta_loss_split not in META_LOSS_SPLITS:
            raise ValueError(f"meta_loss_split={meta_loss_split}; choose one of: {', '.join(META_LOSS_SPLITS)}")
        if not 0 <= meta_loss_train_weight <= 1:
            raise ValueError(f"meta_loss_train_weight={meta_loss_train_weight}; it must be in [0, 1]")
        self.task, self.aggregator, self.meta_loss_split = task, aggregator, meta_loss_split
        self.train_weight = meta_loss_train_weight
        self.particle_sharding = particle_sharding  # lagg_pipeline.meta.devices; None on one device
        self.num_tasks, self.trunc_length, self.std = num_tasks, trunc_length, pes_std
        self.min_length, self.max_length = min_length, max_length
        self.round_args = dict(num_grads=num_grads, num_local_steps=num_local_steps,
                               local_batch_size=local_batch_size, local_learning_rate=local_learning_rate)
        self.round_size = round_size(num_grads, num_local_steps, local_batch_size)
        self.loss_ceiling = float(normalize_meta_loss(jnp.inf, task.num_classes))

    def _round(self, meta_params, state: RoundState, data: PESData, draws: Draws | None = None):
        """One round of one member: (next state, its un-normalised meta-loss). ``draws``: its
        stream's :meth:`_draws` when the unroll drew them for its pair; None draws them here."""
        draws = self._draws(state.data_key, state.data_counter, data) if draws is None else draws
        update = self.aggregator.server_update(meta_params)
        state, train_loss = make_round_step(self.task, update, **self.round_args)(state, data.train, draws.train)
        if self.meta_loss_split == "train":
            return state, train_loss
        if self.meta_loss_split == "resplit":
            held_out = self.task.loss(state.params, data.train.x[draws.valid], data.train.y[draws.valid])
        else:
            held_out = self._held_out_loss(state, data.meta)
        if self.train_weight == 0:  # the held-out loss alone, computed exactly as without the option
            return state, held_out
        return state, self.train_weight * train_loss + (1 - self.train_weight) * held_out

    def _held_out_loss(self, state: RoundState, split: Split):
        """The updated weights' loss on the whole split, or on a round-sized batch of a larger one."""
        if split.y.shape[0] <= self.round_size:
            return self.task.loss(state.params, split.x, split.y)
        # Its own stream at the training stream's position: fresh each round, and keyed apart from
        # the client streams fold_in(key, m) and the client selection fold_in(key, M) (M < 2^31 - 1).
        x, y = sample_batch(split, jax.random.fold_in(state.data_key, 2**31 - 1), stream_position(state.data_counter),
                            self.round_size)
        return self.task.loss(state.params, x, y)

    def _draws(self, key, counter, data: PESData, valid=None) -> Draws:
        """One data stream's indices for the round from (key, counter): its training examples
        (None over clients: the round draws them) and, with resplit, the episode's validation
        examples (``valid`` when already computed: they are fixed for the episode)."""
        train = None if isinstance(data.train, ClientSplit) else round_indices(data.train, key, counter,
                                                                                self.round_size)
        if self.meta_loss_split == "resplit" and valid is None:
            valid = episode_split.valid_indices(data.train.y.shape[0], key)
        return Draws(train, valid)

    def _episode_valid(self, key_N, data: PESData):
        """[N, num_valid] each episode's validation indices with resplit, else None."""
        if self.meta_loss_split != "resplit":
            return None
        return jax.vmap(episode_split.valid_indices, in_axes=(None, 0))(data.train.y.shape[0], key_N)

    def _fresh(self, meta_params, key, train) -> RoundState:
        init_key, data_key = jax.random.split(key)
        params = self.task.init(init_key)
        return RoundState(params, self.aggregator.server_update(meta_params).init(params), data_key,
                          init_counter(train))

    def init(self, meta_params, key, data: PESData) -> PESState:
        """Fresh particles with staggered episode offsets and zero accumulators."""
        k_init, k_episode, k_next = jax.random.split(key, 3)
        fresh = jax.vmap(self._fresh, in_axes=(None, 0, None))(meta_params, jax.random.split(k_init, self.num_tasks),
                                                               data.train)
        episode = initial_episodes(k_episode, self.num_tasks, self.min_length, self.max_length)
        accumulator = jax.tree.map(lambda p: jnp.zeros((self.num_tasks, *p.shape), p.dtype), meta_params)
        return PESState(_stack_pair(fresh), episode, accumulator, k_next)

    def _next_counter(self, counter_S, trained, data: PESData):
        """The streams' positions after this round: computed where they are kept, except over
        clients, whose counters only the round's own draw advances (read from the first member
        reading each stream)."""
        if isinstance(data.train, ClientSplit):
            return jax.tree.map(lambda c, x: x[:c.shape[0]], counter_S, trained.data_counter)
        return next_counter(counter_S, self.round_size, stream_size(data.train))

    def unroll(self, meta_params_2N, state: PESState, data: PESData) -> tuple[PESState, Truncation]:
        """T rounds of all 2N members; finished episodes are reset in place.

        Over several devices each one runs its block of members on its own (``jax.shard_map``
        over the member axis, where the state already lies): nothing crosses devices inside the
        scan of rounds. Per-round collectives cost time, and on a CPU they could deadlock the
        thread pool its devices share."""
        n = self.num_tasks
        if self.particle_sharding is None:
            state, out = self._unroll_block(meta_params_2N, state, data)
        else:
            members, everywhere = PartitionSpec("particles"), PartitionSpec()
            per_member = PartitionSpec(None, "particles")
            unrolled, out = jax.shard_map(  # the accumulator stays out: only the estimate reads it
                functools.partial(self._unroll_block, data=data, axis="particles"), mesh=self.particle_sharding.mesh,
                in_specs=(members, PESState(members, everywhere, everywhere, everywhere)),
                out_specs=(PESState(members, everywhere, everywhere, everywhere), Truncation(*(per_member,) * 4)))(
                meta_params_2N, state._replace(accumulator=()))
            state = unrolled._replace(accumulator=state.accumulator)
        # mask and finished per pair: the + members' columns
        return state, out._replace(mask=out.mask[:, :n], finished=out.finished[:, :n])

    def _unroll_block(self, meta_params_B, state: PESState, data: PESData, axis: str | None = None):
        """:meth:`unroll` of a block of B consecutive members: all 2N (``axis`` None), or inside
        ``shard_map`` over ``axis`` this device's B = 2N/D. The state's episodes and key are the
        [N] ones of every pair on every device; the Truncation's columns are the block's members.

        Both members of a pair read the same data stream: the block carries one stream per pair
        it holds (N of them for all 2N members, and B <= N distinct pairs on a device), drawn once
        per round for the members that read it."""
        n = self.num_tasks
        block = jax.tree.leaves(state.rounds)[0].shape[0]
        num_streams = min(block, n)
        copies = block // num_streams  # 2: the whole [+pairs, -pairs]; 1: distinct pairs
        if axis is None:
            mine = lambda x_N: x_N
        else:  # this block's pairs: members dB .. dB + B - 1 read pairs (dB + j) mod N
            first = jax.lax.axis_index(axis) * block % n
            mine = lambda x_N: jax.lax.dynamic_slice_in_dim(jnp.concatenate([x_N, x_N]), first, num_streams)
        tile = lambda tree: jax.tree.map(lambda x: jnp.concatenate([x] * copies), tree)

        def reset(trained, streams, is_reset_S, k_reset):
            fresh_S = jax.vmap(self._fresh, in_axes=(0, 0, None))(
                jax.tree.map(lambda x: x[:num_streams], meta_params_B), mine(jax.random.split(k_reset, n)), data.train)
            fresh_streams = Streams(fresh_S.data_key, fresh_S.data_counter, self._episode_valid(fresh_S.data_key, data))
            return _where(tile(is_reset_S), tile(fresh_S), trained), _where(is_reset_S, fresh_streams, streams)

        def body(carry, _):
            rounds, streams, episode, key = carry
            key, k_reset, k_length = jax.random.split(key, 3)
            episode, is_reset_N = advance(episode, k_length, self.min_length, self.max_length)
            is_reset_S = mine(is_reset_N)
            draws_S = jax.vmap(self._draws, in_axes=(0, 0, None, 0))(streams.key, streams.counter, data, streams.valid)
            trained, loss_B = jax.vmap(self._round, in_axes=(0, 0, None, 0))(meta_params_B, rounds, data, tile(draws_S))
            streams = streams._replace(counter=self._next_counter(streams.counter, trained, data))
            # Most rounds reset no particle: skip building fresh ones then (a real branch in a scan).
            rounds, streams = jax.lax.cond(jnp.any(is_reset_S), reset, lambda t, s, *_: (t, s), trained, streams,
                                           is_reset_S, k_reset)
            loss_B = normalize_meta_loss(loss_B, self.task.num_classes)
            return (rounds, streams, episode, key), (loss_B, tile(1.0 - is_reset_S), tile(is_reset_S),
                                                     trained.server_state.mean_abs_step)

        readers = jax.tree.map(lambda x: x[:num_streams], state.rounds)
        streams = Streams(readers.data_key, readers.data_counter, self._episode_valid(readers.data_key, data))
        (rounds, _, episode, key), (loss, mask, is_reset, step_size) = jax.lax.scan(
            body, (state.rounds, streams, state.episode, state.key), None, length=self.trunc_length)
        finished = jnp.cumsum(is_reset, axis=0) > 0
        return state._replace(rounds=rounds, episode=episode, key=key), Truncation(loss, mask, finished, step_size)

    def perturbations(self, meta_params, key) -> jax.Array:
        """eps [N, P] ~ N(0, std^2), P the meta-parameters' total size in tree order: one draw,
        not one per leaf (each random-bits kernel costs a second of compile)."""
        leaves = jax.tree.leaves(meta_params)
        return self.std * jax.random.normal(key, (self.num_tasks, sum(p.size for p in leaves)),
                                            jnp.result_type(*leaves))

    def antithetic(self, meta_params, eps_NxP) -> MetaParams:
        """The 2N members' meta-parameters, leaves [2N, ...]: theta + eps_i, then theta - eps_i."""
        theta_P = _flat(meta_params)
        return _unflat(meta_params, jnp.concatenate([theta_P + eps_NxP, theta_P - eps_NxP]))

    def estimate(self, meta_params, state: PESState, key, data: PESData) -> tuple[MetaParams, PESState, dict]:
        """One truncation: (PES gradient estimate, next state, metrics).

        The perturbations stay one flat [N, P] array through the estimate, and so does every
        array computed from them: XLA fuses the normal draw's erf_inv polynomial into each of
        its consumers, and per leaf those were ~60 copies, a fifth of the compiled program."""
        n = self.num_tasks
        tree = functools.partial(_unflat, meta_params)
        eps_NxP = self.perturbations(meta_params, key)
        state, out = self.unroll(self.antithetic(meta_params, eps_NxP), state, data)

        loss_pos, loss_neg = out.loss[:, :n], out.loss[:, n:]
        diff = loss_pos - loss_neg
        den = out.mask.sum(axis=0)
        a_N = jnp.sum(diff * (1.0 - out.finished) * out.mask, axis=0) / den
        b_N = jnp.sum(diff * out.finished * out.mask, axis=0) / den
        xi_NxP = _flat(state.accumulator, n) + eps_NxP
        grad_P = jnp.mean(a_N[:, None] * xi_NxP + b_N[:, None] * eps_NxP, axis=0) / (2 * self.std ** 2)
        grad = tree(jnp.nan_to_num(grad_P, nan=0.0))
        any_reset_N = out.finished[-1]
        state = state._replace(accumulator=tree(jnp.where(any_reset_N[:, None], eps_NxP, xi_NxP)))
        metrics = {
            "meta_loss": jnp.sum(0.5 * (loss_pos + loss_neg) * out.mask) / jnp.sum(out.mask),
            "aggregator_step_size": jnp.mean(out.step_size),
            "episode_resets": jnp.sum(1.0 - out.mask),
            # members whose every scored round hit the loss ceiling (NaN/inf count as the ceiling)
            "diverged_fraction": jnp.mean(jnp.all((out.loss >= self.loss_ceiling)
                                                  | (jnp.concatenate([out.mask, out.mask], axis=1) == 0), axis=0)),
        }
        return grad, state, metrics

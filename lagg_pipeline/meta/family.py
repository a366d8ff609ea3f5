"""Meta-training over a family of tasks: one aggregator, PES particles divided among tasks.

Each task has its own model shapes, so each gets its own truncated-PES estimator (its own
scan inside the one jitted outer step) over ``num_tasks / len(meta_tasks)`` antithetic pairs.
Per-task meta-losses differ in scale (digits reaches 0.01 while MNIST-1D stays near 0.5), so
each task's estimate is divided by its own mean meta-loss in that truncation: the sum is then
the gradient of the mean over tasks of log(meta-loss), to which every task contributes by its
relative progress, not by its loss units.
"""
from __future__ import annotations

from importlib import resources

import jax
import jax.numpy as jnp
from omegaconf import OmegaConf

from lagg_pipeline.meta.pes import PES, PESData, PESState


def task_config(name: str):
    """The ``conf/task/<name>.yaml`` entry on top of the typed TaskConfig schema."""
    from lagg_pipeline.config import CONFIG_PACKAGE, TaskConfig

    text = resources.files(CONFIG_PACKAGE).joinpath("task", f"{name}.yaml").read_text()
    return OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.create(text))


def meta_problem(cfg, splits, task):
    """(task or list of tasks, PESData or tuple of them): what the meta-trainer unrolls.

    One task: the job's own (``task``, ``splits``). With ``meta_tasks``: each named task's
    model and data (the job's own splits are reused where the job's task is a member)."""
    if not cfg.meta_tasks:
        return task, pes_data(cfg, splits)
    from lagg_pipeline.data import load_splits
    from lagg_pipeline.data.partition import partition_splits
    from lagg_pipeline.tasks import make_task

    tasks, data = [], []
    for name in cfg.meta_tasks:
        if name == cfg.task.name:
            member_splits, member_task = splits, task
        else:
            task_cfg = task_config(name)
            member_splits = partition_splits(load_splits(task_cfg.dataset, image_size=task_cfg.image_size,
                                                         data_dir=cfg.data_dir), cfg.partition)
            member_task = make_task(task_cfg, tuple(member_splits.train.x.shape[1:]), member_splits.num_classes)
        tasks.append(member_task)
        data.append(pes_data(cfg, member_splits))
    return tasks, tuple(data)


def pes_data(cfg, splits) -> PESData:
    """The splits one task's meta-training reads: train and, for a fixed held-out meta-loss, that
    split; with ``meta_loss_split=resplit`` the pool of every non-test example instead."""
    from lagg_pipeline.data.episode_split import pool_of

    if cfg.meta_loss_split == "resplit":
        return PESData(pool_of(splits))
    return PESData(splits.train, None if cfg.meta_loss_split == "train" else getattr(splits, cfg.meta_loss_split))


class FamilyPES:
    """The PES estimator of a task family: :class:`PES`'s ``init``/``estimate`` interface over
    tuples of per-task states and data, with one member estimator per task."""

    def __init__(self, names: tuple[str, ...], members: tuple[PES, ...]):
        self.names, self.members = names, members

    def init(self, meta_params, key, data: tuple[PESData, ...]) -> tuple[PESState, ...]:
        keys = jax.random.split(key, len(self.members))
        return tuple(pes.init(meta_params, k, d) for pes, k, d in zip(self.members, keys, data))

    def estimate(self, meta_params, state, key, data):
        """(mean over tasks of each task's estimate / its mean meta-loss, next states, metrics)."""
        keys = jax.random.split(key, len(self.members))
        grads, states, metrics = [], [], {}
        for name, pes, s, k, d in zip(self.names, self.members, state, keys, data):
            grad, s, task_metrics = pes.estimate(meta_params, s, k, d)
            scale = 1.0 / jnp.maximum(task_metrics["meta_loss"], 1e-8)
            grads.append(jax.tree.map(lambda g: g * scale, grad))
            states.append(s)
            metrics.update({f"{key}/{name}": value for key, value in task_metrics.items()})
        mean = lambda key: jnp.mean(jnp.stack([metrics[f"{key}/{n}"] for n in self.names]))
        metrics.update({key: mean(key) for key in ("meta_loss", "aggregator_step_size", "diverged_fraction")})
        metrics["episode_resets"] = sum(metrics[f"episode_resets/{n}"] for n in self.names)
        grad = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
        return grad, tuple(states), metrics


def make_estimator(cfg, task, aggregator, sharding_for):
    """:class:`PES` for one task, :class:`FamilyPES` for a list of tasks (particles divided
    evenly). ``sharding_for(pairs)`` gives the particle sharding of a PES with that many pairs."""
    def pes(member_task, num_pairs):
        return PES(member_task, aggregator, num_tasks=num_pairs, trunc_length=cfg.trunc_length,
                   pes_std=cfg.pes_std, min_length=cfg.truncation_schedule_min_length,
                   max_length=cfg.num_inner_steps, num_grads=cfg.num_grads,
                   num_local_steps=cfg.num_local_steps, local_batch_size=cfg.local_batch_size,
                   local_learning_rate=cfg.local_learning_rate, meta_loss_split=cfg.meta_loss_split,
                   meta_loss_train_weight=cfg.meta_loss_train_weight,
                   particle_sharding=sharding_for(num_pairs))

    if not isinstance(task, list):  # a Task is itself a (named) tuple
        return pes(task, cfg.num_tasks)
    per_task = cfg.num_tasks // len(task)
    return FamilyPES(tuple(t.name for t in task), tuple(pes(t, per_task) for t in task))

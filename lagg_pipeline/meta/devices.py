"""Spreading PES particles over devices: the local ones (GPUs, or CPU devices for tests) and,
with ``distributed.enabled=true``, those of every process that joined JAX's distributed runtime.

The 2N antithetic members of a truncation are independent until the estimate averages
them, so their leading axis is split over a one-dimensional ``particles`` mesh, each device
running whole pairs (``PES.unroll``); XLA's SPMD partitioner inserts the reductions the
estimate needs. Across
processes every one runs the same program on the same (seeded) inputs; process 0 alone
writes checkpoints, exports and MLflow records.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def start_distributed(distributed_cfg) -> None:
    """Join JAX's distributed runtime (before any computation); values left null are
    detected from the cluster environment (SLURM, Open MPI, ...)."""
    if not distributed_cfg.enabled or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address=distributed_cfg.coordinator_address,
                               num_processes=distributed_cfg.num_processes,
                               process_id=distributed_cfg.process_id)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local, "
          f"{jax.device_count()} devices in all")


def is_leader() -> bool:
    """The process that writes (checkpoints, exports, MLflow): process 0, or the only one."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process (a one-byte all-gather with several processes):
    every process must call it at the same point, and all get the same answer."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def particle_devices(requested: int | None, num_pairs: int) -> int:
    """How many devices carry the particles: ``requested``, or (None) the most devices that
    divide the ``num_pairs`` antithetic pairs evenly (each device runs whole pairs). Several
    processes always use all devices of all of them."""
    available = jax.device_count()
    if jax.process_count() > 1:
        if (requested not in (None, available)) or num_pairs % available:
            raise ValueError(f"pes_devices={requested} is not allowed with {jax.process_count()} processes; it must "
                             f"be null or {available} (every device of every process), and {available} must divide "
                             f"the num_tasks={num_pairs} particle pairs")
        return available
    if requested is not None:
        if not 1 <= requested <= available or num_pairs % requested:
            raise ValueError(f"pes_devices={requested} is not allowed; it must be between 1 and the {available} "
                             f"local devices and divide the num_tasks={num_pairs} particle pairs")
        return requested
    return max(d for d in range(1, available + 1) if num_pairs % d == 0)


def particle_sharding(num_devices: int) -> NamedSharding | None:
    """Leading-axis sharding over the first ``num_devices`` devices (None for one device)."""
    if num_devices == 1:
        return None
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("particles",))
    return NamedSharding(mesh, PartitionSpec("particles"))


def host_copy(tree):
    """``tree`` as host numpy arrays. With several processes a leaf split over them is gathered
    first: a collective, so every process must call it at the same point."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def gather(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(gather, tree)

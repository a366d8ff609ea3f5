"""Spreading PES particles over the local devices (GPUs, or CPU devices for tests).

The 2N antithetic members of a truncation are independent until the estimate averages
them, so their leading axis is split over a one-dimensional ``particles`` mesh; XLA's SPMD
partitioner runs each device's share and inserts the reductions the estimate needs.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def particle_devices(requested: int | None, num_members: int) -> int:
    """How many local devices carry the particles: ``requested``, or (None) the most local
    devices that divide ``num_members`` evenly."""
    available = jax.local_device_count()
    if requested is not None:
        if not 1 <= requested <= available or num_members % requested:
            raise ValueError(f"pes_devices={requested} is not allowed; it must be between 1 and the {available} "
                             f"local devices and divide the 2*num_tasks={num_members} particles")
        return requested
    return max(d for d in range(1, available + 1) if num_members % d == 0)


def particle_sharding(num_devices: int) -> NamedSharding | None:
    """Leading-axis sharding over the first ``num_devices`` local devices (None for one device)."""
    if num_devices == 1:
        return None
    mesh = Mesh(np.array(jax.local_devices()[:num_devices]), ("particles",))
    return NamedSharding(mesh, PartitionSpec("particles"))

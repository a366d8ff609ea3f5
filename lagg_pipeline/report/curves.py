"""What the report's stages pass on: a group's key and one row's pooled per-seed curves."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lagg_pipeline.config import HAND_OPTIMIZERS

FEDAVG = "fedavg"  # the goal on tasks outside the meta-training family is tuned FedAvg's (also judged alone)


class GroupKey(NamedTuple):
    """Every setting the rows of one comparison share: rows differing in any of these are never
    judged against each other. γ is each baseline's own tuned value (a row's identity, not the group's)."""

    task: str
    K: int
    H: int
    rounds: int
    B: int  # local batch size
    partition: str

    @property
    def title(self) -> str:
        clients = "" if self.partition == "iid" else f", clients: {self.partition}"
        return f"{self.task}, K={self.K}, H={self.H}, B={self.B}{clients}"


class Curves(NamedTuple):
    """Pooled per-seed curves of one method identity in one group."""

    method: str  # the row's label: the run's method, plus what differs from its namesakes
    optimizer: str
    settings: str  # its tuned keys, or where its meta-parameters came from
    tuned: bool  # a baseline run at the tuned values recorded for its task, K, H and clients
    train_loss: np.ndarray  # [S, R]
    eval_rounds: np.ndarray  # [E]
    test_loss: np.ndarray  # [S, E]
    test_accuracy: np.ndarray  # [S, E]
    outer_valid_loss: np.ndarray  # [S, E]
    outer_valid_accuracy: np.ndarray | None  # [S, E]; None for runs logged before it was measured
    shipped: str | None = None  # "variant@name" of a shipped aggregator's run
    run_seconds: float | None = None  # wall time of the pooled runs, summed; None where not recorded
    tuned_rounds: int | None = None  # the horizon its tuned values were chosen at; None: untuned or not recorded

    @property
    def learned(self) -> bool:
        return self.optimizer not in HAND_OPTIMIZERS

"""Data: embedded TFDS builders, device-resident splits, in-jit batching."""
from lagg_pipeline.data.sampler import sample_batch
from lagg_pipeline.data.splits import (DATASETS, DatasetInfo, DataUnavailableError, Split, Splits,
                                       load_splits, split_sizes)

__all__ = ["DATASETS", "DatasetInfo", "DataUnavailableError", "Split", "Splits", "load_splits",
           "sample_batch", "split_sizes"]

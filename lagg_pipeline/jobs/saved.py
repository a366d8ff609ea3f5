"""Saved learned aggregators: a meta-parameter file, an MLflow artifact or a shipped one, read,
checked and benchmarked with the settings it was meta-trained with."""
from __future__ import annotations

import hashlib
from pathlib import Path

import jax

from lagg_pipeline import tracking
from lagg_pipeline.config import ConfigError
from lagg_pipeline.data.partition import partition_label
from lagg_pipeline.errors import UserError
from lagg_pipeline.jobs.common import command_line_keys, jax_tree


def load_meta_params(cfg):
    """(meta_params, metadata, the file's sha256) from checkpoint=<file or MLflow artifact URI> or
    pretrained=<name>; the digest tells a file apart from another saved at the same place."""
    from lagg_pipeline import pretrained

    location = str(pretrained.path(cfg.optimizer.name, cfg.pretrained)) if cfg.pretrained else cfg.checkpoint
    if location is None:
        raise ConfigError(f"mode=benchmark optimizer={cfg.optimizer.name} needs checkpoint=<meta_params.npz "
                          f"or MLflow artifact URI>")
    if "://" in location or location.startswith("runs:/"):
        import mlflow

        try:
            location = mlflow.artifacts.download_artifacts(artifact_uri=location,
                                                           tracking_uri=tracking.tracking_uri(cfg.tracking.uri))
        except Exception as err:  # MlflowException, OSError: the run, the file or the server is missing
            raise UserError(f"checkpoint={cfg.checkpoint}: cannot download it: {str(err).splitlines()[0]}") from None
    meta_params, metadata = read_saved(location, cfg.optimizer.name, UserError)
    return jax_tree(meta_params), metadata, hashlib.sha256(Path(location).read_bytes()).hexdigest()


def read_saved(location, variant: str, error: type[Exception]):
    """(meta_params, metadata) of a local meta-parameter file holding ``variant``; ``error``
    (one line) when it is missing, unreadable or holds another variant."""
    from lagg_pipeline.checkpoint import CheckpointError, load_params

    if not Path(location).is_file():
        raise error(f"checkpoint={location}: no such file")
    try:
        meta_params, metadata = load_params(location)
    except CheckpointError as err:
        meta_params, metadata = _from_meta_training_checkpoint(location, err, error)
    if metadata.get("variant") not in (None, variant):
        raise error(f"checkpoint={location} holds {metadata['variant']} meta-parameters, not optimizer={variant}")
    return meta_params, metadata


def _from_meta_training_checkpoint(location, not_exported: Exception, error: type[Exception]):
    """(meta_params, metadata) of a meta-training checkpoint (``ckpt_XXXXXXXX.npz``), so that any
    saved step can be benchmarked; ``error`` with ``not_exported`` when the file is not one."""
    from lagg_pipeline.aggregators.learned import LearnedAggregator
    from lagg_pipeline.checkpoint import CheckpointError, load_arrays, rebuild

    try:
        arrays, metadata = load_arrays(location)
        template = LearnedAggregator(metadata["variant"], metadata["num_grads"], metadata["hidden_size"])
        meta_params = rebuild(arrays, template.init_meta_params(jax.random.PRNGKey(0)), location, under="meta_params")
    except (CheckpointError, KeyError, TypeError, ValueError):
        raise error(f"checkpoint={location}: {not_exported}") from None
    outer_steps = int(arrays["outer_step"]) if "outer_step" in arrays else None
    metadata = {k: v for k, v in metadata.items() if k != "config"}
    return meta_params, {**metadata, "outer_steps": outer_steps}


TRAINED_WITH = ("num_grads", "num_local_steps", "local_learning_rate", "local_batch_size", "hidden_size")


def adopted_settings(cfg, metadata: dict, given: set[str]) -> tuple:
    """(cfg with the settings of ``TRAINED_WITH`` it was meta-trained with, except keys in
    ``given``; {key: value} changed). Refused like a command line when a run cannot use them
    (say K above partition.num_clients)."""
    from lagg_pipeline.config import validate

    changes = {k: metadata[k] for k in TRAINED_WITH if k in metadata and k not in given and cfg[k] != metadata[k]}
    if not changes:
        return cfg, changes
    cfg = cfg.copy()
    for key, value in changes.items():
        cfg[key] = value
    try:
        validate(cfg)
    except ConfigError as err:
        adopted = ", ".join(f"{k}={v}" for k, v in changes.items())
        raise ConfigError(f"{err} (with {adopted}, the saved aggregator's own settings; set them on the "
                          f"command line to override)") from None
    return cfg, changes


def adopt_training_settings(cfg, metadata: dict):
    """SPEC 5: a learned aggregator is evaluated with the K, H and gamma it was meta-trained
    with, unless the command line sets them."""
    cfg, changes = adopted_settings(cfg, metadata, command_line_keys())
    if changes:
        print("benchmarking with the settings these meta-parameters were trained with: "
              + ", ".join(f"{k}={v}" for k, v in changes.items()))
    return cfg


def checked_server_update(aggregator, meta_params):
    try:
        return aggregator.server_update(meta_params)
    except ValueError as err:  # incompatible K, width or layout: one line, no shape traceback
        raise UserError(str(err)) from None


def shipped_counterpart(cfg) -> str | None:
    """The shipped aggregator of this variant to show beside a fresh meta-training: the one
    recommended for this task, K, H and clients (pretrained/recommended.yaml), else one meta-trained
    like this job (task, K, H, meta-loss split, clients, start), if there is one."""
    from lagg_pipeline import pretrained

    return (pretrained.recommended(cfg.optimizer.name, cfg.task.name, cfg.num_grads, cfg.num_local_steps,
                                   partition_label(cfg.partition))
            or pretrained.matching(cfg.optimizer.name, cfg.task.name, cfg.num_grads, cfg.num_local_steps,
                                   cfg.meta_loss_split, partition_label(cfg.partition), cfg.meta_init))

"""mode=import_legacy: convert a meta-parameter pickle of the original research code."""
from __future__ import annotations

from pathlib import Path

from lagg_pipeline.errors import UserError
from lagg_pipeline.jobs.common import output_dir


def import_legacy_job(cfg):
    from lagg_pipeline.legacy import LegacyFormatError, import_legacy

    out = Path(cfg.output_path or output_dir() / "meta_params.npz")
    try:
        path = import_legacy(cfg.legacy_path, out, cfg.optimizer.name, cfg.num_grads, cfg.hidden_size)
    except (LegacyFormatError, ValueError, OSError) as err:
        raise UserError(f"legacy_path={cfg.legacy_path}: {err}") from None
    print(f"imported {cfg.legacy_path} -> {path}\n"
          f"benchmark it with: python -m lagg_pipeline mode=benchmark optimizer={cfg.optimizer.name} "
          f"num_grads={cfg.num_grads} checkpoint={path}")
    return str(path)

"""mode=select_tuned: write each baseline's best grid point to conf/tuned_hparams/."""
from __future__ import annotations

from pathlib import Path

from lagg_pipeline import tracking
from lagg_pipeline.errors import UserError
from lagg_pipeline.jobs.common import command_line_keys


def select_tuned_job(cfg):
    """mode=select_tuned: write the best grid point per task/optimizer/H/K of the tuning experiment."""
    from lagg_pipeline import tuning, tuning_select

    experiment = cfg.tracking.experiment if "tracking.experiment" in command_line_keys() else "tuning"
    client, _ = tracking.client(cfg.tracking)
    root = Path(cfg.tuned_dir) if cfg.tuned_dir else tuning.tuned_root()
    try:
        written, unfinished = tuning_select.select(client, experiment, root)
    except LookupError as err:
        raise UserError(str(err)) from None
    for path in written:
        print(f"wrote {path}")
    for line in unfinished:
        print(f"{line} (running its grid again runs only the missing points; `make tune-status` lists them)")
    if not written and not unfinished:
        print(f"no finished grid runs of hand-designed optimizers in experiment {experiment}")
    return [str(p) for p in written]

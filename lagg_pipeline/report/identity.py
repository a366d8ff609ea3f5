"""Which method a run is: the settings that make it, its meta-parameters, whether a baseline ran
at its tuned values, and the row labels that tell namesakes apart."""
from __future__ import annotations

import hashlib
from pathlib import Path

from lagg_pipeline.config import HAND_OPTIMIZERS

# Keys that cannot change a benchmark's numbers: seeds, bookkeeping, where files go.
NOT_SETTINGS = {"seed", "num_runs", "progress", "skip_finished", "mode", "tuned", "tuned_dir", "with_fedavg",
                "report_dir", "readme", "data_dir", "compile_cache_dir", "checkpoint_dir", "resume", "save_iter",
                "checkpoints_to_keep", "legacy_path", "output_path", "pes_devices", "pretrained", "checkpoint",
                "headline", "results_archive",
                "fedavg_local_learning_rate"}  # the last: a selector whose value a run logs as local_learning_rate
NOT_SETTINGS_PREFIXES = ("tracking.", "distributed.")
# Meta-training keys: settings only of a run that meta-trained its own aggregator.
META_TRAINING = {"hidden_size", "num_tasks", "trunc_length", "pes_std", "num_inner_steps", "weight_decay",
                 "truncation_schedule_min_length", "meta_loss_split", "meta_loss_train_weight", "meta_init",
                 "meta_init_scale", "num_outer_steps"}


def meta_params_identity(run) -> str | None:
    """Which meta-parameters a learned run ran: "shipped <name>", "sha256 <hash>" of its checkpoint
    file (the run's ``meta_params_sha256`` tag when the job recorded one, else the file as it is now),
    the artifact URI, or the run itself when it meta-trained them; None for a hand-designed run."""
    params, tags = run.data.params, run.data.tags
    if tags.get("optimizer") in HAND_OPTIMIZERS:
        return None
    if params.get("pretrained") not in (None, "None"):
        return f"shipped {params['pretrained']}"
    location = params.get("checkpoint")
    if location in (None, "None"):
        return f"meta-trained in run {run.info.run_id[:8]}"
    if tags.get("meta_params_sha256"):
        return f"sha256 {tags['meta_params_sha256'][:12]}"
    if Path(location).is_file():  # hashed now: a file overwritten since the run cannot be told apart
        return f"sha256 {hashlib.sha256(Path(location).read_bytes()).hexdigest()[:12]}"
    return location


def settings_of(run) -> dict[str, str]:
    """The run's settings that make its method: every param but seeds and bookkeeping."""
    meta_trained = (meta_params_identity(run) or "").startswith("meta-trained in run")
    return {k: v for k, v in run.data.params.items()
            if k not in NOT_SETTINGS and not k.startswith(NOT_SETTINGS_PREFIXES)
            and (meta_trained or (k not in META_TRAINING and not k.startswith("schedule.")))}


def tuned_entry(run) -> dict | None:
    """The tuned-values entry a baseline run used (its task, K, H and clients' as recorded now, in
    the run's ``tuned_dir`` or the package's), when its params hold every one of them; else None:
    a run at other values is no tuned baseline."""
    from lagg_pipeline import tuning

    params, tags = run.data.params, run.data.tags
    root = Path(params["tuned_dir"]) if params.get("tuned_dir") not in (None, "None") else None
    entry = tuning.lookup(tags["task"], tags["optimizer"], int(tags["H"]), int(tags["K"]), root,
                          tags.get("partition", "iid"))
    return entry if entry is not None and all(same_value(params.get(k), v) for k, v in entry["values"].items()) else None


def same_value(logged: str | None, value) -> bool:
    try:
        return logged is not None and float(logged) == float(value)
    except ValueError:
        return logged == str(value)


def describe(run) -> str:
    """The hyper-parameters a reader looks for: the tuned keys, or where the meta-parameters came from."""
    from lagg_pipeline import tuning

    params, optimizer = run.data.params, run.data.tags.get("optimizer", "")
    if optimizer in HAND_OPTIMIZERS:
        return ", ".join(f"{k.split('.')[-1]}={params.get(k)}" for k in tuning.grid_keys(optimizer))
    return f"local_learning_rate={params.get('local_learning_rate')}, meta-params: {meta_params_identity(run)}"


def labels(identities: list[tuple]) -> dict[tuple, str]:
    """Row labels: the method, plus the settings in which it differs from rows of the same method."""
    found = {}
    for ident in identities:
        method, meta, settings = ident[0], ident[1], dict(ident[2])
        namesakes = [(m, dict(s)) for name, m, s in identities if name == method]
        if len(namesakes) == 1:
            found[ident] = method
            continue
        keys = sorted({k for _, s in namesakes for k in s} - {k for k in settings if all(
            s.get(k) == settings[k] for _, s in namesakes)})
        differs = [f"{k.split('.')[-1]}={settings.get(k, '—')}" for k in keys]
        if any(m != meta for m, _ in namesakes):
            differs.insert(0, f"meta-params {meta}")
        found[ident] = f"{method} ({', '.join(differs[:3])}{', …' if len(differs) > 3 else ''})"
    return found

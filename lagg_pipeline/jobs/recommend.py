"""mode=recommend: ``pretrained/recommended.yaml`` generated from the validation (outer-valid)
verdict of an experiment's runs; the test split is never judged here (SPEC 5)."""
from __future__ import annotations

from lagg_pipeline.errors import UserError
from lagg_pipeline.report import archive
from lagg_pipeline.report.judge import judge
from lagg_pipeline.report.recommend import entries, write


def recommend_job(cfg) -> list[dict]:
    from lagg_pipeline import pretrained

    groups = archive.gather(cfg, print)
    found = entries({key: judge(curves, "outer_valid") for key, curves in groups.items()})
    if not found:
        raise UserError(f"experiment {cfg.tracking.experiment} has no shipped aggregator with an outer-valid verdict "
                        f"(benchmark them with pretrained=<name> beside the tuned baselines, e.g. make results)")
    path = pretrained.recommended_file()
    write(path, found, cfg.tracking.experiment)
    for e in found:
        print(f"{e['tasks'][0]} K={e['num_grads']} H={e['H'][0]}: {e['variant']} pretrained={e['name']} ({e['why']})")
    print(f"wrote {path}")
    return found

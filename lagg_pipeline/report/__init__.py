"""mode=report, read in one direction: :mod:`collect` (MLflow runs -> per-group curves) ->
:mod:`judge` (numpy only: the verdict as data, on the test split or on outer-valid) ->
:mod:`render` (markdown pages with scorecards, sentences and plots; the README headline from the
judgements) -> :mod:`write` (the generated blocks of the docs, once every check has passed).
:mod:`recommend` turns the outer-valid judgements into ``pretrained/recommended.yaml``;
:mod:`run_summary` and :mod:`plots` hold one job's own summary table and plots."""

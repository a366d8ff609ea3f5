"""The speed measurements: the yardstick (``python -m lagg_pipeline.bench``, yardstick.py), its
scaling sweep (scaling.py), the per-op profile of a PES step (profile.py), XLA's CPU options in
alternating processes (xla.py), and where their numbers are written (outputs.py)."""

"""``python -m lagg_pipeline [overrides]``: see lagg_pipeline.cli."""
from lagg_pipeline import xla_flags

xla_flags.apply()  # before JAX's backend starts: it reads XLA_FLAGS once

from lagg_pipeline.cli import main  # noqa: E402  (after the flags)

if __name__ == "__main__":
    main()

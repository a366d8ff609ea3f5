"""``python -m lagg_pipeline [overrides]``: see lagg_pipeline.cli."""
from lagg_pipeline.cli import main

if __name__ == "__main__":
    main()

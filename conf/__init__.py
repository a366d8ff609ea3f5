"""Hydra config root, installed as the package ``lagg_pipeline.conf`` (see setup.cfg).

Importing it registers the typed schema ``base_config`` that config.yaml builds on, so
composing these configs from anywhere (the CLI, tests, notebooks) gets the same types.
"""
from lagg_pipeline.config import register

register()

"""lagg_pipeline: meta-learned aggregators for communication-efficient training.

Reproduces "Meta-learning Optimizers for Communication-Efficient Learning"
(Joseph et al., TMLR 2025): LAgg-A / LOpt-A server updates for local SGD, compared with
hand-designed ones, every run recorded in MLflow.
"""

__version__ = "0.1.0"


def outer_optimizer(*args, **kwargs):
    """A shipped learned aggregator as an optax outer optimizer (see ``lagg_pipeline.outer``)."""
    from lagg_pipeline.outer import outer_optimizer as make

    return make(*args, **kwargs)

"""Task models: the parameter counts of SPEC section 6 and sane losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hydra import compose, initialize_config_module

from lagg_pipeline.tasks import make_task, num_params

SHAPES = {"digits_mlp": (8, 8, 1), "mnist5k_mlp": (28, 28, 1), "small_image_mlp_fmst": (8, 8, 1),
          "image_mlp_fmst": (28, 28, 1), "conv_c10": (32, 32, 3)}
COUNTS = {"digits_mlp": 2410, "mnist5k_mlp": 118282, "small_image_mlp_fmst": 2410,
          "image_mlp_fmst": 118282, "conv_c10": 56970}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_task_configs_build_models_with_spec_parameter_counts(name):
    with initialize_config_module("lagg_pipeline.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"task={name}"])
    task = make_task(cfg.task, SHAPES[name], 10)
    params = task.init(jax.random.PRNGKey(0))
    assert num_params(params) == COUNTS[name]
    x = jnp.zeros((4, *SHAPES[name]))
    assert task.apply(params, x).shape == (4, 10)
    # Haiku's default init gives near-uniform predictions: loss close to ln 10.
    loss = task.loss(params, jax.random.uniform(jax.random.PRNGKey(1), x.shape), jnp.arange(4))
    assert abs(float(loss) - np.log(10)) < 0.5

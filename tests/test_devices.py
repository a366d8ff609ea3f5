"""PES particles spread over several devices give the single-device meta-gradient.

Each case runs in a fresh interpreter, since XLA's host device count is fixed at start-up.
"""
import re
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from lagg_pipeline.aggregators.learned import LearnedAggregator
    from lagg_pipeline.meta.devices import particle_sharding
    from lagg_pipeline.meta.pes import PES
    from test_pes import DATA, linear_task

    assert jax.local_device_count() == {devices}
    aggregator = LearnedAggregator("lagg_a", num_grads=2, hidden_size=8)
    theta = aggregator.init_meta_params(jax.random.PRNGKey(0))

    def gradient(sharding):
        pes = PES(linear_task(), aggregator, num_tasks=4, trunc_length=6, pes_std=0.01, min_length=3,
                  max_length=8, num_grads=2, num_local_steps=2, local_batch_size=8, local_learning_rate=0.3,
                  particle_sharding=sharding)
        state = pes.init(theta, jax.random.PRNGKey(1), DATA)
        estimate = jax.jit(pes.estimate)
        for k in range(2):  # two truncations, with resets (episodes of 3..8 rounds)
            grad, state, metrics = estimate(theta, state, jax.random.PRNGKey(2 + k), DATA)
        return grad, state, metrics

    single = gradient(None)
    shared = gradient(particle_sharding({devices}))
    assert float(single[2]["episode_resets"]) > 0
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(shared)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    leaf = jax.tree.leaves(shared[1].rounds.params)[0]
    assert len(leaf.sharding.device_set) == {devices}, leaf.sharding
    print("ok")
""")


@pytest.mark.parametrize("devices", [2, 4])
def test_sharded_pes_equals_single_device(devices, tmp_path):
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent)}
    import os

    result = subprocess.run([sys.executable, "-c", SCRIPT.format(devices=devices)], capture_output=True,
                            text=True, env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


LOOP_SCRIPT = textwrap.dedent("""
    import jax
    from lagg_pipeline.aggregators.learned import LearnedAggregator
    from lagg_pipeline.meta.devices import particle_sharding
    from lagg_pipeline.meta.pes import PES
    from test_pes import DATA, linear_task

    aggregator = LearnedAggregator("lagg_a", num_grads=2, hidden_size=8)
    theta = aggregator.init_meta_params(jax.random.PRNGKey(0))
    pes = PES(linear_task(), aggregator, num_tasks=4, trunc_length=6, pes_std=0.01, min_length=3, max_length=8,
              num_grads=2, num_local_steps=2, local_batch_size=8, local_learning_rate=0.3,
              particle_sharding=particle_sharding(2))
    state = pes.init(theta, jax.random.PRNGKey(1), DATA)
    print(jax.jit(pes.estimate).lower(theta, state, jax.random.PRNGKey(2), DATA).compile().as_text())
""")
COLLECTIVE = re.compile(r" (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\(")


def computations_run_by_loops(hlo: str) -> dict[str, str]:
    """{name: text} of every computation a while loop of the compiled module runs, nested ones
    (fusions, branches, inner loops) included."""
    computations = dict(re.findall(r"^(?:ENTRY )?%([\w.-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M))
    todo, seen = re.findall(r"body=%([\w.-]+)", hlo), {}
    while todo:
        name = todo.pop()
        if name not in seen and name in computations:
            seen[name] = computations[name]
            todo += [ref for ref in re.findall(r"%([\w.-]+)", seen[name]) if ref in computations]
    return seen


def test_no_collective_inside_the_scan_of_rounds():
    """Each device runs its block of members on its own: the compiled loop over rounds holds no
    collective (per-round collectives cost time, and on a CPU XLA aborted twice in them), while
    the estimate's reductions across the devices remain outside it."""
    import os

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent)}
    result = subprocess.run([sys.executable, "-c", LOOP_SCRIPT], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loops = computations_run_by_loops(result.stdout)
    assert len(loops) > 5, sorted(loops)  # the scan of rounds, its fusions and the reset branch
    assert not [name for name, text in loops.items() if COLLECTIVE.search(text)]
    assert COLLECTIVE.search(result.stdout)


STEPS_SCRIPT = textwrap.dedent("""
    import jax
    from lagg_pipeline.aggregators.learned import LearnedAggregator
    from lagg_pipeline.meta.train import MetaTrainer
    from test_pes import DATA, linear_task, tiny_cfg

    trainer = MetaTrainer(tiny_cfg(optimizer="lagg_a"), linear_task(), DATA, LearnedAggregator("lagg_a", 2, 8))
    if {background}:  # the job's way: compiled from init's shapes, placed as the step leaves them
        trainer.compile_in_background()
    state = trainer.init()
    for _ in range(3):
        state, metrics = trainer.step(state)
    assert trainer.jitted_step._cache_size() == 1, trainer.jitted_step._cache_size()
    leaf = jax.tree.leaves(state.pes.rounds.params)[0]
    assert len(leaf.sharding.device_set) == 2 and not leaf.sharding.is_fully_replicated, leaf.sharding
    print("ok")
""")


@pytest.mark.parametrize("background", [False, True])
def test_the_outer_step_compiles_once_over_several_devices(background):
    """A fresh state sits on one device and the step leaves it over the particle devices: unless
    the state goes in where the step leaves it, jit compiles the step twice, once per placement.
    Compiled in the background from init's shapes, the first step finds that same executable."""
    import os

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent)}
    result = subprocess.run([sys.executable, "-c", STEPS_SCRIPT.format(background=background)], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_particle_devices_choice():
    """By default the most devices that divide the particles (one CPU device per core here, see
    lagg_pipeline/xla_flags.py); an explicit count must exist and divide them."""
    import jax

    from lagg_pipeline.meta.devices import particle_devices

    available = jax.device_count()
    assert particle_devices(None, 16) == max(d for d in range(1, available + 1) if 16 % d == 0)
    assert particle_devices(None, 1) == 1
    assert particle_devices(1, 16) == 1
    with pytest.raises(ValueError, match=f"pes_devices={available + 1} is not allowed"):
        particle_devices(available + 1, 16)

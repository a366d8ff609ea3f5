"""The package's XLA CPU defaults: applied before JAX starts, never over the user's own flags."""
import os
import subprocess
import sys

import pytest

from lagg_pipeline import xla_flags
from lagg_pipeline.bench import xla as bench_xla


def test_merged_keeps_the_users_flags_and_adds_the_rest():
    defaults = xla_flags.cpu_defaults(4)
    assert defaults == {"--xla_backend_optimization_level": "1", "--xla_force_host_platform_device_count": "4"}
    assert xla_flags.merged("", defaults) == ("--xla_backend_optimization_level=1 "
                                              "--xla_force_host_platform_device_count=4")
    mine = "--xla_force_host_platform_device_count=1 --xla_dump_to=/tmp/x"
    assert xla_flags.merged(mine, defaults) == mine + " --xla_backend_optimization_level=1"
    assert xla_flags.merged("--xla_backend_optimization_level=3", {"--xla_backend_optimization_level": "1"}) == \
        "--xla_backend_optimization_level=3"


@pytest.mark.parametrize("environ, applied", [
    ({}, True),
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "cuda"}, False),  # the options concern the host only
    ({xla_flags.OFF_ENV: "0"}, False),
])
def test_apply_only_on_cpu_and_unless_turned_off(environ, applied):
    env = dict(environ)
    xla_flags.apply(env)
    assert ("--xla_backend_optimization_level=1" in env.get("XLA_FLAGS", "")) is applied
    assert ("--xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "")) is applied


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_flags.OFF_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_importing_the_package_leaves_xla_flags_alone():
    """A user who imports the package for outer_optimizer keeps their own environment."""
    code = "import os, lagg_pipeline, lagg_pipeline.outer, jax; print(jax.device_count(), os.environ.get('XLA_FLAGS'))"
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["1", "None"]


def test_the_command_line_entry_starts_jax_with_the_defaults():
    """``python -m lagg_pipeline`` sets them first: one CPU device per core, and a user's flag wins."""
    code = "import lagg_pipeline.__main__, jax, os; print(jax.device_count(), os.environ['XLA_FLAGS'])"
    env = _clean_env()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == str(xla_flags.host_cores())
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "3" and "--xla_backend_optimization_level=1" in out


def test_after_jax_started_it_says_so_once_and_changes_nothing():
    code = ("import os, jax; jax.numpy.zeros(1).block_until_ready(); from lagg_pipeline import xla_flags; "
            "print(xla_flags.apply(), xla_flags.apply(), os.environ.get('XLA_FLAGS'))")
    result = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False", "None"]
    assert result.stderr.count("JAX started before its XLA CPU options could be set") == 1


def test_variants_and_table():
    assert bench_xla.variants(2) == {
        "xla": "", "opt_level_1": "--xla_backend_optimization_level=1",
        "2_devices": "--xla_force_host_platform_device_count=2",
        "package": "--xla_backend_optimization_level=1 --xla_force_host_platform_device_count=2"}
    numbers = {"fedavg_round_seconds": 1e-3, "lagg_a_round_seconds": 2e-3, "pes_outer_step_seconds": 1.0,
               "pes_outer_step_compile_seconds": 6.0}
    faster = {k: v / 2 for k, v in numbers.items()}
    text = bench_xla.table({"digits_mlp": {"xla": numbers, "package": faster}}, 2)
    assert "digits_mlp   package" in text and text.count("(0.50x)") == 4 and text.count("(1.00x)") == 4


@pytest.mark.slow
def test_compare_measures_every_variant_in_its_own_process():
    result = bench_xla.compare(["digits_mlp"], passes=1, outer_steps=1, rounds=5, repeats=1, cores=2)
    by_variant = result["digits_mlp"]
    assert set(by_variant) == {"xla", "opt_level_1", "2_devices", "package"}
    assert by_variant["xla"]["devices"] == 1 and by_variant["2_devices"]["devices"] == 2
    assert all(v["pes_outer_step_seconds"] > 0 for v in by_variant.values())

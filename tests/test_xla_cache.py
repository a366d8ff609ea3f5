"""The persistent compilation cache: which directory is used, and that a second process loads
what the first compiled."""
import subprocess
import sys

import jax

from lagg_pipeline import xla_cache


def test_directory_choice(tmp_path, monkeypatch):
    monkeypatch.delenv(xla_cache.ENV, raising=False)
    before = jax.config.jax_compilation_cache_dir
    assert xla_cache.enable(None) is None and jax.config.jax_compilation_cache_dir == before  # off
    monkeypatch.setenv("HOME", str(tmp_path))
    assert xla_cache.enable("~/cache") == tmp_path / "cache" and (tmp_path / "cache").is_dir()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
    monkeypatch.setenv(xla_cache.ENV, str(tmp_path / "env"))
    assert xla_cache.enable("~/cache") == tmp_path / "env"  # JAX's own variable wins
    assert xla_cache.enable(str(tmp_path / "bench"), env_wins=False) == tmp_path / "bench"
    jax.config.update("jax_compilation_cache_dir", before)


SCRIPT = """
import sys, time, jax, jax.numpy as jnp
from lagg_pipeline import xla_cache
xla_cache.enable(sys.argv[1], env_wins=False)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # store it however fast this machine is
def chain(x):
    for i in range(100):
        x = jnp.tanh(x @ x) + i
    return x
t0 = time.perf_counter()
jax.jit(chain).lower(jnp.ones((32, 32))).compile()
print(time.perf_counter() - t0)
"""


def test_a_second_process_loads_the_compilation(tmp_path):
    def compile_seconds():
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                             check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
        return float(out.stdout.split()[-1])

    cold = compile_seconds()
    assert any(p.name.startswith("jit_chain") for p in tmp_path.iterdir()), list(tmp_path.iterdir())
    assert compile_seconds() < cold / 3

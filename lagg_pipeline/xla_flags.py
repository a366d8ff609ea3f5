"""XLA's CPU options, measured on this project's own computations (docs/performance.md).

Applied by the command-line entry points (``python -m lagg_pipeline``, the ``make bench*``
modules) before JAX starts its backend (JAX reads ``XLA_FLAGS`` once, at its first
computation); importing the package leaves ``os.environ`` alone, so a user's own program
keeps its own flags. On CPU-only installs only: both options concern the host. A flag already
in ``XLA_FLAGS`` wins, and ``LAGG_XLA_DEFAULTS=0`` turns the defaults off.

- ``--xla_backend_optimization_level=1``: LLVM's lighter pipeline for XLA's generated
  kernels (fusions; matmuls run library code either way). The PES step is hundreds of
  small fused kernels per round, which the default level's unrolling and vectorisation make
  slower, not faster; it also compiles a third sooner.
- ``--xla_force_host_platform_device_count=<cores>``: one CPU device per core, so that
  PES spreads its particles over them (meta/devices.py). One device runs a PES step on
  about 1.4 of 2 cores; the particles are independent until the estimate averages them.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

OFF_ENV = "LAGG_XLA_DEFAULTS"


def _accelerator_plugin_installed() -> bool:
    """Whether JAX may find a GPU/TPU backend (a jax plugin package, or jaxlib's TPU library)."""
    if importlib.util.find_spec("jax_plugins") is not None or importlib.util.find_spec("libtpu") is not None:
        return True
    return any(True for _ in importlib.metadata.entry_points(group="jax_plugins"))


def host_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_defaults(cores: int) -> dict[str, str]:
    """{flag name: value} this package sets on a CPU-only install with ``cores`` cores."""
    return {"--xla_backend_optimization_level": "1",
            "--xla_force_host_platform_device_count": str(max(1, cores))}


def merged(existing: str, defaults: dict[str, str]) -> str:
    """``existing`` XLA_FLAGS plus each default whose flag it does not already set."""
    present = {part.split("=", 1)[0] for part in existing.split()}
    added = [f"{name}={value}" for name, value in defaults.items() if name not in present]
    return " ".join([existing.strip(), *added]).strip()


_warned = False


def _jax_started() -> bool:
    """Whether this process's JAX has already built its backends (and so read XLA_FLAGS)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def apply(environ=os.environ) -> bool:
    """Add the CPU defaults to ``environ["XLA_FLAGS"]`` unless turned off or on an accelerator;
    whether they take effect. When JAX already started, say so once (on stderr) and change nothing."""
    global _warned
    if environ.get(OFF_ENV, "1") == "0":
        return False
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms not in ("", "cpu") or (not platforms and _accelerator_plugin_installed()):
        return False
    flags = merged(environ.get("XLA_FLAGS", ""), cpu_defaults(host_cores()))
    if flags == environ.get("XLA_FLAGS", ""):
        return True
    if environ is os.environ and _jax_started():
        if not _warned:
            _warned = True
            print(f"lagg_pipeline: JAX started before its XLA CPU options could be set; to use them, set "
                  f"XLA_FLAGS='{flags}' before the first JAX computation (docs/performance.md)", file=sys.stderr)
        return False
    environ["XLA_FLAGS"] = flags
    return True

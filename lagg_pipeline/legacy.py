"""Import meta-parameters saved by the original research code, without running its pickles.

The reference code pickles a dict of JAX 0.4 arrays. Today's JAX cannot unpickle those
(its array reconstruction rejects the old ``named_shape`` entry), and plain ``pickle.load``
would run whatever code a file names. :class:`RestrictedUnpickler` resolves only numpy's
array reconstruction and a stand-in for JAX's, and refuses every other global.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from lagg_pipeline.checkpoint import save_params


class LegacyFormatError(ValueError):
    """A legacy file that is refused or not laid out as expected (one line)."""


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _reconstruct_jax_array(fun, args, arr_state, aval_state):
    """JAX 0.4's ``_reconstruct_array`` as plain numpy; aval_state (weak_type, named_shape) is dropped."""
    if fun is not _numpy_reconstruct():
        raise LegacyFormatError(f"refusing JAX array reconstruction through {fun!r}")
    array = fun(*args)
    array.__setstate__(arr_state)
    return array


# (module, name) -> the object it resolves to; nothing else is ever imported. This is all a
# pickled ndarray (protocol <= 4) or JAX 0.4 array needs: _reconstruct(ndarray, shape, dtype)
# then ndarray.__setstate__; "numpy.core" is numpy 1's name and "numpy._core" numpy 2's.
_ALLOWED = {
    ("jax._src.array", "_reconstruct_array"): lambda: _reconstruct_jax_array,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy / JAX 0.4 arrays in plain containers and nothing else."""

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise LegacyFormatError(f"refusing to load '{module}.{name}' from a legacy pickle: only "
                                    f"numpy/JAX array reconstruction is allowed")
        return allowed()


NN_KEYS = ("w0", "b0", "w1", "b1", "w2", "b2")
DECAY_SHAPES = {"momentum_decays": (3,), "rms_decays": (1,), "adafactor_decays": (3,)}


def input_width(variant: str, num_grads: int) -> int:
    """Network input width: K+38 (lagg_a), 39 (lopt_a), K+12 (lagg), 13 (lopt)."""
    from lagg_pipeline.aggregators.learned import LearnedAggregator

    return LearnedAggregator(variant, num_grads).input_width


def _describe_width(width: int) -> str:
    """Which legacy (adafactor) variant a first-layer width belongs to."""
    from lagg_pipeline.aggregators.features import feature_width

    if width == feature_width(1, with_accumulators=True):
        return "lopt_a"
    per_worker_offset = feature_width(0, with_accumulators=True)  # lagg_a's width is K + this
    if width > per_worker_offset:
        return f"lagg_a at num_grads={width - per_worker_offset}"
    return "neither lagg_a nor lopt_a"


def _unpickle(path):
    """The file's object, built only from plain containers and allowlisted array globals."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except LegacyFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
        raise LegacyFormatError(f"{path} is not a readable legacy pickle: {err}") from None


def _as_float32(path, data) -> dict:
    """The reference's layout picked out of ``data``, each entry a float32 numpy array."""
    if not isinstance(data, dict):
        raise LegacyFormatError(f"{path} holds a {type(data).__name__}, not the reference's dict of "
                                f"meta-parameters")
    try:
        nn = data["nn"]["~"]
        params = {k: np.asarray(data[k], np.float32) for k in DECAY_SHAPES}
        params["nn"] = {"~": {k: np.asarray(nn[k], np.float32) for k in NN_KEYS}}
    except (KeyError, TypeError) as err:  # TypeError: "nn" is not a dict
        raise LegacyFormatError(f"{path} lacks the expected entry {err}; expected keys "
                                f"{sorted(DECAY_SHAPES)} and nn/~/{{{', '.join(NN_KEYS)}}}") from None
    except ValueError as err:  # e.g. a string where an array should be
        raise LegacyFormatError(f"{path} holds a non-numeric entry: {err}") from None
    return params


def _check_shapes(path, params: dict) -> None:
    """Decay offsets (3,), (1,), (3,); an MLP width -> hidden -> hidden -> 2."""
    for key, shape in DECAY_SHAPES.items():
        if params[key].shape != shape:
            raise LegacyFormatError(f"{path}: {key} has shape {params[key].shape}, expected {shape}")
    w = params["nn"]["~"]
    if w["w0"].ndim != 2:
        raise LegacyFormatError(f"{path}: nn/~/w0 has shape {w['w0'].shape}, expected (input width, hidden size)")
    hidden = w["w0"].shape[1]
    expected = {"b0": (hidden,), "w1": (hidden, hidden), "b1": (hidden,), "w2": (hidden, 2), "b2": (2,)}
    for key, shape in expected.items():
        if w[key].shape != shape:
            raise LegacyFormatError(f"{path}: nn/~/{key} has shape {w[key].shape}, expected {shape}")


def load_legacy_meta_params(path) -> dict:
    """The reference's adafactor-variant meta-parameters as a nested dict of float32 numpy arrays."""
    params = _as_float32(path, _unpickle(path))
    _check_shapes(path, params)
    return params


def import_legacy(legacy_path, out_path, variant: str, num_grads: int, hidden_size: int) -> Path:
    """Convert a legacy LAgg-A / LOpt-A pickle into the pipeline's meta-parameter file."""
    params = read_legacy(legacy_path, variant, num_grads, hidden_size)
    return save_params(out_path, params, {"variant": variant, "num_grads": num_grads,
                                          "hidden_size": hidden_size, "source": f"legacy:{Path(legacy_path).name}"})


def read_legacy(legacy_path, variant: str, num_grads: int, hidden_size: int) -> dict:
    """The meta-parameters of a legacy pickle, checked against the variant, K and hidden size."""
    if variant not in ("lagg_a", "lopt_a"):
        raise LegacyFormatError(f"optimizer={variant} cannot be imported: the reference code's files hold "
                                f"lagg_a or lopt_a meta-parameters")
    params = load_legacy_meta_params(legacy_path)
    width, hidden = params["nn"]["~"]["w0"].shape
    want = input_width(variant, num_grads)
    if width != want:
        raise LegacyFormatError(f"legacy file has input width {width} = {_describe_width(width)}; it does not "
                                f"match optimizer={variant} num_grads={num_grads} (width {want})")
    if hidden != hidden_size:
        raise LegacyFormatError(f"legacy file has hidden size {hidden}; it does not match "
                                f"hidden_size={hidden_size} (set hidden_size={hidden})")
    return params

"""Atomic, pickle-free checkpoints.

A checkpoint is one ``.npz`` holding every array leaf under its pytree key path plus a
JSON metadata string (stored as bytes), read back only with ``allow_pickle=False``: a
file can hold numbers and text, never code. Writes go to a temporary name that is
renamed into place, so a crash leaves the previous checkpoint untouched.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

META_KEY = "__metadata__"
PARAMS_FORMAT = "lagg_pipeline.meta_params"
TREE_KEYS = "tree_keys"
_CKPT = re.compile(r"^ckpt_(\d{8})\.npz$")


class CheckpointError(ValueError):
    """A checkpoint that does not match what it is loaded into (one line)."""


def _path_parts(path) -> list[str]:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return parts


def _path_name(path) -> str:
    return "/".join(_path_parts(path))


def flatten(tree) -> dict[str, np.ndarray]:
    """{"a/b/0": array} for every leaf, named by its key path."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(path): np.asarray(leaf) for path, leaf in leaves}


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_arrays(path, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
    """Write named arrays and JSON metadata to ``path`` atomically."""
    if META_KEY in arrays:
        raise CheckpointError(f"{META_KEY} is a reserved name")
    payload = {**arrays, META_KEY: np.frombuffer(json.dumps(metadata or {}).encode(), np.uint8)}
    return _atomic_write(Path(path), lambda f: np.savez(f, **payload))


def load_arrays(path) -> tuple[dict[str, np.ndarray], dict]:
    """Named arrays and metadata; object arrays (pickles) are refused."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except ValueError as err:
        raise CheckpointError(f"{path}: refusing to load: {err}") from None
    raw = arrays.pop(META_KEY, None)
    metadata = json.loads(raw.tobytes().decode()) if raw is not None else {}
    return arrays, metadata


def save_pytree(path, tree, metadata: dict | None = None) -> Path:
    return save_arrays(path, flatten(tree), metadata)


def load_pytree(path, template) -> tuple[Any, dict]:
    """Rebuild ``template``'s structure from the file, checking names, shapes and dtypes."""
    arrays, metadata = load_arrays(path)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [_path_name(p) for p, _ in leaves]
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise CheckpointError(f"{path} does not match this run: {first} "
                              f"({len(missing)} missing, {len(extra)} unexpected entries)")
    restored = []
    for name, (_, want) in zip(names, leaves):
        got = arrays[name]
        want = np.asarray(want)
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{path}: {name!r} is {got.dtype}{list(got.shape)}, "
                                  f"expected {want.dtype}{list(want.shape)}")
        restored.append(got)
    return jax.tree_util.tree_unflatten(treedef, restored), metadata


def save_params(path, params: dict, metadata: dict | None = None) -> Path:
    """Export a nested dict of arrays (meta-parameters) with a format tag."""
    # Haiku names hold "/" ("mlp/~/linear_0"), so the dict keys of every leaf are stored too.
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    tree_keys = {_path_name(p): _path_parts(p) for p, _ in leaves}
    return save_pytree(path, params, {"format": PARAMS_FORMAT, "version": 1, **(metadata or {}),
                                      TREE_KEYS: tree_keys})


def load_params(path) -> tuple[dict, dict]:
    """A nested dict rebuilt from "/"-separated names, without a template."""
    arrays, metadata = load_arrays(path)
    if metadata.get("format") != PARAMS_FORMAT:
        raise CheckpointError(f"{path} is not an exported meta-parameter file "
                              f"(format {metadata.get('format')!r}, expected {PARAMS_FORMAT!r})")
    tree_keys = metadata.pop(TREE_KEYS, None) or {}
    tree: dict = {}
    for name, value in arrays.items():
        *parents, leaf = tree_keys.get(name) or name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree, metadata


class CheckpointManager:
    """``ckpt_XXXXXXXX.npz`` files in one directory, the newest ``keep`` kept, plus a
    ``latest`` pointer file naming the newest, as the reference code lays them out."""

    def __init__(self, directory, keep: int = 10):
        self.directory, self.keep = Path(directory), keep

    def _steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for f in self.directory.iterdir() if (m := _CKPT.match(f.name)))

    def path(self, step: int) -> Path:
        return self.directory / f"ckpt_{step:08d}.npz"

    def latest_step(self) -> int | None:
        pointer = self.directory / "latest"
        if pointer.is_file():
            match = _CKPT.match(pointer.read_text().strip())
            if match and self.path(int(match.group(1))).is_file():
                return int(match.group(1))
        steps = self._steps()
        return steps[-1] if steps else None

    def latest_path(self) -> Path | None:
        step = self.latest_step()
        return None if step is None else self.path(step)

    def save(self, step: int, tree, metadata: dict | None = None) -> Path:
        for stale in self.directory.glob(".*.tmp") if self.directory.is_dir() else []:
            stale.unlink(missing_ok=True)  # left by a crash mid-write
        path = save_pytree(self.path(step), tree, {**(metadata or {}), "step": step})
        _atomic_write(self.directory / "latest", lambda f: f.write(path.name.encode()))
        for old in self._steps()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)
        return path

    def restore(self, template, step: int | None = None) -> tuple[Any, dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        return load_pytree(self.path(step), template)

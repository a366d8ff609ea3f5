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
import signal
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

META_KEY = "__metadata__"
PARAMS_FORMAT = "lagg_pipeline.meta_params"
PARAMS_VERSION = 1
TREE_KEYS = "tree_keys"
POINTER = "latest"
_CKPT = re.compile(r"^ckpt_(\d{8})\.npz$")
_TMP_SUFFIX = ".tmp"
# Plain numbers only: object arrays would need pickle, and extension dtypes (bfloat16)
# come back from .npz as opaque void bytes.
_NUMERIC_KINDS = "biufc"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, read, or matched to its template (one line)."""


def _path_parts(path) -> list[str]:
    """Key-path entries as strings: dict keys, NamedTuple field names, sequence indices."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return parts


def _path_name(path) -> str:
    return "/".join(_path_parts(path))


def _as_array(name: str, leaf) -> np.ndarray:
    """One leaf as a plain numeric numpy array, or a CheckpointError naming its path."""
    try:
        array = np.asarray(leaf)
    except TypeError as err:  # typed PRNG keys: jax.random.key_data gives their uint32 words
        raise CheckpointError(f"cannot save {name!r}: {err}") from None
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise CheckpointError(f"cannot save {name!r}: dtype {array.dtype} is not a plain numeric dtype")
    return array


def flatten(tree) -> dict[str, np.ndarray]:
    """{"a/b/0": array} for every leaf, named by its key path."""
    arrays: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = _path_name(path)
        if name in arrays:  # e.g. {"a/b": x} next to {"a": {"b": y}}
            raise CheckpointError(f"two leaves share the checkpoint name {name!r}")
        arrays[name] = _as_array(name, leaf)
    return arrays


def _fsync_dir(directory: Path) -> None:
    """Persist a rename; skipped where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PAUSE_ENV = "LAGG_PIPELINE_TEST_PAUSE"  # "<file name>:<moment>": the process stops there (tests kill it)


def _test_pause(path: Path, moment: str) -> None:
    """Test hook: stop this process (SIGSTOP) at ``moment`` of writing ``path`` when
    $LAGG_PIPELINE_TEST_PAUSE asks for it, so that a test can SIGKILL it exactly there."""
    if os.environ.get(PAUSE_ENV) == f"{path.name}:{moment}":
        os.kill(os.getpid(), signal.SIGSTOP)


def _atomic_write(path: Path, write) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            _test_pause(path, "mid_write")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make checkpoints private
        _test_pause(path, "before_rename")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    """np.savez's layout, written member by member so no name can clash with its keyword arguments."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def save_arrays(path, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
    """Write named arrays and JSON metadata to ``path`` atomically."""
    if META_KEY in arrays:
        raise CheckpointError(f"{META_KEY} is a reserved name")
    arrays = {name: _as_array(name, array) for name, array in arrays.items()}
    try:
        text = json.dumps(metadata or {})
    except TypeError as err:
        raise CheckpointError(f"checkpoint metadata must be JSON: {err}") from None
    payload = {**arrays, META_KEY: np.frombuffer(text.encode(), np.uint8)}
    return _atomic_write(Path(path), lambda f: _write_npz(f, payload))


def load_arrays(path) -> tuple[dict[str, np.ndarray], dict]:
    """Named arrays and metadata; object arrays (pickles) are refused."""
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                arrays = {name: data[name] for name in data.files}
    except (ValueError, zipfile.BadZipFile, OSError, EOFError, KeyError) as err:  # garbled or truncated
        raise CheckpointError(f"{path}: refusing to load: {err}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path} holds a single array, not an .npz checkpoint")
    raw = arrays.pop(META_KEY, None)
    try:
        metadata = json.loads(raw.tobytes().decode()) if raw is not None else {}
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError
        raise CheckpointError(f"{path}: unreadable metadata: {err}") from None
    return arrays, metadata


def save_pytree(path, tree, metadata: dict | None = None) -> Path:
    """Write every leaf of ``tree`` under its key-path name, with JSON metadata, atomically."""
    return save_arrays(path, flatten(tree), metadata)


def load_pytree(path, template) -> tuple[Any, dict]:
    """Rebuild ``template``'s structure from the file, checking names, shapes and dtypes."""
    arrays, metadata = load_arrays(path)
    return rebuild(arrays, template, path), metadata


def rebuild(arrays: dict[str, np.ndarray], template, path, under: str = "") -> Any:
    """``template``'s structure from :func:`load_arrays`' arrays of ``path``, checking names, shapes
    and dtypes; ``under``: the part of the saved tree below that name (a checkpoint's ``meta_params``)."""
    if under:
        arrays = {name[len(under) + 1:]: a for name, a in arrays.items() if name.startswith(under + "/")}
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
        want = _as_array(name, want)
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{path}: {name!r} is {got.dtype}{list(got.shape)}, "
                                  f"expected {want.dtype}{list(want.shape)}")
        restored.append(got)
    return jax.tree_util.tree_unflatten(treedef, restored)


def save_params(path, params: dict, metadata: dict | None = None) -> Path:
    """Export a nested dict of arrays (meta-parameters) with a format tag."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for key_path, _ in leaves:
        if not all(isinstance(k, jax.tree_util.DictKey) for k in key_path):
            raise CheckpointError(f"save_params takes nested dicts of arrays; "
                                  f"{jax.tree_util.keystr(key_path)} is not under dict keys only")
    # Haiku names hold "/" ("mlp/~/linear_0"), so the dict keys of every leaf are stored too.
    tree_keys = {_path_name(p): _path_parts(p) for p, _ in leaves}
    return save_pytree(path, params, {**(metadata or {}), "format": PARAMS_FORMAT,
                                      "version": PARAMS_VERSION, TREE_KEYS: tree_keys})


def load_params(path) -> tuple[dict, dict]:
    """A nested dict of numpy arrays rebuilt from the stored keys, without a template."""
    arrays, metadata = load_arrays(path)
    if metadata.get("format") != PARAMS_FORMAT:
        raise CheckpointError(f"{path} is not an exported meta-parameter file "
                              f"(format {metadata.get('format')!r}, expected {PARAMS_FORMAT!r})")
    if metadata.get("version") != PARAMS_VERSION:
        raise CheckpointError(f"{path} has meta-parameter file version {metadata.get('version')!r}; "
                              f"this code reads version {PARAMS_VERSION}")
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
        if keep < 1:
            raise CheckpointError(f"keep={keep} is not allowed; it must be >= 1")
        self.directory, self.keep = Path(directory), keep

    def _steps(self) -> list[int]:
        """Steps of complete checkpoint files; temporary files never match the name pattern."""
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for f in self.directory.iterdir() if (m := _CKPT.match(f.name)))

    def path(self, step: int) -> Path:
        """Where step's checkpoint lives (whether or not it exists)."""
        return self.directory / f"ckpt_{step:08d}.npz"

    def latest_step(self) -> int | None:
        """The step the ``latest`` pointer names, else the newest checkpoint file, else None."""
        pointer = self.directory / POINTER
        if pointer.is_file():
            match = _CKPT.match(pointer.read_text().strip())
            if match and self.path(int(match.group(1))).is_file():
                return int(match.group(1))
        steps = self._steps()
        return steps[-1] if steps else None

    def latest_path(self) -> Path | None:
        """The file of :meth:`latest_step`, or None."""
        step = self.latest_step()
        return None if step is None else self.path(step)

    def save(self, step: int, tree, metadata: dict | None = None) -> Path:
        """Write step's checkpoint, point ``latest`` at it, then prune to the newest ``keep``."""
        if self.directory.is_dir():
            for stale in self.directory.glob(f".*{_TMP_SUFFIX}"):
                stale.unlink(missing_ok=True)  # left by a crash (SIGKILL) mid-write
        path = save_pytree(self.path(step), tree, {**(metadata or {}), "step": step})
        _test_pause(path, "before_pointer")
        _atomic_write(self.directory / POINTER, lambda f: f.write(path.name.encode()))
        # The file just written survives even if a rerun saves below older steps.
        for old in [s for s in self._steps() if s != step][:-(self.keep - 1) or None]:
            self.path(old).unlink(missing_ok=True)
        return path

    def restore_newest_valid(self, template) -> tuple[Any, dict, int, list[str]]:
        """(tree, metadata, step, problems) of the newest checkpoint that loads and matches
        ``template``, trying older ones when the newest is truncated, garbled or mismatched;
        ``problems`` says what was skipped. CheckpointError if none is usable."""
        latest = self.latest_step()
        steps = sorted(set(self._steps()) | ({latest} if latest is not None else set()), reverse=True)
        problems = []
        for step in steps:
            try:
                tree, metadata = load_pytree(self.path(step), template)
                return tree, metadata, step, problems
            except CheckpointError as err:
                problems.append(str(err))
        raise CheckpointError(f"no usable checkpoint in {self.directory}" + (f": {problems[0]}" if problems else ""))

    def restore(self, template, step: int | None = None) -> tuple[Any, dict]:
        """(tree, metadata) of ``step`` (default: the latest), shaped like ``template``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if not self.path(step).is_file():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}")
        return load_pytree(self.path(step), template)

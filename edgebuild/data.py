"""Calibration and evaluation data: npz files checked against the model's inputs before use.

A data entry is one .npz file, or, for sets larger than memory, a folder of .npz shards or a
pattern matching them (read in name order): each input is then a `ShardedArray`, which reads a
shard when a slice of it is used, so an evaluation holds one shard per thread at a time, however
large the set.
"""
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

GLOB_CHARACTERS = frozenset("*?[")


def is_pattern(path) -> bool:
    """Whether a data entry is a glob pattern (in its last part: `data/eval-*.npz`)."""
    return bool(GLOB_CHARACTERS & set(Path(path).name))


def shard_files(path: Path) -> list[Path]:
    """The .npz files of a data entry, in name order: the file itself, a folder's `*.npz`, or
    the files a pattern matches."""
    path = Path(path)
    if is_pattern(path):
        return sorted(p for p in path.parent.glob(path.name) if p.is_file())
    return sorted(p for p in path.glob("*.npz") if p.is_file()) if path.is_dir() else [path]


def data_sha256(path: Path) -> str:
    """The content of a data entry, for cache keys: each shard's name and bytes, in order."""
    import hashlib

    from .fsutil import content_sha256

    digest = hashlib.sha256()
    for shard in shard_files(path):
        digest.update(shard.name.encode() + b"\0" + content_sha256(shard).encode())
    return digest.hexdigest()


class _ShardCache(threading.local):
    """The shard each thread read last, per array: consecutive batches come from the same shard."""

    def __init__(self):
        self.loaded: dict[str, tuple[int, np.ndarray]] = {}


class ShardedArray:
    """One input across .npz shards, read lazily: slices are views, `np.asarray` reads the rows.

    Slicing with a step of 1 gives another view; an integer gives that row; anything else reads
    the whole view first. Rows come back as `dtype` (the model's input dtype)."""

    def __init__(self, shards: list[tuple[Path, int]], name: str, dtype, tail: tuple[int, ...],
                 start: int = 0, stop: int | None = None, cache: _ShardCache | None = None):
        self.shards, self.name, self.dtype, self.tail = shards, name, np.dtype(dtype), tuple(tail)
        self.offsets = np.cumsum([0] + [rows for _, rows in shards])
        self.start, self.stop = start, int(self.offsets[-1]) if stop is None else stop
        self.cache = cache if cache is not None else _ShardCache()

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.tail)

    @property
    def ndim(self) -> int:
        return 1 + len(self.tail)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            begin, end, _ = key.indices(len(self))
            return ShardedArray(self.shards, self.name, self.dtype, self.tail, self.start + begin,
                                self.start + max(begin, end), self.cache)
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows")
            return np.asarray(self[index:index + 1])[0]
        return np.asarray(self)[key]

    def _shard(self, index: int) -> np.ndarray:
        cached = self.cache.loaded.get(self.name)
        if cached is None or cached[0] != index:
            self.cache.loaded.pop(self.name, None)  # let the previous shard go before reading the next
            with np.load(self.shards[index][0], allow_pickle=False) as stored:
                cached = (index, stored[self.name])
            self.cache.loaded[self.name] = cached
        return cached[1]

    def __array__(self, dtype=None, copy=None):
        parts = []
        first = int(np.searchsorted(self.offsets, self.start, side="right")) - 1
        for index in range(max(first, 0), len(self.shards)):
            begin, end = int(self.offsets[index]), int(self.offsets[index + 1])
            if begin >= self.stop:
                break
            if end <= self.start:
                continue
            rows = self._shard(index)[max(self.start, begin) - begin:min(self.stop, end) - begin]
            parts.append(rows.astype(self.dtype, copy=False))
        array = np.concatenate(parts) if parts else np.zeros((0, *self.tail), self.dtype)
        return array if dtype is None else array.astype(dtype, copy=False)


@dataclass
class Dataset:
    inputs: tuple  # one array (np.ndarray or ShardedArray) per model input, in argument order, batch first
    labels: dict[str, np.ndarray] | None   # "y", and "y_<output>" for one output's own labels

    def __len__(self) -> int:
        return len(self.inputs[0])

    def labels_for(self, output: str) -> np.ndarray | None:
        """An output's labels: the data file's `y_<output>`, else `y`."""
        if self.labels is None:
            return None
        return self.labels.get(f"y_{output}", self.labels.get("y"))

    def samples(self, limit: int | None = None) -> list[tuple[np.ndarray, ...]]:
        """Batch-of-one samples, as calibration feeds them."""
        count = len(self) if limit is None else min(limit, len(self))
        heads = self.head(count)
        return [tuple(array[i:i + 1] for array in heads) for i in range(count)]

    def head(self, count: int) -> tuple[np.ndarray, ...]:
        """The first `count` samples of each input, read into memory."""
        return tuple(np.asarray(array[:count]) for array in self.inputs)


def load_dataset(path: Path, label: str, model_inputs: list[dict], *, need_labels: bool) -> Dataset:
    """Read `path` (a .npz file, or a folder of .npz shards) and check it matches `model_inputs`
    ([{name, shape, dtype}]); errors name the file (the shard)."""
    path = Path(path)
    if not path.is_dir() and not is_pattern(path):
        return _checked(_read_npz(path, label), label, model_inputs, need_labels=need_labels)
    if is_pattern(path):
        label = str(Path(label).parent)  # shards are named under the pattern's folder
    shards, rows, labels = [], [], []
    for shard in shard_files(path):
        where = f"{label}/{shard.name}"
        part = _checked(_read_npz(shard, where), where, model_inputs, need_labels=need_labels)
        shards.append(shard)
        rows.append(len(part))
        labels.append(part.labels)
        del part  # one shard in memory at a time
    names = [spec["name"] for spec in model_inputs]
    with np.load(shards[0], allow_pickle=False) as stored:
        stored_names = [name if name in stored.files else "x" for name in names]
    cache = _ShardCache()
    inputs = tuple(ShardedArray(list(zip(shards, rows)), stored, spec["dtype"], tuple(spec["shape"][1:]), cache=cache)
                   for stored, spec in zip(stored_names, model_inputs))
    merged = None
    if need_labels:
        keys = set(labels[0])
        for shard, found in zip(shards, labels):
            if set(found) != keys:
                raise InputError(f"shards disagree on their label arrays: {sorted(found)} here, {sorted(keys)} in "
                                 f"{shards[0].name}", file=f"{label}/{shard.name}")
        merged = {key: np.concatenate([found[key] for found in labels]) for key in sorted(keys)}
    return Dataset(inputs=inputs, labels=merged)


def _read_npz(path: Path, label: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"not a readable .npz file ({reason})", file=label) from None


def _checked(arrays: dict[str, np.ndarray], label: str, model_inputs: list[dict], *, need_labels: bool) -> Dataset:
    """The arrays of one .npz checked against the model's inputs, as the model takes them."""
    def fail(message: str) -> InputError:
        return InputError(message, file=label)

    names = [spec["name"] for spec in model_inputs]
    if len(names) == 1 and names[0] not in arrays and "x" in arrays:
        arrays[names[0]] = arrays.pop("x")
    inputs = []
    for spec in model_inputs:
        name = spec["name"]
        if name not in arrays:
            expected = "'x'" if len(names) == 1 else ", ".join(repr(n) for n in names)
            raise fail(f"missing array {expected} for model input {name!r} (arrays present: {', '.join(sorted(arrays)) or 'none'})")
        array = arrays[name]
        if array.dtype == object or array.dtype.kind not in "biuf":
            raise fail(f"array {name!r} has dtype {array.dtype}; expected numbers")
        expected_shape = tuple(spec["shape"][1:])
        if array.ndim != len(spec["shape"]) or tuple(array.shape[1:]) != expected_shape:
            wanted = "(N, " + ", ".join(str(d) for d in expected_shape) + ")"
            raise fail(f"array {name!r} has shape {tuple(array.shape)}; model input {name!r} takes {wanted}")
        if len(array) == 0:
            raise fail(f"array {name!r} holds no samples")
        wanted_dtype = np.dtype(spec["dtype"])
        if wanted_dtype.kind == "f":
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
                raise fail(f"array {name!r} holds {bad} NaN or infinite values")
            array = array.astype(wanted_dtype)
        elif array.dtype.kind not in "biu":
            raise fail(f"array {name!r} has dtype {array.dtype}; model input {name!r} takes {wanted_dtype}")
        else:
            array = array.astype(wanted_dtype)
        inputs.append(array)
    counts = {len(a) for a in inputs}
    if len(counts) != 1:
        raise fail(f"input arrays hold different numbers of samples: {sorted(counts)}")

    labels = None
    if need_labels:
        labels = {name: array for name, array in arrays.items() if name == "y" or name.startswith("y_")}
        if not labels:
            raise fail("missing array 'y' (labels) needed by the metric")
        for name, array in labels.items():
            # Numbers per sample: a class, one per position (next tokens; negative marks none), or
            # whatever a plugin metric reads (pitch in Hz, boxes); metrics check their own kind.
            if array.ndim < 1 or len(array) != len(inputs[0]) or array.dtype.kind not in "biuf":
                raise fail(f"array {name!r} must hold labels for {len(inputs[0])} samples, got shape "
                           f"{array.shape} dtype {array.dtype}")
    return Dataset(inputs=tuple(inputs), labels=labels)


def padded_batches(inputs: tuple[np.ndarray, ...], batch: int):
    """Yield (arrays, rows): slices of exactly `batch` samples, for models exported with a fixed
    batch size; the last one is padded by repeating its final sample, and `rows` says how many
    of its outputs are real."""
    total = len(inputs[0])
    for start in range(0, total, batch):
        chunk = []
        for array in inputs:
            part = array[start:start + batch]
            if len(part) < batch:
                part = np.concatenate([part, np.repeat(part[-1:], batch - len(part), axis=0)])
            chunk.append(np.ascontiguousarray(part))
        yield chunk, min(batch, total - start)


def run_torch_module(module, inputs: tuple[np.ndarray, ...], batch: int) -> list[np.ndarray]:
    """Every output of a torch module over a data set (in its flattening order), at the batch size
    it was exported with."""
    import torch

    from .outputs import leaves

    outputs = []
    with torch.no_grad():
        for chunk, rows in padded_batches(inputs, batch):
            result = leaves(module(*(torch.from_numpy(part) for part in chunk)))
            outputs.append([tensor.detach().float().numpy()[:rows] for tensor in result])
    return [np.concatenate(parts) for parts in zip(*outputs)]

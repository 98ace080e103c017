"""Calibration and evaluation data: npz files checked against the model's inputs before use."""
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError


@dataclass
class Dataset:
    inputs: tuple[np.ndarray, ...]   # one array per model input, in argument order, batch first
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
        return [tuple(array[i:i + 1] for array in self.inputs) for i in range(count)]


def load_dataset(path: Path, label: str, model_inputs: list[dict], *, need_labels: bool) -> Dataset:
    """Read `path` and check it matches `model_inputs` ([{name, shape, dtype}]); errors name the file."""
    def fail(message: str) -> InputError:
        return InputError(message, file=label)

    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise fail(f"not a readable .npz file ({reason})") from None

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

"""Weights a bundle stores more than once: identical, negated, transposed or scaled copies.

A public helper: a backend that can read its bundle's weight values (`WeightValuesBackend`) gets
its copies found by the same code as the built-ins. Cheap first: tensors are grouped by element
count, then by a hash of their sorted magnitudes relative to the largest; only tensors in one
group are compared exactly.
"""
import hashlib
from typing import Callable, Iterable

import numpy as np

# Smaller tensors (biases, per-channel scales) cost little and repeat by chance (zeros, ones).
MIN_ELEMENTS = 1024
SCALE_TOLERANCE = 1e-6


def _signature(values: np.ndarray) -> str | None:
    # One working copy, edited in place: an LLM's embedding table is ~100 MB of float32.
    magnitudes = np.abs(values.astype(np.float32, copy=False)).ravel()
    magnitudes.sort()
    largest = float(magnitudes[-1])
    if largest == 0.0 or not np.isfinite(largest) or magnitudes[0] == largest:
        return None  # zeros or a splat: not a weight anyone would call stored twice
    # Rounded to 12 bits: a copy scaled in float32 rounds its magnitudes a little differently.
    magnitudes *= np.float32(4096 / largest)
    np.rint(magnitudes, out=magnitudes)
    return hashlib.sha256(memoryview(magnitudes)).hexdigest()


def relation(original: np.ndarray, other: np.ndarray) -> str | None:
    """How `other` stores `original` again: identical, negated, transposed, negated transposed,
    scaled (by a constant, within float32 rounding); None if it does not."""
    a = original.astype(np.float32, copy=False)
    b = other.astype(np.float32, copy=False)
    layouts = [("", a)]
    if a.ndim == 2:
        layouts.append(("transposed", a.T))
    elif a.ndim > 2:  # a channels-last copy of a channels-first one and back
        layouts += [("transposed", np.moveaxis(a, 0, -1)), ("transposed", np.moveaxis(a, -1, 0))]
    for layout, view in layouts:
        if view.shape != b.shape:
            continue
        if np.array_equal(view, b):
            return layout or "identical"
        if np.array_equal(view, -b):
            return f"negated {layout}".strip()
        nonzero = view != 0
        if not nonzero.any() or not np.array_equal(nonzero, b != 0):
            continue
        ratios = b[nonzero] / view[nonzero]
        scale = float(np.median(ratios))
        if abs(scale) not in (0.0, 1.0) and np.allclose(ratios, scale, rtol=SCALE_TOLERANCE, atol=0):
            return f"scaled by {scale:.6g} {layout}".strip()
    return None


def find_copies(tensors: Iterable[tuple[str, int, Callable[[], np.ndarray]]]) -> list[dict]:
    """[{tensor, copy_of, relation, params}] for each tensor that stores an earlier one again.

    `tensors` yields (name, element count, load) once per stored buffer, in a stable order; `load()`
    returns the values (dequantized). Values are loaded when needed and not kept: a language
    model's weights are never all in memory at once here.
    """
    groups: dict[tuple[int, str], list[tuple[str, Callable[[], np.ndarray]]]] = {}
    copies = []
    for name, size, load in tensors:
        if size < MIN_ELEMENTS:
            continue
        values = load()
        signature = _signature(values)
        if signature is None:
            continue
        group = groups.setdefault((size, signature), [])
        found = next(((first, how) for first, load_first in group if (how := relation(load_first(), values))), None)
        if found:
            copies.append({"tensor": name, "copy_of": found[0], "relation": found[1], "params": int(size)})
        else:
            group.append((name, load))
    return copies

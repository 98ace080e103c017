"""Per-layer sensitivity measured in torch, for precisions a backend computes in float on the
weights it stores (weight-only): the exported program with one weight replaced by the exact values
a bundle stores gives the outputs the runtime would, up to float rounding.

Each layer's weight in the fp32 bundle is matched to a parameter of the exported program by value:
the same numbers in another axis order (a convolution's channels-last layout), possibly scaled per
output channel (a BatchNorm the converter folded into it). A probe then writes the bundle's stored
values back through that map and reruns only the nodes that depend on the parameter; everything
else comes from the fp32 pass, recorded once per batch of samples.
"""
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..data import padded_batches
from ..outputs import leaves

# A folded BatchNorm scales each output channel by gamma / sqrt(var + eps), rounded in float32.
FOLDED_SCALE_RTOL = 1e-5
# The recorded fp32 pass keeps every node's value for one batch: above this, the probes rerun the
# whole program instead (an LLM's long windows), which gives the same numbers more slowly.
RECORD_BYTES_LIMIT = 4 << 30


@dataclass(frozen=True)
class WeightMap:
    """How a bundle stores a program parameter: `bundle = parameter.transpose(axes) * scale`, the
    scale (or None) one factor per slice along `scale_axis` of the bundle's layout."""
    parameter: str
    axes: tuple[int, ...]
    scale_axis: int | None = None
    scale: np.ndarray | None = None

    def to_parameter(self, stored: np.ndarray) -> np.ndarray:
        """The parameter value that makes the program compute what the bundle's stored weight does."""
        values = np.asarray(stored, np.float32)
        if self.scale is not None:
            shape = [1] * values.ndim
            shape[self.scale_axis] = -1
            values = values / self.scale.reshape(shape)
        return np.ascontiguousarray(np.transpose(values, np.argsort(self.axes)))


def _per_axis_scale(stored: np.ndarray, view: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(axis, factors) when `stored` is `view` times one factor per slice along an axis."""
    nonzero = view != 0
    if not np.array_equal(nonzero, stored != 0) or not nonzero.any():
        return None
    ratios = np.where(nonzero, stored / np.where(nonzero, view, 1), np.nan)
    for axis in range(stored.ndim):
        rows = np.moveaxis(ratios, axis, 0).reshape(stored.shape[axis], -1)
        if np.isnan(rows).all(axis=1).any():
            continue  # a channel of zeros: its factor is unknown
        factors = np.nanmedian(rows, axis=1).astype(np.float32)
        shape = [1] * stored.ndim
        shape[axis] = -1
        expected = view * factors.reshape(shape)
        if np.allclose(stored, expected, rtol=FOLDED_SCALE_RTOL, atol=0):
            return axis, factors
    return None


def match_weight(stored: np.ndarray, parameters: dict[str, np.ndarray]) -> WeightMap | None:
    """The parameter the bundle's fp32 weight stores, and how; None when none matches exactly."""
    stored = np.asarray(stored, np.float32)
    for name, value in parameters.items():
        if value.size != stored.size or value.ndim != stored.ndim:
            continue
        for axes in itertools.permutations(range(value.ndim)):
            view = np.transpose(value, axes)
            if view.shape != stored.shape:
                continue
            if np.array_equal(view, stored):
                return WeightMap(name, tuple(axes))
            scaled = _per_axis_scale(stored, view)
            if scaled is not None:
                return WeightMap(name, tuple(axes), scaled[0], scaled[1])
    return None


class ProgramSimulator:
    """The exported program over a set of samples, with one parameter replaced at a time."""

    def __init__(self, exported_program, inputs: tuple[np.ndarray, ...], batch: int):
        import torch

        self.module = torch.export.load(str(exported_program)).module()
        self.inputs = inputs
        self.batch = batch
        self.rows = len(inputs[0])
        self.nodes = {node.target: node for node in self.module.graph.nodes if node.op == "get_attr"}
        self.parameters = dict(self.module.named_parameters())

    def parameter_values(self) -> dict[str, np.ndarray]:
        return {name: tensor.detach().float().numpy() for name, tensor in self.parameters.items()
                if name in self.nodes}

    def parameter_value(self, name: str) -> np.ndarray:
        """One parameter's fp32 value, as float64 (for error sums)."""
        return self.parameters[name].detach().double().numpy()

    def _downstream(self, parameter: str) -> set:
        """Every node whose value depends on the parameter."""
        found, stack = set(), [self.nodes[parameter]]
        while stack:
            node = stack.pop()
            for user in node.users:
                if user not in found:
                    found.add(user)
                    stack.append(user)
        return found

    def noise(self, probes: list[tuple[str, np.ndarray]], workers: int = 1) -> tuple[list[float], list[list[float]]]:
        """(signal energy per output, each probe's noise energy per output) over every sample: the
        sums the sqnr metric divides. A probe is (parameter, value); outputs are in the model's
        flattening order. Only those sums are kept: an LLM's logits per probe would not fit.
        `workers` probes run at once, each on one thread, so the sums do not depend on it."""
        import torch
        from torch.fx import Interpreter

        downstream = [self._downstream(parameter) for parameter, _ in probes]
        values = [torch.from_numpy(np.ascontiguousarray(value, np.float32)) for _, value in probes]
        signal, noise = None, [None] * len(probes)
        module = self.module

        class Record(Interpreter):
            def __init__(self):
                super().__init__(module, garbage_collect_values=False)
                self.values = {}

            def run_node(self, node):
                result = super().run_node(node)
                self.values[node] = result
                return result

        class Replay(Interpreter):
            def __init__(self, recorded: dict, dirty: set, node, value):
                super().__init__(module)
                self.recorded, self.dirty, self.node, self.value = recorded, dirty, node, value

            def run_node(self, node):
                if node is self.node:
                    return self.value
                if node.op != "output" and node not in self.dirty:
                    return self.recorded[node]
                return super().run_node(node)

        def arrays(result, rows):
            return [t.detach().double().numpy()[:rows] for t in leaves(result)]

        def probe_energy(index, recorder, tensors, reference, rows):
            with torch.no_grad():  # grad mode is per thread
                parameter = probes[index][0]
                if recorder is not None:
                    out = Replay(recorder.values, downstream[index], self.nodes[parameter], values[index]).run(*tensors)
                else:
                    out = torch.func.functional_call(module, {parameter: values[index]}, tuple(tensors))
                return [float(np.sum((o - r) ** 2)) for o, r in zip(arrays(out, rows), reference)]

        record = True
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread per probe: the same sums on any number of cores
        try:
            with torch.no_grad(), ThreadPoolExecutor(max(1, workers)) as pool:
                for chunk, rows in padded_batches(self.inputs, self.batch):
                    tensors = [torch.from_numpy(part) for part in chunk]
                    recorder = Record() if record else None
                    reference = arrays(recorder.run(*tensors) if recorder else module(*tensors), rows)
                    if recorder is not None and sum(v.numel() * v.element_size() for v in recorder.values.values()
                                                    if isinstance(v, torch.Tensor)) > RECORD_BYTES_LIMIT:
                        record, recorder = False, None
                    energy = [float(np.sum(r ** 2)) for r in reference]
                    signal = energy if signal is None else [a + b for a, b in zip(signal, energy)]
                    # Largest downstream first, so the last probes to finish are short ones.
                    order = sorted(range(len(probes)), key=lambda i: -len(downstream[i]))
                    energies = pool.map(partial(probe_energy, recorder=recorder, tensors=tensors, reference=reference,
                                                rows=rows), order)
                    for index, energy in zip(order, energies):
                        noise[index] = energy if noise[index] is None else [a + b for a, b in zip(noise[index], energy)]
                    del recorder
        finally:
            torch.set_num_threads(threads)
        return signal, noise

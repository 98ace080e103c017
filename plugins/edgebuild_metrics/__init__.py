"""Built-in metrics. Outputs are (samples, ...) arrays; classification metrics use the last axis."""
import numpy as np

from edgebuild.api import Metric
from edgebuild.hookspecs import hookimpl


def top1(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> float:
    return float(np.mean(outputs.argmax(-1) == labels.reshape(-1)))


def agreement(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> float:
    return float(np.mean(outputs.argmax(-1) == reference.argmax(-1)))


def sqnr(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> float:
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    noise = float(np.sum((outputs.astype(np.float64) - reference) ** 2))
    if noise == 0.0:
        return 200.0  # identical outputs; a finite cap keeps report.json valid JSON
    return float(min(200.0, 10.0 * np.log10(max(signal, 1e-30) / noise)))


@hookimpl
def register_metrics(register):
    register(Metric("top1", "top-1 accuracy against the labels in the evaluation set", top1, needs_labels=True))
    register(Metric("agreement", "top-1 agreement with the fp32 model (no labels needed)", agreement))
    register(Metric("sqnr", "signal-to-quantization-noise ratio of the outputs vs fp32, in dB", sqnr,
                    has_baseline=False, unit="dB"))

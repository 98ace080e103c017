"""Built-in metrics. Outputs are (samples, ...) arrays; classification metrics use the last axis.

Labels have the outputs' shape less the last axis: one class per sample, or one next token per
position for language models. A negative label marks a position without one. Metrics that need
float64 softmaxes work a sample at a time: an LLM's logits (samples x positions x vocabulary)
would otherwise take several full-size float64 copies.
"""
import numpy as np

from edgebuild.api import Metric
from edgebuild.hookspecs import hookimpl


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _labelled(outputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels in the outputs' shape (less classes), and the mask of positions that have one."""
    labels = labels.reshape(outputs.shape[:-1])
    return labels, labels >= 0


def top1(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> float:
    labels, mask = _labelled(outputs, labels)
    return float(np.mean((outputs.argmax(-1) == labels)[mask]))


def agreement(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> float:
    return float(np.mean(outputs.argmax(-1) == reference.argmax(-1)))


def sqnr(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> float:
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    noise = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for o, r in zip(outputs, reference))
    if noise == 0.0:
        return 200.0  # identical outputs; a finite cap keeps report.json valid JSON
    return float(min(200.0, 10.0 * np.log10(max(signal, 1e-30) / noise)))


def mean_kl(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> float:
    """Mean KL(fp32 || candidate) of the softmax over the last axis (per token for LMs)."""
    total = 0.0
    for candidate, fp32 in zip(outputs, reference):
        p_log, q_log = _log_softmax(fp32), _log_softmax(candidate)
        total += float(np.sum(np.exp(p_log) * (p_log - q_log)))
    return total / (outputs.size // outputs.shape[-1])


def perplexity(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> float:
    """exp of the mean negative log-likelihood of the labelled next tokens."""
    labels, mask = _labelled(outputs, labels)
    total, count = 0.0, int(mask.sum())
    for logits, wanted, present in zip(outputs, labels, mask):
        picked = np.take_along_axis(_log_softmax(logits), np.where(present, wanted, 0)[..., None], axis=-1)[..., 0]
        total -= float(picked[present].sum())
    return float(np.exp(total / count))


def _has_classes(shape: tuple) -> bool:
    """Classification metrics apply to outputs with a class axis (the last) of two or more."""
    return len(shape) >= 2 and shape[-1] >= 2


@hookimpl
def register_metrics(register):
    register(Metric("top1", "top-1 accuracy against the labels in the evaluation set", top1, needs_labels=True))
    register(Metric("agreement", "top-1 agreement with the fp32 model (no labels needed)", agreement,
                    applies=_has_classes))
    register(Metric("token_agreement", "top-1 next-token agreement with the fp32 model, over every position",
                    agreement, applies=_has_classes))
    register(Metric("kl", "mean KL divergence of the output distribution from fp32's (lower is better)", mean_kl,
                    higher_is_better=False, bounds=(0.0, None), applies=_has_classes))
    register(Metric("perplexity", "perplexity of the evaluation text's next tokens (lower is better)", perplexity,
                    higher_is_better=False, needs_labels=True, bounds=(1.0, None)))
    register(Metric("sqnr", "signal-to-quantization-noise ratio of the outputs vs fp32, in dB", sqnr,
                    has_baseline=False, unit="dB", bounds=(None, None)))

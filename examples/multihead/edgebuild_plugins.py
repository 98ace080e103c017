"""This project's own edgebuild plugin (`plugins:` in edgebuild.yaml): a task metric for the ink head.

It is repository code that runs, like the model's entry. Editing it reruns evaluation and
selection, never conversion.
"""
import numpy as np

from edgebuild.api import Metric
from edgebuild.hookspecs import hookimpl


def ink_error(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> float:
    """Mean absolute error of the predicted ink coverage against the measured one (`y_ink`)."""
    return float(np.mean(np.abs(outputs.reshape(len(outputs), -1)[:, 0] - labels.reshape(len(labels), -1)[:, 0])))


@hookimpl
def register_metrics(register):
    register(Metric("ink_error", "mean absolute error of the ink-coverage head against y_ink (lower is better)",
                    ink_error, higher_is_better=False, needs_labels=True, integer_labels=False, bounds=(0.0, 1.0)))

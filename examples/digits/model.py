"""A small CNN for scikit-learn's bundled 8x8 digits; `build()` is the manifest's model entry."""
from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("weights.npz")


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build():
    """Return the trained model and one example input (batch of 1, NCHW, pixels scaled to [0, 1])."""
    model = DigitsNet()
    # Weights are stored as plain arrays (npz, no pickle) so loading them runs no code.
    with np.load(WEIGHTS, allow_pickle=False) as stored:
        model.load_state_dict({name: torch.from_numpy(stored[name]) for name in stored.files})
    model.eval()
    return model, (torch.zeros(1, 1, 8, 8),)

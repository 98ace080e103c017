"""A digits CNN with two heads, as apps ship them: the digit (class logits) and how much ink the
stroke covers (a regression the app shows as a confidence cue). `build()` is the manifest's entry;
the outputs are named in edgebuild.yaml (`model.outputs: [digit, ink]`)."""
from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("weights.npz")


class TwoHeadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.digit = nn.Sequential(nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
        self.ink = nn.Sequential(nn.Linear(32 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.features(x)
        return self.digit(shared), self.ink(shared)


def build():
    """The trained model and one example input (batch of 1, NCHW, pixels scaled to [0, 1])."""
    model = TwoHeadNet()
    with np.load(WEIGHTS, allow_pickle=False) as stored:
        model.load_state_dict({name: torch.from_numpy(stored[name]) for name in stored.files})
    model.eval()
    return model, (torch.zeros(1, 1, 8, 8),)

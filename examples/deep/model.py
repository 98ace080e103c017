"""A six-layer MLP on scikit-learn's digits, trained in about a second (for bench/search.py).

`build()` trains deterministically on first use and caches the weights beside this file.
"""
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).parent
WIDTHS = [64, 256, 256, 128, 128, 64, 10]


class DeepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(WIDTHS) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def train(path: Path) -> None:
    torch.manual_seed(0)
    x_train, y_train, x_eval, y_eval = data()
    model = DeepNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(30):
        perm = torch.randperm(len(xt))
        for start in range(0, len(xt), 64):
            idx = perm[start:start + 64]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimiser.step()
    np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})
    np.savez(HERE / "calib.npz", x=x_train[:128])
    np.savez(HERE / "eval.npz", x=x_eval, y=y_eval)


def build():
    weights = HERE / "weights.npz"
    if not weights.exists():
        torch.set_num_threads(1)
        train(weights)
    model = DeepNet()
    with np.load(weights) as stored:
        model.load_state_dict({k: torch.from_numpy(stored[k]) for k in stored.files})
    return model.eval(), (torch.zeros(1, 64),)


if __name__ == "__main__":
    train(HERE / "weights.npz")

"""Train the two-head digits CNN; write weights.npz, calib.npz and eval.npz next to this file.

Labels: `y` the digit, `y_ink` the fraction of the 8x8 image the stroke covers (pixels over 0.5):
float labels, read by the project's own `ink_error` metric (edgebuild_plugins.py).
Deterministic: fixed seeds, single thread. Run: python examples/multihead/train.py
"""
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from model import TwoHeadNet

HERE = Path(__file__).parent


def ink(images: np.ndarray) -> np.ndarray:
    return (images > 0.5).mean(axis=(1, 2, 3)).astype(np.float32)[:, None]


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(1).permutation(len(x))
    x, y = x[order], y[order]
    x_train, y_train, x_eval, y_eval = x[:1437], y[:1437], x[1437:], y[1437:]

    model = TwoHeadNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt, it = torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(ink(x_train))
    for epoch in range(25):
        perm = torch.randperm(len(xt))
        for start in range(0, len(xt), 64):
            idx = perm[start:start + 64]
            digit, covered = model(xt[idx])
            loss = nn.functional.cross_entropy(digit, yt[idx]) + 20 * nn.functional.mse_loss(covered, it[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        digit, covered = model(torch.from_numpy(x_eval))
    print(f"held-out top1 {(digit.argmax(1).numpy() == y_eval).mean():.4f}, "
          f"ink mean absolute error {np.abs(covered.numpy() - ink(x_eval)).mean():.4f}")

    np.savez(HERE / "weights.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
    np.savez(HERE / "calib.npz", x=x_train[:128])
    np.savez(HERE / "eval.npz", x=x_eval, y=y_eval, y_ink=ink(x_eval))


if __name__ == "__main__":
    main()

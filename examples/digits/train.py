"""Train the example digits CNN and write weights.npz, train.npz, calib.npz and eval.npz next to this file.

Deterministic: fixed seeds, single thread. Run: python examples/digits/train.py
"""
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from model import DigitsNet

HERE = Path(__file__).parent


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    # 1,437 train / 360 held out; calibration is a slice of the training data, never of eval.
    x_train, y_train, x_eval, y_eval = x[:1437], y[:1437], x[1437:], y[1437:]

    model = DigitsNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for epoch in range(15):
        perm = torch.randperm(len(xt))
        for start in range(0, len(xt), 64):
            idx = perm[start:start + 64]
            optimiser.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_eval)).argmax(1).numpy() == y_eval).mean()
    print(f"held-out top1 {accuracy:.4f}")

    np.savez(HERE / "weights.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
    np.savez(HERE / "train.npz", x=x_train, y=y_train)  # for quantization-aware training (data.train)
    np.savez(HERE / "calib.npz", x=x_train[:128])
    np.savez(HERE / "eval.npz", x=x_eval, y=y_eval)


if __name__ == "__main__":
    main()

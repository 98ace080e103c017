"""A model where no uniform recipe fits but a mixed one does (the mixed-precision search's test case).

`wide` (64 -> 512, 32k weights) is ordinary: it tolerates 4-bit weights. `head` (512 -> 10) reads
its signal from small weights next to a few very large ones in every row and every block of 32:
any per-channel or per-block integer grid sized for the large weights rounds the small ones away.
It needs float16. The data is generated here, deterministically.
"""
import numpy as np
import torch
from torch import nn

HIDDEN, OUTLIER_EVERY = 512, 16


class OutlierNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(64, HIDDEN)
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.wide(x)))


def build():
    generator = torch.Generator().manual_seed(0)
    model = OutlierNet()
    with torch.no_grad():
        model.wide.weight.copy_(torch.randn(HIDDEN, 64, generator=generator) * 0.2)
        model.wide.bias.zero_()
        outliers = torch.arange(HIDDEN) % OUTLIER_EVERY == 0
        # Hidden units feeding the large head weights stay nearly silent...
        model.wide.weight[outliers] *= 1e-4
        head = torch.randn(10, HIDDEN, generator=generator) * 0.02
        head[:, outliers] = 4.0 * torch.sign(torch.randn(10, int(outliers.sum()), generator=generator))
        model.head.weight.copy_(head)
        model.head.bias.zero_()
    return model.eval(), (torch.zeros(1, 64),)


def make_data(path_calibration, path_evaluation) -> None:
    rng = np.random.default_rng(0)
    np.savez(path_calibration, x=rng.standard_normal((128, 64)).astype(np.float32))
    np.savez(path_evaluation, x=rng.standard_normal((400, 64)).astype(np.float32))


if __name__ == "__main__":
    from pathlib import Path

    here = Path(__file__).parent
    make_data(here / "calib.npz", here / "eval.npz")

"""Sensitivity simulated in torch: weights matched to program parameters, probes replayed from a
recorded fp32 pass (the agreement with the runtime, probe by probe, is in test_search.py)."""
import numpy as np
import pytest
import torch
from torch import nn

from edgebuild.pipeline import simulation
from edgebuild.pipeline.simulation import ProgramSimulator, match_weight


def test_a_channels_last_weight_with_a_folded_batchnorm_is_matched_to_its_parameter():
    rng = np.random.default_rng(0)
    parameter = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    decoy = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    stored = np.transpose(parameter, (0, 2, 3, 1)) * scale[:, None, None, None]  # OHWI, BN folded

    found = match_weight(stored, {"decoy.weight": decoy, "conv.weight": parameter})

    assert found is not None and found.parameter == "conv.weight" and found.axes == (0, 2, 3, 1)
    assert found.scale_axis == 0 and np.allclose(found.scale, scale, rtol=1e-6)
    assert np.allclose(found.to_parameter(stored), parameter, rtol=1e-6, atol=0)
    plain = match_weight(np.ascontiguousarray(parameter.T), {"conv.weight": parameter})
    assert plain is not None and plain.scale is None and np.array_equal(plain.to_parameter(parameter.T), parameter)


def test_a_weight_that_is_no_parameter_is_not_matched():
    rng = np.random.default_rng(1)
    parameter = rng.standard_normal((16, 8)).astype(np.float32)
    rounded = np.round(parameter * 4) / 4  # a quantized copy is not the parameter
    assert match_weight(rounded, {"fc.weight": parameter}) is None
    assert match_weight(parameter[:, :4], {"fc.weight": parameter}) is None


class SkipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.second = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        y = torch.relu(self.norm(self.first(x)))
        y = y + self.second(y)  # a skip: a probe of `second` reuses the recorded `y`
        return self.head(y.flatten(1)), y.mean(dim=(2, 3))


@pytest.fixture
def program(tmp_path):
    torch.manual_seed(0)
    module = SkipNet().eval()
    path = tmp_path / "program.pt2"
    torch.export.save(torch.export.export(module, (torch.zeros(1, 3, 8, 8),)), str(path))
    return path


def _direct_noise(path, inputs, parameter: str, value: np.ndarray) -> tuple[list[float], list[float]]:
    """The sums computed the plain way: the whole module run twice per sample."""
    module = torch.export.load(str(path)).module()
    signal, noise = [0.0, 0.0], [0.0, 0.0]
    with torch.no_grad():
        for sample in inputs:
            reference = [t.double().numpy() for t in module(torch.from_numpy(sample[None]))]
            tensor = dict(module.named_parameters())[parameter]
            saved = tensor.detach().clone()
            tensor.copy_(torch.from_numpy(value))
            outputs = [t.double().numpy() for t in module(torch.from_numpy(sample[None]))]
            tensor.copy_(saved)
            for i, (o, r) in enumerate(zip(outputs, reference)):
                signal[i] += float(np.sum(r ** 2))
                noise[i] += float(np.sum((o - r) ** 2))
    return signal, noise


def test_a_probe_replayed_from_the_recorded_pass_gives_the_whole_runs_numbers(program, monkeypatch):
    rng = np.random.default_rng(2)
    inputs = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    simulator = ProgramSimulator(program, (inputs,), batch=1)
    weights = simulator.parameter_values()
    probes = [(name, (np.round(weights[name] * 8) / 8).astype(np.float32))
              for name in ("first.weight", "second.weight", "head.weight")]

    signal, noise = simulator.noise(probes)
    # Probes side by side (each on one thread) give the same sums to the last bit as one at a time.
    assert simulator.noise(probes, workers=3) == (signal, noise)
    monkeypatch.setattr(simulation, "RECORD_BYTES_LIMIT", -1)  # nothing recorded: every probe runs it all
    signal_whole, noise_whole = ProgramSimulator(program, (inputs,), batch=1).noise(probes)

    assert signal == signal_whole
    for (name, value), energies, whole in zip(probes, noise, noise_whole):
        direct_signal, direct = _direct_noise(program, inputs, name, value)
        assert np.allclose(signal, direct_signal, rtol=1e-12)
        assert np.allclose(energies, direct, rtol=1e-9) and np.allclose(whole, direct, rtol=1e-9)
        assert energies[0] > 0
    # `head` feeds only the first output: its probe leaves the second exactly as recorded.
    assert noise[2][1] == 0.0 and noise[1][1] > 0

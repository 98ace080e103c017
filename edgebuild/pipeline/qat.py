"""Quantization-aware training (TFLite): when no post-training candidate holds the floor, train
the model with the chosen candidate's weight grid simulated, then convert and quantize it with
that candidate's own recipe, so the trained weights land exactly on the grid the quantizer uses.

Loss: distillation from the fp32 model's outputs (no labels needed), or cross-entropy on labels.
Seeds are fixed and training runs single-threaded: same inputs, same bytes.
"""
import copy
import os
import time

import numpy as np

from ..api import CompressInput, Technique
from ..data import load_dataset
from ..fsutil import atomic_output, atomic_write_json, bundle_sha256, read_json, remove_path, replace_path
from ..manifest import Target
from .layout import Build

QAT_PREFIX = "qat-"


def weight_grid(technique: Technique) -> dict | None:
    """(bits, qmin, qmax) of a symmetric per-channel min/max weight recipe, the grids QAT can simulate."""
    rules = technique.recipe if isinstance(technique.recipe, list) else []
    if len(rules) != 1 or rules[0].get("algorithm_key") != "min_max_uniform_quantize":
        return None
    weights = rules[0].get("op_config", {}).get("weight_tensor_config", {})
    if weights.get("granularity") != "CHANNELWISE" or not weights.get("symmetric") or weights.get("dtype") != "INT":
        return None
    if "activation_tensor_config" in rules[0]["op_config"]:
        return None  # static activation ranges are not simulated
    bits = int(weights["num_bits"])
    return {"bits": bits, "qmin": -(2 ** (bits - 1)), "qmax": 2 ** (bits - 1) - 1}


def _fake_quant(grid: dict):
    import torch

    class FakeQuant(torch.nn.Module):
        """ai-edge-quantizer's symmetric per-output-channel grid: scale = max|w| / qmax; straight-through gradient."""

        def forward(self, weight):
            flat = weight.reshape(weight.shape[0], -1)
            scale = (flat.abs().amax(dim=1).clamp_min(1e-9) / grid["qmax"]).reshape(-1, *[1] * (weight.dim() - 1))
            quantized = torch.clamp(torch.round(weight / scale), grid["qmin"], grid["qmax"]) * scale
            return weight + (quantized - weight).detach()

    return FakeQuant()


def _quantized_modules(module) -> list:
    import torch

    # Depthwise convolutions keep float weights in ai-edge-quantizer's weight-only recipes.
    return [m for m in module.modules()
            if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.groups == 1)]


def distillation_loss(student, teacher):
    """Output MSE normalised by the teacher's variance, plus KL at a temperature set by the
    teacher's logit spread (so the ranking, which top-1 metrics read, is learned too)."""
    import torch

    temperature = teacher.std().clamp_min(1e-6) * 0.5
    mse = torch.nn.functional.mse_loss(student, teacher) / teacher.var().clamp_min(1e-12)
    if student.dim() < 2 or student.shape[-1] < 2:
        return mse
    kl = torch.nn.functional.kl_div(torch.log_softmax(student / temperature, -1),
                                    torch.softmax(teacher / temperature, -1), reduction="batchmean")
    return mse + kl


def train(module, grid: dict, inputs: tuple[np.ndarray, ...], labels: np.ndarray | None, settings: dict,
          log) -> dict:
    """Train in place with the grid simulated; returns what happened (steps, seconds, final loss)."""
    import torch
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions
    try:
        teacher = copy.deepcopy(module).eval()
        targets = _quantized_modules(module)
        for layer in targets:
            parametrize.register_parametrization(layer, "weight", _fake_quant(grid))
        trainable = settings["trainable"]
        if trainable != "all":  # last:N fine-tunes the last N quantized layers, the rest stay frozen
            for parameter in module.parameters():
                parameter.requires_grad_(False)
            for layer in targets[-int(trainable.split(":")[1]):]:
                for parameter in layer.parameters():  # recursive: the weight now sits in its parametrization
                    parameter.requires_grad_(True)
        for parameter in module.parameters():
            if not parameter.detach().any():
                # An all-zero tensor (typically a bias) is left out of the converted model; training
                # it would add bytes the post-training candidate does not have.
                parameter.requires_grad_(False)
        parameters = [p for p in module.parameters() if p.requires_grad]
        optimiser = torch.optim.Adam(parameters, lr=settings["learning_rate"])
        batches = (len(inputs[0]) + 31) // 32
        planned = min(settings["max_steps"], settings["epochs"] * batches)
        # Cosine decay to zero over the planned steps: large moves early, settling on the grid late.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: 0.5 * (1 + np.cos(np.pi * min(step, planned) / planned)))
        x = [torch.from_numpy(array) for array in inputs]
        with torch.no_grad():
            teacher_out = teacher(*x)
        y = torch.from_numpy(labels) if labels is not None else None
        generator = torch.Generator().manual_seed(0)
        steps, started, loss = 0, time.monotonic(), None
        module.train()
        for epoch in range(settings["epochs"]):
            order = torch.randperm(len(x[0]), generator=generator)
            for start in range(0, len(order), 32):
                index = order[start:start + 32]
                output = module(*(part[index] for part in x))
                if settings["loss"] == "cross_entropy":
                    loss = torch.nn.functional.cross_entropy(output, y[index])
                else:
                    loss = distillation_loss(output, teacher_out[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                steps += 1
                if steps >= settings["max_steps"] or time.monotonic() - started > settings["max_time"]:
                    break
            log(f"epoch {epoch + 1}: loss {float(loss):.5f} ({steps} steps)")
            if steps >= settings["max_steps"] or time.monotonic() - started > settings["max_time"]:
                break
        module.eval()
        for layer in targets:  # bake the grid into the weights
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        return {"steps": steps, "seconds": round(time.monotonic() - started, 2), "loss": float(loss)}
    finally:
        torch.set_num_threads(threads)


def run_qat(build: Build, target: Target) -> None:
    """The qat stage for one target: writes `.edgebuild/targets/<t>/qat.json` and, when it trained, the bundle."""
    import torch

    from .search import search_runs
    from .stages import candidate_verdict, evaluate_bundle, runnable_techniques, target_threshold

    settings = target.qat
    record_path = build.qat_record(target)
    variant = build.variant(target)
    backend = build.registry.backends[variant.backend]
    threshold = target_threshold(build, target)
    judged = []
    for technique, skip in runnable_techniques(build, variant.key):
        if skip:
            continue
        evaluation = read_json(build.evaluation(variant.key, technique.name))
        if evaluation["status"] == "ok":
            judged.append((technique, evaluation, candidate_verdict(build, target, evaluation, threshold)))
    search_pass = False
    if search_runs(build, target):
        search = read_json(build.search_record(target))
        search_pass = bool(search.get("candidate"))
    if settings["mode"] == "auto" and (search_pass or any(not failed for _, _, failed in judged)):
        atomic_write_json(record_path, {"status": "skipped", "reason": "a post-training candidate already meets "
                                        "every budget and the floor (qat: auto)"})
        return
    # Train for the smallest candidate whose only problem is accuracy, on a grid QAT can simulate.
    fitting = [(t, e) for t, e, failed in judged if weight_grid(t) and all(f["constraint"] == "accuracy" for f in failed)]
    if not fitting:
        atomic_write_json(record_path, {"status": "skipped", "reason": "no candidate with a simulable weight grid "
                                        "fits the size budgets"})
        return
    technique, ptq = min(fitting, key=lambda item: (item[1]["bytes"], item[0].name))
    grid = weight_grid(technique)

    data_file = build.manifest.train or build.manifest.calibration or build.manifest.evaluation
    meta = read_json(build.model_meta)
    need_labels = settings["loss"] == "cross_entropy"
    data = load_dataset(data_file, build.manifest.relative(data_file), meta["inputs"], need_labels=need_labels)
    loader = build.registry.loaders[build.manifest.model["source"]]
    module, example = loader(build.manifest.model, build.manifest.root)
    lines = []
    result = train(module, grid, data.inputs, data.labels, settings, lines.append)

    work = build.state / "targets" / target.name / "qat"
    work.mkdir(parents=True, exist_ok=True)
    program = work / "trained.pt2"
    temporary = atomic_output(program)
    torch.export.save(torch.export.export(module, example), str(temporary))
    os.replace(temporary, program)
    fp32 = work / f"fp32{backend.extension}"
    backend.convert(program, fp32, variant.options)
    bundle = build.qat_bundle(target)
    temporary = atomic_output(bundle)
    try:
        backend.compress(technique, CompressInput(fp32_bundle=fp32, exported_program=program, calibration=None,
                                                  work_dir=work, options=variant.options), temporary)
        replace_path(temporary, bundle)
    finally:
        remove_path(temporary)
    evaluation = evaluate_bundle(build, backend, bundle)
    name = QAT_PREFIX + technique.name
    atomic_write_json(record_path, {
        "status": "trained", "technique": name, "trained_for": technique.name,
        "grid": grid, "data": build.manifest.relative(data_file), "loss": settings["loss"],
        "trainable": settings["trainable"], "training": result, "log": lines,
        "post_training": {"bytes": ptq["bytes"], "metric": ptq["metric"]},
        "candidate": {"technique": name, "description": f"quantization-aware training for {technique.name} "
                      f"({settings['loss']} loss, {result['steps']} steps, trainable {settings['trainable']})",
                      "status": "ok", "sha256": bundle_sha256(bundle), **evaluation},
    })


def qat_is_intact(build: Build, target: Target) -> bool:
    try:
        record = read_json(build.qat_record(target))
    except (OSError, ValueError):
        return False
    if record.get("status") != "trained":
        return True
    bundle = build.qat_bundle(target)
    return bundle.exists() and bundle_sha256(bundle) == record["candidate"]["sha256"]


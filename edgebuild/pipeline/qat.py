"""Quantization-aware training: when no post-training candidate holds the floor, train the model
with the chosen candidate's compression simulated, so its weights land where that compression puts
them. The backend owns the simulation and the conversion (`qat_plan`, `train_quantized`); this
module owns the training loop, the loss and the decision when to train.

Loss: distillation from the fp32 model's outputs (no labels needed), or cross-entropy on labels.
Seeds are fixed and training runs single-threaded: same inputs, same bytes.
"""
import copy
import time

import numpy as np

from .. import progress
from ..fsutil import atomic_output, atomic_write_json, bundle_sha256, read_json, remove_path, replace_path
from ..manifest import Target
from .layout import Build

QAT_PREFIX = "qat-"


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


def train(module, layers: list, inputs: tuple[np.ndarray, ...], labels: np.ndarray | None, settings: dict, log,
          after_step=None) -> dict:
    """Train a module the backend prepared (compression simulated) in place.

    `layers` are the compressed layers in forward order (for `trainable: last:N`); `after_step`
    runs after every optimiser step (e.g. a palettizer's own schedule). Returns steps, seconds, loss.
    """
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions
    try:
        with torch.no_grad():
            module.eval()
            x = [torch.from_numpy(array) for array in inputs]
            teacher_out = settings["teacher"](*x)
        trainable = settings["trainable"]
        if trainable != "all":  # last:N fine-tunes the last N compressed layers, the rest stay frozen
            for parameter in module.parameters():
                parameter.requires_grad_(False)
            for layer in layers[-int(trainable.split(":")[1]):]:
                for parameter in layer.parameters():  # recursive: a weight may sit in a parametrization
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
                if after_step is not None:
                    after_step()
                steps += 1
                if steps >= settings["max_steps"] or time.monotonic() - started > settings["max_time"]:
                    break
            log(f"epoch {epoch + 1}/{settings['epochs']}: loss {float(loss):.5f} ({steps} steps)")
            if steps >= settings["max_steps"] or time.monotonic() - started > settings["max_time"]:
                break
        module.eval()
        return {"steps": steps, "seconds": round(time.monotonic() - started, 2), "loss": float(loss)}
    finally:
        torch.set_num_threads(threads)


def run_qat(build: Build, target: Target) -> None:
    """The qat stage for one target: writes `.edgebuild/targets/<t>/qat.json` and, when it trained, the bundle."""
    from .search import search_runs
    from .stages import read_data, candidate_verdict, evaluate_bundle, post_training_entries, target_threshold

    settings = target.qat
    record_path = build.qat_record(target)
    variant = build.variant(target)
    backend = build.registry.backends[variant.backend]
    threshold = target_threshold(build, target)
    judged = [(technique, entry, candidate_verdict(build, target, entry, threshold))
              for technique, entry in post_training_entries(build, variant.key) if entry["status"] == "ok"]
    search_pass = False
    if search_runs(build, target):
        search = read_json(build.search_record(target))
        search_pass = bool(search.get("candidate"))
    if settings["mode"] == "auto" and (search_pass or any(not failed for _, _, failed in judged)):
        atomic_write_json(record_path, {"status": "skipped", "reason": "a post-training candidate already meets "
                                        "every budget and the floor (qat: auto)"})
        return
    # Train for the smallest candidate whose only problem is accuracy, on a grid QAT can simulate.
    fitting = [(t, e) for t, e, failed in judged
               if backend.qat_plan(t) and all(f["constraint"] == "accuracy" for f in failed)]
    if not fitting:
        atomic_write_json(record_path, {"status": "skipped", "reason": "no candidate with a simulable weight grid "
                                        "fits the size budgets"})
        return
    technique, ptq = min(fitting, key=lambda item: (item[1]["bytes"], item[0].name))
    plan = backend.qat_plan(technique)

    role = next(r for r in ("train", "calibration", "evaluation") if build.data_source(r))
    data_file = build.data_source(role)
    data = read_data(build, role, need_labels=settings["loss"] == "cross_entropy")
    loader = build.registry.loaders[build.manifest.model["source"]]
    module, example = loader(build.manifest.model, build.manifest.root)
    lines, results = [], {}
    teacher = copy.deepcopy(module).eval()

    def log(line: str) -> None:
        lines.append(line)
        progress.report(f"  qat {target.name} ({technique.name}): {line}")

    def run_training(prepared, layers, after_step=None):
        results.update(train(prepared, layers, data.inputs, data.labels, {**settings, "teacher": teacher},
                             log, after_step))

    work = build.state / "targets" / target.name / "qat"
    work.mkdir(parents=True, exist_ok=True)
    bundle = build.qat_bundle(target)
    temporary = atomic_output(bundle)
    try:
        backend.train_quantized(technique, plan, module, tuple(example), run_training, temporary, work,
                                variant.options)
        replace_path(temporary, bundle)
    finally:
        remove_path(temporary)
    result = results
    evaluation = evaluate_bundle(build, backend, bundle)
    name = QAT_PREFIX + technique.name
    atomic_write_json(record_path, {
        "status": "trained", "technique": name, "trained_for": technique.name,
        "plan": plan, "data": build.manifest.relative(data_file), "loss": settings["loss"],
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


"""Quantization-aware training: when no post-training candidate holds the floor, train the model
with the chosen candidate's compression simulated, so its weights land where that compression puts
them. The backend owns the simulation and the conversion (`qat_plan`, `train_quantized`); this
module owns the training loop, the loss and the decision when to train.

Loss: distillation from the fp32 model's outputs (no labels needed), or cross-entropy on labels.
Seeds are fixed and training runs single-threaded: same inputs, same bytes. Training data is
`data.train`, else `data.calibration`; never the evaluation set that judges the result (the
manifest refuses QAT without one of them).
"""
import copy
import time

import numpy as np

from ... import progress
from ...api import QATBackend
from ...fsutil import atomic_output, atomic_write_json, bundle_sha256, read_json, remove_path, replace_path
from ...manifest import Target
from ...policy import Status, judge, problems, verdict
from ...outputs import leaves, name_outputs, needs_names
from ..evaluation import evaluate_bundle, limits, output_specs, post_training_entries, read_data
from ..layout import Build

QAT_PREFIX = "qat-"
BATCH = 32
TRAINING_ROLES = ("train", "calibration")  # never "evaluation": it judges the trained candidate


def cross_entropy_loss(output, labels):
    """Cross-entropy over the class axis, the last one: a classifier's [N, C] logits against [N]
    labels, or a language model's [N, T, V] against [N, T]; negative labels (no label) are ignored."""
    import torch

    flat_labels = labels.reshape(-1).long()
    flat_labels = torch.where(flat_labels < 0, torch.full_like(flat_labels, -100), flat_labels)
    return torch.nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), flat_labels, ignore_index=-100)


def teacher_outputs(teacher, inputs: list, batch: int = BATCH) -> list:
    """The fp32 model's outputs (each of them), a batch at a time: a whole data set in one forward
    pass can need more memory than the model itself."""
    import torch

    with torch.no_grad():
        batches = [leaves(teacher(*(part[start:start + batch] for part in inputs)))
                   for start in range(0, len(inputs[0]), batch)]
    return [torch.cat(parts) for parts in zip(*batches)]


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


def _trainable(module, layers: list, trainable: str) -> list:
    """The parameters training may move: all, or those of the last N compressed layers."""
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
    return [p for p in module.parameters() if p.requires_grad]


def _optimiser(parameters: list, settings: dict, samples: int):
    """Adam with cosine decay to zero over the planned steps: large moves early, settling on the grid late."""
    import torch

    optimiser = torch.optim.Adam(parameters, lr=settings["learning_rate"])
    planned = min(settings["max_steps"], settings["epochs"] * ((samples + BATCH - 1) // BATCH))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + np.cos(np.pi * min(step, planned) / planned)))
    return optimiser, schedule


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
        module.eval()
        x = [torch.from_numpy(array) for array in inputs]
        teacher_out = teacher_outputs(settings["teacher"], x)
        optimiser, schedule = _optimiser(_trainable(module, layers, settings["trainable"]), settings, len(inputs[0]))
        y = torch.from_numpy(labels) if labels is not None else None
        generator = torch.Generator().manual_seed(0)
        steps, started, loss = 0, time.monotonic(), None
        module.train()
        for epoch in range(settings["epochs"]):
            order = torch.randperm(len(x[0]), generator=generator)
            for start in range(0, len(order), BATCH):
                index = order[start:start + BATCH]
                outputs = leaves(module(*(part[index] for part in x)))
                if settings["loss"] == "cross_entropy":  # on the output the gating metric reads
                    loss = cross_entropy_loss(outputs[settings["labelled_output"]], y[index])
                else:  # every output is distilled: none may drift from fp32
                    loss = sum(distillation_loss(output, teacher[index]) for output, teacher in zip(outputs, teacher_out))
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


def _skip(build: Build, target: Target) -> str | None:
    """Why the target trains nothing this build (None: it trains)."""
    record = build.search_record(target)
    search_passes = build.searches(target) and read_json(record).get("candidate") is not None
    passing = any(entry["status"] == "ok" and verdict(judge(limits(build, target), entry)) == Status.PASS
                  for _, entry in post_training_entries(build, build.variant(target).key))
    if target.qat["mode"] == "auto" and (search_passes or passing):
        return "a post-training candidate already meets every budget and the floor (qat: auto)"
    return None


def _training_candidate(build: Build, target: Target, backend: QATBackend):
    """The smallest candidate whose only problem is accuracy, on a grid QAT can simulate."""
    target_limits = limits(build, target)
    fitting = []
    for technique, entry in post_training_entries(build, build.variant(target).key):
        # A faster form trains as its smaller form would: QAT answers accuracy, not latency.
        if entry["status"] != "ok" or technique.faster_form_of or not backend.qat_plan(technique):
            continue
        blocking = problems(judge(target_limits, entry))
        if all(f["constraint"] == "accuracy" and f["status"] == Status.FAIL for f in blocking):
            fitting.append((technique, entry))
    return min(fitting, key=lambda item: (item[1]["bytes"], item[0].name), default=None)


def run_qat(build: Build, target: Target) -> None:
    """The qat stage for one target: writes `.edgebuild/targets/<t>/qat.json` and, when it trained, the bundle."""
    settings = target.qat
    record_path = build.qat_record(target)
    variant = build.variant(target)
    backend = build.backend(target)
    reason = _skip(build, target)
    chosen = None if reason else _training_candidate(build, target, backend)
    if reason or chosen is None:
        atomic_write_json(record_path, {"status": "skipped", "reason": reason or "no candidate with a simulable "
                                        "weight grid fits the size budgets"})
        return
    technique, ptq = chosen
    plan = backend.qat_plan(technique)
    role = next(r for r in TRAINING_ROLES if build.data_source(r))
    data = read_data(build, role, need_labels=settings["loss"] == "cross_entropy")
    loader = build.registry.loaders[build.manifest.model["source"]]
    module, example, *_ = loader(build.manifest.model, build.manifest.root)
    names = [spec["name"] for spec in output_specs(build)]
    if needs_names(names):  # as export did: the trained bundle's outputs carry the same names
        name_outputs(module, names)
    labelled = build.manifest.gate.output or names[0]
    settings = {**settings, "labelled_output": names.index(labelled)}
    labels = data.labels_for(labelled)
    lines, result = [], {}
    teacher = copy.deepcopy(module).eval()

    def log(line: str) -> None:
        lines.append(line)
        progress.report(f"  qat {target.name} ({technique.name}): {line}")

    def run_training(prepared, layers, after_step=None):
        result.update(train(prepared, layers, data.head(len(data)), labels, {**settings, "teacher": teacher},
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
    evaluation = evaluate_bundle(build, backend, bundle)
    name = QAT_PREFIX + technique.name
    atomic_write_json(record_path, {
        "status": "trained", "technique": name, "trained_for": technique.name,
        "plan": plan, "data": build.manifest.relative(build.data_source(role)), "loss": settings["loss"],
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


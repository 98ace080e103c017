"""Built-in Core ML backend for iOS targets: conversion, compression gated by iOS version, Swift package."""
import json
import re
from pathlib import Path

from edgebuild import __version__
from edgebuild.api import PackageInput, techniques_from_yaml
from edgebuild.codegen import code_environment
from edgebuild.fsutil import bundle_bytes, bundle_sha256, copy_bundle
from edgebuild.hookspecs import hookimpl

from .backend import CoreMLBackend


def swift_identifier(name: str) -> str:
    """A Swift identifier for a tensor name: 'input.1' -> 'input_1', '1x' -> '_1x'."""
    text = re.sub(r"\W", "_", name)
    return text if text and not text[0].isdigit() else f"_{text}"


def swift_module_name(model_name: str) -> str:
    parts = [p for p in re.split(r"[-_]", model_name) if p]
    return "".join(p[:1].upper() + p[1:] for p in parts) + "Model"


def package_coreml(job: PackageInput) -> list[Path]:
    """A Swift package: Package.swift, the .mlpackage as a resource, and a typed loader."""
    module = swift_module_name(job.model_name)
    sources = job.directory / "Sources" / module
    resources = sources / "Resources"
    resources.mkdir(parents=True)
    bundle = resources / f"{job.model_name}.mlpackage"
    copy_bundle(job.bundle, bundle)
    description = job.backend.describe(bundle)
    meta = {
        **job.metadata(bundle),
        "stem": job.model_name,
        "path": bundle.relative_to(job.directory).as_posix(),
        "sha256": bundle_sha256(bundle),
        "bytes": bundle_bytes(bundle),
        "technique": job.chosen["technique"],
        "metric": job.chosen["metric"],
        "min_ios": job.backend.variant(job.target)[1]["min_ios"],
        "edgebuild_version": __version__,
        "inputs": [{**t, "swift_name": swift_identifier(t["name"])} for t in description["inputs"]],
        "outputs": [{**t, "swift_name": swift_identifier(t["name"])} for t in description["outputs"]],
        "swift": {"module": module},
    }
    if "classifier" in description:
        meta["classifier"] = {**description["classifier"],
                              "label_swift_name": swift_identifier(description["classifier"]["label_output"]),
                              "scores_swift_name": swift_identifier(description["classifier"]["scores_output"])}
    environment = code_environment("swift", "ios")
    swift = {"module": module}
    (job.directory / "Package.swift").write_text(
        environment.get_template("Package.swift.j2").render(meta=meta, swift=swift), encoding="utf-8")
    (sources / f"{module}.swift").write_text(
        environment.get_template("Model.swift.j2").render(meta=meta, swift=swift), encoding="utf-8")
    (job.directory / f"{job.model_name}.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return [job.directory / "Package.swift", sources / f"{module}.swift", bundle, job.directory / f"{job.model_name}.json"]


@hookimpl
def register_backends(register):
    register(CoreMLBackend())


@hookimpl
def register_techniques(register):
    for technique in techniques_from_yaml(Path(__file__).with_name("techniques.yaml"), CoreMLBackend.name):
        register(technique)


@hookimpl
def register_packagers(register):
    register("coreml", package_coreml)

"""Built-in TFLite backend for Android targets: conversion, quantization recipes, packaging."""
import json
import shutil
from pathlib import Path

from edgebuild import __version__
from edgebuild.api import PackageInput, techniques_from_yaml
from edgebuild.codegen import code_environment
from edgebuild.fsutil import sha256_file
from edgebuild.hookspecs import hookimpl

from .backend import TFLiteBackend


def kotlin_object_name(model_name: str) -> str:
    """digits -> DigitsModel, wake-word_v2 -> WakeWordV2Model."""
    parts = [p for p in model_name.replace("-", "_").split("_") if p]
    return "".join(p[:1].upper() + p[1:] for p in parts) + "Model"


def package_tflite(job: PackageInput) -> list:
    """`<model>.tflite`, its metadata `<model>.json`, and a Kotlin object with its names and asset path."""
    bundle = job.directory / f"{job.model_name}.tflite"
    shutil.copyfile(job.bundle, bundle)
    settings = job.target.android
    kotlin = {"package": settings["kotlin_package"],
              "object": kotlin_object_name(job.model_name)}
    kotlin["file"] = f"{kotlin['object']}.kt"
    meta = {
        **job.metadata(bundle),
        "asset_path": f"{settings['assets_dir']}/{bundle.name}",
        "sha256": sha256_file(bundle),
        "bytes": bundle.stat().st_size,
        "technique": job.chosen["technique"],
        "metric": job.chosen["metric"],
        "delivery": job.target.delivery,
        "edgebuild_version": __version__,
        **job.backend.describe(bundle),
        "kotlin": kotlin,
    }
    metadata = job.directory / f"{job.model_name}.json"
    metadata.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    source = job.directory / kotlin["file"]
    template = code_environment("kotlin", "android").get_template("Model.kt.j2")
    source.write_text(template.render(meta=meta, kotlin=kotlin), encoding="utf-8")
    return [bundle, metadata, source]


@hookimpl
def register_backends(register):
    register(TFLiteBackend())


@hookimpl
def register_techniques(register):
    for technique in techniques_from_yaml(Path(__file__).with_name("techniques.yaml"), TFLiteBackend.name):
        register(technique)


@hookimpl
def register_packagers(register):
    register("tflite", package_tflite)

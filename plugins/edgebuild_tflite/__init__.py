"""Built-in TFLite backend for Android targets: conversion, quantization recipes, packaging."""
import shutil
from pathlib import Path

from edgebuild.hookspecs import hookimpl

from .backend import TFLiteBackend, load_techniques


def package_tflite(bundle: Path, target_dir: Path, model_name: str) -> list[Path]:
    """Lay the chosen bundle out as `<output>/<target>/<model>.tflite`."""
    destination = target_dir / f"{model_name}.tflite"
    shutil.copyfile(bundle, destination)
    return [destination]


@hookimpl
def register_backends(register):
    register(TFLiteBackend())


@hookimpl
def register_techniques(register):
    for technique in load_techniques():
        register(technique)


@hookimpl
def register_packagers(register):
    register("tflite", package_tflite)

"""Built-in model loaders: a Python entry point, a torch.export archive, a TorchScript file.

Each returns (nn.Module in eval mode, tuple of example inputs). torch is imported only when a
loader runs, so listing plugins or validating a manifest stays fast.
"""
import functools
import importlib.util
import inspect
import re
import sys
from pathlib import Path

from edgebuild import hf
from edgebuild.errors import InputError, ToolchainError
from edgebuild.hookspecs import hookimpl


def load_python(model: dict, root: Path):
    """`entry: FILE.py:FUNCTION`; FUNCTION() returns (module, example_inputs)."""
    import torch

    file_part, function = model["entry"].rsplit(":", 1)
    file = (root / file_part).resolve()
    # The module's name ends up in converted tensor names: keep it independent of where the
    # project lives and of Python's hash seed, or two clean builds would differ in bytes.
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    # The entry's own folder is importable, so an entry can import its sibling modules.
    sys.path.insert(0, str(file.parent))
    try:
        spec.loader.exec_module(module)
        build = getattr(module, function, None)
        if build is None:
            raise InputError(f"{file_part} has no function {function!r}", field="model.entry")
        result = build()
    finally:
        sys.path.remove(str(file.parent))
    if (not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[0], torch.nn.Module)):
        raise InputError(f"{model['entry']} must return (torch.nn.Module, tuple_of_example_inputs)",
                         field="model.entry")
    net, example = result
    if isinstance(example, torch.Tensor):
        example = (example,)
    return net.eval(), tuple(example)


def load_torch_export(model: dict, root: Path):
    """`path: model.pt2` written by torch.export.save (loaded without unpickling code)."""
    import torch

    path = root / model["path"]
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # a truncated or foreign file: name it, don't dump the zip internals
        raise InputError(f"not a readable torch.export archive: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                         file=model["path"]) from None
    args, kwargs = program.example_inputs or ((), {})
    if kwargs or not args:
        raise InputError("the archive carries no positional example inputs; re-export with torch.export.export(m, args)",
                         file=model["path"])
    return program.module(), tuple(args)


LITE_SUFFIX = ".ptl"
_CONSTRUCT = (re.compile(r"failed for node (\S+)"), re.compile(r"target=torch\.ops\.([\w.]+)"),
              re.compile(r"(aten::\w+|prim::\w+)"))


def load_torchscript(model: dict, root: Path):
    """`path: model.pt` written by torch.jit.save (traced or scripted; no Python source needed), with
    its example inputs beside it as `<path>.inputs.npz` (arrays in argument order).

    The TorchScript module is converted to a torch.export program (TS2EPConverter); the export
    stage checks that program against the TorchScript module on the example inputs and the
    evaluation data (the loader returns the TorchScript module as the reference to match).
    """
    import numpy as np
    import torch

    path = root / model["path"]
    inputs_file = path.with_name(path.name + ".inputs.npz")
    if not inputs_file.is_file():
        raise InputError(f"TorchScript needs example inputs in {inputs_file.name} beside it (arrays in argument "
                         f"order, batch first), not found", file=model["path"])
    try:
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        if path.suffix == LITE_SUFFIX:
            raise InputError("a PyTorch Mobile lite-interpreter file (.ptl) cannot be loaded for conversion; give the "
                             "TorchScript file it was made from (torch.jit.save, .pt) or a torch.export archive "
                             "(source: torch-export)", file=model["path"]) from None
        raise InputError(f"not a readable TorchScript file: {str(exc).splitlines()[0][:200]}",
                         file=model["path"]) from None
    try:
        with np.load(inputs_file, allow_pickle=False) as stored:
            example = tuple(torch.from_numpy(stored[k]) for k in stored.files)
    except Exception as exc:
        raise InputError(f"not a readable .npz file: {str(exc).splitlines()[0][:200]}",
                         file=inputs_file.relative_to(root).as_posix()) from None
    return _exportable(scripted, example), example, scripted


def _exportable(scripted, example: tuple):
    """The TorchScript module as an fx module torch.export takes: converted by TS2EPConverter, with
    its parameters parameters again (the converter makes a scripted module's weights buffers, which
    backends would not compress) and its inputs named as the TorchScript module names them."""
    import torch
    from torch._export.converter import TS2EPConverter

    try:
        program = TS2EPConverter(scripted, example).convert()
    except Exception as exc:
        text = str(exc)
        construct = next((m.group(1) for pattern in _CONSTRUCT if (m := pattern.search(text))), None)
        raise ToolchainError(f"TorchScript cannot be converted to torch.export"
                             f"{f': {construct} is not supported' if construct else ''} "
                             f"({text.splitlines()[0][:200]})", stage="export", op=construct) from exc
    module = program.module()
    for name, _ in scripted.named_parameters():
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if attribute in owner._buffers:
            tensor = owner._buffers.pop(attribute)
            owner.register_parameter(attribute, torch.nn.Parameter(tensor, requires_grad=False))
    # torch.export names inputs after forward's signature: give it the TorchScript argument names.
    names = [value.debugName().split(".")[0] for value in list(scripted.graph.inputs())[1:]]
    if len(names) == len(example) and len(set(names)) == len(names) and all(n.isidentifier() for n in names):
        forward = module.forward

        def named_forward(*args):
            return forward(*args)

        named_forward.__signature__ = inspect.Signature(
            [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names])
        module.forward = named_forward
    return module


def load_hf(model: dict, root: Path):
    """`path:` a local Hugging Face folder, loaded through optimum's TasksManager (no downloads).

    Causal LMs are wrapped to return the logits for `sequence_length` tokens, without a KV cache.
    """
    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from optimum.exporters.tasks import TasksManager

    directory = root / model["path"]
    task = hf.task_of(model, directory)
    try:
        network = TasksManager.get_model_from_task(task, str(directory), framework="pt")
    except OSError as exc:
        raise InputError(f"cannot load the model: {str(exc).splitlines()[0][:200]}", file=model["path"]) from None
    network.eval()
    length = int(model.get("sequence_length", hf.DEFAULT_SEQUENCE_LENGTH))
    wrappers = _logit_wrappers()
    if task == hf.CAUSAL_LM:
        return wrappers["Logits"](network).eval(), (torch.zeros(1, length, dtype=torch.long),)
    if task == "text-classification":
        return wrappers["ClassLogits"](network).eval(), (torch.zeros(1, length, dtype=torch.long),)
    size = getattr(network.config, "image_size", 224)
    channels = getattr(network.config, "num_channels", 3)
    return wrappers["ImageLogits"](network).eval(), (torch.zeros(1, channels, size, size),)


@functools.cache
def _logit_wrappers() -> dict:
    """Modules returning a Hugging Face model's logits. Each forward names its input as the model
    does (input_ids, pixel_values): the exported program, data arrays and bundles use that name."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    class Logits(Wrapper):  # a causal LM: logits for every position, no KV cache
        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    class ClassLogits(Wrapper):
        def forward(self, input_ids):
            return self.inner(input_ids=input_ids).logits

    class ImageLogits(Wrapper):
        def forward(self, pixel_values):
            return self.inner(pixel_values=pixel_values).logits

    return {cls.__name__: cls for cls in (Logits, ClassLogits, ImageLogits)}


@hookimpl
def register_loaders(register):
    register("python", load_python)
    register("torch-export", load_torch_export)
    register("torchscript", load_torchscript)
    register("hf", load_hf)

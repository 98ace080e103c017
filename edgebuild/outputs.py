"""A model's outputs, named: what the manifest calls them, in the order the model returns them.

A model returns a tensor, a tuple or list of tensors, a dict, or a namedtuple. Its outputs are the
leaves in torch's flattening order. Their names: `model.outputs` in the manifest, else the dict
keys or namedtuple fields, else `output_0`, `output_1`, ... A model whose outputs need names of
their own (several outputs, or names given) is exported returning a dict of them, so every backend
sees the names: the TFLite signature's outputs are named after them, Core ML's outputs too.
"""
import functools
import re

OUTPUT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # a Kotlin/Swift identifier and an npz key


def leaves(result) -> list:
    """The output tensors of one forward call, in torch's flattening order."""
    from torch.utils._pytree import tree_flatten

    return tree_flatten(result)[0]


def natural_names(result) -> list[str]:
    """Names a model's own output structure gives: dict keys, namedtuple fields, else output_N."""
    count = len(leaves(result))
    if isinstance(result, dict) and len(result) == count and all(OUTPUT_NAME.match(str(k)) for k in result):
        return [str(key) for key in result]
    fields = getattr(result, "_fields", None)
    if fields and len(fields) == count and all(OUTPUT_NAME.match(f) for f in fields):
        return list(fields)
    return [f"output_{index}" for index in range(count)]


def needs_names(names: list[str]) -> bool:
    """Whether the exported model must return its outputs by name (a single unnamed output needs not)."""
    return names != ["output_0"]


def _rewrap(module, shape):
    """Replace the instance's forward by one returning `shape(its output leaves)`: parameter names,
    module paths and input names (the signature) stay as they are."""
    forward = module.forward

    @functools.wraps(forward)
    def reshaped(*args, **kwargs):
        return shape(leaves(forward(*args, **kwargs)))

    module.forward = reshaped
    return module


def name_outputs(module, names: list[str]):
    """Make `module` return {name: tensor} in its outputs' order."""
    return _rewrap(module, lambda tensors: dict(zip(names, tensors)))


def positional_outputs(module):
    """Make `module` return its outputs as a tuple (torch.jit.trace takes no dicts)."""
    return _rewrap(module, tuple)

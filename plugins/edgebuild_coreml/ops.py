"""Torch ops coremltools 9 lacks, registered through its torch op registry.

`aten.alias` appears in torch.export graphs of transformers' Llama/Mistral (attention masking);
it is an identity.
"""
from functools import cache


@cache
def register_missing_ops() -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    if "alias" not in _TORCH_OPS_REGISTRY:
        @register_torch_op(override=False)
        def alias(context, node):
            x = _get_inputs(context, node, expected=1)[0]
            context.add(mb.identity(x=x, name=node.name))

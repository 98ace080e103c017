"""coremltools 9 adjustments: torch ops it lacks, registered through its torch op registry, and
three of its passes rewritten to give the same results without full-size copies of each weight.

`aten.alias` appears in torch.export graphs of transformers' Llama/Mistral (attention masking);
it is an identity.
"""
from functools import cache

import numpy as np


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


def _fp16_overflow(op) -> bool:
    """FP16ComputePrecision.fp16_overflow, the same answer in 1M-element chunks: the original
    builds an abs copy, int64 index arrays and a gathered copy, ~800 MiB for a 32000x768 embedding."""
    for inputs in op.inputs.values():
        for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                flat = np.asarray(var.op.val.val).reshape(-1)
                for start in range(0, flat.size, 1 << 20):
                    chunk = np.abs(flat[start:start + (1 << 20)])
                    # Values of 1e38 and up stand for infinity (attention masks): fp16 inf is fine.
                    if np.max(chunk, where=chunk < 1e38, initial=0.0) > 65504:
                        return True
    return False


@cache
def lean_conversion_memory() -> None:
    """Patch coremltools 9 where it copies every weight in full, keeping its results byte-identical
    (bench/llm_scale.py: fp16 conversion of a 100M-parameter Llama 4.6x -> 2.8x its fp32 bytes).
    Each patch applies only where the function it replaces is found."""
    from coremltools.converters.mil.backend.mil import helper
    from coremltools.converters.mil.mil.passes.defs import quantization

    precision = getattr(quantization, "FP16ComputePrecision", None)
    if precision is not None and hasattr(precision, "fp16_overflow"):
        precision.fp16_overflow = staticmethod(_fp16_overflow)
    underflow = getattr(precision, "_check_underflow_to_zero", None)
    if underflow is not None:
        def check_underflow_to_zero(self, new_var, var):
            # The original's first test, len(var.val.flatten()) < 400, copies the weight to learn its size.
            if new_var.val is None or np.size(var.val) >= 400:
                return
            underflow(self, new_var, var)

        precision._check_underflow_to_zero = check_underflow_to_zero
    write = getattr(helper, "_get_offset_by_writing_data", None)
    if write is not None:
        def get_offset_by_writing_data(output_var, blob_writer):
            # The original writes val.flatten() (a copy), float16 via .tobytes() (two): same bytes from a view.
            value = output_var.val
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.dtype.itemsize in (2, 4):
                flat = np.ascontiguousarray(value).reshape(-1)
                if value.dtype.itemsize == 2:
                    return blob_writer.write_fp16_data(flat.view(np.uint16))
                return blob_writer.write_float_data(flat)
            return write(output_var, blob_writer)

        helper._get_offset_by_writing_data = get_offset_by_writing_data

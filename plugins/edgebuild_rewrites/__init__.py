"""Built-in graph rewrites: exact fp32 rewrites of the exported program that stop a converter
from storing a weight twice. Each is on by default; `model.rewrites: {NAME: false}` switches it off.
"""
from edgebuild.api import GraphRewrite
from edgebuild.hookspecs import hookimpl
from edgebuild.rewriting import NodeReplacement, finish


def prelu_as_select(program) -> int:
    """PReLU(x) = where(x >= 0, x, alpha * x), the same value in fp32 bit for bit.

    The converter lowers aten.prelu as relu(x) - alpha * relu(-x) and folds the negation into the
    producing layer: a Linear or convolution before a PReLU is stored a second time, negated
    (bench/bit_floor.py: 1.9x the bit floor on an MTCNN-style net). A select reads x once.
    """
    import torch

    aten = torch.ops.aten
    changed = 0
    for node in list(program.graph.nodes):
        if node.op != "call_function" or node.target != aten.prelu.default:
            continue
        x, alpha = node.args
        rank, channels = x.meta["val"].dim(), alpha.meta["val"].numel()
        with NodeReplacement(program, node) as call:
            if rank > 2 and channels > 1:  # one slope per channel, channels on dim 1
                alpha = call(aten.view.default, alpha, [channels] + [1] * (rank - 2))
            call.result(call(aten.where.self, call(aten.ge.Scalar, x, 0), x, call(aten.mul.Tensor, x, alpha)))
        changed += 1
    if changed:
        finish(program)
    return changed


@hookimpl
def register_graph_rewrites(register):
    register(GraphRewrite("prelu-as-select", prelu_as_select,
                          "PReLU as where(x >= 0, x, alpha * x): no negated copy of the layer before it"))

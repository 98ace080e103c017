"""Helpers for graph rewrites (`register_graph_rewrites`): replace one node of an exported program.

A public helper: built-in and third-party rewrites use it alike. New nodes carry the replaced
node's module stack, so converters name the tensors they produce after the same layer (reports and
recipes keep their layer names), and a fake value, so later passes see shapes and dtypes.
"""
import contextlib
from typing import Any

_KEPT_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn", "from_node", "custom")


class NodeReplacement:
    """`with NodeReplacement(program, node) as call:` inserts `call(op, *args)` before `node`;
    `call.result(new)` makes `new` take the node's place (its users and, if it was one, the
    program's output)."""

    def __init__(self, program, node):
        self.program, self.node = program, node
        self.graph = program.graph_module.graph
        self._replacement = None

    def __enter__(self):
        self._inserting = self.graph.inserting_before(self.node)
        self._inserting.__enter__()
        return self

    def __call__(self, target, *args: Any):
        from torch._guards import detect_fake_mode
        from torch.utils._pytree import tree_map

        new = self.graph.call_function(target, args)
        new.meta.update({key: self.node.meta[key] for key in _KEPT_META if key in self.node.meta})
        values = tree_map(lambda arg: arg.meta.get("val") if hasattr(arg, "meta") else arg, list(args))
        with detect_fake_mode([v for v in values if hasattr(v, "fake_mode")]) or contextlib.nullcontext():
            new.meta["val"] = target(*values)
        return new

    def result(self, new) -> None:
        self._replacement = new

    def __exit__(self, kind, value, traceback):
        self._inserting.__exit__(kind, value, traceback)
        if kind is not None or self._replacement is None:
            return
        old = self.node.name
        self.node.replace_all_uses_with(self._replacement)
        self.graph.erase_node(self.node)
        for spec in self.program.graph_signature.output_specs:  # the program's outputs name their nodes
            if getattr(spec.arg, "name", None) == old:
                spec.arg = type(spec.arg)(name=self._replacement.name)


def finish(program) -> None:
    """Recompile and validate a program after its graph was edited."""
    program.graph_module.graph.lint()
    program.graph_module.recompile()
    program.validate()

"""Small helpers over onnx-graphsurgeon graphs: constants, producers, fan-out, names."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normopt import ir

CONSTANT = "Constant"


NODE_DEFAULT_DOMAINS = (None, "", "ai.onnx")   # a node's domain as graphsurgeon holds it


def in_default_domain(node: gs.Node) -> bool:
    """A standard op the passes may read as such: of the default domain, and not a binary op
    of opset 6 or below broadcasting from an ``axis`` attribute (marked at import: each pass
    reads Add, Mul, ... as numpy broadcasting, from the last axis)."""
    return node.domain in NODE_DEFAULT_DOMAINS and ir.LEGACY_AXIS not in node.__dict__


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def node_label(node: gs.Node) -> str:
    """A name for messages: the node's name, else ``Op(first output)``."""
    return label(node.name, node.op, node.outputs[0].name if node.outputs else None)


def label(name: str, op: str, first_output: str | None) -> str:
    """``node_label`` from a node's parts (a NodeProto's too: subgraph paths are made of these)."""
    return name or f"{op}({'?' if first_output is None else first_output})"


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    for t in graph.outputs:
        if t is tensor:
            return True
    return False


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    if getattr(tensor, _INPUT_MARK, False):
        return True
    for t in graph.inputs:
        if t is tensor:
            return True
    return False


_INPUT_MARK = "_normopt_graph_input"


def mark_graph_inputs(root: gs.Graph) -> None:
    """Flag the inputs of the model's graph and subgraphs on the tensors themselves, so that a
    subgraph node reading an outer-scope input still sees it as one (an initializer that is
    also a graph input can be overridden at run time: it is not a constant)."""
    for _path, g in iter_graphs(root):
        for tensor in g.inputs:
            setattr(tensor, _INPUT_MARK, True)


def not_constant(tensor: gs.Tensor, graph: gs.Graph | None = None) -> str:
    """Why ``tensor`` has no value fixed at export time (for a skip reason)."""
    if isinstance(tensor, gs.Constant) and (getattr(tensor, _INPUT_MARK, False)
                                            or (graph is not None and is_graph_input(graph, tensor))):
        return ("is an initializer also listed as a graph input: from IR version 4 on, a default that callers "
                "may override, not a constant")
    function = ir.function_of_input(tensor)
    if function is not None:
        return f"is an input of {function}: its value is given per call, not known in the body"
    node = producer(tensor)
    if getattr(tensor, ir.SPARSE_MARK, False) or (
            node is not None and node.op == CONSTANT and any(isinstance(v, ir.OpaqueAttr) for v in node.attrs.values())):
        return "is a sparse tensor: its values are not read"
    return "is not a constant (graph input or computed)"


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def other_uses(tensor: gs.Tensor, graph: gs.Graph, allowed: set[int]) -> list[str]:
    """Who uses ``tensor`` besides the nodes whose ids are in ``allowed`` (graph output included)."""
    uses = [node_label(n) for n in tensor.outputs if id(n) not in allowed]
    if is_graph_output(graph, tensor):
        uses.append("graph output")
    return uses


def iter_graphs(graph: gs.Graph, path: str = "") -> Iterator[tuple[str, gs.Graph]]:
    """The graph and every subgraph (If/Loop/Scan bodies), each with a readable path."""
    return ir.iter_graphs(graph, path, node_label)


class NameScope:
    """Fresh, deterministic tensor and node names, unique across the model and its subgraphs.
    ``fresh`` costs O(1): each base name remembers the next suffix to try."""

    def __init__(self, graph: gs.Graph, imported: bool = False):
        """``imported``: ``graph`` was just imported and is unchanged (``ir.all_names``)."""
        self.used: set[str] = ir.all_names(graph, imported)
        self._next: dict[str, int] = {}

    def fresh(self, base: str) -> str:
        name = base
        if name in self.used:
            i = self._next.get(base, 1)
            name = f"{base}_{i}"
            while name in self.used:
                i += 1
                name = f"{base}_{i}"
            self._next[base] = i + 1
        self.used.add(name)
        return name


def make_constant(names: NameScope, base: str, values: np.ndarray) -> gs.Constant:
    """A new initializer under a fresh name. Its values are encoded once, here: the array is not
    kept, and a large one leaves the exported skeleton as a header like any weight."""
    return ir.new_constant(names.fresh(base), np.ascontiguousarray(values))


def tensor_dtype(tensor: gs.Tensor):
    """numpy dtype of a tensor when known (constants always), else None."""
    if tensor.dtype is None:
        return None
    if isinstance(tensor.dtype, int):
        return onnx.helper.tensor_dtype_to_np_dtype(tensor.dtype)
    return np.dtype(tensor.dtype)

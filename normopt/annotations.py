"""Carry annotations that onnx-graphsurgeon drops back onto an exported model.

graphsurgeon keeps the computation but not node doc strings and metadata_props (the dynamo
exporter writes module names and stack scopes there), value_info entries of initializers,
or the metadata of graph inputs and outputs. A node of the exported model that computes the
same outputs with the same op as a node of the source model gets the source's annotations
back; value_info entries are restored for tensors that still exist. Rewritten tensors keep
their names and their meaning, so their value_info stays valid.
"""
from __future__ import annotations

import onnx

from normopt.model_io import all_graphs


def restore(out: onnx.ModelProto, source: onnx.ModelProto) -> None:
    nodes = {_key(n): n for g in all_graphs(source.graph) for n in g.node}
    infos: dict[str, onnx.ValueInfoProto] = {}
    for g in all_graphs(source.graph):
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            infos.setdefault(vi.name, vi)
    for g in all_graphs(out.graph):
        for node in g.node:
            old = nodes.get(_key(node))
            if old is not None:
                if old.HasField("doc_string"):
                    node.doc_string = old.doc_string
                del node.metadata_props[:]
                node.metadata_props.extend(old.metadata_props)
        _restore_value_info(g, infos)
        for vi in list(g.input) + list(g.output):  # the interface never changes
            if vi.name in infos:
                vi.CopyFrom(infos[vi.name])
    src, dst = source.graph, out.graph
    if src.HasField("doc_string"):
        dst.doc_string = src.doc_string
    if hasattr(dst, "metadata_props"):
        del dst.metadata_props[:]
        dst.metadata_props.extend(src.metadata_props)


def _restore_value_info(g: onnx.GraphProto, infos: dict[str, onnx.ValueInfoProto]) -> None:
    """Source entries first, in source order, for tensors that still exist; then new ones."""
    alive = {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    interface = {v.name for v in g.input} | {v.name for v in g.output}
    exported = {vi.name: vi for vi in g.value_info}
    kept = [vi for name, vi in infos.items() if name in alive and name not in interface
            and (name not in exported or _compatible(vi, exported[name]))]
    names = {vi.name for vi in kept}
    new = [vi for vi in g.value_info if vi.name not in names]
    del g.value_info[:]
    g.value_info.extend(kept + new)


def _compatible(a: onnx.ValueInfoProto, b: onnx.ValueInfoProto) -> bool:
    ta, tb = a.type.tensor_type, b.type.tensor_type
    return ta.elem_type == tb.elem_type or not tb.elem_type


def _key(node: onnx.NodeProto) -> tuple:
    return node.op_type, node.domain, tuple(node.output)

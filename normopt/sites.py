"""Every normalization site of a model, and what ``fold`` would do with it (``normopt inspect``).

Sites come from two places:

* the passes' own records: the pipeline runs on the model exactly as ``fold`` runs it, minus
  verification, so a site marked ``rewrite`` is one ``fold`` rewrites unless verification rolls
  it back, and a skipped candidate carries the pass's skip reason;
* a walk over the model's nodes (model-local function bodies included) for what no pass
  rewrites: native normalization ops (already a single op), and weight normalization (``g * v / ||v||`` of constant ``v``) when fold-weightnorm,
  which records every norm of a constant, was not run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import onnx

from normopt import pipeline
from normopt.records import PipelineResult

BATCH_NORM = "BatchNormalization"
NATIVE_OPS = (BATCH_NORM, "LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization")
# Decomposed forms, named by the pass that fuses them.
# fold-batchnorm's decomposed sites are TF / Keras batch-norm arithmetic (x * a + b).
KIND_OF_PASS = {"fuse-layernorm": "LayerNorm", "fuse-groupnorm": "GroupNorm", "fuse-instancenorm": "InstanceNorm",
                "fuse-rmsnorm": "RMSNorm", "fold-weightnorm": "WeightNorm", "fold-batchnorm": "BatchNorm"}
# Ops a rewrite adds around the op it is about (Transposes to and from channels last).
HELPER_OPS = ("Cast", "Constant", "Identity", "Transpose")
MEAN_CENTRED = "left to fuse-layernorm"  # fuse-rmsnorm's reason for a layer norm's variance

REWRITE, SKIP, KEEP = "rewrite", "skip", "keep"


@dataclass
class Site:
    """One normalization in the model.

    ``action``: ``rewrite`` (fold rewrites it into ``becomes``), ``skip`` (a candidate fold leaves
    alone, ``reason`` says why) or ``keep`` (nothing to do: already a single standard op).
    ``graph`` is "" for the main graph, a path like ``/If_0.then_branch`` for a subgraph, or
    ``function domain:name`` for a model-local function.
    """

    kind: str
    form: str  # "native" | "decomposed"
    action: str
    nodes: list[str]
    output: str
    graph: str = ""
    pass_name: str | None = None
    becomes: str | None = None
    reason: str = ""


@dataclass
class Inspection:
    sites: list[Site] = field(default_factory=list)
    pipeline: PipelineResult | None = None
    opset: int = 0

    def count(self, action: str) -> int:
        return sum(1 for s in self.sites if s.action == action)

    @property
    def pending(self) -> list[Site]:
        """Sites fold would still rewrite."""
        return [s for s in self.sites if s.action == REWRITE]


def inspect_model(model: onnx.ModelProto, passes: list[str] | None = None, allow_opset_upgrade: bool = True,
                  target: str = "portable", base_dir: str | None = None) -> Inspection:
    """The normalization sites of ``model``, found by running the passes without verification.
    ``base_dir``: where the model's external data is (the folder of its file)."""
    options = pipeline.Options(allow_opset_upgrade=allow_opset_upgrade)
    if target != "portable":
        from normopt.targets import veto_for
        options.veto = veto_for(target)
    out, result = pipeline.run(model, passes, options, base_dir=base_dir, lazy=True)
    return sites_from_records(model, out.model, result)


def sites_from_records(model: onnx.ModelProto, out: onnx.ModelProto, result: PipelineResult) -> Inspection:
    """Sites of ``model`` given the rewritten ``out`` and the records that produced it."""
    before = _NodeIndex(model)
    after = _NodeIndex(out)
    sites: list[Site] = []
    claimed: set[tuple[str, str]] = set()  # (graph, node label) of native nodes already part of a site
    seen: set[tuple[str, str, str]] = set()
    ran = {rec.name for rec in result.passes}
    for rec in result.passes:
        for rw in rec.applied:
            claimed.update((rw.graph, label) for label in rw.removed)
            node = before.get(rw.graph, rw.anchor)
            produced = [after.op(rw.graph, label) for label in rw.added]
            main = next((op for op in produced if op and op not in HELPER_OPS), None) or (produced[0] if produced else "")
            if node is not None and node.op_type == BATCH_NORM:
                claimed.add((rw.graph, rw.anchor))
                sites.append(Site(BATCH_NORM, "native", REWRITE, [rw.anchor], rw.output, rw.graph, rec.name,
                                  f"folded into {main}" if main else "folded"))
            else:
                sites.append(Site(KIND_OF_PASS.get(rec.name, rec.name), "decomposed", REWRITE, list(rw.removed),
                                  rw.output, rw.graph, rec.name, main or None))
        for skip in rec.skipped:
            key = (rec.name, skip.graph, skip.node)
            if key in seen or (rec.name == "fuse-rmsnorm" and "fuse-layernorm" in ran and MEAN_CENTRED in skip.reason):
                continue  # a layer norm: fuse-layernorm's record tells about it
            seen.add(key)
            bns = before.batchnorms_for(skip.graph, skip.node) if rec.name == "fold-batchnorm" else []
            if bns:
                for label, node in bns:
                    claimed.add((skip.graph, label))
                    sites.append(Site(BATCH_NORM, "native", SKIP, [label], node.output[0], skip.graph, rec.name,
                                      None, skip.reason))
                continue
            node = before.get(skip.graph, skip.node) or after.get(skip.graph, skip.node)
            output = node.output[0] if node is not None and node.output else ""
            sites.append(Site(KIND_OF_PASS.get(rec.name, rec.name), "decomposed", SKIP, [skip.node], output,
                              skip.graph, rec.name, None, skip.reason))
    for path, graph in _graphs(model):
        for node in graph.node:
            label = _label(node)
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type in NATIVE_OPS and (path, label) not in claimed:
                sites.append(_native_site(node, label, path, ran))
        if "fold-weightnorm" not in ran:  # else its records name every norm of a constant
            sites.extend(_weight_norms(graph, path))
    return Inspection(sites, result, pipeline.model_opset(model))


def _native_site(node: onnx.NodeProto, label: str, path: str, ran: set[str]) -> Site:
    output = node.output[0] if node.output else ""
    if node.op_type != BATCH_NORM:
        return Site(node.op_type, "native", KEEP, [label], output, path, None, None, "already a single standard op")
    if "fold-batchnorm" not in ran:
        return Site(BATCH_NORM, "native", SKIP, [label], output, path, None, None, "fold-batchnorm was not run")
    return Site(BATCH_NORM, "native", KEEP, [label], output, path, "fold-batchnorm", None,
                "not a fold candidate (fold-batchnorm did not consider it)")


def _weight_norms(graph: onnx.GraphProto, path: str) -> Iterator[Site]:
    """Div(v, ||v||) of a constant v, with the Mul by g after it when there is one."""
    producers = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    constants = {i.name for i in graph.initializer} - {i.name for i in graph.input}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output}
    for div in graph.node:
        if div.op_type != "Div" or len(div.input) != 2 or div.input[0] not in constants:
            continue
        chain = _l2_norm_of(div.input[1], div.input[0], producers)
        if chain is None:
            continue
        nodes = [*chain, div]
        output = div.output[0]
        users = consumers.get(output, [])
        if len(users) == 1 and users[0].op_type == "Mul" and any(i in constants for i in users[0].input if i != output):
            nodes.append(users[0])
            output = users[0].output[0]
        yield Site("WeightNorm", "decomposed", SKIP, [_label(n) for n in nodes], output, path, None, None,
                   "weight normalization of constant weights: fold-weightnorm was not run")


def _l2_norm_of(name: str, v: str, producers: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto] | None:
    """The nodes computing ||v|| into ``name`` (ReduceL2(v), or Sqrt of ReduceSumSquare(v) /
    ReduceSum(v*v) / ReduceSum(v^2)), else None."""
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "ReduceL2" and node.input[0] == v:
        return [node]
    if node.op_type != "Sqrt":
        return None
    reduce = producers.get(node.input[0])
    if reduce is None:
        return None
    if reduce.op_type == "ReduceSumSquare" and reduce.input[0] == v:
        return [reduce, node]
    square = producers.get(reduce.input[0]) if reduce.op_type == "ReduceSum" else None
    if square is not None and ((square.op_type == "Mul" and list(square.input) == [v, v])
                               or (square.op_type == "Pow" and square.input[0] == v)):
        return [square, reduce, node]
    return None


def _label(node: onnx.NodeProto) -> str:
    """As graph.node_label names a node: its name, else ``Op(first output)``."""
    if node.name:
        return node.name
    return f"{node.op_type}({node.output[0] if node.output else '?'})"


def _graphs(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """Every graph with the path graph.iter_graphs gives it."""
    def walk(graph: onnx.GraphProto, path: str):
        yield path, graph
        for node in graph.node:
            for attr in sorted(node.attribute, key=lambda a: a.name):
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for i, sub in enumerate(subs):
                    suffix = f"{attr.name}[{i}]" if len(subs) > 1 else attr.name
                    yield from walk(sub, f"{path}/{_label(node)}.{suffix}")
    yield from walk(model.graph, "")
    for fn in model.functions:  # a function body as a graph (no initializers: its constants are nodes)
        body = onnx.GraphProto(node=fn.node)
        yield from walk(body, f"function {fn.domain}:{fn.name}" + (f":{fn.overload}" if fn.overload else ""))


class _NodeIndex:
    """Nodes by (graph path, label)."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes: dict[tuple[str, str], onnx.NodeProto] = {}
        self.producer_label: dict[tuple[str, str], str] = {}
        self.bns: list[tuple[str, str, onnx.NodeProto]] = []
        for path, graph in _graphs(model):
            producers = {out: n for n in graph.node for out in n.output}
            for node in graph.node:
                label = _label(node)
                self.nodes[(path, label)] = node
                if node.op_type == BATCH_NORM and node.domain in ("", "ai.onnx"):
                    prod = producers.get(node.input[0]) if node.input else None
                    self.bns.append((path, label, node))
                    if prod is not None:
                        self.producer_label[(path, label)] = _label(prod)

    def get(self, path: str, label: str) -> onnx.NodeProto | None:
        return self.nodes.get((path, label))

    def op(self, path: str, label: str) -> str | None:
        node = self.nodes.get((path, label))
        return node.op_type if node is not None else None

    def batchnorms_for(self, path: str, label: str) -> list[tuple[str, onnx.NodeProto]]:
        """BatchNormalization nodes a fold-batchnorm skip names: the node itself, or its producer
        (the pass names the producer when that one is why)."""
        own = [(lbl, n) for p, lbl, n in self.bns if p == path and lbl == label]
        if own:
            return own
        return [(lbl, n) for p, lbl, n in self.bns if p == path and self.producer_label.get((p, lbl)) == label]

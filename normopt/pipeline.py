"""Run passes over a model: match -> check -> rewrite; cleanup and ordering once per run.

A pass looks at one anchor node at a time and answers with a ``Match`` (rewrite it), a
``Reject`` (a candidate it must leave alone, with the reason) or None (not a candidate).
The pipeline owns everything else: detaching the matched nodes, records, rolled-back
rewrites, opset upgrades, cleanup and re-sorting. Passes never clean up or rename.
"""
from __future__ import annotations

import gc
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normopt import graph as G, ir, model_io, opset, progress
from normopt.errors import ModelLoadError, ModelSaveError
from normopt.model_io import (Skeleton, all_graphs, census, input_verdict, min_ir_version, model_graphs, weightless,
                              without_weights)
from normopt.pattern import Match
from normopt.records import OpsetUpgrade, PassRecord, PipelineResult, Reject, Rewrite, Skip
from normopt.registry import available, resolve
from normopt.tensors import TensorFacts

DEFAULT_DOMAINS = ("", "ai.onnx")
MAX_ROUNDS = 4
# First opset whose Reshape shape inference reads shape values propagated from Shape.
SHAPE_VALUE_OPSET = 14


@dataclass
class Context(TensorFacts):
    """What a pass may know about the model while it looks at one graph: every fact about a
    tensor (shape, rank, dtype, constant value) through ``tensors.TensorFacts``."""

    graph: gs.Graph
    root: gs.Graph
    opset: int
    names: G.NameScope
    shapes: dict[str, tuple[int, tuple | None]] = field(default_factory=dict)
    path: str = ""
    # id(tensor) -> (tensor, value or None): each tensor evaluated once per context.
    _values: dict = field(default_factory=dict, repr=False)
    _dtypes: dict = field(default_factory=dict, repr=False)
    _here: set | None = field(default=None, repr=False)

    def node_ids(self) -> set[int]:
        """ids of this graph's own nodes (not a subgraph's, not an outer graph's): built on
        first use, once per graph per round, and kept current as rewrites add nodes."""
        if self._here is None:
            self._here = {id(n) for n in self.graph.nodes}
        return self._here


class Pass:
    """Base class. Subclasses set ``anchor_ops`` and implement ``match`` and ``rewrite``."""

    name: ClassVar[str] = ""
    anchor_ops: ClassVar[tuple[str, ...]] = ()
    # Anchors looked at after the others of their graph: ones that only ever answer with a
    # Reject (a normalization-shaped site no match below explains). By then a fused match has
    # taken their nodes, and they are not looked at at all.
    late_ops: ClassVar[tuple[str, ...]] = ()
    # Default-domain opset that the ops this pass emits need.
    opset: ClassVar[int] = 1

    def required_opset(self, m: Match) -> int:
        return self.opset

    def match(self, node: gs.Node, ctx: Context) -> Match | Reject | None:
        raise NotImplementedError

    def rewrite(self, m: Match, ctx: Context) -> list[gs.Node]:
        """New nodes; exactly one of them must produce ``m.output`` (the kept name)."""
        raise NotImplementedError


@dataclass
class Options:
    allow_opset_upgrade: bool = True
    # Rolled-back rewrites: kept output tensor name -> why it was rolled back.
    exclude: dict[str, str] = field(default_factory=dict)
    strict: bool = False
    # (pass name, match) -> why this rewrite must not be applied (a --target choice), or None.
    veto: Callable[[str, Match], str | None] | None = None


def run(model: onnx.ModelProto, passes: list[str] | None = None, options: Options | None = None, *,
        base_dir: str | None = None, lazy: bool = False):
    """Apply ``passes`` (all by default, in registry order) to ``model``, which is not modified.

    Returns (rewritten model, PipelineResult). With ``lazy`` the model is a ``model_io.Skeleton``:
    large weights are still headers that refer to ``model``'s tensors or to the external data
    files in ``base_dir``, for ``model_io.save`` to stream; otherwise a complete ModelProto.
    """
    options = options or Options()
    table = available()
    names = resolve(passes)
    # The graph is hundreds of thousands of small objects that live for the whole run: Python's
    # cyclic collector would traverse all of them again and again while they are made (half the
    # import time on 110,000 nodes). Matching garbage is acyclic and freed by reference counting.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _run(model, table, names, options, base_dir, lazy)
    finally:
        if _kept is not None:
            gc.freeze()  # the kept graphs are never garbage: later collections skip them
        if collecting:
            gc.enable()


# Graphs kept until the process ends instead of freed (None: free each one when its run is
# done). The command line keeps them and then leaves with os._exit: taking a 100,000-node graph
# apart object by object costs about as much as importing it, for memory the OS reclaims at once.
_kept: list | None = None


def release_kept() -> None:
    """Free the graphs kept so far: work that needs memory follows (verification)."""
    if _kept:
        gc.unfreeze()
        for graph in _kept:
            ir.release(graph)
        _kept.clear()


def keep_graphs_until_exit() -> None:
    """For a process that ends with ``os._exit`` right after its run: graphs are not freed."""
    global _kept
    if _kept is None:
        _kept = []


# Models of some size have their shape inference run in a forked process while the graph is
# imported and the first passes run (``infer_in_background``): onnx's inference holds the GIL, so
# a thread would not overlap it. From 500 nodes the inference and checks it takes over (20 to 40
# ms there) cost more than the fork and the table's trip through the pipe (under 10 ms).
_background = False
BACKGROUND_NODES = 500


def infer_in_background(on: bool = True) -> None:
    """For the command line's own process: shape inference of a model of BACKGROUND_NODES nodes
    or more runs in a forked child (Linux only), in parallel with the graph import. A library
    caller's process may hold threads or locks that a fork would copy, so this is opt-in."""
    global _background
    _background = on and sys.platform.startswith("linux") and hasattr(os, "fork")


def in_background(model: onnx.ModelProto) -> bool:
    """Whether a run of ``model`` forks its shape inference (``infer_in_background``): the
    command line then also leaves the input's whole-model checks to that child
    (``model_io.load``'s ``check_later``)."""
    return _background and count_nodes(model) >= BACKGROUND_NODES


def _run(model, table, names, options: Options, base_dir: str | None, lazy: bool):
    started = time.perf_counter()
    result = PipelineResult(nodes_before=count_nodes(model))
    weights = ir.Weights(base_dir or "")
    background = in_background(model)   # the command line's load asked the same (``check_later``)
    unchecked = model_io.unchecked(model)   # "cannot read '...'" when the checker is still to run
    if unchecked is not None and not background:
        _accept(model, unchecked, input_verdict(model))
        unchecked = None
    shapes = Shapes(model, background=background, check=unchecked is not None)
    try:
        try:
            done = _run_passes(model, table, names, options, lazy, started, result, weights, shapes)
        except Exception as err:
            # An input the checks reject may fail anywhere in the passes: that is its error.
            if unchecked is not None:
                _accept(model, unchecked, shapes.input_verdict(), err)
            raise
        if unchecked is not None:
            _accept(model, unchecked, shapes.input_verdict())
        return done
    finally:
        shapes.close()


def _accept(model: onnx.ModelProto, where: str, verdict: str | None, cause: BaseException | None = None) -> None:
    """The input is checked: raise the load error its ``verdict`` makes, if any."""
    model_io.mark_checked(model)
    if verdict is not None:
        raise model_io.load_error(where, verdict) from cause


def _run_passes(model, table, names, options, lazy, started, result, weights, shapes):
    current = model
    graph = _import(current, weights)
    scope = G.NameScope(graph, imported=True)
    for name in names:
        pass_ = table[name]()
        t0 = time.perf_counter()
        shown = progress.begin(f"pass {name}")
        record, need = _run_pass(pass_, graph, current, shapes, scope, options, upgrade_note=None)
        earlier: list = []
        while need:
            # The scan stopped at the first rewrite that needs a newer opset. Rewrites that
            # needed none are already applied: keep them (and their records) in the model that
            # is upgraded, then scan again. Each round raises the opset, so this ends.
            earlier += record.applied
            have = model_opset(current)
            note = None
            if not options.allow_opset_upgrade:
                note = "opset upgrade disabled"
            elif hazard := opset.upgrade_hazard((n for _p, g in G.iter_graphs(graph) for n in g.nodes), have, need):
                note = f"opset upgrade {have} -> {need} refused: {hazard}"
            elif _relabel_ok(graph, need) and opset_in_place(graph, current, need, shapes, scope):
                current = with_opset(current, need)
                result.upgrades.append(OpsetUpgrade(have, need, name))
            else:
                ir.finish(graph)
                exported = ir.export_model(graph, current, weights)
                try:
                    upgraded = upgrade_opset(exported, need)
                except Exception as err:  # the converter raises many types
                    note = f"opset upgrade {have} -> {need} failed: {' '.join(str(err).split())[:160]}"
                else:
                    current = upgraded
                    graph = _import(current, weights)
                    shapes = Shapes(current)   # in process: _run stops the first one's child
                    scope = G.NameScope(graph, imported=True)
                    result.upgrades.append(OpsetUpgrade(have, need, name))
            record, need = _run_pass(pass_, graph, current, shapes, scope, options, upgrade_note=note)
        record.applied[:0] = earlier
        record.seconds = time.perf_counter() - t0
        progress.end(shown)
        result.passes.append(record)
        if options.strict:
            ir.finish(graph)
            _check_strict(ir.export_model(graph, current, weights), weights, name)
    ir.finish(graph)
    out = Skeleton(ir.export_model(graph, current, weights), weights)
    if _kept is not None:
        _kept.append(graph)
    else:
        ir.release(graph)
    result.nodes_after = count_nodes(out.model)
    result.seconds = time.perf_counter() - started
    return (out if lazy else out.materialize()), result


class Shapes:
    """name -> (elem_type, shape) from onnx shape inference: run once, on first use, and each
    tensor's entry decoded when a pass first asks for it (in process), or every entry decoded
    by the forked child that ran it (in the background)."""

    def __init__(self, model: onnx.ModelProto, background: bool = False, check: bool = False):
        self._model = model
        self._index: dict[str, onnx.ValueInfoProto] | None = None
        self._child = _ForkedIndex.start(model, check) if background else None
        self._unchecked = model if check else None   # ``input_verdict`` is asked for it
        self._decoded: dict[str, tuple[int, tuple | None] | None] = {}
        self._complete = False   # _decoded holds every typed tensor (the child's table)
        self._elem: dict[str, int] = {}
        self._with_functions = model if model.functions else None
        self._functions: dict[int, FunctionShapes] = {}
        self._calls: tuple | None = None

    def calls(self) -> tuple[dict, set, dict]:
        """(function key -> call sites in the model's graphs, keys called from function bodies,
        initializer name -> (elem_type, dims)): one walk over the model, on first use."""
        if self._calls is None:
            model = self._with_functions
            sites: dict[tuple[str, str], list[onnx.NodeProto]] = {}
            inits = {}
            for g in all_graphs(model.graph):
                inits.update((t.name, (t.data_type, tuple(t.dims))) for t in g.initializer)
                for n in g.node:
                    if n.domain not in DEFAULT_DOMAINS:
                        sites.setdefault((n.domain, n.op_type, n.overload), []).append(n)
            nested = {(n.domain, n.op_type, n.overload) for f in model.functions for n in f.node}
            self._calls = (sites, nested, inits)
        return self._calls

    def function(self, fn: gs.Graph) -> "FunctionShapes":
        """The shapes inside function body ``fn`` (names there are local to it)."""
        found = self._functions.get(id(fn))
        if found is None:
            found = self._functions[id(fn)] = FunctionShapes(self._with_functions, fn.__dict__["_function_src"], self)
        return found

    def _infer(self) -> None:
        """The inference, once: the forked child's decoded table, else an index made here."""
        child = self._child
        table = child.result() if child is not None else None
        if child is not None and table is None:
            child.cancel()   # nothing more will come from it: the checks too run here
            self._child = None
        elif child is not None and self._unchecked is None:
            child.reap()     # it sent all it had: no verdict to wait for
            self._child = None
        if table is not None:
            self._decoded, self._complete = table, True
        else:
            self._index = inferred_index(self._model)
        self._model = None

    def input_verdict(self) -> str | None:
        """What ``model_io.load`` would have said against the model (made with ``check``): the
        forked child's verdict when it sent one, else the checks run here."""
        child, self._child = self._child, None
        if child is not None:
            sent, verdict = child.verdict()
            if sent:
                return verdict
        return input_verdict(self._unchecked)

    def close(self) -> None:
        """Stop a background inference nobody asked for."""
        if self._child is not None:
            self._child.cancel()
            self._child = None

    def get(self, name: str, default=None):
        found = self._decoded.get(name, _UNSEEN)
        if found is _UNSEEN:
            if self._index is None and not self._complete:
                self._infer()
            if self._complete:
                found = self._decoded.get(name)
            else:
                vi = self._index.get(name)
                found = self._decoded[name] = None if vi is None else _decode(vi)
        return default if found is None else found

    def elem_type(self, name: str) -> int:
        """The element type alone (0: unknown), without decoding the shape; read once per name."""
        found = self._decoded.get(name)
        if found is not None:
            return found[0]
        known = self._elem.get(name)
        if known is not None:
            return known
        if self._index is None and not self._complete:
            self._infer()
        if self._complete:
            found = self._decoded.get(name)
            return found[0] if found is not None else 0
        vi = self._index.get(name)
        known = vi.type.tensor_type.elem_type if vi is not None and vi.type.HasField("tensor_type") else 0
        self._elem[name] = known
        return known


_UNSEEN = object()


class _ForkedIndex:
    """``infer_shapes(model)`` computed by a forked child, every entry decoded there (the
    parent's lookups are then plain dict reads), and sent back through a pipe pickled, its
    length first. With ``check`` the child then runs the input's whole-model checks (its
    initializers, the ONNX checker) and sends its verdict after the table: the parent reads it
    at the end of its run."""

    def __init__(self, pid: int, fd: int):
        self.pid = pid
        self.pipe = os.fdopen(fd, "rb")
        self.table_read = False
        self.reaped = False

    @classmethod
    def start(cls, model: onnx.ModelProto, check: bool = False) -> "_ForkedIndex | None":
        try:
            read, write = os.pipe()
        except OSError:
            return None
        try:
            pid = os.fork()
        except OSError:
            os.close(read)
            os.close(write)
            return None
        if pid:
            os.close(write)
            return cls(pid, read)
        code = 1
        try:  # the child: never returns into the caller's code
            os.close(read)
            with os.fdopen(write, "wb") as pipe:
                data = pickle.dumps(infer_shapes(model), protocol=pickle.HIGHEST_PROTOCOL)
                pipe.write(len(data).to_bytes(8, "little"))
                pipe.write(data)
                pipe.flush()
                if check:
                    pipe.write(pickle.dumps(input_verdict(model)))
            code = 0   # the exit status tells the parent that the verdict is whole
        finally:
            os._exit(code)

    def result(self) -> dict[str, tuple[int, tuple | None]] | None:
        """The decoded table, or None when the child failed (the caller then infers in process)."""
        self.table_read = True
        head = self._read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        data = self._read(size) if size >= 0 else b""
        table = None
        if size >= 0 and len(data) == size:
            try:
                table = pickle.loads(data)  # our own child's message: a dict of str -> (int, tuple)
            except Exception:  # noqa: BLE001 - a damaged message: infer in process instead
                table = None
        if not isinstance(table, dict):
            self.cancel()
            return None
        return table

    def verdict(self) -> tuple[bool, str | None]:
        """(True, the verdict: None or its one-line reason) as the child sent it; (False, None)
        when it sent none (the caller then checks in process)."""
        if not self.table_read and self.result() is None:
            return False, None
        if self.reaped:
            return False, None
        data = self._read()
        if self._wait() != 0:
            return False, None
        try:
            found = pickle.loads(data)
        except Exception:  # noqa: BLE001
            return False, None
        return (True, found) if found is None or isinstance(found, str) else (False, None)

    def reap(self) -> None:
        """Wait for a child that has sent all it will (its table, no verdict)."""
        if not self.reaped:
            self._wait()

    def cancel(self) -> None:
        try:
            self.pipe.close()
        except OSError:
            pass
        if not self.reaped:
            try:
                os.kill(self.pid, 9)
            except OSError:
                pass
            self._wait()

    def _read(self, size: int | None = None) -> bytes:
        try:
            return self.pipe.read() if size is None else self.pipe.read(size)
        except (OSError, ValueError):
            return b""
        except BaseException:  # interrupted while waiting: the child goes too
            self.cancel()
            raise

    def _wait(self) -> int:
        self.reaped = True
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = -1
        try:
            self.pipe.close()
        except OSError:
            pass
        return status


class FunctionShapes:
    """name -> (elem_type, shape) inside one function body: what holds at every call of it.

    Each call site's input types (from the model's shape inference) are given to the body in a
    one-function model, and onnx infers its tensors from them (attributes that refer to the
    function's take the call's values). A fact is kept only when every call gives it: a dim that
    differs between calls is unknown, a rank that differs leaves the shape unknown. When a call
    site cannot be typed (or the function is called from another function body, or never),
    nothing is known. Computed on first use."""

    def __init__(self, model: onnx.ModelProto | None, fp: onnx.FunctionProto, shapes: Shapes):
        self._model, self._fp, self._shapes = model, fp, shapes
        self._table: dict[str, tuple[int, tuple | None]] | None = None

    def get(self, name: str, default=None):
        if self._table is None:
            try:
                self._table = _function_facts(self._model, self._fp, self._shapes) if self._model is not None else {}
            except Exception:  # noqa: BLE001 - inference is best effort: without facts passes skip
                self._table = {}
            self._model = None
        found = self._table.get(name)
        return default if found is None else found


def _function_facts(model: onnx.ModelProto, fp: onnx.FunctionProto, shapes: Shapes) -> dict:
    calls, nested, inits = shapes.calls()
    key = (fp.domain, fp.name, fp.overload)
    sites = calls.get(key, [])
    if not sites or key in nested:
        return {}
    tables = []
    for site in sites:
        table = _infer_call(model, fp, site, lambda name: inits.get(name) or shapes.get(name))
        if table is None:
            return {}
        tables.append(table)
    merged = tables[0]
    for table in tables[1:]:
        merged = {name: fact for name, fact in ((n, _meet(f, table.get(n))) for n, f in merged.items())
                  if fact is not None}
    return merged


def _meet(a, b):
    """What two calls agree on about one tensor: same element type, and per dim the same value."""
    if a is None or b is None or a[0] != b[0]:
        return None
    if a[1] is None or b[1] is None or len(a[1]) != len(b[1]):
        return (a[0], None)
    return (a[0], tuple(x if x == y else None for x, y in zip(a[1], b[1])))


def _infer_call(model: onnx.ModelProto, fp: onnx.FunctionProto, site: onnx.NodeProto, typed) -> dict | None:
    """The body's tensors typed by onnx inference from one call's input types; None when the
    call's inputs are not all typed."""
    inputs = []
    for formal, actual in zip(fp.input, site.input):
        if not actual:
            continue
        found = typed(actual)
        if found is None or not found[0]:
            return None
        elem, shape = found
        inputs.append(onnx.helper.make_tensor_value_info(formal, elem, None if shape is None else list(shape)))
    values = {a.name: a for a in fp.attribute_proto}
    values.update((a.name, a) for a in site.attribute)
    body = []
    for node in fp.node:
        if any(a.ref_attr_name for a in node.attribute):
            node = _bind_refs(node, values)
        body.append(node)
    graph = onnx.helper.make_graph(body, "call", inputs, [onnx.helper.ValueInfoProto(name=o) for o in fp.output])
    imports = {imp.domain: imp.version for imp in model.opset_import}
    imports.update((imp.domain, imp.version) for imp in fp.opset_import)
    mini = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in imports.items()],
                                  ir_version=model.ir_version)
    mini.functions.extend(f for f in model.functions
                          if (f.domain, f.name, f.overload) != (fp.domain, fp.name, fp.overload))
    inferred = onnx.shape_inference.infer_shapes(mini, data_prop=True)
    table = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        found = _decode(vi)
        if found is not None and found[0]:
            table[vi.name] = found
    return table


def _bind_refs(node: onnx.NodeProto, values: dict) -> onnx.NodeProto:
    """A copy of a body node with each attribute that refers to the function's attributes
    replaced by the call's value (dropped when the call gives none and there is no default)."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    del out.attribute[:]
    for a in node.attribute:
        if not a.ref_attr_name:
            out.attribute.append(a)
        elif a.ref_attr_name in values:
            bound = out.attribute.add()
            bound.CopyFrom(values[a.ref_attr_name])
            bound.name = a.name
    return out


def _run_pass(pass_: Pass, root: gs.Graph, model: onnx.ModelProto, shapes, names: G.NameScope, options: Options,
              upgrade_note: str | None) -> tuple[PassRecord, int]:
    """One pass over every graph, repeated until nothing more applies. Returns (record, opset needed)."""
    record = PassRecord(pass_.name)
    model_version = opset = model_opset(model)
    for _round in range(MAX_ROUNDS):
        skipped: list[Skip] = []
        applied_before = len(record.applied)
        created_anchor = False
        for path, graph, fn in _graphs(root):
            if fn is None:
                ctx = Context(graph=graph, root=root, opset=opset, names=names, shapes=shapes, path=path)
            else:
                ctx = Context(graph=graph, root=root, opset=fn.opset, names=names, shapes=shapes.function(fn),
                              path=path)
            gone: set[int] = set()
            local = None if graph is root else {id(n) for n in graph.nodes}  # once per graph: no rescans
            anchors = _anchors(graph, pass_.anchor_ops)
            if pass_.late_ops:
                anchors = [n for n in anchors if n.op not in pass_.late_ops] + \
                          [n for n in anchors if n.op in pass_.late_ops]
            for node in anchors:
                if id(node) in gone or not node.outputs:
                    continue
                found = _safe_match(pass_, node, ctx)
                if found is None:
                    continue
                if isinstance(found, Reject):
                    skipped.append(Skip(pass_.name, G.node_label(found.node or node), found.reason, path))
                    continue
                label = G.node_label(node)
                if fn is not None:
                    why = _function_refusal(found, path)
                    if why:
                        skipped.append(Skip(pass_.name, label, why, path))
                        continue
                outer = _outer_node(found, local)
                if outer is not None:
                    # Rewriting would move that node into this subgraph, away from the outer
                    # scope's other readers, which the fan-out checks on this graph cannot see.
                    skipped.append(Skip(pass_.name, label, f"matched node {G.node_label(outer)} is in an "
                                        "outer graph", path))
                    continue
                key = exclusion_key(path, found.output.name)
                if key in options.exclude:
                    skipped.append(Skip(pass_.name, label, f"rolled back: {options.exclude[key]}", path))
                    continue
                vetoed = options.veto(pass_.name, found) if options.veto else None
                if vetoed:
                    skipped.append(Skip(pass_.name, label, vetoed, path))
                    continue
                required = pass_.required_opset(found)
                if fn is not None:
                    if required > model_version and upgrade_note is None:
                        return record, required  # upgrade the model (and bodies) first, as for the main graph
                    why = _function_opset(fn, required, model_version, path)
                    if why and required > model_version and upgrade_note:
                        why += f"; {upgrade_note}"
                    if why:
                        skipped.append(Skip(pass_.name, label, why, path))
                        continue
                    ctx.opset = fn.opset
                elif required > opset:
                    if upgrade_note is None:
                        # Stop here: what is left is scanned again once the model is upgraded
                        # (scanning it now would match the whole graph twice).
                        return record, required
                    else:
                        skipped.append(Skip(pass_.name, label,
                                            f"needs opset {required} (model has {opset}); {upgrade_note}", path))
                    continue
                count = len(graph.nodes)
                record.applied.append(_apply(pass_, found, ctx, node, label, local))
                gone.update(id(n) for n in found.matched)
                if local is not None:
                    local.update(id(n) for n in graph.nodes[count:])
                if ctx._here is not None:
                    ctx._here.update(id(n) for n in graph.nodes[count:])
                created_anchor = created_anchor or any(n.op in pass_.anchor_ops for n in graph.nodes[count:])
        # Another round can only find more where this one left a site it refused (a use outside
        # a match may have gone with a later rewrite) or made a node this pass starts from; a
        # site that did not fit a pattern sits upstream of no rewrite that came after it.
        if len(record.applied) == applied_before or not (skipped or created_anchor):
            record.skipped = skipped
            break
    return record, 0


def _anchors(graph: gs.Graph, ops: tuple[str, ...]) -> list[gs.Node]:
    """The nodes of ``graph`` whose op is one of ``ops``, in node order, from an index of node
    positions by op: one walk over the nodes per run, not one per pass and round. During the
    passes the node list only grows (a rewrite appends its nodes; a node taken out is detached
    and stays listed until ``ir.finish``, which makes a new list and so a new index)."""
    nodes = graph.nodes
    index = graph.__dict__.get("_op_index")
    if index is None or index[0] is not nodes or index[1] > len(nodes):
        index = graph.__dict__["_op_index"] = [nodes, 0, {}]
    by_op = index[2]
    for i in range(index[1], len(nodes)):
        by_op.setdefault(nodes[i].op, []).append(i)
    index[1] = len(nodes)
    lists = [by_op[op] for op in dict.fromkeys(ops) if op in by_op]
    positions = lists[0] if len(lists) == 1 else sorted(i for found in lists for i in found)
    return [nodes[i] for i in positions]


def _graphs(root: gs.Graph) -> list[tuple[str, gs.Graph, gs.Graph | None]]:
    """(path, graph, function body or None) for the main graph, its subgraphs, and each model-local
    function body with its subgraphs (path ``function domain:name``), listed before any rewrite.
    A model without functions pays nothing more."""
    found = [(path, graph, None) for path, graph in G.iter_graphs(root)]
    for fn in ir.functions(root):
        found += [(path, graph, fn) for path, graph in G.iter_graphs(fn, fn.__dict__["_function_label"])]
    return found


def exclusion_key(path: str, output: str) -> str:
    """The key a rolled-back rewrite is excluded by: its kept output's name, qualified by the
    function inside a function body (names there are local to the body)."""
    return f"{path}: {output}" if ir.is_function_path(path) else output


def _function_refusal(m: Match, path: str) -> str | None:
    """Why a match inside a function body cannot be rewritten there: a matched node's attribute
    refers to an attribute of the function (its value is given per call)."""
    for node in m.matched:
        refs = ir.ref_attrs(node)
        if refs:
            attr, ref = refs[0]
            return (f"attribute '{attr}' of {G.node_label(node)} refers to attribute '{ref}' of {path.split('/')[0]}: "
                    "its value is given per call, so the rewrite cannot be checked")
    return None


def _relabel_ok(root: gs.Graph, target: int) -> bool:
    """Whether every function body keeps its meaning at default-domain opset ``target`` (no op
    of it changes between its opset and ``target``): then the model may be upgraded (the bodies
    stay compatible with its opset) and a body relabelled. True for a model without functions."""
    return _relabel_block(root, target) is None


def _relabel_block(root: gs.Graph, target: int) -> str | None:
    """Why a model-local function body would not be compatible with default-domain opset ``target``."""
    for f in ir.functions(root):
        changed = opset.changed_ops({n.op for _p, g in G.iter_graphs(f) for n in g.nodes if G.in_default_domain(n)},
                                    f.opset, target)
        if changed:
            return (f"{f.__dict__['_function_label']} imports opset {f.opset}; at opset {target} these ops of "
                    f"it differ: {', '.join(sorted(changed)[:4])}")
    return None


def _function_opset(fn: gs.Graph, required: int, model_version: int, path: str) -> str | None:
    """None when a rewrite needing default-domain opset ``required`` may be emitted in function
    ``fn`` (its own opset raised to the model's when no op of its body changes between the two);
    else why not."""
    have = fn.opset
    name = fn.__dict__["_function_label"]
    if required <= have and required <= model_version:
        return None
    if required > model_version:
        return f"needs opset {required}, {name} imports {have} (the model imports {model_version})"
    changed = opset.changed_ops({n.op for _p, g in G.iter_graphs(fn) for n in g.nodes if G.in_default_domain(n)},
                                have, model_version)
    if changed:
        return (f"needs opset {required}, {name} imports {have}; raising it to the model's {model_version} "
                f"would change {', '.join(sorted(changed)[:4])}")
    ir.set_function_opset(fn, model_version)
    return None


def _outer_node(m: Match, local: set[int] | None) -> gs.Node | None:
    """A matched node that is not one of this subgraph's ``local`` nodes (a match that reached
    the outer scope); None in the main graph."""
    if local is None:
        return None
    return next((n for n in m.matched if id(n) not in local), None)


def _safe_match(pass_: Pass, node: gs.Node, ctx: Context) -> Match | Reject | None:
    """A pass that cannot analyse one node (an exporter form nobody foresaw) skips that node
    with the error as its reason instead of stopping the whole run; nothing was changed yet."""
    try:
        return pass_.match(node, ctx)
    except ir.UnknownAttribute as err:  # a function-body attribute given per call
        return Reject(str(err))
    except Exception as err:  # noqa: BLE001 - reported as a skip, never swallowed silently
        return Reject(f"not analysed: {type(err).__name__}: {' '.join(str(err).split())[:160]}")


def _apply(pass_: Pass, m: Match, ctx: Context, anchor: gs.Node, label: str, local: set[int] | None) -> Rewrite:
    removed = tuple(G.node_label(n) for n in m.matched)
    # Detach outputs first so that the new producer of the kept tensor is its only one;
    # inputs stay attached until the pass has read them.
    for node in m.matched:
        ir.detach(node, ("outputs",))
    new_nodes = pass_.rewrite(m, ctx)
    read = [t for node in m.matched for t in node.inputs]
    for node in m.matched:
        ir.detach(node, ("inputs",))
    ctx.graph.nodes.extend(new_nodes)
    ctx.graph.__dict__["_rewritten"] = True
    if not any(m.output in n.outputs for n in new_nodes):  # pragma: no cover - a pass bug
        raise AssertionError(f"{pass_.name}: rewrite lost tensor '{m.output.name}'")
    if any(n is anchor for n in m.matched):
        ir.place(ctx.graph, anchor, new_nodes)  # the new nodes take the anchor's place in the order
    else:
        ctx.graph.__dict__["_dirty"] = True
    ir.detach_dead_producers(read, ctx.graph, local)
    return Rewrite(pass_.name, label, m.output.name, removed,
                   tuple(G.node_label(n) for n in new_nodes), ctx.path, dict(m.info))


def _import(model: onnx.ModelProto, weights: ir.Weights) -> gs.Graph:
    try:
        return ir.import_model(model, weights)
    except Exception as err:  # a construct the importer cannot read
        raise ModelLoadError(f"cannot process the model's graph: {type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]}") from err


def model_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return imp.version
    return 1


def count_nodes(model: onnx.ModelProto) -> int:
    """Nodes of the model's graphs and of its function bodies."""
    return census(model).nodes


def opset_in_place(graph: gs.Graph, model: onnx.ModelProto, target: int, shapes, names: G.NameScope) -> bool:
    """Raise the imported graph's opset node by node (normopt.opset.upgrade_graph); False when
    the whole model must go through the converter."""
    def elem_type(t: gs.Tensor) -> int | None:
        if isinstance(t, gs.Constant):
            values = t._values
            if isinstance(values, ir.ProtoValues):
                return values.tensor.data_type
        dtype = t.dtype
        if dtype is not None:
            try:
                return dtype if isinstance(dtype, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            except (KeyError, TypeError, ValueError):
                return None
        known = shapes.get(t.name)
        return known[0] if known and known[0] else None

    try:  # model-local functions keep their own opset imports (their bodies do not change there)
        return opset.upgrade_graph(graph, model_opset(model), target, elem_type, names)
    except Exception:  # noqa: BLE001 - any surprise: the converter's whole-model path decides
        return False


def with_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model-level fields of ``model`` (no graph) at default-domain opset ``target``: the
    template the rewritten graph is exported with."""
    out = ir.model_fields(model)
    for imp in out.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            imp.version = target
    out.ir_version = max(model.ir_version, min_ir_version(target))
    return out


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model at default-domain opset ``target``. The converter only sees a weight-free copy
    (it would otherwise copy every weight in and out of C++ twice); the large initializers are
    put back by name afterwards. The result is verified like every rewrite."""
    light = without_weights(model)
    upgraded = opset.convert(light, target)
    upgraded.ir_version = max(model.ir_version, min_ir_version(target))
    if model.functions and not upgraded.functions:  # onnx's converter drops them: each body on its own
        upgraded.functions.extend(_upgraded_function(fp, target, upgraded.ir_version) for fp in model.functions)
    weights = {init.name: init for init in model.graph.initializer}
    for i, init in enumerate(upgraded.graph.initializer):
        if init.data_location == onnx.TensorProto.EXTERNAL and init.name in weights:
            upgraded.graph.initializer[i].CopyFrom(weights[init.name])
    _keep_value_info(model.graph, upgraded.graph)
    return upgraded


def _upgraded_function(fp: onnx.FunctionProto, target: int, ir_version: int) -> onnx.FunctionProto:
    """``fp`` as it is when its body keeps its meaning at ``target`` (it keeps its own opset
    import); else its body converted to ``target``. Raises, naming the function, when the
    conversion fails."""
    version = opset.function_opset(fp) or target
    if version >= target or not opset.changed_ops({n.op_type for n in fp.node if n.domain in DEFAULT_DOMAINS},
                                                  version, target):
        return fp
    try:
        return opset.convert_function(fp, target, ir_version)
    except Exception as err:  # the converter raises many types
        raise ValueError(f"{ir.function_label(fp.domain, fp.name, fp.overload)}: "
                         f"{' '.join(str(err).split())[:120]}") from err


def _keep_value_info(source: onnx.GraphProto, converted: onnx.GraphProto) -> None:
    """Give every graph of ``converted`` the value_info of its ``source`` graph (none if it has
    no counterpart). The converter writes value_info from its own inference, which does not
    propagate shape values: every tensor after Reshape(t, Shape(u)) gets unknown dims there,
    and graphsurgeon would read them as the tensor's shape, hiding what infer_shapes finds."""
    del converted.value_info[:]
    converted.value_info.extend(source.value_info)
    subgraphs = {(n.output[0] if n.output else n.name, a.name): a for n in source.node for a in n.attribute}
    for node in converted.node:
        for attr in node.attribute:
            old = subgraphs.get((node.output[0] if node.output else node.name, attr.name))
            if attr.type == onnx.AttributeProto.GRAPH:
                _keep_value_info(old.g if old is not None else onnx.GraphProto(), attr.g)
            for i, sub in enumerate(attr.graphs):
                has = old is not None and i < len(old.graphs)
                _keep_value_info(old.graphs[i] if has else onnx.GraphProto(), sub)


def inferred_index(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """name -> ValueInfoProto from onnx shape inference (data propagation on), every graph."""
    light = weightless(model)  # only read (conversion and inference make new models)
    if model_opset(model) < SHAPE_VALUE_OPSET and any(n.op_type == "Reshape" for g in model_graphs(light)
                                                      for n in g.node):
        # Reshape before opset 14 ignores shape values propagated from Shape: every tensor
        # after Reshape(t, Shape(u)) (each TorchScript GroupNorm) would lose its shape. A copy
        # converted to opset 14 keeps the tensor names; if conversion fails, infer as is.
        try:
            light = opset.convert(light, SHAPE_VALUE_OPSET)
        except Exception:  # the converter raises many types
            pass
    nested = census(light).subgraphs
    index = _inferred_index(light, nested)
    if any(g.value_info for g in model_graphs(light)):
        # Declared value_info is kept by inference even where the graph computes another shape
        # (a Reshape by a run-time shape declared with the wrong rank). Shapes inferred without
        # the declarations win where inference knows them: ``Context.shape`` fills from the
        # declarations only what inference left open, and ``checked_shape`` compares the two.
        bare = onnx.ModelProto()
        bare.CopyFrom(light)
        for g in all_graphs(bare.graph):
            del g.value_info[:]
        index.update((name, vi) for name, vi in _inferred_index(bare, nested).items()
                     if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"))
    return index


def _inferred_index(light: onnx.ModelProto, nested: bool = True) -> dict[str, onnx.ValueInfoProto]:
    """``nested``: whether the model has subgraphs (inference adds none)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # inference is best effort: a pass that needs a shape skips without it
        return {}
    index: dict[str, onnx.ValueInfoProto] = {}
    for g in (all_graphs(inferred.graph) if nested else [inferred.graph]):
        for part in (g.input, g.output, g.value_info):
            index.update((vi.name, vi) for vi in part)
    return index


def _decode(vi: onnx.ValueInfoProto) -> tuple[int, tuple | None] | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return tt.elem_type, shape


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, tuple | None]]:
    """name -> (elem_type, shape) for every tensor onnx shape inference can type."""
    table = {}
    for name, vi in inferred_index(model).items():
        found = _decode(vi)
        if found is not None:
            table[name] = found
    return table


def _check_strict(model: onnx.ModelProto, weights: ir.Weights, pass_name: str) -> None:
    try:
        model_io.check(model)
    except onnx.checker.ValidationError as err:
        raise ModelSaveError(f"pass '{pass_name}' produced an invalid model: {' '.join(str(err).split())[:200]}") from err

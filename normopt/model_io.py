"""Load and save ONNX models: clear errors, external data, atomic writes, metadata kept.

The input file is only ever opened for reading. The output is written to a temporary
file in the destination folder and renamed into place, so a failure leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import heapq
import math
import mmap
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterator

import onnx
from google.protobuf.message import DecodeError, EncodeError

from normopt import ir, signals
from normopt.errors import ModelLoadError, ModelSaveError

# Protobuf cannot serialize a message of 2 GiB or more; stay well under it.
PROTOBUF_LIMIT = 2**31 - 2**26
# Smaller tensors stay in the model file (onnx's own default): onnxruntime's shape inference
# reads Reshape shapes, Unsqueeze axes or Resize scales from initializers and cannot read them
# from external data ("Cannot parse data from external tensors").
EXTERNAL_MIN_BYTES = 1024

def min_ir_version(opset: int) -> int:
    """Lowest IR version able to carry a default-domain opset (from onnx.helper.VERSION_TABLE)."""
    irs = [row[1] for row in onnx.helper.VERSION_TABLE if row[2] >= opset]
    return min(irs) if irs else onnx.IR_VERSION


def default_output(path: str | os.PathLike) -> Path:
    """``net.onnx`` -> ``net.normopt.onnx`` beside it."""
    p = Path(path)
    return p.with_name(f"{p.stem}.normopt{p.suffix or '.onnx'}")


def load(path: str | os.PathLike, notes: list[str] | None = None,
         check_later: Callable[[onnx.ModelProto], bool] | None = None) -> onnx.ModelProto:
    """Read an ONNX model or raise ModelLoadError.

    ``check_later(model)`` true: the text check (every name valid UTF-8), the initializers'
    check and the ONNX checker (the costly whole-model checks) do not run here; the model is
    registered as unchecked, and whoever runs it promises to check it (``input_verdict``, for
    example in a forked process beside its work) and raise ``load_error`` before using the
    result.

    External data is not read: its tensors stay headers (name, type, dims, location) that
    passes and the writer resolve against the model's folder when they need the bytes. Files and
    ranges are checked here, and tensors of up to KEEP_ELEMENTS elements are read in (shape
    constants that inference and passes need as values).

    Nodes out of topological order (onnxruntime sorts them on load) are sorted; a line saying
    so is appended to ``notes``.
    """
    p = Path(path)
    where = f"cannot read '{p}'"
    if not p.exists():
        raise ModelLoadError(f"{where}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{where}: is a directory, expected an .onnx file")
    if special_file(p):
        raise ModelLoadError(f"{where}: {NOT_REGULAR}, expected an .onnx file")
    if p.stat().st_size == 0 and not _has_bytes(p):   # (a /proc file says 0 and has some)
        raise ModelLoadError(f"{where}: file is empty")
    try:
        model = _parse(p)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{where}: file is not an ONNX model (protobuf parse failed: {_short(err)})") from err
    except OSError as err:
        raise ModelLoadError(f"{where}: {err.strerror or err}") from err
    later = check_later is not None and check_later(model)
    try:
        # Left for later, the text is checked with the rest (``input_verdict``): here only the
        # main graph's order, and the external data entries that are read below.
        in_order = _touch_graph(model.graph, check_order=True, text=False) if later else _touch_text(model)
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{where}: {_not_utf8(err)}") from err
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError(f"{where}: file is not an ONNX model (no graph)")
    if not model.opset_import:
        raise ModelLoadError(f"{where}: model declares no opset_import")
    try:
        _check_versions(model)
        if not later:
            _check_tensors(model)
        moved = sort_nodes(model, main_in_order=bool(in_order))
    except ValueError as err:
        raise _refusal(model, later, where, str(err)) from err
    try:
        _check_external(model, str(p.resolve().parent))
    except (OSError, ValueError, KeyError) as err:
        raise _refusal(model, later, where, f"external data could not be loaded ({_short(err)})") from err
    listed = _list_legacy_initializers(model)
    if later:
        _unchecked[id(model)] = (model, where)
    else:
        verdict = _checker_verdict(model)
        if verdict is not None:
            raise load_error(where, verdict)
    if notes is not None:
        notes.extend(moved + listed)
    return model


def _has_bytes(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return bool(f.read(1))
    except OSError:
        return False


# Models loaded with their whole-model checks left to the caller: id -> (model, "cannot read '...'").
_unchecked: dict[int, tuple[onnx.ModelProto, str]] = {}


def unchecked(model: onnx.ModelProto) -> str | None:
    """The error prefix of a model ``load`` left unchecked (``check_later``), else None."""
    found = _unchecked.get(id(model))
    return found[1] if found is not None and found[0] is model else None


def mark_checked(model: onnx.ModelProto) -> None:
    _unchecked.pop(id(model), None)


def input_verdict(model: onnx.ModelProto) -> str | None:
    """What ``load`` says against a model it left unchecked (one line: its text, its
    initializers, then the ONNX checker), None when all accept it."""
    try:
        _touch_text(model)
    except UnicodeDecodeError as err:
        return _not_utf8(err)
    try:
        _check_tensors(model)
    except ValueError as err:
        return str(err)
    return _checker_verdict(model)


def _refusal(model: onnx.ModelProto, text_unchecked: bool, where: str, reason: str) -> ModelLoadError:
    """The load's error, ``where: reason``, unless the text, when it was left unchecked, is not
    UTF-8: a name read as bytes may be what failed, and the error says so first."""
    if text_unchecked:
        try:
            _touch_text(model)
        except UnicodeDecodeError as err:
            reason = _not_utf8(err)
    return ModelLoadError(f"{where}: {reason}")


def _not_utf8(err: UnicodeDecodeError) -> str:
    return f"file is not an ONNX model (a name or text field is not UTF-8: {_short(err)})"


def _checker_verdict(model: onnx.ModelProto) -> str | None:
    try:
        check(model)
    except (onnx.checker.ValidationError, ValueError) as err:
        return f"the ONNX checker rejects it: {_short(err)}"
    return None


def load_error(where: str, verdict: str) -> ModelLoadError:
    return ModelLoadError(f"{where}: {verdict}")


def _list_legacy_initializers(model: onnx.ModelProto) -> list[str]:
    """Below IR version 4 the format requires every initializer of the main graph to be listed
    as a graph input (the listing makes it a constant); onnxruntime runs models whose exporter
    left some out (its own sample ``mul_1.onnx``). They are listed here, in the model in memory,
    so that the checker accepts it and the output is valid; returns a note when it did."""
    if model.ir_version >= 4:
        return []
    graph = model.graph
    declared = {vi.name for vi in graph.input}
    missing = [t for t in graph.initializer if t.name not in declared]
    for t in missing:
        graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if not missing:
        return []
    return [f"{len(missing)} initializer(s) not listed as graph inputs ('{missing[0].name}'"
            f"{', ...' if len(missing) > 1 else ''}) are listed in the output, as IR version {model.ir_version} requires"]


def _parse(p: Path) -> onnx.ModelProto:
    """``onnx.load(p, load_external_data=False)``. A binary model is parsed straight from the
    file mapped into memory: protobuf copies what it keeps, so reading the file into a bytes
    object first (as onnx.load does) would copy the whole model once more."""
    fmt = onnx.serialization.registry.get_format_from_file_extension(p.suffix)
    if fmt not in (None, "protobuf"):
        return onnx.load(str(p), load_external_data=False)
    with open(p, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system or file that cannot be mapped
            return onnx.load(f, load_external_data=False)
        with mapped, memoryview(mapped) as view:
            model = onnx.ModelProto()
            decoded = model.ParseFromString(view)
            if decoded is not None and decoded != len(view):
                raise DecodeError(f"Protobuf decoding consumed too few bytes: {decoded} out of {len(view)}")
    return model


def _touch_text(message) -> None:
    """Decode every text field of the model's structure once (protobuf decodes them lazily, so
    a flipped bit in a name would otherwise surface in the middle of a pass). Tensor values are
    not touched: only a tensor's name, doc string and external data entries."""
    if isinstance(message, onnx.TensorProto):
        _text(message.name, "tensor name")
        for entry in message.external_data:
            _text(entry.key, "external data key")
            _text(entry.value, "external data value")
        return
    if isinstance(message, onnx.NodeProto):
        _touch_nodes([message])
        return
    if isinstance(message, onnx.GraphProto):  # the bulk of a model: nodes and initializers in tight loops
        _touch_graph(message)
        return None
    if isinstance(message, onnx.ModelProto):
        # The main graph is read once for two things: its text, and whether its nodes are in
        # topological order already (``sort_nodes`` is then spared that walk).
        in_order = _touch_graph(message.graph, check_order=True)
        for field, value in message.ListFields():
            if field.name != "graph":
                _touch_field(field, value)
        return in_order
    if isinstance(message, onnx.AttributeProto):  # string attributes are bytes that importers decode
        _touch_attribute(message)
        return
    for field, value in message.ListFields():
        _touch_field(field, value)
    return None


def _touch_field(field, value) -> None:
    if field.type == field.TYPE_STRING:
        for item in (value if _repeated(field) else [value]):
            _text(item, field.name)
    if field.type != field.TYPE_MESSAGE:
        return
    if _repeated(field):
        for item in value:
            _touch_text(item)
    else:
        _touch_text(value)


def _touch_graph(g: onnx.GraphProto, check_order: bool = False, text: bool = True) -> bool | None:
    """A graph's text; with ``check_order``, also whether every name its nodes read is provided
    before them and none is produced twice (``_sorted_already``, for the main graph). Without
    ``text``, only the order and the initializers' external data entries."""
    external = onnx.TensorProto.EXTERNAL
    given: set[str] = set()
    for t in g.initializer:
        name = t.name
        if name.__class__ is bytes:
            _text(name, "tensor name")
        given.add(name)
        if t.data_location == external:
            _touch_text(t)
    if text:
        for part in (g.input, g.output, g.value_info, g.sparse_initializer, g.quantization_annotation,
                     g.metadata_props):
            for item in part:
                _touch_text(item)
        _text(g.name, "graph name")
        _text(g.doc_string, "doc_string")
    if not check_order:
        _touch_nodes(g.node)
        return None
    given.update(vi.name for vi in g.input)
    given.update(s.values.name for s in g.sparse_initializer)
    return _touch_nodes(g.node, given, text)


_SCALAR_ATTRIBUTES = frozenset({onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT, onnx.AttributeProto.FLOATS,
                                onnx.AttributeProto.INTS})


def _touch_attribute(attr: onnx.AttributeProto) -> None:
    """An attribute's own text (name, reference, doc string, string values), then whatever
    message it holds (a tensor, a graph, a type). Most attributes hold numbers only."""
    for text in (attr.name, attr.ref_attr_name, attr.doc_string):
        if text.__class__ is bytes:
            _text(text, "attribute field")
    if attr.type in _SCALAR_ATTRIBUTES:
        return
    attr.s.decode("utf-8")
    for s in attr.strings:
        s.decode("utf-8")
    for field, value in attr.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        for item in (value if _repeated(field) else [value]):
            _touch_text(item)


def _touch_nodes(nodes, given: set[str] | None = None, text: bool = True) -> bool | None:
    """The nodes' text (without ``text``: none of it); with ``given`` (the names the graph itself
    provides), also whether they are in topological order with no name produced twice."""
    in_order = given is not None
    seen: set[str] = set()
    for node in nodes:
        op, domain, inputs, outputs = node.op_type, node.domain, node.input[:], node.output[:]
        if text:
            for value in (node.name, op, domain, *inputs, *outputs):
                if value.__class__ is bytes:
                    _text(value, "node field")
        elif not in_order:
            break
        if in_order:
            reads = _node_reads(node) if op in SUBGRAPH_OPS or domain not in ("", "ai.onnx") else inputs
            if any(name and name not in seen and name not in given for name in reads) or \
                    any(name and name in seen for name in outputs):
                in_order = False
            seen.update(outputs)
        if text and (node.attribute or node.doc_string or node.metadata_props or node.overload):
            for attr in node.attribute:
                _touch_text(attr)
            _text(node.doc_string, "doc_string")
            _text(node.overload, "overload")
            for entry in node.metadata_props:
                _touch_text(entry)
    return in_order if given is not None else None


def _text(value, what: str) -> None:
    """protobuf hands a string field that is not valid UTF-8 back as bytes."""
    if isinstance(value, bytes):
        raise UnicodeDecodeError("utf-8", value[:40], 0, 1, f"{what} {value[:40]!r}")


def _repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 6; older ones have label
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


def _check_versions(model: onnx.ModelProto) -> None:
    """A default-domain opset this onnx does not know: the passes would assume the semantics of
    ops they have no schema for."""
    known = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > known:
            raise ValueError(f"the model uses opset {imp.version} of the default domain; this onnx "
                             f"({onnx.__version__}) knows opsets up to {known}")
        if imp.domain in ("", "ai.onnx") and imp.version < 1:
            raise ValueError(f"the model declares opset {imp.version} of the default domain")


_DATA_TYPES = frozenset(v for v in onnx.TensorProto.DataType.values() if v != onnx.TensorProto.UNDEFINED)


def _check_tensors(model: onnx.ModelProto) -> None:
    """Every initializer has a known element type, dims >= 0 and, when its values are inline
    raw bytes, enough of them (the checker is only shown large tensors' types and shapes); the
    main graph's tensor inputs and outputs have a known element type (onnxruntime needs one)."""
    for kind, vis in (("input", model.graph.input), ("output", model.graph.output)):
        for vi in vis:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type not in _DATA_TYPES:
                raise ValueError(f"graph {kind} '{vi.name}' has an undefined or unknown element type "
                                 f"{vi.type.tensor_type.elem_type}")
    external, string, known = onnx.TensorProto.EXTERNAL, onnx.TensorProto.STRING, _DATA_TYPES
    for t in _initializers(model.graph):
        data_type, dims = t.data_type, t.dims
        if data_type not in known:
            raise ValueError(f"initializer '{t.name}' has unknown element type {data_type}")
        if dims and min(dims) < 0:
            raise ValueError(f"initializer '{t.name}' has a negative dimension {list(dims)}")
        if t.data_location != external and data_type != string and t.HasField("raw_data") \
                and len(t.raw_data) < _nbytes(t):
            raise ValueError(f"initializer '{t.name}' holds fewer bytes than its shape {list(dims)} needs")


def sort_nodes(model: onnx.ModelProto, main_in_order: bool = False) -> list[str]:
    """Put the nodes of every graph in topological order (stable: ties keep the file's order),
    as onnxruntime does on load; returns a note per graph that was reordered.

    Raises ValueError for a node that reads a tensor nothing provides, or for a cycle. A name
    produced twice is left to the checker (not single assignment)."""
    notes: list[str] = []
    _sort_graph(model.graph, set(), "", notes, main_in_order)
    return notes


def sorted_model(model: onnx.ModelProto, notes: list[str] | None = None) -> onnx.ModelProto:
    """``model`` itself when every graph is in topological order, else a sorted copy (the
    caller's model is never modified); the notes of ``sort_nodes`` go to ``notes``.

    Raises ValueError as ``sort_nodes`` does."""
    if _all_sorted(model.graph, set()):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    moved = sort_nodes(copy)
    if notes is not None:
        notes.extend(moved)
    return copy


def _all_sorted(g: onnx.GraphProto, outer: set[str]) -> bool:
    """Whether ``g`` and every subgraph in it are in topological order (one walk each)."""
    if not _sorted_already(g, outer):
        return False
    holders = [n for n in g.node if n.op_type in SUBGRAPH_OPS or n.domain not in ("", "ai.onnx")]
    if not holders:
        return True
    scope = outer | {vi.name for vi in g.input} | {t.name for t in g.initializer} \
        | {s.values.name for s in g.sparse_initializer} | {o for n in g.node for o in n.output if o}
    return all(_all_sorted(sub, scope) for node in holders for attr in node.attribute
               for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs))


def _graph_reads(g: onnx.GraphProto) -> set[str]:
    """Names the nodes of ``g`` (and its subgraphs) read from an enclosing scope."""
    own = {vi.name for vi in g.input} | {t.name for t in g.initializer} \
        | {s.values.name for s in g.sparse_initializer} | {o for n in g.node for o in n.output}
    return {name for n in g.node for name in _node_reads(n) if name not in own}


def _node_reads(node: onnx.NodeProto) -> list[str]:
    reads = [name for name in node.input if name]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
            reads.extend(_graph_reads(sub))
    return reads


def _label(node: onnx.NodeProto, index: int) -> str:
    return f"'{node.name}' ({node.op_type})" if node.name else f"#{index} ({node.op_type})"


def _sorted_already(g: onnx.GraphProto, outer: set[str]) -> bool:
    """One walk: every name a node reads is provided before it, and no name is produced twice
    (the common case, with no per-node dependency sets)."""
    given = {vi.name for vi in g.input} | {t.name for t in g.initializer} | {s.values.name for s in g.sparse_initializer}
    seen: set[str] = set()
    for node in g.node:
        subgraphs = node.op_type in SUBGRAPH_OPS or node.domain not in ("", "ai.onnx")
        for name in (_node_reads(node) if subgraphs else node.input):
            if name and name not in seen and name not in given and name not in outer:
                return False
        for name in node.output:
            if name in seen:
                return False
            if name:
                seen.add(name)
    return True


def _sort_graph(g: onnx.GraphProto, outer: set[str], path: str, notes: list[str],
                known_in_order: bool = False) -> None:
    if known_in_order or _sorted_already(g, outer):
        _sort_subgraphs(g, outer, path, notes)
        return
    nodes = list(g.node)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.output:
            if name and name in producer:
                return  # not single assignment: the checker names it
            if name:
                producer[name] = i
    given = {vi.name for vi in g.input} | {t.name for t in g.initializer} \
        | {s.values.name for s in g.sparse_initializer}
    deps: list[set[int]] = []
    for i, node in enumerate(nodes):
        d = set()
        for name in _node_reads(node):
            j = producer.get(name)
            if j is not None:
                if j != i:
                    d.add(j)
            elif name not in given and name not in outer:
                where = f" in {path}" if path else ""
                raise ValueError(f"node {_label(node, i)}{where} reads '{name}', which no node, graph input or "
                                 "initializer provides")
        deps.append(d)
    if all(j < i for i, d in enumerate(deps) for j in d):
        order = nodes
    else:
        users: list[list[int]] = [[] for _ in nodes]
        for i, d in enumerate(deps):
            for j in d:
                users[j].append(i)
        waiting = [len(d) for d in deps]
        heap = [i for i, w in enumerate(waiting) if w == 0]
        heapq.heapify(heap)
        done: list[int] = []
        while heap:
            i = heapq.heappop(heap)
            done.append(i)
            for u in users[i]:
                waiting[u] -= 1
                if waiting[u] == 0:
                    heapq.heappush(heap, u)
        if len(done) < len(nodes):
            stuck = [_label(nodes[i], i) for i in range(len(nodes)) if waiting[i]][:3]
            where = f" in {path}" if path else ""
            raise ValueError(f"the nodes{where} form a cycle (through {', '.join(stuck)})")
        order = [nodes[i] for i in done]
        moved = sum(1 for k, i in enumerate(done) if k != i)
        notes.append(f"nodes of {path or 'the main graph'} were not in topological order: sorted on load "
                     f"({moved} of {len(nodes)} moved)")
        copies = [onnx.NodeProto() for _ in order]
        for c, n in zip(copies, order):
            c.CopyFrom(n)
        del g.node[:]
        g.node.extend(copies)
        order = list(g.node)
    _sort_subgraphs(g, outer, path, notes)


def _sort_subgraphs(g: onnx.GraphProto, outer: set[str], path: str, notes: list[str]) -> None:
    subgraph_nodes = [n for n in g.node if n.op_type in SUBGRAPH_OPS or n.domain not in ("", "ai.onnx")]
    if not subgraph_nodes:
        return
    scope = outer | {vi.name for vi in g.input} | {t.name for t in g.initializer} \
        | {s.values.name for s in g.sparse_initializer} | {o for n in g.node for o in n.output if o}
    for node in subgraph_nodes:
        for attr in node.attribute:
            subs = ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs)
            for k, sub in enumerate(subs):
                suffix = f"{attr.name}[{k}]" if attr.type != onnx.AttributeProto.GRAPH else attr.name
                _sort_graph(sub, scope, f"{path}/{node.name or node.op_type}.{suffix}", notes)


def _check_external(model: onnx.ModelProto, base_dir: str) -> None:
    """Every external tensor's file exists inside the model's folder and holds its range; small
    ones are read in."""
    weights = ir.Weights(base_dir)
    root = os.path.realpath(base_dir)
    sizes: dict[str, int] = {}
    for fp in model.functions:
        _external_elsewhere(fp)
    for g in all_graphs(model.graph):
        _external_elsewhere(g)
        for t in g.initializer:
            if ir.is_header(t):
                _check_range(t, base_dir, root, sizes)
                if math.prod(t.dims) <= KEEP_ELEMENTS:
                    data = weights.raw_bytes(t)
                    t.data_location = onnx.TensorProto.DEFAULT
                    del t.external_data[:]
                    t.raw_data = data


_TENSOR_ATTR_OPS = frozenset({"Constant", "ConstantOfShape"})


def _external_elsewhere(g: onnx.GraphProto | onnx.FunctionProto) -> None:
    """Raise when a tensor of ``g`` other than an initializer (a Constant node's value, a tensor
    attribute, a sparse tensor) keeps its data in an external file: only initializers' data is
    read from and written to data files here."""
    external = onnx.TensorProto.EXTERNAL
    for sparse in getattr(g, "sparse_initializer", ()):   # (a function body has none)
        if external in (sparse.values.data_location, sparse.indices.data_location):
            raise ValueError(f"sparse initializer '{sparse.values.name}' keeps its data in an external file; "
                             "only initializers' data can be external here")
    for node in g.node:
        if node.op_type not in _TENSOR_ATTR_OPS and node.domain in ("", "ai.onnx"):
            continue   # no other standard op has a tensor attribute
        for a in node.attribute:
            tensors = [a.t] if a.type == onnx.AttributeProto.TENSOR else list(a.tensors)
            tensors += [s.values for s in ([a.sparse_tensor] if a.type == onnx.AttributeProto.SPARSE_TENSOR
                                           else a.sparse_tensors)]
            if any(t.data_location == external for t in tensors):
                raise ValueError(f"attribute '{a.name}' of {node.op_type} node '{node.name or node.output[0]}' "
                                 "keeps its data in an external file; only initializers' data can be external here")


def _check_range(t: onnx.TensorProto, base_dir: str, root: str, sizes: dict[str, int]) -> None:
    info = ir.external_info(t)
    location = info.get("location", "")
    if not location or os.path.isabs(location):
        raise ValueError(f"tensor '{t.name}' has external data location '{location}'")
    path = os.path.realpath(os.path.join(base_dir, location))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"tensor '{t.name}': external data '{location}' is outside the model's folder")
    if path not in sizes:
        if not os.path.isfile(path):
            what = "not found" if not os.path.exists(path) else "is a folder" if os.path.isdir(path) else f"is {NOT_REGULAR}"
            raise ValueError(f"tensor '{t.name}': external data file '{location}' {what}")
        sizes[path] = os.path.getsize(path)
    try:
        offset = int(info.get("offset", 0))
        length = ir.external_length(t, info, offset, lambda: sizes[path])
    except ValueError:
        raise ValueError(f"tensor '{t.name}': external data offset or length is not a number "
                         f"({info.get('offset')!r}, {info.get('length')!r})") from None
    expected = _nbytes(t)
    if offset < 0 or length < 0:
        raise ValueError(f"tensor '{t.name}': external data '{location}' has a negative offset or length "
                         f"(offset {offset}, length {length})")
    if offset + length > sizes[path] or (expected and length < expected):
        raise ValueError(f"tensor '{t.name}': external data '{location}' is too short "
                         f"(offset {offset}, length {length}, file {sizes[path]} bytes)")


def check(model: onnx.ModelProto, full: bool = False) -> None:
    """onnx.checker on a model of any size. Large weights are checked as graph inputs of their
    type and shape: the checker then never copies their bytes (a BERT-base model checks in
    milliseconds instead of seconds, a model over 2 GB at all)."""
    light = weightless(model, as_inputs=True)
    with _c_stdout_discarded() if _checker_quiet else contextlib.nullcontext():
        onnx.checker.check_model(light, full_check=full)


# onnx's checker writes "Warning: Model contains experimental ops: ATen" (any of its experimental
# ops) on the C++ standard output. In the command that output is the command's own: its lines,
# the JSON of ``inspect --format json``. ``checker_quiet`` discards it there; a library caller's
# stdout is left as it is.
_checker_quiet = False


@contextlib.contextmanager
def checker_quiet() -> Iterator[None]:
    global _checker_quiet
    before, _checker_quiet = _checker_quiet, True
    try:
        yield
    finally:
        _checker_quiet = before


@contextlib.contextmanager
def _c_stdout_discarded() -> Iterator[None]:
    """File descriptor 1 points at /dev/null meanwhile; C's buffered output is flushed before
    it is pointed back (written while a pipe was stdout, it would otherwise come out later)."""
    import ctypes   # (numpy has loaded it already)

    try:
        if sys.stdout is not None:   # (None when the command started with stdout closed)
            sys.stdout.flush()
    except (OSError, ValueError):   # a broken pipe: the command's own lines are what it loses
        pass
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    try:
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)
        except (OSError, TypeError, AttributeError):   # no C library to name this way (Windows)
            pass
        os.dup2(saved, 1)
        os.close(saved)


def passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        check(model, full=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, RuntimeError, ValueError):
        return False
    return True


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def byte_size(model: onnx.ModelProto) -> int:
    """About ``model.ByteSize()``, without asking protobuf (which takes seconds on a large model
    and refuses a message of 2 GiB or more): a weight-free copy's size plus the weights' bytes."""
    try:
        light = weightless(model).ByteSize()
    except EncodeError:  # 2 GiB even without the top-level weights (huge Constant nodes)
        return PROTOBUF_LIMIT
    return light + census(model).large_bytes


def needs_external_data(model: onnx.ModelProto) -> bool:
    return byte_size(model) >= PROTOBUF_LIMIT


@dataclass
class Skeleton:
    """A rewritten model whose large weights may still be headers (see normopt.ir);
    ``weights`` says where their bytes are: the input model's tensors or its data files."""

    model: onnx.ModelProto
    weights: ir.Weights

    def materialize(self) -> onnx.ModelProto:
        """A complete, self-contained ModelProto: every weight's bytes inline."""
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        for t in _initializers(out.graph):
            if ir.is_header(t):
                t.CopyFrom(self._whole(t))
        return out

    def _whole(self, header: onnx.TensorProto) -> onnx.TensorProto:
        mem, path, offset, length = self.weights.source(header)
        if mem is not None:
            return mem.whole() if mem.__class__ is ir.ArrayTensor else mem
        return ir.with_bytes(header, ir.read_range(path, offset, length))

    def data_files(self) -> set[str]:
        """The external data files the headers read from (resolved paths)."""
        files = set()
        found = census(self.model)
        if not (found.large or found.sub_headers):
            return files  # no header anywhere: nothing to look up
        for t in _initializers(self.model.graph):
            if ir.is_header(t):
                mem, path, _o, _l = self.weights.source(t)
                if mem is None:
                    files.add(os.path.realpath(path))
        return files


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether a loaded model keeps weights in external data files (headers to a file)."""
    return census(model).external


def external_files(model: onnx.ModelProto, base_dir: str | os.PathLike) -> set[str]:
    """The external data files ``model``'s tensors refer to (real paths, against ``base_dir``)."""
    files = set()
    for t in _initializers(model.graph):
        if ir.is_header(t):
            location = ir.external_info(t).get("location")
            if location and location != ir.MEMORY:
                files.add(os.path.realpath(os.path.join(base_dir, location)))
    return files


def external_files_at(path: str | os.PathLike) -> set[str]:
    """``external_files`` of the model file at ``path`` (its structure only is read)."""
    return external_files(onnx.load(str(path), load_external_data=False), os.path.dirname(os.path.realpath(path)))


def files_referenced_beside(path: str | os.PathLike) -> tuple[set[str], list[str]]:
    """(external data files that the other ``*.onnx`` models in ``path``'s folder refer to,
    the names of those models that could not be read: they may refer to anything)."""
    folder = Path(path).parent
    found: set[str] = set()
    unreadable: list[str] = []
    me = os.path.realpath(path)
    for other in sorted(folder.glob("*.onnx")):
        if os.path.realpath(other) == me or not other.is_file():
            continue
        try:
            found |= external_files(onnx.load(str(other), load_external_data=False), str(folder))
        except Exception:  # noqa: BLE001  (not a model we can read: keep what it might use)
            unreadable.append(other.name)
    return found, unreadable


def as_skeleton(model) -> Skeleton:
    return model if isinstance(model, Skeleton) else Skeleton(model, ir.Weights())


def unopenable_name(path: str | os.PathLike) -> str | None:
    """Why onnxruntime cannot open ``path`` by its name (its binding takes UTF-8 paths only; a
    name's undecodable bytes are held as surrogates in a str, ``os.fsdecode``); None if it can."""
    name = os.fspath(path)
    try:
        if isinstance(name, bytes):
            name.decode("utf-8")
        else:
            name.encode("utf-8")
    except UnicodeError:
        shown = os.fsdecode(name).encode("utf-8", "backslashreplace").decode()
        return f"onnxruntime cannot open '{shown}': the file name is not valid UTF-8"
    return None


# What a path that ``special_file`` finds is, in the messages that refuse it.
NOT_REGULAR = "not a regular file (a device, FIFO or socket)"


def special_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` (links followed) is a device, FIFO or socket: a file renamed over it would
    take its place (a model written to /dev/null would replace the device)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def switch_into_place(model_src: Path, dest: Path, data: tuple[Path, Path] | None = None) -> None:
    """Rename a written model to ``dest``, and its data file first (``data``: written file, its
    place), as one switch: the model's rename is the switch. An old data file in that place is
    moved aside (into ``model_src``'s folder, which the caller removes) rather than overwritten;
    when anything stops the switch before the model's rename (an error, an interrupt), it is put
    back and a new one removed, so the model already there keeps its own data. SIGINT and
    SIGTERM wait until the switch is done. Raises what the renames raise."""
    with signals.deferred():
        moved = placed = None
        try:
            if data is not None:
                src, target = data
                if os.path.islink(target) or os.path.isfile(target):   # (a folder there fails the rename)
                    moved = model_src.with_name(f".replaced-{target.name}")
                    os.replace(target, moved)
                os.replace(src, target)
                placed = target
            os.replace(model_src, dest)
        except BaseException:
            try:
                if placed is not None:
                    os.unlink(placed)
                if moved is not None:
                    os.replace(moved, data[1])
            except OSError:
                pass
            raise


def save(model: onnx.ModelProto | Skeleton, path: str | os.PathLike, external_data: bool | None = None,
         ) -> list[Path]:
    """Write ``model`` atomically to ``path``; returns the files written.

    ``external_data=None`` keeps the input's layout: weights go to ``<name>.data`` beside the
    model when the input had external data or protobuf's 2 GB limit demands it, else one file;
    True forces ``<name>.data``. Tensors under EXTERNAL_MIN_BYTES stay in the model file.
    Weights that no pass rewrote are streamed from where they are (the input's data files or
    tensors) to the output, one tensor at a time: nothing holds a second copy of the model.
    """
    skel = as_skeleton(model)
    dest = Path(path)
    if dest.is_dir():
        raise ModelSaveError(f"cannot write '{dest}': is a directory")
    if special_file(dest):
        raise ModelSaveError(f"cannot write '{dest}': it is {NOT_REGULAR}")
    if not dest.parent.exists():
        raise ModelSaveError(f"cannot write '{dest}': folder '{dest.parent}' does not exist")
    sources = skel.data_files()
    if external_data is None:
        external_data = bool(sources) or needs_external_data(skel.model)
    data_name = dest.name + ".data"
    if external_data and special_file(dest.parent / data_name):
        raise ModelSaveError(f"cannot write '{dest.parent / data_name}': it is {NOT_REGULAR}")
    if external_data and os.path.realpath(dest.parent / data_name) in sources:
        raise ModelSaveError(f"cannot write '{dest}': its data file '{data_name}' is the input's own data file; "
                             "choose another output name")
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".normopt-", dir=dest.parent))
    except OSError as err:  # a folder we may not write to (permissions, read-only file system)
        raise ModelSaveError(f"cannot write '{dest}': {err.strerror or err}") from err
    try:
        tmp_model = tmpdir / dest.name
        data = None
        if external_data:
            _write_external(skel, tmp_model, tmpdir / data_name, data_name)
            if (tmpdir / data_name).exists():
                os.chmod(tmpdir / data_name, tmp_model.stat().st_mode & 0o777)
                data = (tmpdir / data_name, dest.parent / data_name)
        else:
            _write_single(skel, tmp_model)
        switch_into_place(tmp_model, dest, data)
        written = [dest] + ([data[1]] if data else [])
    except OSError as err:
        raise ModelSaveError(f"cannot write '{dest}': {err.strerror or err}") from err
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        forget_census()  # written: the cache keeps no reference to the caller's model
    return written


# Tensors of at least this many bytes start at a multiple of ALIGN in the data file (onnxruntime
# can then map them instead of copying).
ALIGN_MIN_BYTES = 1 << 20
ALIGN = 4096
_CHUNK = 16 << 20


def _shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its main graph's initializers (the large part of a model)."""
    out = ir.model_fields(model)
    graph = model.graph
    g = out.graph
    for key in ("name", "doc_string"):
        if graph.HasField(key):
            setattr(g, key, getattr(graph, key))
    for part in ("node", "sparse_initializer", "input", "output", "value_info", "quantization_annotation",
                 "metadata_props"):
        getattr(g, part).extend(getattr(graph, part))
    return out


def _write_external(skel: Skeleton, model_path: Path, data_path: Path, data_name: str) -> None:
    out = _shell(skel.model)
    copied: dict[tuple[str, int, int], int] = {}  # a range of an input data file -> where it went
    with open(data_path, "wb") as f:
        def write_tensor(t: onnx.TensorProto) -> onnx.TensorProto | None:
            """The tensor as stored in the output model: a header into the data file, or None to keep it."""
            if ir.is_header(t):
                mem, path, offset, length = skel.weights.source(t)
                if mem is None:
                    # Tensors that share their bytes in the input (tied weights) share them in the output.
                    start = copied.get((path, offset, length))
                    if start is None:
                        start = copied[(path, offset, length)] = _pad(f, length)
                        _copy_range(path, offset, length, f)
                    return ir.header(t, data_name, start, length)
                t_bytes = skel.weights.raw_bytes(t)   # in memory: a TensorProto's or an array's bytes
            elif t.data_type != onnx.TensorProto.STRING and _nbytes(t) >= EXTERNAL_MIN_BYTES:
                t_bytes = skel.weights.raw_bytes(t)
            else:
                return None
            start = _pad(f, len(t_bytes))
            f.write(t_bytes)
            return ir.header(t, data_name, start, len(t_bytes))

        for t in skel.model.graph.initializer:  # one at a time: no second copy of the weights
            stored = write_tensor(t)
            out.graph.initializer.append(t if stored is None else stored)
            del stored
        for g in (list(all_graphs(out.graph))[1:] if census(skel.model).subgraphs else []):  # subgraph weights (rare)
            for i, t in enumerate(g.initializer):
                stored = write_tensor(t)
                if stored is not None:
                    g.initializer[i].CopyFrom(stored)
        empty = f.tell() == 0
    if empty:
        data_path.unlink()
    model_path.write_bytes(serialize(out))


def _pad(f, size: int) -> int:
    pos = f.tell()
    align = ALIGN if size >= ALIGN_MIN_BYTES else 64
    start = -(-pos // align) * align
    if start > pos:
        f.write(b"\0" * (start - pos))
    return start


def _copy_range(path: str, offset: int, length: int, dst) -> None:
    """Copy ``length`` bytes at ``offset`` of ``path`` to the end of ``dst``, in bounded chunks
    (in the kernel where it can)."""
    dst.flush()
    with open(path, "rb") as src:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < length:
                    n = os.copy_file_range(src.fileno(), dst.fileno(), min(_CHUNK, length - done),
                                           offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError:
                pass
        dst.seek(0, os.SEEK_END)
        src.seek(offset + done)
        while done < length:
            chunk = src.read(min(_CHUNK, length - done))
            if not chunk:
                raise OSError(f"external data file '{path}' ends early")
            dst.write(chunk)
            done += len(chunk)


def _write_single(skel: Skeleton, model_path: Path) -> None:
    """One file. The main graph's initializers are written one at a time after the rest of the
    model, each as its own ``graph { initializer }`` record: protobuf merges repeated occurrences
    of a message field, so readers see one graph with the initializers in their order."""
    out = _shell(skel.model)
    for g in (list(all_graphs(out.graph))[1:] if census(skel.model).subgraphs else []):  # subgraph weights (rare)
        for t in g.initializer:
            if ir.is_header(t):
                t.CopyFrom(skel._whole(t))
    with open(model_path, "wb") as f:
        f.write(serialize(out))
        for t in skel.model.graph.initializer:
            held = skel.weights.source(t)[0] if ir.is_header(t) else None
            if held.__class__ is ir.ArrayTensor and held.proto.name == t.name:
                # Its fields (dims, type, name: numbers 1, 2, 8) then raw_data (9), as the
                # deterministic encoding orders them; the bytes go from the array to the file.
                tail = held.raw()
                head = held.proto.SerializeToString(deterministic=True) + _key(9) + _varint(len(tail))
            else:
                whole = skel._whole(t) if ir.is_header(t) else t
                head = whole.SerializeToString(deterministic=True) if whole.name == t.name else _renamed(whole, t.name)
                tail = b""
            size = len(head) + len(tail)
            inner = _key(5) + _varint(size)
            f.write(_key(7) + _varint(len(inner) + size) + inner)
            f.write(head)
            f.write(tail)
            del head, tail, held


def _renamed(t: onnx.TensorProto, name: str) -> bytes:  # pragma: no cover - passes never rename
    copy = onnx.TensorProto()
    copy.CopyFrom(t)
    copy.name = name
    return copy.SerializeToString(deterministic=True)


def _key(field_number: int) -> bytes:
    return _varint(field_number << 3 | 2)  # wire type 2: length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# Default-domain ops with graph attributes; any op of another domain may have them too.
SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it (If/Loop/Scan bodies), depth first. Only nodes that
    can hold a subgraph have their attributes read."""
    yield graph
    for node in graph.node:
        if node.op_type not in SUBGRAPH_OPS and node.domain in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                yield from all_graphs(sub)


def _initializers(graph: onnx.GraphProto):
    for g in all_graphs(graph):
        yield from g.initializer


@dataclass(frozen=True)
class Census:
    """What the whole-model helpers ask of a model, from one walk over it: whether any graph
    holds a subgraph, whether the main graph has initializers too large to copy cheaply (and
    their bytes), whether a subgraph's initializer is a header, whether any weight lives in an
    external data file, and how many nodes there are."""

    subgraphs: bool
    large: bool
    large_bytes: int
    sub_headers: bool
    external: bool
    nodes: int


# id(model) -> (model, fingerprint, Census). A model is walked once however many helpers ask
# (loading, inference, checking and saving a 110,000-node model asked a dozen times). The entry
# holds the model itself, so its id cannot be reused while cached; the fingerprint (node,
# initializer and function counts) notices a model that was changed in place since.
_CENSUS: dict[int, tuple] = {}
_CENSUS_KEEP = 4


def census(model: onnx.ModelProto) -> Census:
    g = model.graph
    fingerprint = (len(g.node), len(g.initializer), len(g.sparse_initializer), len(model.functions))
    hit = _CENSUS.get(id(model))
    if hit is not None and hit[0] is model and hit[1] == fingerprint:
        return hit[2]
    graphs = list(all_graphs(g))
    large = external = sub_headers = False
    large_bytes = 0
    header, string, keep = onnx.TensorProto.EXTERNAL, onnx.TensorProto.STRING, KEEP_ELEMENTS
    for t in g.initializer:
        if t.data_location == header:
            large = True
            large_bytes += _nbytes(t)
            external = external or ir.external_info(t).get("location") != ir.MEMORY
        elif t.data_type != string and math.prod(t.dims) > keep:
            large = True
            large_bytes += _nbytes(t)
    for sub in graphs[1:]:
        for t in sub.initializer:
            if t.data_location == header:
                sub_headers = True
                external = external or ir.external_info(t).get("location") != ir.MEMORY
    found = Census(len(graphs) > 1, large, large_bytes, sub_headers, external,
                   sum(len(x.node) for x in graphs) + sum(len(f.node) for f in model.functions))
    if len(_CENSUS) >= _CENSUS_KEEP:
        del _CENSUS[next(iter(_CENSUS))]
    _CENSUS[id(model)] = (model, fingerprint, found)
    return found


def forget_census() -> None:
    """Drop the cached census entries (and with them the references to their models)."""
    _CENSUS.clear()


def model_graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """``all_graphs(model.graph)`` as a list; no walk over the nodes when the census knows there
    is no subgraph."""
    return list(all_graphs(model.graph)) if census(model).subgraphs else [model.graph]


# Initializers up to this many elements count as small (counted from dims: asking protobuf for
# a tensor's size or bytes would copy it).
KEEP_ELEMENTS = 1024


def without_weights(model: onnx.ModelProto, keep_elements: int = KEEP_ELEMENTS, as_inputs: bool = False,
                    ) -> onnx.ModelProto:
    """A light copy for inference and checking: large top-level initializers lose their bytes.

    They become tensors of the same name, type and dims marked as external data (shape
    inference reads those), or with ``as_inputs`` graph inputs of that type and shape (the
    checker reads those). Small ones (Reshape shapes, axes) stay whole so that inference can
    read their values.
    """
    light = onnx.ModelProto()
    for key in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        if model.HasField(key):
            setattr(light, key, getattr(model, key))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g, src = light.graph, model.graph
    g.name = src.name
    for part in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(g, part).extend(getattr(src, part))
    for sub in list(all_graphs(g))[1:]:
        for t in sub.initializer:
            if ir.is_header(t):  # a subgraph's weight whose bytes are elsewhere: zeros stand in
                t.CopyFrom(ir.with_bytes(t, bytes(_nbytes(t))))
    inputs = {vi.name for vi in src.input}
    for init in src.initializer:
        if not _large(init, keep_elements):
            g.initializer.append(init)
        elif not as_inputs:
            g.initializer.append(ir.header(init, "weights.bin", 0, _nbytes(init)))
        elif init.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def weightless(model: onnx.ModelProto, as_inputs: bool = False) -> onnx.ModelProto:
    """``without_weights(model)`` for a reader that changes nothing: ``model`` itself when it
    has nothing to strip (no large top-level initializer, no subgraph tensor whose bytes are
    elsewhere), so a graph of small tensors is not copied once more."""
    found = census(model)
    if found.large or found.sub_headers:
        return without_weights(model, as_inputs=as_inputs)
    return model


def _large(init: onnx.TensorProto, keep_elements: int = KEEP_ELEMENTS) -> bool:
    if init.data_location == onnx.TensorProto.EXTERNAL:
        return True  # a header: its bytes are elsewhere
    return math.prod(init.dims) > keep_elements and init.data_type != onnx.TensorProto.STRING


def _nbytes(init: onnx.TensorProto) -> int:
    """``ir.stored_bytes``; 8 bytes per element for a type of unknown size (counted as large)."""
    found = ir.stored_bytes(init)
    return math.prod(init.dims) * 8 if found is None else found


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."

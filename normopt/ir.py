"""ONNX <-> graphsurgeon, at a cost that follows the rewrites rather than the model.

graphsurgeon's own importer and exporter touch every attribute, tensor type and weight of the
model (and copy each weight twice on export). Here:

* import builds the same graphsurgeon objects (passes see ``gs.Node``, ``gs.Variable``,
  ``gs.Constant``) but reads a node's attributes and a tensor's declared type only when a pass
  asks for them, and never decodes a weight until a pass reads its values;
* export reuses the source ``NodeProto`` of every node no pass touched and the source
  ``TensorProto`` of every initializer, so untouched nodes keep their encoding, doc strings and
  metadata exactly; large in-memory weights are not copied at all: the exported skeleton holds
  a small header in their place, resolved by the writer (``model_io.save``) or by
  ``Skeleton.materialize``;
* dead nodes are dropped, replacement nodes take their anchor's place in the node order, and the
  graph is re-sorted only when that order is not topological: once per run, not per pass;
* model-local function bodies are imported as graphs too (``functions``); a body no pass
  changed is exported as its source FunctionProto, a changed one with the constants its
  rewrites made as Constant nodes (a function has no initializers).
"""
from __future__ import annotations

import functools
import heapq
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter, get_onnx_tensor_dtype
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER
from onnx_graphsurgeon.util.misc import SynchronizedList

# An in-memory initializer with more bytes than this leaves the exported skeleton: a header
# stands in for it until the model is written (smaller ones are cheaper to copy).
HEADER_MIN_BYTES = 64 * 1024
# The location of a header whose bytes are an in-memory tensor (offset = its index).
MEMORY = "<normopt-memory>"

_GRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
_INPUT_MARK = "_normopt_graph_input"


# ----------------------------------------------------------------------------- weights

class ArrayTensor:
    """A tensor a rewrite made, kept as its array: ``proto`` has its name, type and dims and no
    values. The bytes go from the array straight to the output file (``raw``); a complete
    TensorProto is built only where one is asked for (``whole``)."""

    __slots__ = ("proto", "array")

    def __init__(self, proto: onnx.TensorProto, array: np.ndarray):
        self.proto, self.array = proto, array

    def raw(self) -> memoryview:
        """The values' little-endian bytes, without a copy (the array is C-contiguous)."""
        return memoryview(self.array).cast("B")

    def whole(self) -> onnx.TensorProto:
        return with_bytes(self.proto, self.array.tobytes())


@dataclass
class Weights:
    """Where the bytes of headers live: the input's folder (its external data files) and the
    in-memory tensors that the exported skeleton refers to by index."""

    base_dir: str = ""
    memory: list[onnx.TensorProto | ArrayTensor] = field(default_factory=list)
    _index: dict[int, int] = field(default_factory=dict)

    def header_for(self, tensor: onnx.TensorProto, array: np.ndarray | None = None) -> onnx.TensorProto:
        """A bytes-free stand-in for an in-memory tensor (same name, type and dims); with
        ``array``, ``tensor`` has no values of its own and the array holds them."""
        key = id(tensor)
        if key not in self._index:
            self._index[key] = len(self.memory)
            self.memory.append(tensor if array is None else ArrayTensor(tensor, array))
        return header(tensor, MEMORY, self._index[key], 0)

    def source(self, tensor: onnx.TensorProto) -> tuple[onnx.TensorProto | ArrayTensor | None, str | None, int, int]:
        """(in-memory tensor, None, 0, 0) or (None, file path, offset, length) for a header."""
        info = external_info(tensor)
        location = info.get("location", "")
        offset = int(info.get("offset", 0))
        if location == MEMORY:
            return self.memory[offset], None, 0, 0
        path = os.path.join(self.base_dir, location)
        return None, path, offset, external_length(tensor, info, offset, lambda: os.path.getsize(path))

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The values of ``tensor`` (inline, in memory, or in an external data file)."""
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return decode(tensor)
        mem, path, offset, length = self.source(tensor)
        if mem is not None:
            return mem.array if mem.__class__ is ArrayTensor else self.array(mem)
        return decode(with_bytes(tensor, read_range(path, offset, length)))

    def raw_bytes(self, tensor: onnx.TensorProto) -> bytes | memoryview:
        """The raw little-endian bytes of a tensor's values, wherever they live."""
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            mem, path, offset, length = self.source(tensor)
            if mem is not None:
                return mem.raw() if mem.__class__ is ArrayTensor else self.raw_bytes(mem)
            return read_range(path, offset, length)
        if tensor.HasField("raw_data"):
            return tensor.raw_data
        return encode(decode(tensor)).raw_data


# Element types whose raw bytes are exactly a little-endian numpy array of this dtype (no packing,
# no conversion): decoded and encoded here directly, as numpy_helper would, without its
# per-call type lookups (a pass reads tens of thousands of small parameters on a large model).
_PLAIN = {code: np.dtype(dt) for code, dt in (
    (onnx.TensorProto.FLOAT, np.float32), (onnx.TensorProto.FLOAT16, np.float16), (onnx.TensorProto.DOUBLE, np.float64),
    (onnx.TensorProto.INT8, np.int8), (onnx.TensorProto.UINT8, np.uint8), (onnx.TensorProto.INT16, np.int16),
    (onnx.TensorProto.UINT16, np.uint16), (onnx.TensorProto.INT32, np.int32), (onnx.TensorProto.UINT32, np.uint32),
    (onnx.TensorProto.INT64, np.int64), (onnx.TensorProto.UINT64, np.uint64), (onnx.TensorProto.BOOL, np.bool_))}
_PLAIN_CODES = {dt: code for code, dt in _PLAIN.items()}
_LITTLE_ENDIAN = sys.byteorder == "little"


def decode(tensor: onnx.TensorProto) -> np.ndarray:
    """``numpy_helper.to_array`` of an inline tensor (read-only for raw bytes, as there)."""
    dtype = _PLAIN.get(tensor.data_type)
    if dtype is not None and _LITTLE_ENDIAN and tensor.HasField("raw_data") and not tensor.HasField("segment"):
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tensor.dims)
    return numpy_helper.to_array(tensor)


def encode(values: np.ndarray, name: str = "") -> onnx.TensorProto:
    """``numpy_helper.from_array(values, name)``: the same bytes."""
    code = _PLAIN_CODES.get(values.dtype)
    if code is None or not _LITTLE_ENDIAN:
        return numpy_helper.from_array(values, name)
    tensor = _typed(values, name, code)
    tensor.raw_data = values.tobytes()
    return tensor


def _typed(values: np.ndarray, name: str, code: int) -> onnx.TensorProto:
    """A TensorProto with the name, type and dims of ``values`` and no values yet."""
    tensor = onnx.TensorProto()
    tensor.dims.extend(values.shape)
    if name:
        tensor.name = name
    tensor.data_type = code
    return tensor


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def header(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name, t.data_type = tensor.name, tensor.data_type
    t.dims.extend(tensor.dims)
    if tensor.doc_string:
        t.doc_string = tensor.doc_string
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def with_bytes(tensor: onnx.TensorProto, data: bytes) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name, t.data_type = tensor.name, tensor.data_type
    t.dims.extend(tensor.dims)
    if tensor.doc_string:
        t.doc_string = tensor.doc_string
    t.raw_data = data
    return t


def read_range(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"external data file '{path}' ends before offset {offset} + length {length}")
    return data


def is_header(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


# ----------------------------------------------------------------------------- lazy gs objects

_DTYPES: dict[int, object] = {}


def _dtype(data_type: int):
    """graphsurgeon's dtype for an ONNX element type (numpy dtype, or the enum where numpy has none)."""
    if data_type not in _DTYPES:
        probe = onnx.TensorProto()
        probe.data_type = data_type
        try:
            with G_LOGGER.suppress(G_LOGGER.ERROR):   # its warning that numpy has no such type (bfloat16)
                _DTYPES[data_type] = get_onnx_tensor_dtype(probe)
        except Exception:  # an element type graphsurgeon does not know
            _DTYPES[data_type] = data_type
    return _DTYPES[data_type]


class ProtoValues(LazyValues):
    """The values of an initializer, decoded only when read, never cached into the Constant (so
    export still finds the source tensor). Small arrays are kept once decoded."""

    CACHE_BYTES = 1 << 20

    _array = None
    held = False   # the values are ``_array`` alone: ``tensor`` has none (``new_constant``)

    def __init__(self, tensor: onnx.TensorProto, weights: Weights):  # noqa: D107 - no LazyValues init: it decodes types eagerly
        self.tensor = tensor
        self.weights = weights

    # Read from the proto on first use: most constants of a large graph are never asked.
    @functools.cached_property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.dims)

    @functools.cached_property
    def dtype(self):
        return _dtype(self.tensor.data_type)

    @property
    def nbytes(self) -> int:
        size = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type).itemsize \
            if self.tensor.data_type in _NP_SIZES else 1
        return int(np.prod(self.shape, dtype=np.int64)) * size

    def load(self) -> np.ndarray:
        if self._array is not None:
            return self._array
        array = self.weights.array(self.tensor)
        if array.nbytes <= self.CACHE_BYTES:
            self._array = array
        return array


# Default-domain ops with graph attributes; an op of another domain may have them too.
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_NP_SIZES = {t for t in onnx.helper.get_all_tensor_dtypes()
             if t not in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED)}


def constant_array(tensor: gs.Constant) -> np.ndarray:
    """A Constant's values without replacing its lazy source (graphsurgeon's ``.values`` would)."""
    values = tensor._values
    if isinstance(values, LazyValues) and not isinstance(values, ProtoValues):
        return np.asarray(values.load())
    if isinstance(values, ProtoValues):
        return values.load()
    return np.asarray(values)


# Attribute types read here directly, as graphsurgeon's importer reads them.
class EmptyList(list):
    """An attribute's empty list (a Constant's ``value_ints=[]``, the shape of a scalar), which
    remembers its attribute type: onnx cannot tell the type of ``[]`` when it is written back."""

    __slots__ = ("attr_type",)

    def __init__(self, attr_type: int):
        super().__init__()
        self.attr_type = attr_type


def _listed(values, attr_type: int) -> list:
    return list(values) or EmptyList(attr_type)


_PLAIN_ATTRS = {
    onnx.AttributeProto.FLOAT: lambda a: a.f,
    onnx.AttributeProto.INT: lambda a: a.i,
    onnx.AttributeProto.STRING: lambda a: a.s.decode(),
    onnx.AttributeProto.FLOATS: lambda a: _listed(a.floats, a.type),
    onnx.AttributeProto.INTS: lambda a: _listed(a.ints, a.type),
}


def import_attributes(protos) -> OrderedDict:
    """``OnnxImporter.import_attributes`` for attributes of a node: numbers and strings are read
    directly (most nodes have nothing else); any other type, or a reference to a function's
    attribute, goes through graphsurgeon's importer. The types graphsurgeon drops (a Constant's
    ``sparse_value``, type protos) are kept whole as ``OpaqueAttr``."""
    opaque = [attr for attr in protos if attr.type in _OPAQUE_ATTRS and not attr.ref_attr_name]
    if opaque:
        protos = [attr for attr in protos if attr.type not in _OPAQUE_ATTRS or attr.ref_attr_name]
    out = OrderedDict()
    for attr in protos:
        read = _PLAIN_ATTRS.get(attr.type)
        if read is None or attr.ref_attr_name:
            out = OnnxImporter.import_attributes(protos, {}, {}, None, None)
            for a in protos:   # an empty list keeps its type (graphsurgeon's importer gives [])
                if isinstance(out.get(a.name), list) and not out[a.name] and not a.ref_attr_name:
                    out[a.name] = EmptyList(a.type)
            break
        out[attr.name] = read(attr)
    for attr in opaque:
        out[attr.name] = OpaqueAttr(attr)
    return out


SPARSE_MARK = "_sparse"   # on the tensor of a sparse initializer

_OPAQUE_ATTRS = (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS,
                 onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS)


class OpaqueAttr:
    """An attribute no pass reads (a sparse tensor, a type): written back as it came."""

    def __init__(self, proto: onnx.AttributeProto):
        self.proto = proto

    def __repr__(self) -> str:
        return f"OpaqueAttr({self.proto.name})"


class ProtoNode(gs.Node):
    """A node imported from a NodeProto: its attributes are decoded on first access. A node whose
    attributes were never read and whose inputs and outputs are unchanged is exported as its
    source proto."""

    @property
    def attrs(self):
        d = self.__dict__
        attrs = d.get("_attrs")
        if attrs is None:
            attrs = d["_attrs"] = import_attributes(d["_proto"].attribute)
            if "_function" in d:
                attrs = d["_attrs"] = _guard_refs(self, attrs)
        return attrs

    @attrs.setter
    def attrs(self, value):
        self.__dict__["_attrs"] = value


class ProtoVariable(gs.Variable):
    """A Variable whose declared type (value_info, graph input/output) is decoded on first access."""

    def _decode(self) -> None:
        d = self.__dict__
        vi = d.pop("_vi", None)
        dtype = shape = None
        kind = "tensor_type"
        if vi is not None:
            t = vi.type
            which = t.WhichOneof("value")
            if which == "tensor_type":
                tt = t.tensor_type
                if tt.elem_type:
                    dtype = _dtype(tt.elem_type)
                if tt.HasField("shape"):
                    shape = [dim.dim_param if dim.HasField("dim_param") else dim.dim_value if dim.HasField("dim_value")
                             else None for dim in tt.shape.dim]
            elif which is not None:  # sequences, maps, optionals: graphsurgeon's own reading
                probe = OnnxImporter.import_tensor(vi)
                dtype, shape, kind = probe.dtype, probe.shape, probe.type
        d.setdefault("_dtype", dtype)
        d.setdefault("_shape", shape)
        d.setdefault("_type", kind)

    def _get(self, key):
        d = self.__dict__
        if key not in d:
            self._decode()
        return d[key]

    dtype = property(lambda self: self._get("_dtype"), lambda self, v: self.__dict__.__setitem__("_dtype", v))
    shape = property(lambda self: self._get("_shape"), lambda self, v: self.__dict__.__setitem__("_shape", v))
    type = property(lambda self: self._get("_type"), lambda self, v: self.__dict__.__setitem__("_type", v))


_new_list = SynchronizedList.__new__


def _sync_list(parent, field_name: str, items: list) -> SynchronizedList:
    """graphsurgeon's SynchronizedList, built without its per-element Python overrides."""
    sl = _new_list(SynchronizedList)
    d = sl.__dict__
    d["parent_obj"], d["field_name"] = parent, field_name
    if items:
        list.extend(sl, items)
        for item in items:
            list.append(item.__dict__[field_name], parent)
    return sl


def _new_tensor(cls, name: str):
    t = object.__new__(cls)
    d = t.__dict__
    d["name"] = name
    d["inputs"] = _sync_list(t, "outputs", ())
    d["outputs"] = _sync_list(t, "inputs", ())
    return t


_UNTYPED = {"_dtype": None, "_shape": None, "_type": "tensor_type"}


def _variable(name: str, vi: onnx.ValueInfoProto | None = None) -> ProtoVariable:
    v = _new_tensor(ProtoVariable, name)
    if vi is not None:
        v.__dict__["_vi"] = vi
    else:
        v.__dict__.update(_UNTYPED)
    return v


_IN_MEMORY = Weights()


def new_constant(name: str, values: np.ndarray) -> gs.Constant:
    """A Constant held as a TensorProto (encoded once), exported like a source initializer. A
    large one (a folded weight) keeps its array instead, unchanged and uncopied (the caller
    hands it over): its bytes are written from the array when the model is saved."""
    code = _PLAIN_CODES.get(values.dtype)
    if code is not None and _LITTLE_ENDIAN and values.nbytes >= HEADER_MIN_BYTES and values.flags.c_contiguous:
        const = _constant(_typed(values, name, code), _IN_MEMORY)
        held = values.view()
        held.flags.writeable = False
        const._values._array, const._values.held = held, True
        return const
    try:
        tensor = encode(values, name)
    except Exception:  # noqa: BLE001 - a dtype onnx cannot encode here: graphsurgeon's way
        return gs.Constant(name, values)
    const = _constant(tensor, _IN_MEMORY)
    const._values._array = values if values.nbytes <= ProtoValues.CACHE_BYTES else None
    return const


class ProtoConstant(gs.Constant):
    """A Constant imported from (or encoded as) a TensorProto: its data location is read from
    the proto when asked, as graphsurgeon's importer would have set it."""

    @property
    def data_location(self):
        d = self.__dict__
        if "_data_location" not in d:
            tensor = getattr(d["_values"], "tensor", None)   # values set since: an in-memory array
            d["_data_location"] = int(tensor.data_location) \
                if tensor is not None and tensor.HasField("data_location") else None
        return d["_data_location"]

    @data_location.setter
    def data_location(self, value):
        self.__dict__["_data_location"] = value


def _constant(tensor: onnx.TensorProto, weights: Weights) -> gs.Constant:
    c = _new_tensor(ProtoConstant, tensor.name)
    d = c.__dict__
    d["_values"] = ProtoValues(tensor, weights)
    d["_export_dtype"] = None   # an instance attribute: graphsurgeon's to_variable() deletes it
    return c


# ----------------------------------------------------------------------------- import

def import_model(model: onnx.ModelProto, weights: Weights) -> gs.Graph:
    """The model's main graph (and subgraphs) as graphsurgeon objects, lazily decoded."""
    opset = next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), None)
    legacy = model.ir_version < LISTED_INITIALIZERS_IR
    domains = list(model.opset_import)
    g = _import_graph(model.graph, {}, weights, opset, domains, legacy=legacy)
    if model.functions:
        g.__dict__["_local_functions"] = [_import_function(fp, weights, opset, domains) for fp in model.functions]
    return g


# Below this IR version the format requires every initializer to be listed as a graph input:
# the listing makes it a constant, not an input. From it on, a listed initializer is a default
# value that callers may override.
LISTED_INITIALIZERS_IR = 4


def _import_graph(gp: onnx.GraphProto, outer: dict, weights: Weights, opset, domains, legacy: bool = False,
                  function: str | None = None) -> gs.Graph:
    local: dict[str, gs.Tensor] = {}
    for init in gp.initializer:
        local[init.name] = _constant(init, weights)
    for sparse in gp.sparse_initializer:
        # Opaque to the passes (a value no pass reads: graphsurgeon's import of a sparse tensor
        # is not its dense values), and written back as it came (``export_graph``).
        local[sparse.values.name] = _variable(sparse.values.name)
        local[sparse.values.name].__dict__[SPARSE_MARK] = True
    for vi in gp.value_info:
        if vi.name not in local:
            local[vi.name] = _variable(vi.name, vi)
    inputs = []
    constants = {init.name for init in gp.initializer} if legacy else set()
    for vi in gp.input:
        if vi.name in constants:
            continue  # listed because the IR version requires it: a constant
        t = local.get(vi.name)
        if t is None:
            t = local[vi.name] = _variable(vi.name, vi)
        elif isinstance(t, ProtoVariable) and "_vi" in t.__dict__:
            t.__dict__["_vi"] = vi  # the interface's declaration wins over value_info
        t.__dict__[_INPUT_MARK] = True
        inputs.append(t)
    outputs = []
    for vi in gp.output:
        t = local.get(vi.name)
        if t is None:
            t = local[vi.name] = _variable(vi.name, vi)
        outputs.append(t)

    def get(name: str, outer_ok: bool = True) -> gs.Tensor:
        t = local.get(name)
        if t is None and outer_ok:
            t = outer.get(name)
        if t is None:
            if not name:
                return _variable("")  # an omitted optional input or output
            t = local[name] = _variable(name)
        return t

    nodes = _import_nodes(gp.node, get, lambda: {**outer, **local}, weights, opset, domains, function)
    names = set(local)   # every tensor name the graph declares or its nodes use (outer ones: there)
    names.update(node.name for node in nodes)

    g = object.__new__(gs.Graph)
    g.__dict__.update(nodes=nodes, inputs=inputs, outputs=outputs, name=gp.name, __name__=gp.name,
                      doc_string=gp.doc_string, opset=opset, producer_name="", producer_version="",
                      import_domains=domains, ir_version=None, name_idx=0, _functions=[], _src=gp,
                      _names=names)
    if legacy:
        g.__dict__["_listed_initializers"] = True
    return g


# Binary ops whose opsets 1-6 broadcast B into A from an ``axis`` attribute (opset 7 removed
# it): such a node is marked LEGACY_AXIS at import, and ``graph.in_default_domain`` refuses it.
LEGACY_BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Greater", "Less"})
LEGACY_AXIS = "_legacy_axis"


def _import_nodes(protos, get, scope, weights: Weights, opset, domains, function: str | None) -> list[gs.Node]:
    """The nodes of a graph or function body; ``scope()`` is what their subgraphs may read.
    In a function body (``function``: its label) each node remembers where it is, so that an
    attribute referring to the function's attributes can say so when read."""
    nodes = []
    legacy = opset is None or opset < 7
    for np_ in protos:
        node = object.__new__(ProtoNode)
        d = node.__dict__
        d["op"], d["name"] = np_.op_type, np_.name
        d["domain"] = np_.domain if np_.HasField("domain") else None
        d["_proto"] = np_
        if legacy and np_.op_type in LEGACY_BROADCAST and any(a.name == "axis" for a in np_.attribute):
            d[LEGACY_AXIS] = True
        if function is not None:
            d["_function"] = function
        if (np_.op_type in _SUBGRAPH_OPS or np_.domain not in ("", "ai.onnx")) \
                and any(a.type in _GRAPH_ATTRS for a in np_.attribute):
            d["_attrs"] = _import_graph_attrs(np_, scope(), weights, opset, domains, function)
            if function is not None:
                d["_attrs"] = _guard_refs(node, d["_attrs"])
            d["_has_graphs"] = True
        d["inputs"] = _sync_list(node, "outputs", [get(n) for n in np_.input])
        d["outputs"] = _sync_list(node, "inputs", [get(n, outer_ok=False) for n in np_.output])
        nodes.append(node)
    return nodes


def _import_graph_attrs(np_: onnx.NodeProto, scope: dict, weights: Weights, opset, domains,
                        function: str | None = None) -> OrderedDict:
    plain = [a for a in np_.attribute if a.type not in _GRAPH_ATTRS]
    attrs = import_attributes(plain)
    out = OrderedDict()
    for a in np_.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out[a.name] = _import_graph(a.g, scope, weights, opset, domains, function=function)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out[a.name] = [_import_graph(sub, scope, weights, opset, domains, function=function) for sub in a.graphs]
        elif a.name in attrs:
            out[a.name] = attrs[a.name]
    return out


# ----------------------------------------------------------------------------- model-local functions

FUNCTION = "function"


def function_label(domain: str, name: str, overload: str = "") -> str:
    """How records name a model-local function (its graph path): ``function domain:name``
    (``function domain:name:overload`` for an overload)."""
    return f"{FUNCTION} {domain}:{name}" + (f":{overload}" if overload else "")


def is_function_path(path: str) -> bool:
    return path.startswith(FUNCTION + " ")


class UnknownAttribute(Exception):
    """A pass read an attribute that refers to an attribute of the enclosing function: its
    value is given per call, not known in the body."""


def _refused(self, *args, **kwargs):
    raise UnknownAttribute(self.why)


class RefAttr(gs.Node.AttributeRef):
    """An attribute of a function-body node that refers to an attribute of the function
    (``ref_attr_name``). Any use of its value (number, comparison, truth, iteration) raises
    UnknownAttribute: a pass cannot mistake it for a value, nor for an absent attribute."""

    def __init__(self, ref: gs.Node.AttributeRef, why: str, proto: onnx.AttributeProto):
        super().__init__(ref.name, ref.type)
        self.why = why
        self.proto = proto

    __float__ = __int__ = __index__ = __bool__ = __len__ = __iter__ = __getitem__ = __array__ = _refused
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __neg__ = __abs__ = _refused
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refused
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"RefAttr(@{self.name})"


def _guard_refs(node: gs.Node, attrs) -> OrderedDict:
    d = node.__dict__
    if not any(isinstance(v, gs.Node.AttributeRef) for v in attrs.values()):
        return attrs
    label = d["name"] or f"{d['op']}({d['_proto'].output[0] if d['_proto'].output else '?'})"
    protos = {a.name: a for a in d["_proto"].attribute}
    out = OrderedDict()
    for key, value in attrs.items():
        if isinstance(value, gs.Node.AttributeRef) and not isinstance(value, RefAttr):
            value = RefAttr(value, f"attribute '{key}' of {label} refers to attribute '{value.name}' of "
                                   f"{d['_function']}: its value is given per call", protos[key])
        out[key] = value
    return out


def ref_attrs(node: gs.Node) -> list[tuple[str, str]]:
    """(attribute, function attribute it refers to) for a function-body node; [] elsewhere."""
    proto = node.__dict__.get("_proto")
    if proto is None or "_function" not in node.__dict__:
        return []
    return [(a.name, a.ref_attr_name) for a in proto.attribute if a.ref_attr_name]


def _import_function(fp: onnx.FunctionProto, weights: Weights, model_opset, domains) -> gs.Graph:
    """A function body as a graph: its inputs and outputs as the graph's, no initializers
    (constants are Constant nodes), its own opset (``opset``: its default-domain import)."""
    label = function_label(fp.domain, fp.name, fp.overload)
    local: dict[str, gs.Tensor] = {}
    inputs = []
    for name in fp.input:
        t = local.get(name)
        if t is None:
            t = local[name] = _variable(name)
        t.__dict__[_INPUT_MARK] = True
        t.__dict__[_FUNCTION_INPUT] = label
        inputs.append(t)

    def get(name: str, outer_ok: bool = True) -> gs.Tensor:
        t = local.get(name)
        if t is None:
            if not name:
                return _variable("")
            t = local[name] = _variable(name)
        return t

    opset = next((imp.version for imp in fp.opset_import if imp.domain in ("", "ai.onnx")), model_opset)
    nodes = _import_nodes(fp.node, get, lambda: dict(local), weights, opset, domains, label)
    outputs = [get(name) for name in fp.output]
    g = object.__new__(gs.Graph)
    g.__dict__.update(nodes=nodes, inputs=inputs, outputs=outputs, name=fp.name, __name__=fp.name,
                      doc_string=fp.doc_string, opset=opset, producer_name="", producer_version="",
                      import_domains=list(fp.opset_import), ir_version=None, name_idx=0, _functions=[],
                      _function_src=fp, _function_label=label)
    return g


_FUNCTION_INPUT = "_normopt_function_input"


def function_of_input(tensor: gs.Tensor) -> str | None:
    """The label of the function whose input ``tensor`` is, else None."""
    return tensor.__dict__.get(_FUNCTION_INPUT)


def release(root: gs.Graph) -> None:
    """Break the node <-> tensor reference cycles of a graph that is no longer used (every
    subgraph and function body too), so that reference counting frees it at once: left to the
    cyclic collector, the objects of a 100,000-node graph stay allocated until a full collection
    traverses them all."""
    graphs = [g for _path, g in iter_graphs(root)]
    for fn in functions(root):
        graphs += [g for _path, g in iter_graphs(fn)]
    for g in graphs:
        for node in g.nodes:
            d = node.__dict__
            for key in ("inputs", "outputs"):
                for t in d.get(key) or ():
                    t.__dict__["inputs"] = t.__dict__["outputs"] = None
                d[key] = None
        for t in list(g.inputs) + list(g.outputs):
            t.__dict__["inputs"] = t.__dict__["outputs"] = None
        g.__dict__["nodes"] = []
        g.__dict__.pop("_op_index", None)   # the passes' index of nodes by op (normopt.pipeline)


def functions(root: gs.Graph) -> list[gs.Graph]:
    """The model-local function bodies imported with ``root`` (none for most models)."""
    return root.__dict__.get("_local_functions", [])


def function_opset(g: gs.Graph) -> int | None:
    """A function body's default-domain opset; None for a graph."""
    return g.opset if "_function_src" in g.__dict__ else None


def set_function_opset(g: gs.Graph, version: int) -> None:
    g.opset = version
    g.__dict__["_rewritten"] = True


def iter_graphs(graph: gs.Graph, path: str = "", label=None) -> Iterator[tuple[str, gs.Graph]]:
    """The graph and every subgraph (If/Loop/Scan bodies), each with a readable path; only nodes
    that hold subgraphs have their attributes read."""
    yield path, graph
    holders = graph.__dict__.get("_holders")
    if holders is None:
        # Found once per graph: only imported nodes hold subgraphs (rewrites emit none), and
        # none of those is ever rewritten.
        holders = [node for node in graph.nodes
                   if "_proto" not in node.__dict__ or node.__dict__.get("_has_graphs")]
        graph.__dict__["_holders"] = holders
    for node in holders:
        for key, value in sorted(node.attrs.items()):
            subs = value if isinstance(value, (list, tuple)) else [value]
            for i, sub in enumerate(subs):
                if isinstance(sub, gs.Graph):
                    suffix = f"{key}[{i}]" if len(subs) > 1 else key
                    name = label(node) if label else node.name
                    yield from iter_graphs(sub, f"{path}/{name}.{suffix}", label)


def all_names(graph: gs.Graph, imported: bool = False) -> set[str]:
    """Every tensor and node name in the graph and its subgraphs (from the source protos where
    the graph was imported, so nothing is decoded). With ``imported``, a graph just imported
    and not yet changed gives the names its import collected instead of being walked again
    (once: they are dropped as they are read)."""
    names: set[str] = set()
    graphs = list(iter_graphs(graph))
    for fn in functions(graph):  # names there are local, but fresh ones stay unique everywhere
        graphs += iter_graphs(fn)
    for _path, g in graphs:
        collected = g.__dict__.pop("_names", None)
        if imported and collected is not None:
            names |= collected
            continue
        src = g.__dict__.get("_src")
        if src is not None:
            names.update(t.name for t in src.initializer)
            names.update(v.name for v in src.input)
            names.update(v.name for v in src.output)
            names.update(v.name for v in src.value_info)
        for node in g.nodes:
            if node.name:
                names.add(node.name)
            names.update(t.name for t in node.inputs)
            names.update(t.name for t in node.outputs)
    names.discard("")
    return names


# ----------------------------------------------------------------------------- finishing

def place(graph: gs.Graph, anchor: gs.Node, new_nodes: list[gs.Node]) -> None:
    """Record that ``new_nodes`` replace ``anchor``: they take its place in the node order."""
    slots = graph.__dict__.setdefault("_slots", {})
    slots[id(anchor)] = new_nodes
    graph.__dict__.setdefault("_placed", set()).update(id(n) for n in new_nodes)


_SIDES = {"outputs": "inputs", "inputs": "outputs"}


def detach(node: gs.Node, fields: tuple[str, ...] = ("outputs", "inputs")) -> None:
    """Take ``node`` off its tensors' producer (``outputs``) and consumer (``inputs``) lists and
    empty those lists of its own, as graphsurgeon's ``clear()`` does, matching by identity:
    its list.remove compares with ``==``, which for nodes compares names, attributes and
    tensors one by one."""
    for own in fields:
        side = _SIDES[own]
        mine = node.__dict__[own]
        for t in mine:
            theirs = t.__dict__[side]
            for i, other in enumerate(theirs):
                if other is node:
                    list.__delitem__(theirs, i)
                    break
        list.clear(mine)


def detach_dead_producers(tensors, graph: gs.Graph, local: set[int] | None = None) -> None:
    """Detach the producers that only fed a rewritten subgraph (Constant nodes, shape chains),
    so that they no longer count as consumers of their inputs. Local: walks up from ``tensors``;
    ``local`` (ids of the graph's nodes, None for the main graph) keeps it inside this graph."""
    outputs = {id(t) for t in graph.outputs}
    stack = list(tensors)
    while stack:
        t = stack.pop()
        if t.outputs or id(t) in outputs or not t.inputs:
            continue
        node = t.inputs[0]
        if (local is not None and id(node) not in local) or node.__dict__.get("_has_graphs") or any(o.outputs or id(o) in outputs for o in node.outputs):
            continue
        ins = list(node.inputs)
        detach(node)
        stack.extend(ins)


def finish(graph: gs.Graph) -> None:
    """Replacement nodes at their anchors' places, dead nodes dropped, the order topological;
    the same for every subgraph. Costs one walk over the nodes."""
    for _path, g in list(iter_graphs(graph)):
        _finish_one(g)
    for fn in functions(graph):
        for _path, g in list(iter_graphs(fn)):
            _finish_one(g)


def _finish_one(g: gs.Graph) -> None:
    slots = g.__dict__.pop("_slots", {})
    placed = g.__dict__.pop("_placed", set())
    if not slots and not placed and not g.__dict__.pop("_dirty", False):
        return
    order: list[gs.Node] = []

    def emit(node):
        reps = slots.get(id(node))
        if reps is not None:
            for r in reps:
                emit(r)
        elif node.outputs:
            order.append(node)

    for node in g.nodes:
        if id(node) not in placed:
            emit(node)
    order = _live(order, g)
    if not _is_sorted(order):
        order = _toposort(order)
    g.nodes = order


def _live(nodes: list[gs.Node], g: gs.Graph) -> list[gs.Node]:
    """``nodes`` without those whose outputs nothing live uses (graph outputs are live)."""
    users: dict[int, int] = {}
    reads = [_reads(node) for node in nodes]
    for rs in reads:
        for t in rs:
            users[id(t)] = users.get(id(t), 0) + 1
    for t in g.outputs:
        users[id(t)] = users.get(id(t), 0) + 1
    alive = [True] * len(nodes)
    producer = {id(t): i for i, node in enumerate(nodes) for t in node.outputs}
    stack = [i for i, node in enumerate(nodes) if not any(users.get(id(t)) for t in node.outputs)]
    while stack:
        i = stack.pop()
        if not alive[i]:
            continue
        alive[i] = False
        for t in reads[i]:
            users[id(t)] -= 1
            j = producer.get(id(t))
            if users[id(t)] == 0 and j is not None and alive[j] \
                    and not any(users.get(id(o)) for o in nodes[j].outputs):
                stack.append(j)
    return [n for n, keep in zip(nodes, alive) if keep]


def _reads(node: gs.Node) -> list[gs.Tensor]:
    """The tensors a node reads, its subgraphs' reads of enclosing-scope tensors included."""
    reads = [t for t in node.inputs if t.name]
    if node.__dict__.get("_has_graphs") or "_proto" not in node.__dict__:
        for sub in _subgraphs(node):
            reads += _outer_reads(sub)
    return reads


def _subgraphs(node: gs.Node) -> list[gs.Graph]:
    subs = []
    for value in node.attrs.values():
        for sub in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(sub, gs.Graph):
                subs.append(sub)
    return subs


def _declared(g: gs.Graph) -> set[int]:
    """The source initializers a graph declares (by identity of their TensorProto)."""
    src = g.__dict__.get("_src")
    return {id(init) for init in src.initializer} if src is not None else set()


def _local_constant(t: gs.Constant, declared: set[int]) -> bool:
    """A constant declared by this graph: one of its source initializers, or a new constant
    (passes create them in the graph that reads them)."""
    values = t._values
    return not isinstance(values, ProtoValues) or values.weights is _IN_MEMORY or id(values.tensor) in declared


def _outer_reads(sub: gs.Graph) -> list[gs.Tensor]:
    own = {id(t) for n in sub.nodes for t in n.outputs} | {id(t) for t in sub.inputs}
    declared = _declared(sub)
    out = []
    for n in sub.nodes:
        for t in _reads(n):
            if id(t) in own or (isinstance(t, gs.Constant) and _local_constant(t, declared)):
                continue
            out.append(t)
    return out


def _is_sorted(nodes: list[gs.Node]) -> bool:
    position = {id(t): i for i, n in enumerate(nodes) for t in n.outputs}
    for i, node in enumerate(nodes):
        for t in _reads(node):
            j = position.get(id(t))
            if j is not None and j >= i:
                return False
    return True


def _toposort(nodes: list[gs.Node]) -> list[gs.Node]:
    """Kahn's algorithm, ties broken by the current order (stable and deterministic). A cycle
    keeps its nodes in their current order at the end."""
    position = {id(t): i for i, n in enumerate(nodes) for t in n.outputs}
    deps = [set() for _ in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for t in _reads(node):
            j = position.get(id(t))
            if j is not None and j != i and j not in deps[i]:
                deps[i].add(j)
                users[j].append(i)
    waiting = [len(d) for d in deps]
    heap = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(heap)
    out, done = [], [False] * len(nodes)
    while heap:
        i = heapq.heappop(heap)
        out.append(nodes[i])
        done[i] = True
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(heap, u)
    out += [n for i, n in enumerate(nodes) if not done[i]]
    return out


# ----------------------------------------------------------------------------- export

def export_graph(g: gs.Graph, weights: Weights, main: bool = True,
                 into: onnx.GraphProto | None = None) -> onnx.GraphProto:
    """``g`` as a GraphProto: source protos for untouched nodes and initializers, headers for
    large in-memory weights of the main graph (a subgraph's stay whole: they are rare, and the
    checker could not read headers there). Constants declared by an enclosing graph stay there."""
    header_ok = main
    src: onnx.GraphProto | None = g.__dict__.get("_src")
    gp = onnx.GraphProto() if into is None else into   # ``into``: an empty message to fill
    gp.name = g.name or (src.name if src is not None else "")
    doc = src.doc_string if src is not None else g.doc_string
    if doc:
        gp.doc_string = doc
    gp.node.extend([_export_node(n, weights) for n in g.nodes])

    declared = _declared(g)
    used: dict[int, gs.Constant] = {}
    for t in [t for n in g.nodes for t in _reads(n)] + list(g.inputs) + list(g.outputs):
        if isinstance(t, gs.Constant) and _local_constant(t, declared) \
                and not isinstance(t._values, gs.ir.tensor.SparseValues):
            used.setdefault(id(t), t)
    by_source = {id(c._values.tensor): c for c in used.values()
                 if isinstance(c._values, ProtoValues) and c._values.weights is not _IN_MEMORY}
    inits = []
    if src is not None:  # source initializers first, in source order, while something reads them
        inits += [_export_tensor(by_source[id(init)], weights, header_ok) for init in src.initializer
                  if id(init) in by_source]
    inits += [_export_tensor(c, weights, header_ok) for c in used.values()
              if not isinstance(c._values, ProtoValues) or c._values.weights is _IN_MEMORY]
    gp.initializer.extend(inits)

    if src is not None:
        gp.sparse_initializer.extend(src.sparse_initializer)
        gp.input.extend(src.input)
        gp.output.extend(src.output)
        alive = {t.name for n in g.nodes for t in n.outputs} | {c.name for c in used.values()}
        gp.value_info.extend(vi for vi in src.value_info if vi.name in alive)
        known = {vi.name for vi in src.value_info} | {vi.name for vi in src.input} | {vi.name for vi in src.output}
    else:  # pragma: no cover - every graph comes from an import
        gp.input.extend(OnnxExporter.export_value_info_proto(t, False) for t in g.inputs)
        gp.output.extend(OnnxExporter.export_value_info_proto(t, False) for t in g.outputs)
        known = {t.name for t in g.inputs} | {t.name for t in g.outputs}
    for node in g.nodes:  # value_info of tensors that rewrites created
        if "_proto" in node.__dict__:
            continue
        for t in node.outputs:
            if t.name and t.name not in known and isinstance(t, gs.Variable) \
                    and (t.dtype is not None or t.shape is not None):
                gp.value_info.append(OnnxExporter.export_value_info_proto(t, False))
                known.add(t.name)
    return gp


def _export_tensor(c: gs.Constant, weights: Weights, header_ok: bool = True) -> onnx.TensorProto:
    values = c._values
    if isinstance(values, ProtoValues):
        tensor = values.tensor
        if values.held:   # a folded weight: a header to its array, or (in a subgraph) whole
            if header_ok and tensor.name == c.name:
                return weights.header_for(tensor, values._array)
            return encode(values._array, c.name)
        if tensor.name != c.name:  # pragma: no cover - passes never rename tensors
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = c.name
            return copy
        if header_ok and not is_header(tensor) and _inline_bytes(tensor) >= HEADER_MIN_BYTES:
            return weights.header_for(tensor)
        return tensor
    return OnnxExporter.export_tensor_proto(c)


def _inline_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of an inline tensor's values, from its dims (``len(raw_data)`` would copy them)."""
    data_type = tensor.data_type
    if data_type in _NP_SIZES:
        size = itemsize(data_type)
        return HEADER_MIN_BYTES if size is None else math.prod(tensor.dims) * size
    return 0


# Element types packed several to a byte: bits per element.
_PACKED_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in (
    ("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(onnx.TensorProto, name)}


def stored_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's values take in raw form (packed types rounded up to a byte): what its
    raw data or external range holds, and the length of that range when the model leaves
    ``length`` out. None when the element type's size is not known here."""
    count = math.prod(tensor.dims)
    bits = _PACKED_BITS.get(tensor.data_type)
    if bits is not None:
        return (count * bits + 7) // 8
    size = itemsize(tensor.data_type)
    return None if size is None else count * size


def external_length(tensor: onnx.TensorProto, info: dict[str, str], offset: int, file_size) -> int:
    """Bytes of an external tensor's range: its ``length`` entry; without one (the entry is
    optional), the tensor's own byte size, as onnxruntime reads it; for an element type whose
    size is not known here, the rest of the file (``file_size()``). A ``length`` that is not a
    number raises ValueError."""
    if "length" in info:
        return int(info["length"])
    found = stored_bytes(tensor)
    return file_size() - offset if found is None else found


@functools.lru_cache(maxsize=None)
def itemsize(data_type: int) -> int | None:
    """Bytes per element of an ONNX element type; None for a packed or exotic one."""
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except Exception:  # noqa: BLE001 - a packed or exotic type: None counts it as large
        return None


def _empty_list_type(value: list, key: str, src: onnx.NodeProto | None) -> int:
    """The attribute type of an empty list: remembered at import (``EmptyList``), else the source
    node's attribute of that name; a list no model gave (a pass's own ``[]``) is INTS."""
    if isinstance(value, EmptyList):
        return value.attr_type
    found = next((a.type for a in src.attribute if a.name == key), None) if src is not None else None
    return found if found is not None else onnx.AttributeProto.INTS


def node_proto(node: gs.Node) -> onnx.NodeProto:
    """The node as a NodeProto (its source proto when untouched); subgraphs are not exported."""
    return _export_node(node, Weights())


def _export_node(node: gs.Node, weights: Weights) -> onnx.NodeProto:
    d = node.__dict__
    src = d.get("_proto")
    if src is not None and "_attrs" not in d and node.op == src.op_type and node.name == src.name \
            and (node.domain or "") == src.domain \
            and len(node.inputs) == len(src.input) and len(node.outputs) == len(src.output) \
            and all(t.name == n for t, n in zip(node.inputs, src.input)) \
            and all(t.name == n for t, n in zip(node.outputs, src.output)):
        return src
    proto = onnx.NodeProto()
    proto.op_type = node.op
    if node.name:
        proto.name = node.name
    if node.domain is not None:
        proto.domain = node.domain
    proto.input.extend(t.name for t in node.inputs)
    proto.output.extend(t.name for t in node.outputs)
    for key, value in node.attrs.items():
        if isinstance(value, (RefAttr, OpaqueAttr)):
            proto.attribute.append(value.proto)
        elif isinstance(value, gs.Graph) or (isinstance(value, list) and value and isinstance(value[0], gs.Graph)):
            attr = onnx.AttributeProto()
            attr.name = key
            if isinstance(value, gs.Graph):
                attr.type = onnx.AttributeProto.GRAPH
                attr.g.CopyFrom(export_graph(value, weights, main=False))
            else:
                attr.type = onnx.AttributeProto.GRAPHS
                attr.graphs.extend(export_graph(v, weights, main=False) for v in value)
            proto.attribute.append(attr)
        elif isinstance(value, gs.Constant) and isinstance(value._values, ProtoValues):
            attr = onnx.AttributeProto()   # a Constant node's value: whole, whatever its size
            attr.name, attr.type = key, onnx.AttributeProto.TENSOR
            attr.t.CopyFrom(_export_tensor(value, weights, header_ok=False))
            proto.attribute.append(attr)
        elif isinstance(value, list) and not value:
            proto.attribute.append(onnx.helper.make_attribute(key, [], attr_type=_empty_list_type(value, key, src)))
        else:
            proto.attribute.extend(OnnxExporter.export_attributes({key: value}))
    if src is not None:
        if src.HasField("doc_string"):
            proto.doc_string = src.doc_string
        proto.metadata_props.extend(src.metadata_props)
    return proto


def model_fields(model: onnx.ModelProto) -> onnx.ModelProto:
    """A ModelProto with ``model``'s model-level fields and no graph."""
    out = onnx.ModelProto()
    for key in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if model.HasField(key):
            setattr(out, key, getattr(model, key))
    for part in ("opset_import", "metadata_props", "training_info", "functions"):
        getattr(out, part).extend(getattr(model, part))
    return out


def export_model(graph: gs.Graph, template: onnx.ModelProto, weights: Weights) -> onnx.ModelProto:
    """The rewritten model (a skeleton when it holds headers); model-level fields from ``template``."""
    out = model_fields(template)
    out.graph.SetInParent()
    export_graph(graph, weights, into=out.graph)   # filled in place: no copy of a large graph
    fns = functions(graph)
    if fns:
        del out.functions[:]
        out.functions.extend(_export_function(fn, weights) for fn in fns)
    if graph.__dict__.get("_listed_initializers"):
        src = graph.__dict__["_src"]
        _list_initializers(out.graph, {t.name for t in src.initializer}, out.ir_version < LISTED_INITIALIZERS_IR)
    return out


def _export_function(fn: gs.Graph, weights: Weights) -> onnx.FunctionProto:
    """A function body as a FunctionProto: its source proto when no pass changed it; else the
    source's interface, attributes and metadata with the body's nodes. A function holds no
    initializers: each constant a rewrite made becomes a Constant node at the top of the body."""
    src: onnx.FunctionProto = fn.__dict__["_function_src"]
    if not any(g.__dict__.get("_rewritten") for _path, g in iter_graphs(fn)):
        return src
    fp = onnx.FunctionProto()
    fp.name, fp.domain = src.name, src.domain
    if src.overload:
        fp.overload = src.overload
    if src.doc_string:
        fp.doc_string = src.doc_string
    fp.input.extend(src.input)
    fp.output.extend(src.output)
    fp.attribute.extend(src.attribute)
    fp.attribute_proto.extend(src.attribute_proto)
    has_default = False
    for imp in src.opset_import:
        entry = fp.opset_import.add()
        entry.CopyFrom(imp)
        if imp.domain in ("", "ai.onnx"):
            entry.version, has_default = fn.opset, True
    if not has_default:
        fp.opset_import.add().version = fn.opset
    used: dict[int, gs.Constant] = {}
    for node in fn.nodes:
        for t in _reads(node):
            if isinstance(t, gs.Constant):
                used.setdefault(id(t), t)
    for c in used.values():
        node = fp.node.add()
        node.op_type = "Constant"
        node.output.append(c.name)
        attr = node.attribute.add()
        attr.name, attr.type = "value", onnx.AttributeProto.TENSOR
        attr.t.CopyFrom(_export_tensor(c, weights, header_ok=False))
    fp.node.extend(_export_node(n, weights) for n in fn.nodes)
    alive = {t.name for n in fn.nodes for t in n.outputs} | set(src.input)
    fp.value_info.extend(vi for vi in src.value_info if vi.name in alive)
    fp.metadata_props.extend(src.metadata_props)
    return fp


def _list_initializers(gp: onnx.GraphProto, source_inits: set[str], listed: bool) -> None:
    """The graph inputs of a model whose initializers were constants listed as inputs (IR < 4):
    every initializer listed, in order, when the output's IR version still requires it; none
    when it does not (a listed initializer would become an input that callers may override)."""
    inits = {t.name: t for t in gp.initializer}
    declared = {vi.name: vi for vi in gp.input}
    inputs = [vi for vi in gp.input if vi.name not in inits and vi.name not in source_inits]
    if listed:
        for t in gp.initializer:
            vi = declared.get(t.name) or onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            inputs.append(vi)
    del gp.input[:]
    gp.input.extend(inputs)

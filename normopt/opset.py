"""Raise a model's default-domain opset, at a cost linear in its size.

onnx's version converter is exact but its cost grows faster than the graph: 0.5 s for 11,000
nodes, 10-13 s for 110,000. Its adapters act on one node at a time, though. So on a large graph,
each distinct node form (op, attributes with their values, input and output counts) of an op
that changed between the two opsets is probed, all forms in one conversion of a graph holding
one node of each (a call costs 10-15 ms whatever its size). A form of an op whose every step in
between is one of the converter's no-op adapters (``compatible``: most changes from opset 13 to
17) is not probed at all. A form the converter leaves unchanged is only relabelled; each node of
a form that changes (ReduceMean's axes attribute becoming an input, say) is spliced back from a
conversion made once per form and input types (its tensors renamed to placeholders). Graphs
with subgraphs or local functions, and any form whose one-node conversion fails or needs an
input type that is not declared, go through the whole-graph converter. The result is verified
like every rewrite.
"""
from __future__ import annotations

import onnx
from onnx import helper, version_converter

DEFAULT_DOMAINS = ("", "ai.onnx")
# Below this many nodes the whole-graph converter is fast enough and is used as is.
NODEWISE_MIN_NODES = 5000


def convert(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` (weight-free: headers for large tensors) at default-domain opset ``target``."""
    if len(model.graph.node) >= NODEWISE_MIN_NODES:
        done = _nodewise(model, target)
        if done is not None:
            return done
    return version_converter.convert_version(model, target)


def _opset(model: onnx.ModelProto) -> int:
    return next((imp.version for imp in model.opset_import if imp.domain in DEFAULT_DOMAINS), 1)


def _nodewise(model: onnx.ModelProto, target: int) -> onnx.ModelProto | None:
    graph = model.graph
    if model.functions or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                              for n in graph.node for a in n.attribute):
        return None
    source = _opset(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(graph.input) + list(graph.value_info)
             if vi.type.HasField("tensor_type")}
    types.update((t.name, t.data_type) for t in graph.initializer)
    used = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    used.update(name for n in graph.node for name in list(n.input) + list(n.output))
    used.update(n.name for n in graph.node if n.name)
    changed = changed_ops({n.op_type for n in graph.node if n.domain in DEFAULT_DOMAINS}, source, target)
    keys = [_form(node) if node.domain in DEFAULT_DOMAINS and node.op_type in changed else None for node in graph.node]
    forms = _one_of_each(zip(graph.node, keys))
    same = _unchanged_forms(forms, source, target, types)
    if same is None:
        return None
    cache: dict[tuple, onnx.ModelProto | None] = {}
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    for node, key in zip(graph.node, keys):
        if key is None or same[key]:
            nodes.append(node)
            continue
        converted = _converted(node, source, target, types, cache)
        if converted is None:
            return None
        renames = _fresh_names(converted.graph, node, used)
        for n in converted.graph.node:
            n.input[:] = [renames.get(x, x) for x in n.input]
            n.output[:] = [renames.get(x, x) for x in n.output]
            if n.name in renames:
                n.name = renames[n.name]
            nodes.append(n)
        for t in converted.graph.initializer:
            t.name = renames.get(t.name, t.name)
            inits.append(t)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    for imp in out.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            imp.version = target
    return out


def _convert_one(node: onnx.NodeProto, source: int, target: int, types: dict[str, int],
                 require_types: bool) -> onnx.ModelProto | None:
    inputs = []
    for name in dict.fromkeys(n for n in node.input if n):
        elem = types.get(name)
        if elem is None:
            if require_types:
                return None
            elem = onnx.TensorProto.FLOAT
        inputs.append(helper.make_tensor_value_info(name, elem, None))
    outputs = [helper.make_empty_tensor_value_info(n) for n in node.output if n]
    g = helper.make_graph([node], "node", inputs, outputs)
    tiny = helper.make_model(g, opset_imports=[helper.make_opsetid("", source)], ir_version=7)
    try:
        return version_converter.convert_version(tiny, target)
    except Exception:  # the converter raises many types: the whole graph goes through it instead
        return None


def _form(node: onnx.NodeProto) -> tuple:
    """A node's form: nodes alike in op, attributes (values included) and arity convert alike.
    Values count: an adapter may act on one (Softmax's axis -1 stays as it is from opset 12 to
    13, axis 1 does not; GridSample's mode 'bilinear' is renamed at 20)."""
    return (node.op_type, tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute)),
            len(node.input), len(node.output))


def _one_of_each(keyed) -> dict:
    """form -> the first node of it, from (node, form or None) pairs."""
    forms: dict = {}
    for node, key in keyed:
        if key is not None:
            forms.setdefault(key, node)
    return forms


def _unchanged_forms(forms: dict, source: int, target: int, types: dict[str, int]) -> dict | None:
    """For each node form (key -> one node of it), whether onnx's converter leaves the node as it
    is from opset ``source`` to ``target``. A form of an op whose every step in between is one of
    the converter's no-op adapters (``compatible``) is not converted at all. The others go
    through one conversion (each adapter acts on its own node; a call costs 10-15 ms whatever the
    graph's size). When that fails, each form is converted on its own, and None means one of
    them fails alone too."""
    same: dict = {key: True for key, node in forms.items()
                  if compatible(key[0], source, target) and not _has_subgraphs(node)}
    keys = [key for key in forms if key not in same]
    if len(keys) > 1:
        batch = []
        inputs: dict[str, int] = {}
        for i, key in enumerate(keys):
            node = _bare(forms[key])
            node.name = f"form_{i}"
            node.input[:] = [f"form_{i}_{x}" if x else "" for x in forms[key].input]
            node.output[:] = [f"form_{i}_{x}" if x else "" for x in forms[key].output]
            for x, y in zip(forms[key].input, node.input):
                if x:
                    inputs[y] = types.get(x) or onnx.TensorProto.FLOAT
            batch.append(node)
        graph = helper.make_graph(batch, "forms", [helper.make_tensor_value_info(n, t, None) for n, t in inputs.items()],
                                  [helper.make_empty_tensor_value_info(o) for n in batch for o in n.output if o])
        try:
            out = version_converter.convert_version(
                helper.make_model(graph, opset_imports=[helper.make_opsetid("", source)], ir_version=7), target)
        except Exception:  # the converter raises many types: each form on its own, below
            out = None
        if out is not None:
            kept = {n.name: n for n in out.graph.node}
            same.update((key, kept.get(node.name) == node) for key, node in zip(keys, batch))
            return same
    for key in keys:
        bare = _bare(forms[key])
        probe = _convert_one(bare, source, target, types, require_types=False)
        if probe is None:
            return None
        same[key] = len(probe.graph.node) == 1 and not probe.graph.initializer and probe.graph.node[0] == bare
    return same


def _has_subgraphs(node: onnx.NodeProto) -> bool:
    """The converter converts a node's subgraphs whatever its own adapter does."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _bare(node: onnx.NodeProto) -> onnx.NodeProto:
    """A copy of ``node`` without its doc string and metadata (the exporter's stack traces):
    the converter drops them, so a node compared with its conversion would always differ, and
    no two nodes would share a conversion."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    out.ClearField("doc_string")
    del out.metadata_props[:]
    return out


def _converted(node: onnx.NodeProto, source: int, target: int, types: dict[str, int],
               cache: dict) -> onnx.ModelProto | None:
    """``_convert_one(node, ..., require_types=True)``, run once per form: what a conversion
    can depend on (the node with its tensors renamed to placeholders and no name, and its inputs'
    element types) is the key of ``cache``; the result gets the node's own names back. 600
    ReduceMeans of one kind (axes becoming an input at opset 18) cost one conversion, not 600
    of about 7 ms each."""
    inputs = list(dict.fromkeys(n for n in node.input if n))
    real = list(dict.fromkeys(inputs + [n for n in node.output if n]))
    place = {name: f"normopt_placeholder_{i}" for i, name in enumerate(real)}
    generic = _bare(node)
    generic.name = ""
    generic.input[:] = [place.get(n, n) for n in node.input]
    generic.output[:] = [place.get(n, n) for n in node.output]
    key = (generic.SerializeToString(deterministic=True), tuple(types.get(n) for n in inputs))
    if key not in cache:
        cache[key] = _convert_one(generic, source, target, {place[n]: types[n] for n in inputs if types.get(n)},
                                  require_types=True)
    found = cache[key]
    if found is None:
        return None
    back = {v: k for k, v in place.items()}
    converted = onnx.ModelProto()
    converted.CopyFrom(found)
    for n in converted.graph.node:
        n.input[:] = [back.get(x, x) for x in n.input]
        n.output[:] = [back.get(x, x) for x in n.output]
        if not n.name and n.op_type == node.op_type:
            n.name = node.name
    return converted


def _fresh_names(g: onnx.GraphProto, node: onnx.NodeProto, used: set[str]) -> dict[str, str]:
    """Unique names for the tensors and nodes the converter added around ``node``."""
    keep = set(node.input) | set(node.output)
    base = node.output[0] if node.output else node.op_type
    renames = {}
    new = [t.name for t in g.initializer] + [o for n in g.node for o in n.output] + [n.name for n in g.node if n.name]
    for name in new:
        if name in keep or name in renames or not name:
            continue
        if n_name := _unique(f"{base}_{name.strip('_')}", used):
            renames[name] = n_name
    if node.name:
        for n in g.node:
            if n.op_type == node.op_type and n.name == node.name:
                renames.pop(n.name, None)
    return renames


def _unique(base: str, used: set[str]) -> str:
    name, i = base, 1
    while name in used:
        name = f"{base}_{i}"
        i += 1
    used.add(name)
    return name


def upgrade_graph(graph, source: int, target: int, elem_type, names) -> bool:
    """Raise the opset of an imported graph (normopt.ir) in place, node by node, without the
    export / convert / import round trip. ``elem_type(tensor)`` gives an ONNX element type or
    None; ``names`` makes fresh names. Returns False, having changed nothing, when the
    whole-graph converter is needed instead (subgraphs, a form that fails on its own)."""
    import onnx_graphsurgeon as gs

    from normopt import ir

    nodes = [n for n in graph.nodes if n.outputs]
    if any(n.__dict__.get("_has_graphs") for n in nodes):
        return False
    # An op with one definition from source to target is left as it is by the converter. Nodes
    # of the others alike in op, attributes (values included) and arity convert alike: one probe
    # per form, all probes in one conversion.
    nodes = [n for n in nodes if n.domain in (None, *DEFAULT_DOMAINS)]
    changed = changed_ops({n.op for n in nodes}, source, target)
    protos = [(node, ir.node_proto(node)) for node in nodes if node.op in changed]   # each exported once
    keys = [_form(proto) for _node, proto in protos]
    same = _unchanged_forms(_one_of_each((proto, key) for (_node, proto), key in zip(protos, keys)),
                            source, target, {})
    if same is None:
        return False
    cache: dict[tuple, onnx.ModelProto | None] = {}
    plans = []
    for (node, proto), key in zip(protos, keys):
        if same[key]:
            continue
        types = {t.name: elem_type(t) for t in node.inputs if t.name}
        converted = _converted(proto, source, target, types, cache)
        if converted is None:
            return False
        plans.append((node, converted))
    for node, converted in plans:
        g = converted.graph
        renames = {}
        keep = {t.name for t in node.inputs} | {t.name for t in node.outputs}
        base = node.outputs[0].name
        for name in [t.name for t in g.initializer] + [o for n in g.node for o in n.output]:
            if name and name not in keep and name not in renames:
                renames[name] = names.fresh(f"{base}_{name.strip('_')}")
        tensors = {t.name: t for t in list(node.inputs) + list(node.outputs)}
        for t in g.initializer:
            tensors[renames[t.name]] = gs.Constant(renames[t.name], onnx.numpy_helper.to_array(t))
        outputs = list(node.outputs)
        node.outputs.clear()
        new_nodes = []
        for n in g.node:
            def get(name):
                name = renames.get(name, name)
                if not name:
                    return gs.Variable.empty()
                if name not in tensors:
                    tensors[name] = gs.Variable(name)
                return tensors[name]
            attrs = ir.import_attributes(n.attribute)
            new_nodes.append(gs.Node(n.op_type, node.name if n.op_type == node.op else names.fresh(f"{base}_{n.op_type}"),
                                     attrs, [get(x) for x in n.input], [get(x) for x in n.output],
                                     n.domain or node.domain))
        node.inputs.clear()
        if not all(any(o is t for n in new_nodes for o in n.outputs) for t in outputs):
            raise AssertionError(f"opset conversion of {node.op} lost an output")  # pragma: no cover
        graph.nodes.extend(new_nodes)
        ir.place(graph, node, new_nodes)
    return True


# Ops whose conversion by onnx's version converter changes what they compute, or leaves a model
# that does not run (every backend node test, moved to each source opset 7..22 and converted to
# 17, 18, 21 and 23, then both run in onnxruntime): (op, source opsets first..last, the target
# opset from which it applies, why, which nodes: None for every one, else a test of the attrs).
_HAZARDS = (
    ("Hardmax", 1, 12, 13, "its axis is kept, but below opset 13 it flattens the input to 2-D there",
     lambda attrs: int(attrs.get("axis", 1)) != -1),
    ("Resize", 10, 10, 11, "its coordinates become half_pixel, not opset 10's asymmetric", None),
    ("Upsample", 1, 9, 10, "it becomes a Resize whose coordinates are half_pixel, not asymmetric", None),
    ("GroupNormalization", 18, 20, 21, "its scale and bias stay per group; opset 21 reads them per channel",
     lambda attrs: int(attrs.get("num_groups", 0)) != 1),
    ("Scan", 8, 8, 9, "the batch axis is dropped from the graph's declared shapes", None),
    ("BatchNormalization", 1, 8, 9, "spatial=0 has no adapter", lambda attrs: int(attrs.get("spatial", 1)) == 0),
)
# Ops onnxruntime has no CPU kernel for at the version opset 22 gives them.
_NO_KERNEL_22 = frozenset({"Bernoulli", "GlobalLpPool", "MaxRoiPool", "Multinomial", "RandomNormal",
                           "RandomNormalLike", "RandomUniform", "RandomUniformLike", "RoiAlign"})


def upgrade_hazard(nodes, source: int, target: int) -> str | None:
    """Why raising default-domain ``nodes`` (objects with ``op``, ``domain`` and ``attrs``, as
    graphsurgeon's) from opset ``source`` to ``target`` would change the model's meaning or leave
    a model onnxruntime cannot run; None when no node is of such a kind."""
    hazards = [h for h in _HAZARDS if h[1] <= source <= h[2] and target >= h[3]]
    no_kernel = _NO_KERNEL_22 if source < 22 <= target else frozenset()
    if not hazards and not no_kernel:
        return None
    watched = {h[0] for h in hazards} | no_kernel
    for node in nodes:
        if node.op not in watched or node.domain not in (None, *DEFAULT_DOMAINS):
            continue
        if node.op in no_kernel:
            return f"at opset {target} onnxruntime has no kernel for {node.op}"
        for op, _first, _last, _bite, why, applies in hazards:
            if node.op == op and (applies is None or applies(node.attrs)):
                return f"onnx's converter changes {op} from opset {source}: {why}"
    return None


# onnx's converter walks a node up one opset at a time; where the op's definition changes it
# applies the adapter registered for that step. For these ops and opsets v, the adapter from v - 1
# to v is its CompatibleAdapter, which returns the node as it is (the new definition only widens
# types or adds optional inputs and attributes). Read from onnx/version_converter/convert.h;
# tests/test_scale.py checks it against the header of the onnx installed (an adapter registered
# twice for one step is left out).
_COMPATIBLE_STEPS: dict[str, tuple[int, ...]] = {
    "Abs": (13,), "Acos": (22,), "Acosh": (22,), "Add": (13, 14), "ArgMax": (11, 12, 13), "ArgMin": (11, 12, 13),
    "Asin": (22,), "Asinh": (22,), "Atan": (22,), "Atanh": (22,), "Attention": (24, 25),
    "AveragePool": (7, 10, 11, 19, 22), "BatchNormalization": (12, 15), "Bernoulli": (22,), "BitShift": (28,),
    "Cast": (9, 13, 19, 21, 23, 24, 25, 28), "CastLike": (19, 21, 23, 24, 25), "Ceil": (13,), "Celu": (28,),
    "Clip": (12, 13), "Compress": (11, 28), "Concat": (11, 13), "Constant": (9, 11, 12, 13, 19, 21, 23, 24, 25),
    "ConstantOfShape": (20, 21, 23, 24, 25), "Conv": (11, 22), "ConvTranspose": (11, 22), "Cos": (22,),
    "Cosh": (22,), "CumSum": (14,), "DeformConv": (22,), "DepthToSpace": (11, 13, 28),
    "DequantizeLinear": (13, 19, 21, 23, 24, 25, 28), "Det": (22,), "Div": (13, 14), "Dropout": (10, 13, 22),
    "Einsum": (28,), "Elu": (22,), "Equal": (11, 13, 19), "Erf": (13,), "Exp": (13,), "Expand": (13,),
    "EyeLike": (22,), "Flatten": (9, 11, 13, 21, 23, 24, 25), "Floor": (13,), "GRU": (22,), "Gather": (11, 13),
    "GatherElements": (13,), "GatherND": (12, 13), "Gemm": (6, 9, 11, 13), "GlobalAveragePool": (22,),
    "GlobalLpPool": (22,), "GlobalMaxPool": (22,), "Greater": (9, 13), "GreaterOrEqual": (16,), "GridSample": (22,),
    "HardSigmoid": (22,), "HardSwish": (22,), "Hardmax": (11, 13), "Identity": (13, 14, 16, 19, 21, 23, 24, 25),
    "If": (11, 13, 16, 19, 21, 23, 24, 25), "InstanceNormalization": (22,), "IsInf": (20,), "IsNaN": (13, 20),
    "LRN": (13,), "LSTM": (22,), "LeakyRelu": (16,), "Less": (9, 13), "LessOrEqual": (16,), "Log": (13,),
    "LogSoftmax": (11,), "Loop": (11, 13, 16, 19, 21, 23, 24, 25), "LpNormalization": (22,), "LpPool": (11, 22),
    "MatMul": (9, 13), "Max": (8, 12, 13), "MaxPool": (8, 10, 11, 12, 22), "MaxRoiPool": (22,),
    "MaxUnpool": (11, 22), "Mean": (8, 13), "MeanVarianceNormalization": (13,), "Min": (8, 12, 13), "Mish": (22,),
    "Mod": (13, 28), "Mul": (13, 14), "Multinomial": (22,), "Neg": (13,), "NegativeLogLikelihoodLoss": (13, 22),
    "NonMaxSuppression": (11,), "NonZero": (13,), "OneHot": (11, 28), "Optional": (28,),
    "OptionalGetElement": (18, 28), "OptionalHasElement": (18, 28), "PRelu": (7, 9, 16),
    "Pad": (13, 18, 19, 21, 23, 24, 25), "Pow": (12, 13, 15), "QLinearMatMul": (21,),
    "QuantizeLinear": (13, 19, 21, 23, 24, 25, 28), "RNN": (22,), "RandomNormal": (22,), "RandomNormalLike": (22,),
    "RandomUniform": (22,), "RandomUniformLike": (22,), "Range": (27,), "Reciprocal": (13,), "ReduceL1": (11, 13),
    "ReduceL2": (11, 13), "ReduceLogSum": (11, 13), "ReduceLogSumExp": (11, 13), "ReduceMax": (11, 12, 13, 20),
    "ReduceMean": (11, 13), "ReduceMin": (11, 12, 13, 20), "ReduceProd": (11, 13), "ReduceSum": (11,),
    "ReduceSumSquare": (11, 13), "Relu": (13, 14), "Reshape": (13, 14, 19, 21, 23, 24, 25), "Resize": (13, 18, 19),
    "ReverseSequence": (28,), "RoiAlign": (22,), "Round": (22,), "Scan": (11, 16, 19, 21, 23, 24, 25),
    "ScatterElements": (13, 16, 18), "ScatterND": (13, 16, 18), "Selu": (22,), "Shape": (13, 15, 19, 21, 23, 24, 25),
    "Sigmoid": (13,), "Sign": (13,), "Sin": (22,), "Sinh": (22,), "Size": (13, 19, 21, 23, 24, 25),
    "Slice": (11, 13), "Softmax": (11,), "SoftmaxCrossEntropyLoss": (13,), "Softplus": (22,), "Softsign": (22,),
    "SpaceToDepth": (13, 28), "Split": (11,), "SplitToSequence": (24,), "Sqrt": (13,),
    "Squeeze": (11, 21, 23, 24, 25), "Sub": (13, 14), "Sum": (8, 13), "Tan": (22,), "Tanh": (13,),
    "ThresholdedRelu": (22,), "Tile": (13,), "TopK": (11, 24), "Transpose": (13, 21, 23, 24, 25), "Unique": (28,),
    "Unsqueeze": (11, 21, 23, 24, 25), "Where": (16,),
}


def compatible(op: str, source: int, target: int) -> bool:
    """Whether onnx's converter leaves every default-domain ``op`` node as it is from opset
    ``source`` up to ``target``: each opset in between that defines ``op`` anew is a step with a
    no-op adapter. (A node's subgraphs are converted all the same.)"""
    steps = _COMPATIBLE_STEPS.get(op)
    if not steps or not 1 <= source < target <= onnx.defs.onnx_opset_version():
        return False
    try:
        return all(v in steps for v in range(source + 1, target + 1)
                   if onnx.defs.get_schema(op, v, "").since_version == v)
    except onnx.defs.SchemaError:
        return False


def changed_ops(ops, source: int, target: int) -> set[str]:
    """The default-domain ops among ``ops`` whose definition differs between opsets ``source``
    and ``target`` (or that one of them lacks): a body using them cannot simply be relabelled."""
    changed = set()
    for op in ops:
        try:
            a = onnx.defs.get_schema(op, source, "").since_version
            b = onnx.defs.get_schema(op, target, "").since_version
        except onnx.defs.SchemaError:
            changed.add(op)
            continue
        if a != b:
            changed.add(op)
    return changed


def function_opset(fp: onnx.FunctionProto) -> int | None:
    return next((imp.version for imp in fp.opset_import if imp.domain in DEFAULT_DOMAINS), None)


def convert_function(fp: onnx.FunctionProto, target: int, ir_version: int) -> onnx.FunctionProto:
    """A model-local function whose body is converted to default-domain opset ``target`` by
    onnx's converter (a one-graph model of the body; the converter itself skips functions).
    Raises what the converter raises."""
    source = function_opset(fp)
    graph = helper.make_graph(list(fp.node), fp.name, [onnx.ValueInfoProto(name=i) for i in fp.input],
                              [onnx.ValueInfoProto(name=o) for o in fp.output])
    body = helper.make_model(graph, opset_imports=list(fp.opset_import), ir_version=ir_version)
    if source is None:
        raise ValueError("the function imports no default-domain opset")
    converted = version_converter.convert_version(body, target)
    out = onnx.FunctionProto()
    out.CopyFrom(fp)
    del out.node[:]
    out.node.extend(converted.graph.node)
    for imp in out.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            imp.version = target
    return out

"""Fold eval-mode BatchNormalization into the Conv / ConvTranspose / Gemm / MatMul that feeds it.

BatchNormalization computes ``y = x * s + t`` per channel (axis 1), with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. When output channel c of the
producer depends only on the weight slice for c and on bias b[c], scaling them folds the
BatchNormalization away exactly:

    W'[c] = W[c] * s[c]        b'[c] = b[c] * s[c] + t[c]        (b = 0 when absent)

Where the output-channel slice lives (the only per-producer difference):

    Conv           W [Cout, Cin/g, k...]               axis 0
    ConvTranspose  W [Cin, Cout/g, k...], group g       W viewed as [g, Cin/g, Cout/g, k...],
                                                       s as [g, 1, Cout/g, 1...]
    Gemm           B [K, N] (transB=0) axis 1,          C' = beta*C*s + t, beta := 1, alpha kept
                   B [N, K] (transB=1) axis 0
    MatMul         W [K, F] axis 1, on a rank-2 [N, K]  optional bias Add(b); one is added if absent
                   input (on [N, L, F] BatchNormalization normalizes L, not F: left alone)

All BatchNormalization versions: training_mode=0, legacy is_test=1 / spatial=1, a single output
at opsets 7-13 (more outputs are training mode there), epsilon default 1e-5 as a float32
(what onnxruntime uses: exact 1e-5 differs beyond float64 tolerances when var ~ epsilon).
Math runs in float64 and is cast back to the weight's dtype (fp16, bf16, fp32, fp64). Below
opset 7 the bias Add after a MatMul gets broadcast=1, without which it does not broadcast.
New weights are new initializers, computed in ``rewrite`` (``folded``; ``match`` reads the
weight, records s and t, and bounds the fold: ``overflow``): a weight shared with another node is
never changed.

Parameters may be computed: from constants (``ctx.const``), or, for the affine-free
BatchNormalization of dynamo ``optimize=False`` exports, filled to the producer output's known
channel count (``Expand(CastLike(1.0, y), Shape(y, 1, 2))``, ``ConstantOfShape``).

Keras / TensorFlow write batch normalization as arithmetic (tf.nn.batch_normalization):
``x * a + b`` with ``a = gamma * rsqrt(var + eps)`` and ``b = beta - mean * a`` computed from
constants, or, once tf2onnx (TensorFlow's grappler) folded them at export, plain constants. The
same fold applies with s = a, t = b when they are per output channel of the producer: axis 1 of
a Conv / ConvTranspose, the last axis of a Gemm / MatMul of any rank (a Dense layer), seen
through the views tf2onnx puts after the producer (a Transpose to NHWC, Conv1D's Squeeze of the
added axis, a Dense's Tensordot Reshape that keeps the last axis), which stay after it. Where
no producer absorbs the rsqrt form and a, b vary over axis 1 only, it becomes
BatchNormalization(x, a, b, mean 0, var 1, epsilon 0), which is exactly that arithmetic. Plain
constants alone do not say "batch norm": they are a candidate only right after a producer that
can absorb them (a ReLU in between, per-element or non-finite constants, a non-constant scale
are skipped with the reason) and are folded, never made a BatchNormalization.
Inside If/Loop/Scan bodies the producer must sit in the same body as the BatchNormalization,
and initializers that are also inputs of the main graph are not constants there either.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normopt import graph as G
from normopt.pattern import Match
from normopt.pipeline import Context, Pass, Reject
from normopt.registry import register_pass

BATCHNORM = "BatchNormalization"
DEFAULT_EPSILON = float(np.float32(1e-5))  # a float32 attribute: its default is 1e-5 rounded to float32
PARAMETERS = ("scale", "bias", "mean", "var")
FLOAT_KINDS = "f"  # numpy kind of float dtypes; bfloat16 is checked by name


def bn_scale_shift(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (s, t) in float64 with ``BN(x) = x * s + t`` (not finite where var + eps is 0
    or negative: ``overflow`` says so)."""
    f64 = lambda a: np.asarray(a, dtype=np.float64).reshape(-1)  # noqa: E731
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = f64(gamma) / np.sqrt(f64(var) + eps)
        return s, f64(beta) - f64(mean) * s


def scale_output_channels(w: np.ndarray, s: np.ndarray, op: str, group: int = 1, trans_b: int = 0,
                          dtype=None) -> np.ndarray:
    """``w`` scaled by ``s`` along the producer's output-channel axis, computed in float64.

    The result is float64; with ``dtype`` (the weight's float16 / float32 / float64) each product
    is rounded once to it as it is made, the same values as ``.astype(dtype)`` of the float64
    result without a float64 copy of the weight."""
    w = np.asarray(w)
    view, keep = _channel_view(w, op, group, trans_b)
    s_view = np.asarray(s, dtype=np.float64).reshape([view.shape[i] if i in keep else 1 for i in range(view.ndim)])
    return _times(view, s_view, dtype).reshape(w.shape)


def _channel_view(w: np.ndarray, op: str, group: int = 1, trans_b: int = 0) -> tuple[np.ndarray, tuple[int, ...]]:
    """``w`` viewed so that the producer's output channels lie on the returned axes (in channel
    order when flattened): ConvTranspose [Cin, Cout/g, ...] as [g, Cin/g, Cout/g, ...] (axes 0
    and 2), Conv and Gemm transB=1 axis 0, Gemm transB=0 and MatMul [K, N] axis 1."""
    if op == "ConvTranspose":
        return w.reshape((group, w.shape[0] // group, w.shape[1]) + w.shape[2:]), (0, 2)
    if op == "Conv" or (op == "Gemm" and trans_b):
        return w, (0,)
    return w, (1,)


_ROUNDED_ONCE = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _times(w: np.ndarray, s: np.ndarray, dtype) -> np.ndarray:
    if dtype is not None and np.dtype(dtype) in _ROUNDED_ONCE and w.dtype in _ROUNDED_ONCE:
        out = np.empty(np.broadcast_shapes(w.shape, s.shape), dtype=dtype)
        np.multiply(w, s, out=out, dtype=np.float64, casting="same_kind")
        return out
    product = np.asarray(w, dtype=np.float64) * s
    return product if dtype is None else product.astype(dtype)


def _is_float(dtype) -> bool:
    return dtype is not None and (np.dtype(dtype).kind == FLOAT_KINDS or "bfloat16" in str(dtype))


@register_pass("fold-batchnorm")
class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNormalization into the preceding Conv, ConvTranspose, Gemm or MatMul."""

    anchor_ops = (BATCHNORM, "Add")

    def match(self, bn: gs.Node, ctx: Context) -> Match | Reject | None:
        if not G.in_default_domain(bn):
            return None
        if bn.op == "Add":
            return self._match_algebra(bn, ctx)
        graph = ctx.graph
        if int(bn.attrs.get("training_mode", 0)) == 1:
            return Reject("BatchNormalization is in training mode (training_mode=1)")
        if "is_test" in bn.attrs and int(bn.attrs["is_test"]) == 0:
            return Reject("BatchNormalization is in training mode (is_test=0)")
        outputs = sum(1 for out in bn.outputs if out.name)
        if 7 <= ctx.opset < 14 and outputs > 1:
            # BatchNormalization-7/9 has no mode attribute: more than one output is training mode,
            # batch statistics even when the extra outputs are unused (TrainingMode.TRAINING export).
            return Reject(f"BatchNormalization is in training mode ({outputs} outputs at opset {ctx.opset})")
        if int(bn.attrs.get("spatial", 1)) == 0:
            return Reject("BatchNormalization uses per-activation statistics (spatial=0)")
        for extra in bn.outputs[1:]:
            if extra.name and (extra.outputs or G.is_graph_output(graph, extra)):
                return Reject(f"BatchNormalization output '{extra.name}' (running statistics) is used")
        if len(bn.inputs) < 5:
            return Reject("BatchNormalization has fewer than 5 inputs")
        params, readers = {}, []  # readers: nodes that compute a parameter from x's type or shape
        for key, tensor in zip(PARAMETERS, bn.inputs[1:5]):
            value = ctx.const(tensor, from_shapes=False)
            if value is None:
                filled = shape_filled(tensor, ctx)
                value = None if filled is None else filled[0]
                readers += [] if filled is None else filled[1]
            if value is None:
                return Reject(f"BatchNormalization {key} '{tensor.name}' {G.not_constant(tensor, ctx.graph)}")
            params[key] = value
        eps = float(bn.attrs.get("epsilon", DEFAULT_EPSILON))
        s, t = bn_scale_shift(params["scale"], params["bias"], params["mean"], params["var"], eps)
        x = bn.inputs[0]
        prod = G.producer(x)
        if prod is None:
            return Reject(f"input '{x.name}' is a graph input: no producer to fold into")
        inside = {id(bn)} | {id(n) for n in readers}
        uses = G.other_uses(x, graph, inside)
        leaks = [use for n in readers for out in n.outputs for use in G.other_uses(out, graph, inside)]
        if leaks:
            return Reject(f"a computed parameter of the BatchNormalization is also used by {', '.join(sorted(set(leaks)))}")
        if uses:
            return Reject(f"{G.node_label(prod)} output also feeds {', '.join(sorted(set(uses)))}")
        m = Match(output=bn.outputs[0], nodes={"bn": bn})
        m.tensors["bn_input"] = x
        m.info.update(epsilon=eps, channels=int(s.size))
        fold = _FOLDERS.get(prod.op)
        if fold is None or not G.in_default_domain(prod):
            return Reject(f"producer {G.node_label(prod)} ({prod.op}) cannot absorb a BatchNormalization")
        reason = fold(prod, m, s, t, ctx) or overflow(m)
        if reason:
            return Reject(reason, prod)
        m.info["producer"] = prod.op
        for node in list(m.nodes.values()):
            m.add(node)
        return m

    def _match_algebra(self, add: gs.Node, ctx: Context) -> Match | Reject | None:
        """Keras / TensorFlow's batch_normalization as arithmetic, ``x * a + b`` with
        ``a = gamma * rsqrt(var + eps)`` and ``b = beta - mean * a`` computed from constants
        (tf2onnx writes rsqrt as Reciprocal(Sqrt)), or a and b already constant-folded at export
        time. Folded into the producer of x when a and b are per output channel of it: axis 1 of
        a Conv, the last axis of a Gemm / MatMul (a Dense layer: any rank), seen through the
        Transpose / Squeeze / Reshape tf2onnx puts after it (NHWC, Conv1D, Tensordot)."""
        found = _affine_operands(add, ctx)
        if found is None or isinstance(found, Reject):
            return found
        mul, x, a, b, derived = found
        if not derived:
            bad = next((k for k, v in (("a", a), ("b", b)) if not np.all(np.isfinite(v))), None)
            if bad:
                return Reject(f"per-channel affine after '{x.name}': constant {bad} has non-finite values", mul)
        if G.producer(x) is None:
            return Reject(f"input '{x.name}' is a graph input: no producer to fold into", mul)
        rank = ctx.checked_shape(x)
        if isinstance(rank, Reject):
            return Reject(rank.reason, mul)
        if rank is None:
            return Reject(f"rank of '{x.name}' is unknown: cannot tell the channel axis", mul)
        rank = len(rank)
        axis = _varying_axis([a, b], rank)
        what = "batch-norm arithmetic" if derived else "constant x * a + b"
        if isinstance(axis, str):
            return Reject(f"{what} after '{x.name}': {axis}", mul)
        x0, axis0 = x, axis

        def instead(reason: str) -> Match | Reject:
            if not derived:  # not provably a batch norm: nothing but a fold into the producer
                return Reject(reason, mul)
            return _as_batchnorm(ctx, mul, add, x0, a, b, rank, axis0, reason)

        walked = _through_views(x, axis, mul, ctx)
        if isinstance(walked, str):
            return instead(walked)
        prod, x, axis, views = walked
        prod_rank = ctx.rank(x)
        if prod.op in ("Conv", "ConvTranspose"):
            if axis not in (None, 1):
                where = f"axis {axis} of the {prod.op} output" if not views else \
                    f"axis {axis0} of '{x0.name}' (axis {axis} of the {prod.op} output)"
                return instead(f"{what} varies over {where}, not its channels (axis 1)")
        elif prod.op in ("Gemm", "MatMul", "Add"):
            if prod_rank is None or axis not in (None, prod_rank - 1):
                return instead(f"{what} varies over axis {axis} of the {prod.op} output, not its "
                               f"features (axis {'unknown' if prod_rank is None else prod_rank - 1})")
        else:
            return instead(f"producer {G.node_label(prod)} ({prod.op}) cannot absorb the batch-norm arithmetic")
        # Scalars a and b: one per output channel all the same (the folders check the count).
        channels = max(np.asarray(a).size, np.asarray(b).size)
        if channels == 1:
            out_shape = ctx.shape(x) or ()
            channels = out_shape[-1 if _last_axis_producer(prod) else 1] if out_shape else None
            if not isinstance(channels, int) or channels < 1:
                return instead(f"channel count of '{x.name}' is unknown")
        s = np.broadcast_to(np.asarray(a, np.float64).reshape(-1), (channels,)).copy()
        t = np.broadcast_to(np.asarray(b, np.float64).reshape(-1), (channels,)).copy()
        uses = G.other_uses(x, ctx.graph, {id(views[0] if views else mul)})
        if uses:
            return instead(f"{G.node_label(prod)} output also feeds {', '.join(sorted(set(uses)))}")
        m = Match(output=add.outputs[0], nodes={"mul": mul, "add": add})
        m.tensors["bn_input"] = x
        m.info.update(channels=int(channels), last_axis=_last_axis_producer(prod),
                      form="x * a + b" if derived else "x * a + b, a and b constant")
        if not G.in_default_domain(prod):
            return instead(f"producer {G.node_label(prod)} is not a standard {prod.op}")
        reason = _FOLDERS[prod.op](prod, m, s, t, ctx) or overflow(m)
        if reason:
            return instead(reason)
        m.info["producer"] = prod.op
        for i, view in enumerate(views):
            m.nodes[f"view{i}"] = view
        m.info["views"] = len(views)
        for node in [mul, add, *views, *m.nodes.values()]:
            m.add(node)
        return m

    def rewrite(self, m: Match, ctx: Context) -> list[gs.Node]:
        if m.info.get("producer") == BATCHNORM:  # x * a + b as BatchNormalization(mean 0, var 1, eps 0)
            x, dtype = m.tensors["bn_input"], np.dtype(m.info["dtype"])
            a, b = m.values["scale"], m.values["bias"]
            params = [G.make_constant(ctx.names, f"{m.output.name}_bn_{key}", value.astype(dtype))
                      for key, value in (("scale", a), ("bias", b), ("mean", np.zeros_like(a)), ("var", np.ones_like(a)))]
            return [gs.Node(BATCHNORM, ctx.names.fresh(f"{m.output.name}/BatchNormalization"), {"epsilon": 0.0},
                            [x, *params], [m.output])]
        prod = m["producer"]
        w = m.tensors["weight"]
        new_weight, new_bias = folded(m)
        weight = G.make_constant(ctx.names, f"{w.name}_bnfolded", new_weight)
        bias = G.make_constant(ctx.names, f"{prod.name or weight.name}_bias_bnfolded", new_bias)
        x = m.tensors["x"]
        # The views tf2onnx put between the producer and the arithmetic (Transpose to NHWC,
        # Squeeze of Conv1D, Tensordot's Reshape) stay, after the folded producer.
        views = [m[f"view{i}"] for i in range(m.info.get("views", 0))]
        out = m.output if not views else gs.Variable(ctx.names.fresh(f"{m.output.name}_{prod.op.lower()}"),
                                                     dtype=m.output.dtype)
        after = []
        for i, view in enumerate(views):
            dst = m.output if i == len(views) - 1 else gs.Variable(ctx.names.fresh(f"{view.outputs[0].name}_folded"),
                                                                   dtype=m.output.dtype)
            after.append(gs.Node(view.op, view.name, dict(view.attrs), [after[-1].outputs[0] if after else out,
                                                                        *view.inputs[1:]], [dst]))
        if prod.op in ("Conv", "ConvTranspose"):
            return [gs.Node(prod.op, prod.name, dict(prod.attrs), [x, weight, bias], [out]), *after]
        if prod.op == "Gemm":
            attrs = dict(prod.attrs)
            attrs["beta"] = 1.0
            return [gs.Node("Gemm", prod.name, attrs, [x, weight, bias], [out]), *after]
        # Below opset 7, Add broadcasts its second input only with broadcast=1.
        legacy = {"broadcast": 1} if ctx.opset < 7 else {}
        # MatMul, with or without its bias Add: MatMul(x, W') + b'
        matmul = m["matmul"]
        hidden = gs.Variable(ctx.names.fresh(f"{m.output.name}_matmul"), dtype=m.output.dtype)
        add_name = prod.name if prod.op == "Add" and prod.name else ctx.names.fresh(f"{matmul.name or 'MatMul'}_bias")
        return [gs.Node("MatMul", matmul.name, dict(matmul.attrs), [x, weight], [hidden]),
                gs.Node("Add", add_name, legacy, [hidden, bias], [out]), *after]


# Elementwise ops a batch-norm parameter may be computed with from constants (float64 here).
_ARITHMETIC = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
_UNARY = {"Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative, "Identity": lambda v: v}
_COMPUTED = frozenset(_ARITHMETIC) | frozenset(_UNARY) | {"Cast"}


def _evaluate(t: gs.Tensor, ctx: Context, seen: set, depth: int = 0) -> np.ndarray | None:
    """The value of a tensor computed from constants with Add/Sub/Mul/Div/Sqrt/Reciprocal/Neg
    (float64 math); ``seen`` collects the op types met. None if anything is not constant."""
    value = ctx.const(t, from_shapes=False)
    if value is not None:
        return np.asarray(value, np.float64) if _is_float(value.dtype) else None
    node = G.producer(t)
    if node is None or depth > 8 or not G.in_default_domain(node):
        return None
    if node.op == "Cast" and node.inputs:
        # The rounding to the target type is part of the value (a float16 parameter stays one).
        target = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
        inner = _evaluate(node.inputs[0], ctx, seen, depth + 1) if _is_float(target) else None
        return None if inner is None else inner.astype(target).astype(np.float64)
    if node.op in _UNARY and node.inputs:
        inner = _evaluate(node.inputs[0], ctx, seen, depth + 1)
        seen.add(node.op)
        return None if inner is None else _UNARY[node.op](inner)
    if node.op in _ARITHMETIC and len(node.inputs) == 2:
        left = _evaluate(node.inputs[0], ctx, seen, depth + 1)
        right = None if left is None else _evaluate(node.inputs[1], ctx, seen, depth + 1)
        seen.add(node.op)
        return None if left is None or right is None else _ARITHMETIC[node.op](left, right)
    return None


def _affine_operands(add: gs.Node, ctx: Context):
    """(Mul node, x, a, b, derived) for ``add = x * a + b`` with a and b computed from
    constants; ``derived`` when a goes through a square root (rsqrt: the batch-norm algebra),
    else a is a plain constant (tf2onnx folded it at export time) and x comes from a producer
    that can absorb it. None otherwise; a Reject for x * y + b after such a producer, y not
    constant."""
    if len(add.inputs) != 2:
        return None
    for i in (0, 1):
        mul = G.producer(add.inputs[i])
        if mul is None or mul.op != "Mul" or not G.in_default_domain(mul) or len(mul.inputs) != 2:
            continue
        for j in (0, 1):
            # a is computed through a Sqrt: an initializer (no producer) cannot be it. Checked
            # before anything is evaluated: most Adds after a Mul are no batch norm at all.
            made = G.producer(mul.inputs[1 - j])
            if made is None or made.op not in _COMPUTED:
                continue
            seen: set = set()
            a = _evaluate(mul.inputs[1 - j], ctx, seen)
            if a is None or "Sqrt" not in seen or ctx.const(mul.inputs[j], from_shapes=False) is not None:
                continue
            b = _evaluate(add.inputs[1 - i], ctx, set())
            if b is None:
                break
            uses = G.other_uses(add.inputs[i], ctx.graph, {id(add)})
            if uses:
                return Reject(f"'{add.inputs[i].name}' (x * a) is also used by {', '.join(sorted(set(uses)))}", mul)
            return mul, mul.inputs[j], a, b, True
        for j in (0, 1):
            # Plain constants: the producer above x is checked first (a few hops, no values read).
            x, scale = mul.inputs[j], mul.inputs[1 - j]
            plain = _plain_candidate(x, ctx)
            if plain is None:
                continue
            b = _evaluate(add.inputs[1 - i], ctx, set())
            if b is None:
                continue
            a = _evaluate(scale, ctx, set())
            if a is None:
                if isinstance(plain, Reject):
                    continue
                return Reject(f"x * y + b after '{x.name}': the scale '{scale.name}' "
                              f"{G.not_constant(scale, ctx.graph)}", mul)
            uses = G.other_uses(add.inputs[i], ctx.graph, {id(add)})
            if uses:
                return Reject(f"'{add.inputs[i].name}' (x * a) is also used by {', '.join(sorted(set(uses)))}", mul)
            return Reject(plain.reason, mul) if isinstance(plain, Reject) else (mul, x, a, b, False)
    return None


def _fixed(t: gs.Tensor, ctx: Context, depth: int = 0) -> bool:
    """Whether ``t`` is a constant (an initializer or a Constant node, maybe through Identity /
    Cast / Transpose), told without reading its values: a weight is never decoded for this."""
    if G.is_graph_input(ctx.graph, t):
        return False
    if isinstance(t, gs.Constant):
        return True
    node = G.producer(t)
    if node is None or depth > 4 or not G.in_default_domain(node):
        return False
    if node.op == "Constant":
        return True
    return node.op in ("Identity", "Cast", "Transpose") and bool(node.inputs) and _fixed(node.inputs[0], ctx, depth + 1)


# Ops tf2onnx puts between a producer and the batch-norm arithmetic that keep each channel's
# values in one slice: Transpose (NHWC), Squeeze (Conv1D's [N, C, 1, L]), Reshape (Tensordot
# of a Dense on rank > 2, when it keeps the last axis).
_VIEWS = ("Transpose", "Squeeze", "Reshape")
_MAX_VIEWS = 3
_FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _view_chain(x: gs.Tensor) -> tuple[gs.Node | None, list[gs.Node]]:
    """(the node above the views over ``x``, those views from the producer down)."""
    views, node = [], G.producer(x)
    while node is not None and node.op in _VIEWS and G.in_default_domain(node) and len(views) < _MAX_VIEWS:
        views.insert(0, node)
        node = G.producer(node.inputs[0])
    return node, views


def _absorbs(node: gs.Node | None, ctx: Context) -> bool:
    """Whether ``node`` is a Conv / ConvTranspose / Gemm / MatMul (or MatMul + constant bias)
    with a constant weight."""
    if node is None or not G.in_default_domain(node):
        return False
    if node.op == "Add" and len(node.inputs) == 2:
        left, right = node.inputs
        node = next((G.producer(t) for t, other in ((left, right), (right, left)) if G.producer(t) is not None
                     and G.producer(t).op == "MatMul" and _fixed(other, ctx)), None)
        if node is None:
            return False   # a residual Add: nothing a constant x * a + b can be folded into
    return node.op in _FOLDABLE and len(node.inputs) > 1 and _fixed(node.inputs[1], ctx)


def _plain_candidate(x: gs.Tensor, ctx: Context) -> gs.Node | Reject | None:
    """Whether constant ``x * a + b`` is a fold candidate. Constants alone do not say "batch
    norm": x (through views) must come from a producer that can absorb it (that producer), else
    a near miss one op further up is named (a Reject: an op in between); None otherwise."""
    node, _views = _view_chain(x)
    if _absorbs(node, ctx):
        return node
    if node is None or not G.in_default_domain(node) or not node.inputs:
        return None
    data = [t for t in node.inputs if t.name and not _fixed(t, ctx)]
    if len(data) == 1:
        above, _ = _view_chain(data[0])
        if _absorbs(above, ctx):
            return Reject(f"{G.node_label(node)} ({node.op}) is between {G.node_label(above)} and the per-channel "
                          f"x * a + b: nothing to fold into")
    return None


def _through_views(x: gs.Tensor, axis: int | None, mul: gs.Node, ctx: Context):
    """(producer, its output, the axis of it that ``axis`` of x is, the views from the producer
    down) following x up through tf2onnx's views; or why a view breaks the channel slices."""
    views, t = [], x
    prod = G.producer(x)
    while prod is not None and prod.op in _VIEWS and G.in_default_domain(prod) and len(views) < _MAX_VIEWS:
        uses = G.other_uses(t, ctx.graph, {id(views[0] if views else mul)})
        if uses:
            return f"{G.node_label(prod)} output also feeds {', '.join(sorted(set(uses)))}"
        inner = prod.inputs[0]
        mapped = _axis_before(prod, inner, t, axis, ctx)
        if isinstance(mapped, str):
            return mapped
        axis, t = mapped, inner
        views.insert(0, prod)
        prod = G.producer(t)
    if prod is None:
        return f"input '{t.name}' is a graph input: no producer to fold into"
    return prod, t, axis, views


def _axis_before(view: gs.Node, inner: gs.Tensor, out: gs.Tensor, axis: int | None, ctx: Context) -> int | None | str:
    """The axis of ``inner`` that ``axis`` of ``out = view(inner)`` is (None stays None), or
    why the view mixes channels."""
    rank = ctx.rank(inner)
    label = f"{view.op} {G.node_label(view)}"
    if view.op == "Transpose":
        perm = view.attrs.get("perm")
        perm = list(range(rank - 1, -1, -1)) if perm is None and rank is not None else perm
        if perm is None:
            return f"{label} has no perm and its input's rank is unknown"
        return None if axis is None else int(perm[axis])
    if view.op == "Squeeze":
        axes = view.attrs.get("axes")
        if axes is None and len(view.inputs) > 1 and view.inputs[1].name:
            axes = ctx.const(view.inputs[1], from_shapes=False)
        if axes is None or rank is None:
            return f"{label} squeezes axes unknown before run time"
        gone = {int(a) % rank for a in np.asarray(axes).reshape(-1)}
        kept = [k for k in range(rank) if k not in gone]
        return None if axis is None else kept[axis]
    # Reshape: only one that keeps the last axis whole, and the parameters on it (or scalars).
    before, after = ctx.shape(inner), ctx.shape(out)
    last = before[-1] if before else None
    if axis is not None and (not before or not after or axis != len(after) - 1 or not isinstance(last, int)
                             or last != after[-1]):
        return f"{label} does not keep the axis the parameters vary over ({axis}) as the last axis of its input"
    return None if axis is None else len(before) - 1


def _varying_axis(values, rank: int):
    """The one axis of a rank-``rank`` tensor along which ``values`` vary (None: scalars), or why
    there is no such axis."""
    axes = set()
    for value in values:
        value = np.asarray(value)
        if value.ndim > rank:
            return f"a parameter of shape {list(value.shape)} has more axes than the input's {rank}"
        axes.update(rank - value.ndim + k for k, d in enumerate(value.shape) if d != 1)
    if len(axes) > 1:
        return f"the parameters vary over axes {sorted(axes)}, not over one channel axis"
    return next(iter(axes), None)


def _as_batchnorm(ctx: Context, mul: gs.Node, add: gs.Node, x: gs.Tensor, a, b, rank: int, axis: int | None,
                  reason: str) -> Match | Reject:
    """``x * a + b`` that no producer absorbs, as one BatchNormalization when a and b vary over
    axis 1 only: scale a, bias b, mean 0, var 1, epsilon 0 is exactly that arithmetic
    (sqrt(1 + 0) = 1). Else the reason no producer absorbs it."""
    shape = ctx.shape(x) or ()
    # x's channel count, which a and b must match or broadcast to (size 1): x * a + b with more
    # channels in a or b than in x grows the output, which BatchNormalization does not
    channels = shape[1] if len(shape) > 1 else None
    size = max(np.asarray(a).size, np.asarray(b).size)
    dtype = ctx.dtype(x)
    if axis not in (None, 1) or rank < 2 or ctx.opset < 7 or not isinstance(channels, int) or channels < 1 \
            or size not in (1, channels) or dtype is None or np.dtype(dtype).name not in ("float32", "float64"):
        return Reject(reason, mul)
    m = Match(output=add.outputs[0], nodes={"mul": mul, "add": add})
    m.add(mul)
    m.add(add)
    m.tensors["bn_input"] = x
    m.values["scale"] = np.broadcast_to(np.asarray(a, np.float64).reshape(-1), (channels,)).copy()
    m.values["bias"] = np.broadcast_to(np.asarray(b, np.float64).reshape(-1), (channels,)).copy()
    m.info.update(channels=int(channels), form="x * a + b", producer=BATCHNORM, dtype=np.dtype(dtype).name,
                  not_folded=reason)
    return m


def _last_axis_producer(prod: gs.Node) -> bool:
    """Whether ``prod``'s output channels are its last axis (Gemm, MatMul, MatMul + bias)."""
    return prod.op in ("Gemm", "MatMul", "Add")


def shape_filled(t: gs.Tensor, ctx: Context) -> tuple[np.ndarray, list[gs.Node]] | None:
    """A tensor filled with one constant to a shape read from a tensor whose shape is known:
    dynamo with optimize=False writes an affine-free BatchNormalization's scale and bias as
    Expand(CastLike(1.0, y), Shape(y, start=1, end=2)) (or ConstantOfShape) of the producer's
    output y. (value, the nodes that compute it) when the value and the shape are both fixed.

    Those nodes read y only for its type and shape, which folding keeps: they are not uses of
    y's values, and they go once the BatchNormalization does."""
    node = G.producer(t)
    if node is None or not G.in_default_domain(node) or not node.inputs:
        return None
    nodes = [node]
    if node.op == "Expand" and len(node.inputs) == 2:
        value, dims = _fill_value(node.inputs[0], ctx, nodes), _shape_value(node.inputs[1], ctx, nodes)
    elif node.op == "ConstantOfShape":
        attr = node.attrs.get("value")
        value = np.zeros(1, np.float32) if attr is None else np.asarray(getattr(attr, "values", attr))
        dims = _shape_value(node.inputs[0], ctx, nodes)
    else:
        return None
    if value is None or dims is None or value.size != 1 or np.prod(dims) > (1 << 20):
        return None
    try:
        return np.array(np.broadcast_to(value, np.broadcast_shapes(value.shape, tuple(dims)))), nodes
    except ValueError:
        return None


def _fill_value(t: gs.Tensor, ctx: Context, nodes: list) -> np.ndarray | None:
    node = G.producer(t)
    if node is not None and node.op == "CastLike" and G.in_default_domain(node):
        inner, dtype = ctx.const(node.inputs[0], from_shapes=False), ctx.dtype(node.inputs[1])
        nodes.append(node)
        return None if inner is None or dtype is None else inner.astype(dtype)
    return ctx.const(t, from_shapes=False)


def _shape_value(t: gs.Tensor, ctx: Context, nodes: list) -> list[int] | None:
    """A 1-D shape tensor's value: a constant, or Shape(u)[start:end] of static dims of u."""
    value = ctx.const(t, from_shapes=False)
    if value is not None:
        return [int(d) for d in value.reshape(-1)]
    node = G.producer(t)
    if node is None or node.op != "Shape" or not G.in_default_domain(node):
        return None
    shape = ctx.checked_shape(node.inputs[0])
    if shape is None or isinstance(shape, Reject):
        return None
    dims = list(shape)[node.attrs.get("start", 0):node.attrs.get("end")]
    nodes.append(node)
    return dims if all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims) else None


def _conv(prod: gs.Node, m: Match, s, t, ctx: Context) -> str | None:
    w = _weight(prod, m, ctx)
    if isinstance(w, str):
        return w
    group = int(prod.attrs.get("group", 1))
    if prod.op == "ConvTranspose":
        if w.ndim < 3 or w.shape[0] % group:
            return f"ConvTranspose input channels {w.shape[0]} are not divisible by group {group}"
        cout = group * w.shape[1]
    else:
        cout = w.shape[0]
    if cout != s.size:
        return f"{prod.op} has {cout} output channels but BatchNormalization has {s.size}"
    b = _optional_const(prod, 2, ctx)
    if isinstance(b, str):
        return b
    if b is not None and np.shape(b) != (cout,):
        # (onnxruntime refuses such a model: B is one value per output channel)
        return f"{prod.op} bias '{prod.inputs[2].name}' has shape {list(np.shape(b))}, not [{cout}]"
    _store(m, prod, w, b, s, t)
    return None


def _gemm(prod: gs.Node, m: Match, s, t, ctx: Context) -> str | None:
    w = _weight(prod, m, ctx)
    if isinstance(w, str):
        return w
    if w.ndim != 2:
        return f"Gemm weight '{prod.inputs[1].name}' is {w.ndim}-D, not 2-D"
    trans_b = int(prod.attrs.get("transB", 0))
    n = w.shape[0] if trans_b else w.shape[1]
    if n != s.size:
        return f"Gemm has {n} output features but BatchNormalization has {s.size} channels"
    c = _optional_const(prod, 2, ctx)
    if isinstance(c, str):
        return c
    if c is not None and (np.ndim(c) > 2 or (np.ndim(c) >= 1 and np.shape(c)[-1] not in (1, n))):
        # (onnxruntime refuses such a model: C must broadcast to the output [M, N])
        return f"Gemm C '{prod.inputs[2].name}' of shape {list(np.shape(c))} does not broadcast to the output's [M, {n}]"
    _store(m, prod, w, c, s, t)
    return None


def _matmul(prod: gs.Node, m: Match, s, t, ctx: Context) -> str | None:
    bias = None
    matmul = prod
    if prod.op == "Add":
        found = _matmul_bias(prod, ctx)
        if isinstance(found, str):
            return found
        matmul, bias = found
    w = _weight(matmul, m, ctx)
    if isinstance(w, str):
        return w
    if w.ndim != 2:
        return f"MatMul weight '{matmul.inputs[1].name}' is {w.ndim}-D, not 2-D"
    rank = None
    for tensor in (m.tensors["bn_input"], matmul.inputs[0]):
        shape = ctx.checked_shape(tensor)
        if isinstance(shape, Reject):
            return shape.reason
        rank = rank or (None if shape is None else len(shape))
    if rank is None:
        return "rank of the MatMul output is unknown: cannot tell which axis BatchNormalization normalizes"
    if rank != 2 and not m.info.get("last_axis"):
        return f"BatchNormalization normalizes axis 1 of a rank-{rank} MatMul output, not its feature axis"
    if w.shape[1] != s.size:
        return f"MatMul has {w.shape[1]} output features but BatchNormalization has {s.size} channels"
    if bias is not None:
        if bias.size not in (1, s.size) or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
            return f"bias Add operand of shape {list(bias.shape)} is not a per-feature bias"
        x_shape = ctx.shape(matmul.inputs[0])
        out_rank = None if x_shape is None else len(x_shape)   # x @ W[K, N] keeps x's rank
        if bias.ndim > 1 and (out_rank is None or bias.ndim > out_rank):
            # a [1, F] bias after a 1-D input's [F] product adds an axis the folded bias would drop
            return (f"bias Add operand of shape {list(bias.shape)} has more axes than the MatMul output"
                    + (f" (rank {out_rank})" if out_rank is not None else " (its rank is unknown)"))
        bias = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (s.size,))
    m.nodes["matmul"] = matmul
    _store(m, prod, w, bias, s, t, x=matmul.inputs[0])
    return None


def _matmul_bias(add: gs.Node, ctx: Context):
    for i in (0, 1):
        mm = G.producer(add.inputs[i])
        bias = ctx.const(add.inputs[1 - i], from_shapes=False)
        if mm is None or mm.op != "MatMul" or bias is None:
            continue
        uses = G.other_uses(add.inputs[i], ctx.graph, {id(add)})
        if uses:
            return f"{G.node_label(mm)} output also feeds {', '.join(sorted(set(uses)))}"
        return mm, bias
    return f"producer {G.node_label(add)} (Add) is not a MatMul plus constant bias"


def _weight(prod: gs.Node, m: Match, ctx: Context):
    if len(prod.inputs) < 2:
        return f"{prod.op} has no weight input"
    tensor = prod.inputs[1]
    w = ctx.const(tensor, from_shapes=False)
    if w is None:
        return f"{prod.op} weight '{tensor.name}' {G.not_constant(tensor, ctx.graph)}"
    if not _is_float(w.dtype):
        return f"{prod.op} weight '{tensor.name}' has non-float dtype {w.dtype}"
    m.tensors["weight"] = tensor
    return w


def _optional_const(prod: gs.Node, index: int, ctx: Context):
    if len(prod.inputs) <= index or not prod.inputs[index].name:
        return None
    value = ctx.const(prod.inputs[index], from_shapes=False)
    if value is None:
        return f"{prod.op} bias '{prod.inputs[index].name}' {G.not_constant(prod.inputs[index], ctx.graph)}"
    return value


def _store(m: Match, prod, w, b, s, t, x=None) -> None:
    """What ``folded`` needs: the producer's weight ``w`` and bias ``b`` as read (None: it has
    none) and the per-channel ``s``, ``t`` of ``BN(x) = x * s + t``. Nothing is computed here."""
    m.nodes["producer"] = prod
    m.tensors["x"] = prod.inputs[0] if x is None else x
    m.values.update(weight=w, s=s, t=t)
    if b is not None:
        m.values["producer_bias"] = b


def overflow(m: Match) -> str | None:
    """Why ``folded`` would leave the weight's type (a float16 weight of 1000 scaled by 100) or
    be not finite at all (a variance plus epsilon of 0), or None. Bounds first: the weight is
    scanned only when a scale above 1 could carry it past the type's largest value, and per
    channel only when its largest value could."""
    prod, w, s, t = m["producer"], m.values["weight"], m.values["s"], m.values["t"]
    if np.dtype(w.dtype) not in _ROUNDED_ONCE or not w.size:
        return None
    s_top, t_top = _top(s), _top(t)
    if not (s_top < math.inf and t_top < math.inf):   # NaN fails too
        return "the per-channel scale or shift is not finite (a variance plus epsilon of 0 or below?)"
    top = _LARGEST[np.dtype(w.dtype)]
    name = np.dtype(w.dtype).name
    if s_top > 1.0 and _top(w) * s_top > top:
        reach = _channel_peaks(w, prod) * np.abs(np.asarray(s, np.float64))
        if float(reach.max()) > top:
            c = int(np.argmax(reach))
            return f"folding would overflow the {name} weight '{m.tensors['weight'].name}' (channel {c}: up to {reach[c]:.3g})"
    b = m.values.get("producer_bias")
    b_top = 0.0 if b is None else _top(b) * abs(float(prod.attrs.get("beta", 1.0)))
    if b_top * s_top + t_top > top:
        bias = _top(_folded_bias(m))
        if not bias <= top:
            return f"folding would overflow the {name} bias (up to {bias:.3g})"
    return None


_LARGEST = {dtype: float(np.finfo(dtype).max) for dtype in _ROUNDED_ONCE}


def _top(a) -> float:
    """max |a| (NaN when a holds one)."""
    a = np.asarray(a)
    return max(float(a.max()), -float(a.min())) if a.size else 0.0


def _channel_peaks(w: np.ndarray, prod: gs.Node) -> np.ndarray:
    """max |w| per output channel of the producer (the axes ``scale_output_channels`` scales)."""
    view, keep = _channel_view(w, prod.op, int(prod.attrs.get("group", 1)), int(prod.attrs.get("transB", 0)))
    axes = tuple(i for i in range(view.ndim) if i not in keep)
    return np.maximum(np.abs(np.max(view, axis=axes).astype(np.float64)),
                      np.abs(np.min(view, axis=axes).astype(np.float64))).reshape(-1)


def _folded_bias(m: Match) -> np.ndarray:
    """``b' = b * s + t`` (Gemm: ``beta * C * s + t``) in float64."""
    prod, s, t = m["producer"], np.asarray(m.values["s"], np.float64), m.values["t"]
    b = m.values.get("producer_bias")
    if prod.op == "Gemm":
        beta = float(prod.attrs.get("beta", 1.0))
        # beta*C*s + t, with C broadcast to the output's last axis.
        cs = np.zeros(s.size) if b is None or beta == 0.0 else beta * np.asarray(b, np.float64) * s
        return cs + t
    b64 = np.zeros(s.size) if b is None else np.asarray(b, np.float64).reshape(-1)
    return b64 * s + t


def folded(m: Match) -> tuple[np.ndarray, np.ndarray]:
    """The new weight and bias of the producer: ``W' = W * s`` along its output channels and
    ``b' = b * s + t`` (Gemm: ``beta * C * s + t``, its beta becoming 1), in float64, cast back
    to the weight's dtype."""
    prod, w, s = m["producer"], m.values["weight"], m.values["s"]
    if prod.op == "Gemm":
        weight = scale_output_channels(w, s, "Gemm", trans_b=int(prod.attrs.get("transB", 0)), dtype=w.dtype)
    elif prod.op in ("Conv", "ConvTranspose"):
        weight = scale_output_channels(w, s, prod.op, int(prod.attrs.get("group", 1)), dtype=w.dtype)
    else:  # MatMul, or the Add of MatMul + bias
        weight = scale_output_channels(w, s, "MatMul", dtype=w.dtype)
    return weight, _folded_bias(m).astype(w.dtype)


_FOLDERS = {"Conv": _conv, "ConvTranspose": _conv, "Gemm": _gemm, "MatMul": _matmul, "Add": _matmul}

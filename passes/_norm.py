"""The matching core shared by the normalization passes.

Two normalizations, as exporters write them, with every check that makes fusing exact:

    mean-centred  y = (x - mean(x)) / sqrt(var(x) + eps),  var(x) = mean((x - mean(x))^2)
    RMS           y = x / sqrt(mean(x^2) + eps)

Accepted spellings (alternatives inside one pattern):

* the square as ``Pow(d, 2)`` or ``Mul(d, d)``; the exponent may come through a Cast (Apex);
* ``Div(d, std)``, ``Mul(d, Reciprocal(std))`` or ``Mul(d, Div(1, std))`` (TorchScript rsqrt), or
  ``Mul(d, Pow(var + eps, -0.5))`` (``** -0.5`` written by hand);
* the variance of the same centred tensor, or of a duplicated ``Sub(x, mean)`` (old PyTorch),
  or ``mean(x*x) - mean(x)^2`` (ONNX's LayerNormalization function body);
* epsilon on either Add input, a scalar or 1-element constant of any float type, or a Cast of one;
  no Add is epsilon 0 (what onnxscript's optimizer leaves of an epsilon of 1e-8 or less);
* ReduceMean axes as attribute (opset < 18) or constant input (opset >= 18), negative or not,
  or computed from the input's rank (``Range(rank + axis, rank, 1)``, ONNX function bodies);
  the mean as ``GlobalAveragePool`` (tf2onnx: a mean over axes 2.., the last axis of a rank-3
  tensor), seen through an Identity (TF's stop_gradient) where it centres x;
* Cast to a float type on the input, on the centred tensor and on the standard deviation
  (mixed precision: the statistics computed in float32 for a float16 model); the input cast
  twice to the same type (TorchScript T5LayerNorm in float16);
* a second ReduceMean of the input over the same axes centring the variance (torch.var_mean).

Near misses (a ``Reject`` with the reason) are spellings that look alike but compute something
else: swapped Div operands, the mean or the variance of another tensor, a Pow exponent other
than 2 (other than -0.5 for 1/std), a non-constant epsilon, keepdims=0, the two ReduceMeans
over different axes, integer dtypes, and intermediates used outside the pattern (dead consumers
aside). Whether the reduced axes are the trailing ones is left to each pass
(``trailing_axis``): grouped forms normalize the trailing axes of a reshaped tensor.

Over the trailing axes (LayerNormalization, RMSNormalization): ``trailing`` places the axes and
``plan`` builds the match of the core plus its affine tail. The affine tail after the normalized
tensor (``match_affine``, and per channel ``channel_affine``) lives in ``_affine``; the means
(``reduction``, ``restored_mean``) in ``_reduce``; normalization-shaped sites in ``_sites``; the
fused op and the type it runs in in ``_emit``. What is known about a tensor (shape, dtype,
constant value) comes from the context, ``normopt.tensors``. No function here changes the graph
or a Match it was given: a check that narrows or extends a match returns a new one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from normopt import graph as G
from normopt.passes._affine import (  # noqa: F401  (re-exported: the passes use them as _norm's)
    CAST, FLOAT_BITS, Affine, TensorParam, affine_params, broadcast_param, cast_target, channel_affine, describe,
    float_bits, is_float, match_affine, scalar, sole_consumer)
from normopt.pattern import AnyOf, Const, Match, Op, Opt, Pattern, Var, match
from normopt.pipeline import Context, Reject
from normopt.passes._reduce import (  # noqa: F401  (MEAN_OPS re-exported: the passes use it as _norm's)
    GLOBAL_AVERAGE_POOL, MEAN_OPS, chain_names, reduce_axes, reduction, restored_mean, through_cast)

# ------------------------------------------------------------------------------ patterns

X = Var("x")
# The input, maybe cast to the compute type. A second Cast of x (unnamed: matched by structure)
# is TorchScript's T5LayerNorm in float16, which casts x once for the variance and once for
# the product; ``_duplicated_casts`` checks that they cast to the same type.
XC = AnyOf(Op(CAST, [X], name="cast_x"), Op(CAST, [X]), X)
MEAN = reduction(XC, "mean")
# Unnamed: a duplicated Sub still matches. A second ReduceMean of the same input (TorchScript's
# torch.var_mean) is the same mean once its axes agree (``_common_axes``). The mean of another
# tensor is a near miss to report.
CENTERED = Op("Sub", [XC, AnyOf(MEAN, reduction(XC, "mean_dup"), reduction(Var("other_mean"), "other_mean"))])
EXPONENT = Opt(CAST, Const("exponent"))
EPSILON = AnyOf(Const("eps"), Op(CAST, [Const("eps")]), Var("eps_tensor"))


def square(t: Pattern) -> Pattern:
    return AnyOf(Op("Pow", [t, EXPONENT], name="pow"), Op("Mul", [t, t]))


def scaled_by_inverse_std(numerator: Pattern, variance: Pattern) -> Pattern:
    """numerator / sqrt(variance + eps) in its three spellings, plus the swapped Div (a near miss)."""
    # No Add at all is epsilon 0: onnxscript's optimizer (dynamo's default) removes x + c as a
    # no-op when |c| <= 1e-8, so a hand-written LayerNorm with BERT's 1e-12 loses its Add.
    shifted = AnyOf(Op("Add", [variance, EPSILON], name="add_eps"), variance)
    std = Opt(CAST, Op("Sqrt", [shifted], name="sqrt"))
    # 1/std also as Pow(variance + eps, -0.5): PyTorch's ``(var + eps) ** -0.5`` written by hand.
    reciprocal = AnyOf(Op("Reciprocal", [std]), Op("Div", [Const("one"), std], name="recip_div"),
                       Opt(CAST, Op("Pow", [shifted, Opt(CAST, Const("rsqrt_exponent"))], name="pow_rsqrt")))
    return AnyOf(Op("Div", [numerator, std], name="div"),
                 Op("Mul", [numerator, reciprocal], name="mul_recip"),
                 Op("Div", [std, numerator], name="div_swapped"))


# The variance operand: the centred tensor (maybe cast), else anything (a near miss to report).
CENTERED_SQUARED = square(AnyOf(Opt(CAST, CENTERED), Var("other_centered")))
VARIANCE = AnyOf(
    reduction(CENTERED_SQUARED, "var"),
    # ONNX's LayerNormalization function body: mean(x*x) - mean(x)*mean(x).
    Op("Sub", [reduction(square(XC), "var"), Op("Mul", [MEAN, MEAN])], name="var_sub"),
)
MEAN_CORE = scaled_by_inverse_std(Opt(CAST, CENTERED), VARIANCE)
RMS_CORE = scaled_by_inverse_std(XC, reduction(square(XC), "var"))

# TF / Keras (tf2onnx): the scale s = gamma / std is applied to x and to the mean separately,
# y = x*s + (beta - mean*s) (tf.nn.batch_normalization), Keras 3's x*s + ((-mean)*s + beta);
# gamma and beta optional. LayerNorm over the last axes, GroupNorm on the grouped tensor.
def tf_core(views: bool = False) -> Pattern:
    """The TF / Keras normalization; with ``views``, also the forms tf2onnx writes when it moves
    an NHWC model's Transposes through a LayerNorm: the statistics are taken of the NCHW tensor x,
    x itself is scaled as Transpose(x) (``x_view``), and 1/std and -mean follow it as Reshapes
    (``inv_view``, ``neg_view``). Views are LayerNorm-only: what they mean must be checked by the
    pass that accepts them (fuse-layernorm's ``_views``)."""
    std = Op("Sqrt", [Op("Add", [VARIANCE, EPSILON], name="add_eps")], name="sqrt")
    inv = AnyOf(Op("Reciprocal", [std], name="recip"), Op("Div", [Const("one"), std], name="recip_div"))
    neg = Op("Neg", [MEAN])
    x = XC
    if views:
        inv = AnyOf(Op("Reshape", [inv, Const()], name="inv_view"), inv)
        neg = AnyOf(Op("Reshape", [neg, Const()], name="neg_view"), neg)
        x = AnyOf(Op("Transpose", [XC], name="x_view"), XC)
    s = AnyOf(Op("Mul", [inv, Const("gamma")], name="mul_gamma"), inv)
    xs = Op("Mul", [x, s], name="mul_x")
    ms = Op("Mul", [MEAN, s], name="mul_mean")
    neg_ms = Op("Mul", [neg, s], name="mul_mean")
    return AnyOf(
        Op("Add", [xs, Op("Sub", [Const("beta"), ms])]),          # tf.nn.batch_normalization
        Op("Add", [xs, Op("Add", [neg_ms, Const("beta")])]),      # Keras 3
        Op("Add", [xs, AnyOf(neg_ms, Op("Neg", [ms]))]),          # no beta
        Op("Sub", [xs, ms]),
    )


TF_CORE = tf_core()                      # the LayerNorm and GroupNorm form
TF_VIEWED_CORE = tf_core(views=True)     # also tf2onnx's NHWC LayerNorm (fuse-layernorm only)


def tf_scaled_alike(m: Match) -> bool:
    """Whether a ``TF_CORE`` / ``TF_VIEWED_CORE`` match scales x and the mean by one tensor s
    (else it is not one normalization)."""
    s = m["mul_gamma" if m.has("mul_gamma") else "inv_view" if m.has("inv_view") else
          "recip" if m.has("recip") else "recip_div"].outputs[0]
    return all(any(i is s for i in m[k].inputs) for k in ("mul_x", "mul_mean"))


# ------------------------------------------------------------------------------ axes

def normalize_axes(axes, rank: int | None) -> tuple[int, ...] | None:
    """Sorted axes, non-negative when ``rank`` is known.

    With the rank unknown, all-negative axes are kept negative (they still say "the last n
    axes"); a positive axis cannot be placed and gives None. None also for an axis out of
    range or a repeated axis.
    """
    axes = [int(a) for a in axes]
    if rank is None:
        return tuple(sorted(axes)) if all(a < 0 for a in axes) and len(set(axes)) == len(axes) else None
    if any(not -rank <= a < rank for a in axes):
        return None
    out = sorted(a % rank for a in axes)
    return tuple(out) if len(set(out)) == len(out) else None


def trailing_axis(axes: tuple[int, ...], rank: int | None) -> int | None:
    """The (negative) first axis when ``axes`` are exactly the last len(axes) axes, else None."""
    n = len(axes)
    if not n:
        return None
    if rank is None:
        return axes[0] if axes == tuple(range(-n, 0)) else None
    return axes[0] - rank if axes == tuple(range(rank - n, rank)) else None


# ------------------------------------------------------------------------------ the core

@dataclass
class Normalized:
    """A matched normalization core: ``match.output`` = normalize(x) over ``axes``."""

    x: gs.Tensor                  # the input, before any Cast to the compute type
    axes: tuple[int, ...]         # non-negative when ``rank`` is known
    epsilon: float
    match: Match                  # .matched: every node of the core; .output: the normalized tensor
    rank: int | None
    kind: str                     # "mean" ((x - mean) / std) or "rms" (x / rms)
    compute_bits: int | None      # narrowest float significand inside the core (None: unknown)
    variant: list[str] = field(default_factory=list)

    @property
    def output(self) -> gs.Tensor:
        return self.match.output


def match_normalized(t: gs.Tensor, ctx: Context, statistics: bool = False) -> Normalized | Reject | None:
    """``t = (x - mean(x)) / sqrt(var(x) + eps)``, checked exact; None if ``t`` is not one.

    ``statistics``: the mean and 1/std may be used outside (LayerNormalization's optional
    outputs Mean and InvStdDev give them); see ``check_core``."""
    m = match(MEAN_CORE, t, ctx.graph, ctx.const)
    return None if m is None else check_core(m, ctx, "mean", statistics)


def match_rms_normalized(t: gs.Tensor, ctx: Context) -> Normalized | Reject | None:
    """``t = x / sqrt(mean(x^2) + eps)``, checked exact; None if ``t`` is not one."""
    m = match(RMS_CORE, t, ctx.graph, ctx.const)
    return None if m is None else check_core(m, ctx, "rms")


def check_core(m: Match, ctx: Context, kind: str, statistics: bool = False) -> Normalized | Reject:
    """Every exactness check of a matched core (also used by the TF LayerNorm form).

    With ``statistics``, the mean (``m.tensors["stat_mean"]``) and 1/std
    (``m.tensors["stat_inv_std"]``) may have users outside the match: the fused op then writes
    them as its Mean and InvStdDev outputs.

    ``m`` is left as it is: the core's Normalized holds a new Match."""
    found = _structural_misses(m) or _duplicated_casts(m, ctx)
    if found:
        return found
    m = _drop_constant_nodes(_trim_input_cast(m, ctx), ctx)
    bits = _compute_bits(m, ctx)
    if isinstance(bits, Reject):
        return bits
    eps = _epsilon(m)
    if isinstance(eps, Reject):
        return eps
    x = m.tensors["x"]
    checked = ctx.checked_shape(x)
    if isinstance(checked, Reject):
        return Reject(checked.reason, m["var"])
    rank = ctx.rank(x)
    axes = _common_axes(m, ctx, rank)
    if isinstance(axes, Reject):
        return axes
    # A 1-element constant broadcasts: one of higher rank than x grows the output's rank (and
    # shifts what the variance's ReduceMean axes count), which the fused op would not. With the
    # rank unknown, x has at least as many axes as the (negative) axes reduced.
    limit = rank if rank is not None else len(axes)
    for key, what, node in (("eps", "epsilon", "add_eps"), ("exponent", "exponent", "pow"),
                            ("one", "1 of 1 / std", "recip_div"), ("rsqrt_exponent", "exponent -0.5", "pow_rsqrt")):
        const_rank = np.asarray(m.values[key]).ndim if key in m.values else 0
        if const_rank > limit:
            known = f"the input's {rank}" if rank is not None else f"the {limit} axes it normalizes (input rank unknown)"
            return Reject(f"{what} has rank {const_rank}, more than {known}", m[node])
    m = m.evolve()   # what goes with the match is added to a copy
    if statistics and m.has("sqrt") and "stat_inv_std" not in statistic_tensors(m):
        # 1/std computed beside a Div(d, std) (ONNX's function body writes InvStdDev that way):
        # it goes with the match, as the InvStdDev output.
        inside = {id(n) for n in m.matched}
        users = [u for u in m["sqrt"].outputs[0].outputs if u.op == "Reciprocal" and id(u) not in inside]
        local = ctx.node_ids() if users else set()
        for user in users:   # one of this graph: a subgraph's reader of the outer std stays
            if G.in_default_domain(user) and id(user) in local:
                m.add(user)
                break
    allowed = statistic_tensors(m) if statistics else {}
    escaped: dict[str, str] = {}   # tensor name -> who else uses it
    live_escapes(m, ctx, found=escaped)
    stray = [name for name in escaped if name not in allowed.values()]
    if stray:
        return Reject(f"intermediate '{stray[0]}' is also used by {escaped[stray[0]]}", m["var"])
    for node in side_computations(m, ctx):
        m.add(node)
    for key, name in allowed.items():
        if name in escaped:
            m.tensors[key] = next(o for n in m.matched for o in n.outputs if o.name == name)
    return Normalized(x, axes, eps, m, rank, kind, bits, _variant(m))


def statistic_tensors(m: Match) -> dict[str, str]:
    """Names of the matched tensors that are LayerNormalization's Mean and InvStdDev outputs:
    the mean, and 1/std when written as Reciprocal(std) or Div(1, std)."""
    found = {}
    if m.has("mean"):
        # the mean as the Sub reads it: the end of the ops after the reduction (a ReduceSum's
        # division by N, keepdims=0's Unsqueeze back), not the reduction's own output
        last = next((m[k] for k in reversed(("mean",) + chain_names("mean")) if m.has(k)))
        found["stat_mean"] = last.outputs[0].name
    sqrt = m["sqrt"].outputs[0] if m.has("sqrt") else None
    for node in m.matched:
        reciprocal = node.op == "Reciprocal" or (node.op == "Div" and (node is m.nodes.get("recip_div")))
        if reciprocal and sqrt is not None and through_cast(node.inputs[-1]) is sqrt:
            found["stat_inv_std"] = node.outputs[0].name
    return found


def live_escapes(m: Match, ctx: Context, allowed: set[str] = frozenset(),
                 found: dict[str, str] | None = None) -> list[str]:
    """``Match.escapes``, except that a consumer whose outputs nobody uses is dead code, not a
    use: the ONNX inliner leaves LayerNormalization's unused InvStdDev Reciprocal behind.
    ``found`` collects tensor name -> its other users, allowed ones included."""
    graph = ctx.graph
    inside = {id(n) for n in m.matched}
    local = None
    unused = [user for node in m.matched for out in node.outputs for user in out.outputs
              if all(not o.outputs and not G.is_graph_output(graph, o) for o in user.outputs)]
    if unused:
        # A subgraph node reading an outer-scope value looks unused from here (its outputs are
        # its own graph's): only a node of this graph can be dead code.
        local = ctx.node_ids()
        inside.update(id(user) for user in unused if id(user) in local)
    escapes: list[str] = []
    for node in m.matched:
        for out in node.outputs:
            if out is m.output or out.name in allowed:
                continue
            outside = [u for u in out.outputs if id(u) not in inside]
            if outside and local is None:
                local = ctx.node_ids()
            uses = [G.node_label(u) for u in outside if not _feeds_only(u, inside, graph, local)] + \
                (["graph output"] if G.is_graph_output(graph, out) else [])
            if uses:
                escapes.append(f"'{out.name}' is also used by {', '.join(sorted(set(uses)))}")
                if found is not None:
                    found.setdefault(out.name, ', '.join(sorted(set(uses))))
    return escapes


# Nodes followed when checking that a side computation only feeds the match.
_SIDE_LIMIT = 32


def _feeds_only(node: gs.Node, inside: set[int], graph: gs.Graph, local: set[int],
                found: list | None = None) -> bool:
    """Whether everything ``node`` computes ends in the match (or nowhere): dynamo rebuilds a
    reduced shape with Shape(var) -> Reshape -> Concat -> Reshape(var, ...), a use of the
    variance that disappears with it. ``local``: ids of the graph's nodes; ``found`` collects
    those nodes."""
    seen, todo, nodes = set(), [node], []
    while todo:
        n = todo.pop()
        if id(n) in inside or id(n) in seen:
            continue
        if id(n) not in local or len(seen) >= _SIDE_LIMIT:
            return False
        seen.add(id(n))
        nodes.append(n)
        for out in n.outputs:
            if G.is_graph_output(graph, out):
                return False
            todo.extend(out.outputs)
    if found is not None:
        found.extend(nodes)
    return True


def side_computations(m: Match, ctx: Context) -> list[gs.Node]:
    """Nodes outside the match that read its tensors only to feed it (``_feeds_only``): they go
    with it."""
    inside = {id(n) for n in m.matched}
    found: list[gs.Node] = []
    local = None
    for node in list(m.matched):
        for out in node.outputs:
            if out is m.output:
                continue
            for user in out.outputs:
                if id(user) not in inside and all(u is not user for u in found):
                    local = local if local is not None else ctx.node_ids()
                    _feeds_only(user, inside, ctx.graph, local, found)
    return found


def _structural_misses(m: Match) -> Reject | None:
    if m.has("other_mean"):
        return Reject(f"mean is taken of '{m.tensors['other_mean'].name}', not of the centred input "
                      f"'{m.tensors['x'].name}'", m["other_mean"])
    if m.has("div_swapped"):
        return Reject("Div divides the standard deviation by the input (operands swapped)", m["div_swapped"])
    if m.has("other_centered"):
        return Reject(f"variance is taken of '{m.tensors['other_centered'].name}', not of the centred input",
                      m["var"])
    if m.has("eps_tensor"):
        return Reject(f"epsilon '{m.tensors['eps_tensor'].name}' is not a constant", m["add_eps"])
    if m.has("exponent") and scalar(m.values["exponent"]) != 2.0:
        return Reject(f"Pow exponent is {describe(m.values['exponent'])}, not 2", m["pow"])
    if m.has("rsqrt_exponent") and scalar(m.values["rsqrt_exponent"]) != -0.5:
        return Reject(f"Pow exponent of the variance is {describe(m.values['rsqrt_exponent'])}, not -0.5",
                      m["pow_rsqrt"])
    if m.has("one") and scalar(m.values["one"]) != 1.0:
        return Reject(f"reciprocal is taken as {describe(m.values['one'])} / std, not 1 / std", m["recip_div"])
    return None


def _epsilon(m: Match) -> float | Reject:
    if not m.has("add_eps"):
        return 0.0
    value = np.asarray(m.values["eps"])
    if value.size != 1:
        return Reject(f"epsilon has {value.size} elements, not 1", m["add_eps"])
    if not is_float(value.dtype):
        return Reject(f"epsilon has non-float dtype {value.dtype}", m["add_eps"])
    eps = scalar(value)
    if not np.isfinite(eps):
        return Reject(f"epsilon is {eps}", m["add_eps"])
    held = held_epsilon(eps)
    if held is not None:
        return Reject(held, m["add_eps"])
    return eps


# Relative error a float32 epsilon may carry: float32 holds every normal value within 2^-24.
EPSILON_RTOL = 1e-6


def held_epsilon(eps: float) -> str | None:
    """Why the fused op's float32 ``epsilon`` attribute cannot hold ``eps``, else None.

    A float64 normalization may add an epsilon below float32's range (1e-50 becomes 0, and a
    row of equal values then gives 0/0 = NaN where the original gives 0) or in its subnormal
    range (held with a few bits only)."""
    f32 = float(np.float32(eps))
    if eps == 0.0 or (np.isfinite(f32) and abs(f32 - eps) <= EPSILON_RTOL * abs(eps)):
        return None
    return f"epsilon {eps:g} is not representable as the op's float32 attribute (it would be {f32:g})"


def epsilon_miss(eps: float) -> Reject | None:
    """``held_epsilon`` as a Reject: the fused op's epsilon attribute is a float32."""
    reason = held_epsilon(eps)
    return Reject(reason) if reason else None


def _duplicated_casts(m: Match, ctx: Context) -> Reject | None:
    """Further Casts of x must be the same conversion as ``cast_x``, which must stay inside."""
    cast = m.nodes.get("cast_x")
    dups = [n for n in m.matched if n.op == CAST and n is not cast and n.inputs[0] is m.tensors["x"]]
    if not dups:
        return None
    targets = {cast_target(n) for n in dups + ([cast] if cast is not None else [])}
    if cast is None or len(targets) > 1:
        return Reject(f"input '{m.tensors['x'].name}' is cast to {len(targets)} types or used uncast", dups[0])
    source, target = ctx.dtype(m.tensors["x"]), cast_target(cast)
    if not is_float(source) or not is_float(target) or float_bits(target) < float_bits(source):
        return Reject(f"input '{m.tensors['x'].name}' is cast more than once, not to a wider float", dups[0])
    return None


def _trim_input_cast(m: Match, ctx: Context) -> Match:
    """Leave a Cast on the input outside the match when it is not a float-widening compute cast.

    A Cast from an integer (token ids, say) or one whose output also feeds other nodes belongs
    to the model, not to the normalization: the cast tensor itself is then the input. So does
    a narrowing Cast (float32 x rounded to float16): the fused op must see the rounded values.
    Returns ``m`` itself when the Cast stays, else a new Match without it.
    """
    if not m.has("cast_x"):
        return m
    cast = m["cast_x"]
    inside = {id(n) for n in m.matched}
    source, target = ctx.dtype(cast.inputs[0]), cast_target(cast)
    if not is_float(source) or not is_float(target) or float_bits(target) < float_bits(source) or \
            G.other_uses(cast.outputs[0], ctx.graph, inside):
        nodes = {k: n for k, n in m.nodes.items() if k != "cast_x"}
        return m.evolve(matched=[n for n in m.matched if n is not cast], nodes=nodes,
                        tensors={**m.tensors, "x": cast.outputs[0]})
    return m


def _common_axes(m: Match, ctx: Context, rank: int | None) -> tuple[int, ...] | Reject:
    keys = [k for k in ("mean", "mean_dup", "var") if m.has(k)]
    reductions = [m[k] for k in keys]
    found = []
    for key, node in zip(keys, reductions):
        axes = reduce_axes(node, ctx)
        if axes is None:
            what = "an input of unknown rank, or of rank below 3" if node.op == GLOBAL_AVERAGE_POOL \
                else "no constant axes (computed, or absent)"
            return Reject(f"{node.op} {G.node_label(node)} has {what}", node)
        norm = normalize_axes(axes, rank)
        if norm is None:
            return Reject(f"{node.op} {G.node_label(node)} axes {list(axes)} cannot be placed "
                          f"(input rank {rank if rank is not None else 'unknown'})", node)
        restored = restored_mean(m, key, node, ctx, norm)
        if restored is not None:
            return restored
        found.append(norm)
    for node, axes in zip(reductions[1:], found[1:]):
        if axes != found[0]:
            return Reject(f"the ReduceMeans reduce different axes ({list(found[0])} and {list(axes)})", node)
    return found[0]


def _compute_bits(m: Match, ctx: Context) -> int | None | Reject:
    """Narrowest float type the core computes in; integer types are rejected."""
    bits = []
    for node in m.matched:
        for out in node.outputs[:1]:
            dtype = ctx.dtype(out)
            if dtype is None:
                continue
            if not is_float(dtype):
                return Reject(f"'{out.name}' has integer dtype {np.dtype(dtype).name}", node)
            bits.append(float_bits(dtype))
    x_dtype = ctx.dtype(m.tensors["x"])
    if x_dtype is not None and not is_float(x_dtype):
        return Reject(f"input '{m.tensors['x'].name}' has integer dtype {np.dtype(x_dtype).name}")
    return min(bits) if bits else None


def narrowest(nodes: list[gs.Node], ctx: Context) -> tuple[int, gs.Tensor] | None:
    """(significand bits, tensor) of the narrowest float tensor that ``nodes`` compute, if known.

    A fused op computes in its one type: a tensor of the original rounded to fewer bits than
    the output (float16 inside a float32 computation) makes the two differ beyond the output's
    tolerance."""
    found = [(float_bits(ctx.dtype(n.outputs[0])), n.outputs[0]) for n in nodes if n.outputs]
    found = [(bits, t) for bits, t in found if bits is not None]
    return min(found, key=lambda f: f[0]) if found else None


def precision_miss(nodes: list[gs.Node], ctx: Context, out_type) -> Reject | None:
    """A Reject when one of ``nodes`` computes in a float type narrower than ``out_type``."""
    low = narrowest(nodes, ctx)
    if low is None or low[0] >= float_bits(out_type):
        return None
    inner = next(k for k, v in FLOAT_BITS.items() if v == low[0])
    return Reject(f"'{low[1].name}' is computed in {inner}, narrower than the output's {np.dtype(out_type).name}")


def _drop_constant_nodes(m: Match, ctx: Context) -> Match:
    """``m`` without the nodes that compute constants (a new Match): Casts of constants
    (epsilon, exponent) stay in the graph, others may share them, and cleanup removes them
    once unused."""
    made_inside = {id(o) for n in m.matched for o in n.outputs}
    keep = [n for n in m.matched
            if any(id(i) in made_inside for i in n.inputs)   # reads the match: not a constant
            or not all(ctx.const(i) is not None for i in n.inputs if i.name)]
    return m if len(keep) == len(m.matched) else m.evolve(matched=keep)


def _variant(m: Match) -> list[str]:
    names = []
    if m.has("cast_x"):
        names.append("cast input")
    if m.has("var_sub"):
        names.append("mean(x*x) - mean(x)^2")
    if m.has("pow_rsqrt"):
        names.append("Pow -0.5")
    elif m.has("mul_recip"):
        names.append("reciprocal")
    if sum(1 for n in m.matched if n.op == "Sub") > 1 and not m.has("var_sub"):
        names.append("duplicated Sub")
    if m.has("mean_dup"):
        names.append("duplicated ReduceMean")
    if sum(1 for n in m.matched if n.op == CAST and n.inputs[0] is m.tensors["x"]) > 1:
        names.append("duplicated Cast")
    return names


# ------------------------------------------------------------------------------ over the trailing axes

def trailing(norm: Normalized, ctx: Context) -> tuple[int, tuple] | Reject:
    """(negative first axis, normalized dims) when ``norm`` is over the trailing axes
    (LayerNormalization, RMSNormalization).

    The dims may be symbolic: the fused op normalizes whatever size they have at run time."""
    x, rank = norm.x, norm.rank
    if rank is None:
        # All-negative axes still say "the last n axes": the fused op over axis -n is the same
        # whatever the rank (``least_rank`` keeps the affine from growing it). Positive ones
        # cannot be placed.
        axis = trailing_axis(norm.axes, None)
        if axis is None:
            return Reject(f"rank of input '{x.name}' is unknown and axes {list(norm.axes)} are not the last ones "
                          "counted from the end")
        return axis, (None,) * len(norm.axes)
    axis = trailing_axis(norm.axes, rank)
    if axis is None:
        return Reject(f"normalizes axes {list(norm.axes)} of a rank-{rank} input, not its trailing axes "
                      "(channels-first layout)", norm.match["mean" if norm.match.has("mean") else "var"])
    return axis, tuple(ctx.shape(x)[axis:])


def least_rank(norm: Normalized) -> int:
    """The input's rank, or when unknown the fewest axes it can have: the (negative) axes it
    normalizes. An affine parameter of no more axes cannot grow the output's rank."""
    return norm.rank if norm.rank is not None else len(norm.axes)


def plan(norm: Normalized, ctx: Context, axis: int, tail: Affine) -> Match:
    """The match to replace: the core plus its affine tail, for a fused op over ``axis`` (a new
    Match; the core's is left as it is).

    Fills ``m.tensors["input"]``, ``m.values["scale"]`` (ones when there is none),
    ``m.values["bias"]`` (when there is one) and ``m.info`` (axis, epsilon, variant).
    """
    x = norm.x
    shape = static_dims(ctx, x, axis)
    m = norm.match.evolve(output=tail.output)
    for node in tail.nodes:
        m.add(node)
    m.tensors["input"] = x
    for key, param in (("scale", tail.scale), ("bias", tail.bias)):
        if isinstance(param, TensorParam):
            m.tensors[key] = param.tensor
            m.info[f"{key}_lead"] = param.lead
        elif param is not None:
            m.values[key] = param
    if tail.scale is None and shape is not None:
        m.values["scale"] = np.ones(shape, np.float32)
    # else: no scale and normalized dims known only at run time: ones of Shape(x)[axis:] (``_emit``)
    m.info.update(epsilon=norm.epsilon, axis=axis, scale=tail.scale is not None, bias=tail.bias is not None)
    outputs = [name for key, name in (("stat_mean", "Mean"), ("stat_inv_std", "InvStdDev")) if key in m.tensors]
    if outputs:
        m.info["outputs"] = outputs
    if norm.variant:
        m.info["variant"] = ", ".join(norm.variant)
    if tail.kept:
        m.info["kept"] = tail.kept
    return m


def static_dims(ctx: Context, x: gs.Tensor, axis: int) -> tuple[int, ...] | None:
    """The dims of ``x`` from ``axis`` on, when all are static."""
    shape = ctx.shape(x)
    if shape is None:
        return None
    dims = tuple(shape[axis:])
    return dims if all(isinstance(d, int) and d > 0 for d in dims) else None

"""Shared machinery of the property suite: settings, the properties, and model generators.

Every generated example is a ``Case``: a model, the pass to run, and either the exact op counts
the rewrite must leave (a positive form) or the skip reason it must give (a near miss). The
properties checked for every example are in ``prove_rewrite`` and ``prove_left_alone``.

Hypothesis draws the structure (spellings, shapes, dtypes, attributes); numpy, seeded by a drawn
integer, draws the values of weights and parameters.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from helpers import GraphBuilder, assert_equivalent, make_model, op_counts, run_pass

# One profile for the whole suite: seeded (derandomized) and bounded by default. The slow
# campaign draws fresh examples: 1,000 positive forms per pass, and 125 per kind of near miss
# (8 kinds or more per pass, so 1,000 near misses or more).
settings.register_profile(
    "normopt-property", max_examples=30, derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
PROFILE = settings.get_profile("normopt-property")
NEAR_MISS = settings(PROFILE, max_examples=3)   # per kind of near miss
CAMPAIGN = int(os.environ.get("NORMOPT_PROPERTY_EXAMPLES", 1000))
SLOW = settings(PROFILE, max_examples=CAMPAIGN, derandomize=False)
SLOW_NEAR_MISS = settings(SLOW, max_examples=max(1, CAMPAIGN // 8))

# The input sets of the equivalence check: seeded normal(0, 1) inputs. Verification's stress
# sets are left to the verifier's own tests: there onnxruntime's kernels differ from the
# decomposed original in ways that are not the rewrite's math (InstanceNormalization on
# 2-element rows at offset 1000 is 4e-4 off where the original is 6e-8; GroupNormalization's
# function body cancels; with epsilon 0, constant rows give NaN in the original but not in
# onnxruntime's InstanceNormalization), and fold rolls such rewrites back.
INPUT_SETS = ("normal",)

F16, F32, F64 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE
INT32, INT64 = TensorProto.INT32, TensorProto.INT64
NP = {F16: np.float16, F32: np.float32, F64: np.float64}
BITS = {F16: 11, F32: 24, F64: 53}


@dataclass
class Case:
    """One generated model and what the pass must do with it."""

    model: onnx.ModelProto
    pass_name: str
    expected_ops: dict[str, int] | None = None   # positive form: op counts after the rewrite
    applied: int = 1
    reason: str | tuple | None = None            # near miss: a substring of the skip reason (or one of)
    reference: onnx.ModelProto | None = None     # what onnxruntime runs as the original (default: model)
    runnable: Callable | None = None             # the rewritten model as onnxruntime can run it
    seed: int = 0
    spec: dict = field(default_factory=dict)     # what was drawn, shown when an example fails

    def __repr__(self) -> str:
        return f"Case({self.pass_name}, {self.spec})"


def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def prove_rewrite(case: Case) -> onnx.ModelProto:
    """The positive-form properties: rewritten (exact op counts, no skip), equivalent to the
    original in onnxruntime, valid under the full checker, a fixed point of the pass, and the
    same bytes on a second run."""
    out, rec = run_pass(case.pass_name, case.model)
    assert [s.reason for s in rec.skipped] == [], (case, [s.reason for s in rec.skipped])
    assert len(rec.applied) == case.applied, (case, rec.applied)
    assert op_counts(out) == case.expected_ops, (case, op_counts(out))
    onnx.checker.check_model(out, full_check=True)
    assert_equivalent(case.reference or case.model, case.runnable(out) if case.runnable else out, seed=case.seed,
                      input_sets=INPUT_SETS)
    again, rec2 = run_pass(case.pass_name, out)
    assert not rec2.applied and not rec2.skipped, (case, rec2)
    assert again.graph == out.graph, case
    twin, _ = run_pass(case.pass_name, case.model)
    assert _bytes(twin) == _bytes(out), case
    return out


def canonical(graph: onnx.GraphProto):
    """A graph's content up to what cannot change its meaning: node order (a re-sort keeps a
    topological order) and how constant tensors are encoded (values compared as arrays)."""
    def value(attr):
        v = helper.get_attribute_value(attr)
        if isinstance(v, onnx.TensorProto):
            a = numpy_helper.to_array(v)
            return (a.dtype.str, a.shape, a.tobytes())
        return canonical(v) if isinstance(v, onnx.GraphProto) else repr(v)
    nodes = sorted((n.op_type, n.domain, n.name, tuple(n.input), tuple(n.output),
                    tuple(sorted((a.name, value(a)) for a in n.attribute))) for n in graph.node)
    inits = sorted((i.name, *value(helper.make_attribute("v", i))) for i in graph.initializer)
    io = [v.SerializeToString(deterministic=True) for v in (*graph.input, *graph.output)]
    return nodes, inits, io


def passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def prove_left_alone(case: Case) -> onnx.ModelProto:
    """The near-miss properties: nothing rewritten, the graph unchanged, a skip with the
    expected reason, valid under the full checker where the input is, and deterministic."""
    out, rec = run_pass(case.pass_name, case.model)
    assert not rec.applied, (case, rec.applied)
    reasons = (case.reason,) if isinstance(case.reason, str) else case.reason
    assert any(r in s.reason for r in reasons for s in rec.skipped), (case, [s.reason for s in rec.skipped])
    assert canonical(out.graph) == canonical(case.model.graph), case
    if passes_full_check(case.model):  # (a ConvTranspose whose Cin is not divisible by group does not)
        onnx.checker.check_model(out, full_check=True)
    twin, rec2 = run_pass(case.pass_name, case.model)
    assert _bytes(twin) == _bytes(out) and [s.reason for s in rec2.skipped] == [s.reason for s in rec.skipped]
    return out


# ------------------------------------------------------------------------------ building blocks

def widest(*types: int) -> int:
    return max(types, key=lambda t: BITS[t])


class Net(GraphBuilder):
    """A graph under construction. ``finish`` names the result ``y`` (through an Identity) and
    adds any intermediates listed in ``exposed`` as extra graph outputs."""

    def __init__(self, opset: int, dtype: int, constants: str = "initializer"):
        super().__init__(opset, dtype, constants)
        self.exposed: list[tuple[str, int]] = []
        self.extra_inputs: list[tuple] = []

    def reduce_sum(self, x: str, axes) -> str:
        if self.opset < 13:
            return self.op("ReduceSum", x, axes=list(axes))
        return self.op("ReduceSum", x, self.const(list(axes), "int"))

    def expose(self, name: str, dtype: int) -> None:
        self.exposed.append((name, dtype))

    def finish(self, out: str, x_shape, x_dtype: int, y_shape, y_dtype: int) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [out], ["y"], name="output"))
        inputs = [("x", x_dtype, x_shape), *self.extra_inputs]
        model = make_model(self.nodes, inputs, [("y", y_dtype, y_shape)], self.inits, opset=self.opset)
        if self.exposed:  # an intermediate also a graph output, typed as shape inference finds it,
            # else read by a consumer outside the pattern (a ReduceSum to a scalar output)
            known = {v.name: v for v in onnx.shape_inference.infer_shapes(model, data_prop=True).graph.value_info}
            for name, dtype in self.exposed:
                vi = known.get(name)
                if vi is not None and vi.type.tensor_type.HasField("shape"):
                    model.graph.output.append(vi)
                    continue
                model.graph.node.append(helper.make_node("ReduceSum", [name], [f"{name}_sum"], keepdims=0))
                model.graph.output.append(helper.make_tensor_value_info(f"{name}_sum", dtype, []))
            onnx.checker.check_model(model)
        return model


@dataclass(frozen=True)
class Spelling:
    """How a decomposed normalization core is written (every alternative the patterns accept)."""

    square: str        # "pow" | "mul"
    exponent: str      # Pow's 2: "float" (model dtype), "int" (int64), "cast" (Cast of a float64 2)
    divide: str        # "div" | "reciprocal" (Mul(d, Reciprocal(std))) | "div_one" (Mul(d, Div(1, std)))
    mul_first: bool    # the reciprocal first in that Mul
    eps: float | None  # None: no Add at all (epsilon 0)
    eps_first: bool
    eps_shape: tuple
    eps_cast: bool     # epsilon a Cast of a float64 constant
    dup_sub: bool      # old PyTorch: a second Sub(x, mean) for the variance
    dup_mean: bool     # torch.var_mean: a second ReduceMean(x) centring the variance
    fn_body: bool      # ONNX's function body: mean(x*x) - mean(x)^2
    negative_axes: bool


def _conditioned(sp: Spelling) -> Spelling:
    """ONNX's function body computes the variance as mean(x*x) - mean(x)^2, which cancels
    catastrophically in the original itself when a row's spread is small and epsilon ~ 0 (a
    2-element row of near-equal values: 6.5e-5 off at epsilon 1e-3); the fused op is exact there.
    Against that original only an epsilon >= 0.1 keeps the comparison meaningful."""
    return replace(sp, eps=max(sp.eps or 0.0, 0.1)) if sp.fn_body else sp


def over_two(sp: Spelling, n_elems) -> Spelling:
    """A normalization over 2 elements with epsilon ~ 0 is a sign function, (a - b) / |a - b|:
    its result turns on the last bits of two near-equal values, in the original itself (a norm
    after it sees that too). onnxruntime's fused kernels (the variance as mean(x^2) - mean(x)^2)
    and the decomposed original then differ by far more than rounding (1.8e-3 normalizing
    [1, 1.0001]); verification rolls such a site back. Epsilon 0.1 there keeps the comparison
    about the rewrite."""
    return replace(sp, eps=max(sp.eps or 0.0, 0.1)) if n_elems == 2 else sp


def spellings(kind: str = "mean") -> st.SearchStrategy[Spelling]:
    centred = kind == "mean"
    return st.builds(
        Spelling,
        square=st.sampled_from(["pow", "mul"]),
        exponent=st.sampled_from(["float", "int", "cast"]),
        divide=st.sampled_from(["div", "reciprocal", "div_one"]),
        mul_first=st.booleans(),
        eps=st.one_of(st.none(), st.sampled_from([1e-12, 1e-6, 1e-5, 1e-3, 0.1])),
        eps_first=st.booleans(),
        eps_shape=st.sampled_from([(), (1,)]),
        eps_cast=st.booleans(),
        dup_sub=st.booleans() if centred else st.just(False),
        dup_mean=st.booleans() if centred else st.just(False),
        fn_body=st.booleans() if centred else st.just(False),
        negative_axes=st.booleans(),
    ).map(_conditioned)


# Near misses of a core: one change that makes the math differ.
CORE_MISSES = {
    "exponent": "Pow exponent is",
    "var_axes": "reduce different axes",
    # N/(N-1) exactly; rounded to float16; or a ReduceSum over dims of unknown size
    "bessel": ("Bessel", "not a mean", "divisor cannot be checked"),
    "escape": "is also used by",
    "int_cast": "not of the centred input",
    "swapped": "operands swapped",
    "eps_input": "is not a constant",
    "narrow": "narrower than the output",
}


def core(net: Net, x: str, axes, sp: Spelling, kind: str, dtype: int, miss: str | None = None,
         miss_value=None, n_elems: int = 2, var_axes=None, numerator: str | None = None,
         kept_outputs=()) -> str:
    """The decomposed normalization of ``x`` (of ``dtype``) over ``axes``; returns its output.

    kind "mean": (x - mean) / sqrt(var + eps); "rms": x / sqrt(mean(x^2) + eps).
    ``miss`` makes one near-miss change (a key of CORE_MISSES); ``kept_outputs``: the parts a
    fused op can still write when they are used elsewhere (never exposed as an escape)."""
    def c(value, t=None):
        return net.const(value, t or dtype)

    def sq(t):
        if sp.square == "mul" and miss != "exponent":
            return net.op("Mul", t, t)
        value = miss_value if miss == "exponent" else 2.0
        if sp.exponent == "int" and float(value).is_integer():
            e = net.const(int(value), "int")
        elif sp.exponent == "cast":
            e = net.op("Cast", net.const(np.asarray(value, np.float64), "raw"), to=dtype)
        else:
            e = c(value)
        return net.op("Pow", t, e)

    if kind == "mean":
        mean = net.mean(x, axes)
        num = net.op("Sub", x, mean)
        centred = num
        fn_body = sp.fn_body and miss not in ("int_cast", "var_axes")
        if sp.dup_sub and not fn_body:
            centred = net.op("Sub", x, mean)
        elif sp.dup_mean and not fn_body:
            centred = net.op("Sub", x, net.mean(x, axes))
        if miss == "int_cast":
            centred = net.op("Cast", net.op("Cast", centred, to=INT32), to=dtype)
        if fn_body:
            square = sq(x)
            var = net.op("Sub", net.mean(square, axes), net.op("Mul", mean, mean))
            parts = {"mean": mean, "centred": num, "square": square}
        else:
            square = sq(centred)
            var = None if miss == "bessel" else net.mean(square, var_axes if miss == "var_axes" else axes)
            parts = {"mean": mean, "centred": num, "square": square}
    else:
        num = numerator or x
        square = sq(net.op("Cast", net.op("Cast", x, to=INT32), to=dtype) if miss == "int_cast" else x)
        var = None if miss == "bessel" else net.mean(square, var_axes if miss == "var_axes" else axes)
        parts = {"square": square}
    if miss == "bessel":  # the unbiased variance: N / (N - 1) times the mean of squares, or sum / (N - 1)
        if miss_value % 2:
            var = net.op("Mul", net.mean(square, axes), c(n_elems / (n_elems - 1)))
        else:
            var = net.op("Div", net.reduce_sum(square, axes), c(n_elems - 1))
    parts["variance"] = var
    eps = sp.eps
    if eps is not None and dtype == F64:
        # The fused ops' epsilon attribute is a float32: a float64 model's 0.1 becomes 0.1 + 1.5e-9,
        # a difference float64 tolerances see where var << epsilon (verification rolls it back).
        eps = float(np.float32(eps))
    if sp.eps is None and miss != "eps_input":
        std = net.op("Sqrt", var)
    else:
        if miss == "eps_input":
            e = net.name("eps")
            net.extra_inputs.append((e, dtype, list(sp.eps_shape)))
        elif sp.eps_cast:
            e = net.op("Cast", net.const(np.full(sp.eps_shape, eps, np.float64), "raw"), to=dtype)
        else:
            e = net.const(np.full(sp.eps_shape, eps), dtype)
        std = net.op("Sqrt", net.op("Add", *((e, var) if sp.eps_first else (var, e))))
    parts["std"] = std
    if miss == "swapped":
        out = net.op("Div", std, num)
    elif sp.divide == "div":
        out = net.op("Div", num, std)
    else:
        inv = net.op("Reciprocal", std) if sp.divide == "reciprocal" else net.op("Div", c(1.0), std)
        parts["inverse"] = inv
        out = net.op("Mul", *((inv, num) if sp.mul_first else (num, inv)))
    if miss == "escape":
        names = sorted(set(parts) - set(kept_outputs))
        name = names[miss_value % len(names)]
        net.expose(parts[name], dtype)
    return out


def affine(net: Net, t: str, rng, gamma_shape, beta_shape, dtype: int, gamma_first: bool, beta_first: bool,
           between: str | None = None, between_type: int | None = None) -> str:
    """``t * gamma + beta`` (each optional, None shape = absent), with an optional Identity or
    Cast (to ``between_type``) between the Mul and the Add."""
    if gamma_shape is not None:
        g = net.const(rng.uniform(0.5, 1.5, gamma_shape), dtype)
        t = net.op("Mul", *((g, t) if gamma_first else (t, g)))
    if between == "identity":
        t = net.op("Identity", t)
    elif between == "cast":
        t = net.op("Cast", t, to=between_type)
        dtype = between_type
    if beta_shape is not None:
        b = net.const(rng.standard_normal(beta_shape), dtype)
        t = net.op("Add", *((b, t) if beta_first else (t, b)))
    return t


def param_shape(draw, rank: int, norm_shape: tuple, allow_absent: bool = True):
    """A gamma/beta shape broadcasting to ``norm_shape`` per normalized element: the trailing
    dims, with leading 1s (rank growth to at most ``rank``), or size-1 dims inside."""
    if allow_absent and draw(st.booleans()):
        return None
    n = len(norm_shape)
    shape = [d if draw(st.integers(0, 3)) else 1 for d in norm_shape]
    lead = draw(st.integers(0, rank - n))
    return tuple([1] * lead + shape)


@st.composite
def shapes(draw, min_rank=2, min_norm=1):
    """(x shape with symbolic or static leading dims, number of trailing normalized axes)."""
    rank = draw(st.integers(min_rank, 4))
    n = draw(st.integers(min_norm, rank))
    lead = [draw(st.one_of(st.integers(1, 3), st.sampled_from(["N", "S"]))) for _ in range(rank - n)]
    if len(set(d for d in lead if isinstance(d, str))) < sum(isinstance(d, str) for d in lead):
        lead = [d if isinstance(d, int) else f"d{i}" for i, d in enumerate(lead)]
    return lead + [draw(st.integers(2, 6)) for _ in range(n)], n


def trailing_axes(first: int, n: int, rank: int, negative: bool) -> list[int]:
    axes = list(range(first, first + n))
    return [a - rank for a in axes] if negative else axes


def channel_param(draw, rank: int, channels: int, per_channel: bool = False):
    """A per-channel parameter shape: [C, 1, ...], [1, C, 1, ...], or a scalar / [1]."""
    forms = [(channels,) + (1,) * (rank - 2), (1, channels) + (1,) * (rank - 2)]
    return draw(st.sampled_from(forms if per_channel else forms + [(), (1,)]))


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2 ** 31 - 1)


# ------------------------------------------------------------------------------ affine tails

@dataclass
class Tail:
    """The steps after a normalization core, and what a fused op absorbs of them."""

    steps: list = field(default_factory=list)   # ("mul"|"add", shape, first) | ("cast", to) | ("identity",)
    constant_nodes: bool = False                # parameters written as Constant nodes

    def build(self, net: Net, t: str, rng, dtype: int) -> tuple[str, int]:
        self.constant_nodes = net.constants == "node"
        for step in self.steps:
            if step[0] in ("mul", "add"):
                value = rng.uniform(0.5, 1.5, step[1]) if step[0] == "mul" else rng.standard_normal(step[1])
                if step[3:] == ("gemma",):  # Gemma's (1 + w), w constant
                    p = net.op("Add", net.const(np.ones(()), dtype), net.const(value - 1.0, dtype))
                else:
                    p = net.const(value, dtype)
                t = net.op(step[0].capitalize(), *((p, t) if step[2] else (t, p)))
            elif step[0] == "cast":
                t = net.op("Cast", t, to=step[1])
                dtype = step[1]
            else:
                t = net.op("Identity", t)
        return t, dtype

    def absorbed(self, core_dtype: int) -> tuple[int, list[int], dict[str, int]]:
        """(dtype of the fused op's output, dtypes of absorbed parameters, op counts left after it):
        the fused op takes every step up to the last Mul/Add before the first one marked "outside"
        (a parameter varying over other axes); everything after it stays."""
        outside = next((i for i, s in enumerate(self.steps) if s[3:] == ("outside",)), len(self.steps))
        last = max((i for i, s in enumerate(self.steps[:outside]) if s[0] in ("mul", "add")), default=-1)
        dtype, params, left = core_dtype, [], {}
        for i, step in enumerate(self.steps):
            if i <= last:
                if step[0] == "cast":
                    dtype = step[1]
                elif step[0] in ("mul", "add"):
                    params.append(dtype)
            else:
                op = {"cast": "Cast", "identity": "Identity"}.get(step[0], step[0].capitalize())
                left[op] = left.get(op, 0) + 1
                if op in ("Mul", "Add") and self.constant_nodes:
                    left["Constant"] = left.get("Constant", 0) + 1
        return dtype, params, left


def fused_counts(op: str, x_dtype: int, out_dtype: int, params: list[int], left: dict[str, int],
                 extra: dict[str, int] | None = None) -> dict[str, int]:
    """Op counts after fusing: the op, Casts around it where its work type (the widest of input,
    output and absorbed parameters) differs, what the tail left, the graph's final Identity."""
    work = widest(x_dtype, out_dtype, *params)
    counts = {op: 1, "Identity": 1}
    for k, v in list(left.items()) + list((extra or {}).items()):
        counts[k] = counts.get(k, 0) + v
    casts = (work != x_dtype) + (work != out_dtype)
    if casts:
        counts["Cast"] = counts.get("Cast", 0) + casts
    return counts


@st.composite
def tails(draw, rank: int, norm_shape: tuple, model_dtype: int, core_dtype: int, with_bias: bool = True,
          param_shapes=None, positional: tuple | None = None) -> Tail:
    """[Mul gamma] [Identity | Cast] [Add beta], each optional, on either side; when the core
    computes in a wider type than the model, one Cast back to the model's type somewhere;
    sometimes a ``positional`` Add that must stay outside (in beta's place, or last)."""
    param_shapes = param_shapes or (lambda: param_shape(draw, rank, norm_shape))
    gamma, beta = param_shapes(), (param_shapes() if with_bias else None)
    steps = []
    if gamma is not None:
        steps.append(("mul", gamma, draw(st.booleans())))
    if draw(st.booleans()):
        steps.append(("identity",))
    if beta is not None:
        steps.append(("add", beta, draw(st.booleans())))
    if core_dtype != model_dtype:
        steps.insert(draw(st.integers(0, len(steps))), ("cast", model_dtype))
    if positional is not None and draw(st.integers(0, 3)) == 0:
        # a positional Add ([S, D] after a norm over D): not per normalized element, kept after the op
        add = ("add", positional, draw(st.booleans()), "outside")
        beta_at = next((i for i, s in enumerate(steps) if s[0] == "add"), None)
        if beta_at is not None and draw(st.booleans()):
            steps[beta_at] = add
        else:
            steps.append(add)
    return Tail(steps)


def at_opset_7(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime has no BatchNormalization-6, Add-6 or Gemm-6 kernel: a model of opset 6 runs
    as the same model at opset 7, where is_test=1 and broadcast=1 are what the ops do anyway."""
    runnable = onnx.ModelProto()
    runnable.CopyFrom(model)
    runnable.opset_import[0].version = 7
    for node in runnable.graph.node:
        for attr in [a for a in node.attribute if a.name in ("is_test", "broadcast")]:
            node.attribute.remove(attr)
    return runnable


def typed_model(nodes, inputs, outputs, inits, opset: int) -> onnx.ModelProto:
    """``make_model`` where ``outputs`` are (name, elem_type) pairs whose shapes shape inference finds."""
    untyped = make_model(nodes, inputs, [], inits, opset=opset)
    inferred = onnx.shape_inference.infer_shapes(untyped)
    known = {v.name: v for v in inferred.graph.value_info}
    rank = len(inputs[0][2])  # where inference cannot tell (a model the checker accepts, that cannot run)
    untyped.graph.output.extend(known.get(name) or helper.make_tensor_value_info(name, elem, [None] * rank)
                                for name, elem in outputs)
    for vi, (_, elem) in zip(untyped.graph.output, outputs):
        assert vi.type.tensor_type.elem_type == elem, (vi, elem)
    onnx.checker.check_model(untyped)
    return untyped

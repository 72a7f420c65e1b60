"""fuse-layernorm: every exporter spelling fuses to LayerNormalization; near misses stay, with reasons."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import GraphBuilder, assert_equivalent, make_model, op_counts, run_pass, run_pipeline

F32, F16, F64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE
NP = {F32: np.float32, F16: np.float16, F64: np.float64, TensorProto.INT32: np.int32}
LN = "LayerNormalization"
SHAPE = [2, 5, 8]


class Net(GraphBuilder):
    def __init__(self, opset=13, dtype=F32):
        super().__init__(opset, dtype)

    def mean(self, x, axes, keepdims=1):
        return super().mean(x, axes, keepdims=keepdims)

    def model(self, out, shape=SHAPE, in_dtype=None, out_dtype=None, inputs=(), outputs=()):
        self.nodes.append(helper.make_node("Identity", [out], ["y"]))
        ins = [("x", in_dtype or self.dtype, shape), *inputs]
        outs = [("y", out_dtype or self.dtype, shape), *outputs]
        return make_model(self.nodes, ins, outs, self.inits, opset=self.opset)


def layernorm(net, x="x", axes=(-1,), square="pow", divide="div", eps=1e-5, eps_first=False, eps_shape=(),
              exponent=2.0, dup_sub=False, keepdims=1, var_axes=None, cast_d=None, dup_mean_axes=None):
    """The decomposed core, as exporters write it; returns the normalized tensor.
    dup_mean_axes: the variance centres x on a second ReduceMean (TorchScript torch.var_mean)."""
    mean = net.mean(x, axes, keepdims)
    d = net.op("Sub", x, mean)
    dv = net.op("Sub", x, mean) if dup_sub else d
    if dup_mean_axes is not None:
        dv = net.op("Sub", x, net.mean(x, dup_mean_axes, keepdims))
    if cast_d is not None:                     # TorchScript fp16: Sub -> Cast(double) -> Pow and Div
        d = dv = net.op("Cast", d, to=cast_d)
    inner = cast_d or net.dtype
    sq = net.op("Pow", dv, net.const(exponent, inner)) if square == "pow" else net.op("Mul", dv, dv)
    var = net.mean(sq, var_axes or axes, keepdims)
    if eps is None:                            # onnxscript's optimizer drops x + c for |c| <= 1e-8
        shifted = var
    else:
        e = net.const(np.full(eps_shape, eps), inner)
        shifted = net.op("Add", *((e, var) if eps_first else (var, e)))
    if divide == "pow":                        # (var + eps) ** -0.5 written by hand
        return net.op("Mul", d, net.op("Pow", shifted, net.const(-0.5, inner)))
    std = net.op("Sqrt", shifted)
    if divide == "div":
        return net.op("Div", d, std)
    if divide == "swapped":
        return net.op("Div", std, d)
    recip = net.op("Reciprocal", std) if divide == "reciprocal" else net.op("Div", net.const(1.0, inner), std)
    return net.op("Mul", recip, d)


def affine(net, t, rng, gamma=(8,), beta=(8,), dtype=None, gamma_first=False):
    dtype = dtype or net.dtype
    if gamma is not None:
        g = net.const(rng.uniform(0.5, 1.5, gamma), dtype)
        t = net.op("Mul", *((g, t) if gamma_first else (t, g)))
    if beta is not None:
        t = net.op("Add", t, net.const(rng.standard_normal(beta), dtype))
    return t


def ln_node(model):
    return next(n for n in model.graph.node if n.op_type == LN)


def attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fused(model, **kw):
    out, rec = run_pass("fuse-layernorm", model, **kw)
    assert len(rec.applied) >= 1 and not rec.skipped, [s.reason for s in rec.skipped]
    return out, rec


def left_alone(model, reason, passes=("fuse-layernorm",)):
    out, result = run_pipeline(model, list(passes))
    assert op_counts(out) == op_counts(model)
    reasons = [s.reason for r in result.passes for s in r.skipped]
    assert any(reason in r for r in reasons), reasons
    return out


# ----------------------------------------------------------------------------- must fuse

CORE_VARIANTS = {
    "pytorch_op13": dict(),
    "axes_input_op18": dict(opset=18),
    "positive_axis": dict(axes=(2,)),
    "square_as_mul": dict(square="mul"),
    "reciprocal_mul": dict(divide="reciprocal"),
    "div_one_mul": dict(divide="div_one", opset=18),
    "pow_minus_half": dict(divide="pow"),
    "duplicated_sub": dict(dup_sub=True),
    "torch_var_mean_duplicated_mean": dict(dup_mean_axes=(-1,), square="mul", divide="div_one"),
    "eps_first_1_element": dict(eps_first=True, eps_shape=(1,)),
    "eps_1e-3": dict(eps=1e-3),
    "eps_1e-12": dict(eps=1e-12),
}


@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_fuse_layernorm_core_variant_is_fused(variant, rng):
    kw = dict(CORE_VARIANTS[variant])
    net = Net(opset=kw.pop("opset", 13))
    model = net.model(affine(net, layernorm(net, **kw), rng))
    out, rec = fused(model)
    assert op_counts(out) == {LN: 1, "Identity": 1}
    a = attrs(ln_node(out))
    assert a["axis"] == -1 and a["stash_type"] == 1
    assert a["epsilon"] == pytest.approx(kw.get("eps", 1e-5), rel=1e-6)
    assert len(ln_node(out).input) == 3
    assert_equivalent(model, out)


def test_fuse_layernorm_without_epsilon_add_has_epsilon_0(rng):
    """dynamo's default optimizer (onnxscript) removes ``var + 1e-12`` as adding zero: what is
    left is LayerNorm with epsilon 0, exactly."""
    net = Net(opset=18)
    model = net.model(affine(net, layernorm(net, eps=None), rng))
    assert "Add" in op_counts(model) and op_counts(model)["Add"] == 1  # the bias only
    out, rec = fused(model)
    assert op_counts(out) == {LN: 1, "Identity": 1}
    assert attrs(ln_node(out))["epsilon"] == 0.0 and rec.applied[0].info["epsilon"] == 0.0
    assert_equivalent(model, out)


def test_fuse_layernorm_opset13_model_is_upgraded_to_17(rng):
    net = Net(opset=13)
    model = net.model(affine(net, layernorm(net), rng))
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert [(u.from_version, u.to_version) for u in result.upgrades] == [(13, 17)]
    assert out.opset_import[0].version == 17 and op_counts(out) == {LN: 1, "Identity": 1}
    assert_equivalent(model, out)


def test_fuse_layernorm_upgrade_disabled_is_skipped_with_reason(rng):
    net = Net(opset=14)
    model = net.model(affine(net, layernorm(net), rng))
    out, result = run_pipeline(model, ["fuse-layernorm"], allow_opset_upgrade=False)
    assert op_counts(out) == op_counts(model) and out.opset_import[0].version == 14
    assert any("needs opset 17 (model has 14); opset upgrade disabled" in s.reason for s in result.passes[0].skipped)


def test_fuse_layernorm_two_trailing_axes_give_axis_minus_2(rng):
    net = Net(opset=17)
    model = net.model(affine(net, layernorm(net, axes=(-2, -1)), rng, gamma=(5, 8), beta=(5, 8)))
    out, _ = fused(model)
    assert attrs(ln_node(out))["axis"] == -2
    assert_equivalent(model, out)


def test_fuse_layernorm_without_beta_has_two_inputs(rng):
    net = Net(opset=17)
    model = net.model(affine(net, layernorm(net), rng, beta=None, gamma_first=True))
    out, _ = fused(model)
    assert op_counts(out) == {LN: 1, "Identity": 1} and len(ln_node(out).input) == 2
    assert_equivalent(model, out)


def test_fuse_layernorm_without_gamma_and_beta_scales_by_ones(rng):
    net = Net(opset=17)
    model = net.model(layernorm(net, axes=(-2, -1)))
    out, _ = fused(model)
    node = ln_node(out)
    assert len(node.input) == 2
    scale = next(numpy_helper.to_array(i) for i in out.graph.initializer if i.name == node.input[1])
    assert scale.shape == (5, 8) and np.all(scale == 1)
    assert_equivalent(model, out)


def test_fuse_layernorm_gamma_1_1_D_is_reshaped(rng):
    net = Net(opset=17)
    model = net.model(affine(net, layernorm(net), rng, gamma=(1, 1, 8), beta=(1, 8)))
    out, _ = fused(model)
    assert op_counts(out) == {LN: 1, "Identity": 1}
    assert_equivalent(model, out)


def test_fuse_layernorm_positional_add_stays_outside(rng):
    """An Add of a [S, D] tensor varies over a non-normalized axis: it is not LayerNorm's bias."""
    net = Net(opset=17)
    model = net.model(affine(net, layernorm(net), rng, gamma=(8,), beta=(5, 8)))
    out, rec = fused(model)
    assert op_counts(out) == {LN: 1, "Add": 1, "Identity": 1} and len(ln_node(out).input) == 2
    assert "varies over non-normalized axes" in rec.applied[0].info["kept"]
    assert_equivalent(model, out)


def test_fuse_layernorm_minus_beta_stays_outside(rng):
    net = Net(opset=17)
    t = affine(net, layernorm(net), rng, beta=None)
    model = net.model(net.op("Sub", t, net.const(rng.standard_normal(8))))
    out, _ = fused(model)
    assert op_counts(out) == {LN: 1, "Sub": 1, "Identity": 1}
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- mixed precision

def _apex_fp16(rng, exponent_cast=False):
    """float16 model whose statistics run in float32 (Apex O2 / autocast): Cast x up, Cast down
    before the float16 affine; optionally the Pow exponent comes through a Cast too."""
    net = Net(opset=17, dtype=F32)
    xc = net.op("Cast", "x", to=F32)
    t = layernorm(net, xc)
    if exponent_cast:
        at = next(i for i, n in enumerate(net.nodes) if n.op_type == "Pow")
        net.nodes[at].input[1] = net.op("Cast", net.const(2.0, F16), to=F32)
        net.nodes.insert(at, net.nodes.pop())
    t = affine(net, net.op("Cast", t, to=F16), rng, dtype=F16)
    return net.model(t, in_dtype=F16, out_dtype=F16)


def _cast_after_affine(rng):
    net = Net(opset=17, dtype=F32)
    t = affine(net, layernorm(net, net.op("Cast", "x", to=F32)), rng)
    return net.model(net.op("Cast", t, to=F16), in_dtype=F16, out_dtype=F16)


def _torchscript_fp16(rng):
    """TorchScript fp16 LayerNorm below opset 17: mean and Sub in fp16, the rest in double."""
    net = Net(opset=14, dtype=F16)
    t = net.op("Cast", layernorm(net, cast_d=F64), to=F16)
    return net.model(affine(net, t, rng))


def _torchscript_fp16_no_affine(rng):
    """The same without gamma and beta (elementwise_affine=False): only a Cast back to float16
    follows the double division, and the fused op takes it as its output."""
    net = Net(opset=14, dtype=F16)
    return net.model(net.op("Cast", layernorm(net, cast_d=F64), to=F16))


def _fp32_core_fp16_affine(rng):
    net = Net(opset=17, dtype=F32)
    t = affine(net, net.op("Cast", layernorm(net), to=F16), rng, dtype=F16)
    return net.model(t, out_dtype=F16)


def _fp16_throughout(rng):
    net = Net(opset=17, dtype=F16)
    return net.model(affine(net, layernorm(net), rng))


def _fp64(rng):
    net = Net(opset=17, dtype=F64)
    return net.model(affine(net, layernorm(net), rng))


# variant: (model, LayerNormalization type, Cast nodes after fusion)
MIXED = {
    "apex_fp16": (_apex_fp16, np.float16, 0),
    "exponent_through_cast": (lambda rng: _apex_fp16(rng, exponent_cast=True), np.float16, 0),
    "cast_after_affine": (_cast_after_affine, np.float32, 2),
    "torchscript_fp16_double": (_torchscript_fp16, np.float16, 0),
    "torchscript_fp16_double_no_affine": (_torchscript_fp16_no_affine, np.float16, 0),
    "fp32_core_fp16_affine": (_fp32_core_fp16_affine, np.float32, 1),
    "fp16_throughout": (_fp16_throughout, np.float16, 0),
    "fp64": (_fp64, np.float64, 0),
}


@pytest.mark.parametrize("variant", MIXED)
def test_fuse_layernorm_mixed_precision_keeps_output_type(variant, rng):
    build, ln_type, casts = MIXED[variant]
    model = build(rng)
    out, rec = fused(model)
    assert op_counts(out) == {LN: 1, "Identity": 1, **({"Cast": casts} if casts else {})}
    assert rec.applied[0].info["dtype"] == np.dtype(ln_type).name
    a = attrs(ln_node(out))
    assert a["stash_type"] == (TensorProto.DOUBLE if ln_type == np.float64 else TensorProto.FLOAT)
    assert out.graph.output[0].type.tensor_type.elem_type == model.graph.output[0].type.tensor_type.elem_type
    eps = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == _eps_name(model))
    assert a["epsilon"] == pytest.approx(float(eps))  # the value as stored: 1e-5 in float16 is 1.0014e-5
    assert_equivalent(model, out)


def test_fuse_layernorm_narrowing_input_cast_stays_outside(rng):
    """float32 x rounded to float16 before float16 statistics: the fused op must see the rounded
    values, so the Cast stays in front of a float16 LayerNormalization. (Only the structure can
    show it: onnxruntime's CPU provider runs float16 ReduceMean in float32 and drops the
    Cast pair, so it never rounds x in the original either.)"""
    net = Net(opset=17, dtype=F16)
    model = net.model(affine(net, layernorm(net, net.op("Cast", "x", to=F16)), rng), in_dtype=F32)
    out, rec = fused(model)
    assert op_counts(out) == {"Cast": 1, LN: 1, "Identity": 1} and rec.applied[0].info["dtype"] == "float16"
    cast = next(n for n in out.graph.node if n.op_type == "Cast")
    assert ln_node(out).input[0] == cast.output[0] and cast.input[0] == "x"
    assert_equivalent(model, out)


def _eps_name(model):
    add = next(n for n in model.graph.node if n.op_type == "Add" and any(
        p.op_type == "ReduceMean" for p in model.graph.node if p.output[0] in n.input))
    return next(i for i in add.input if any(t.name == i for t in model.graph.initializer))


# ----------------------------------------------------------------------------- near misses

def _model(rng, opset=17, shape=SHAPE, inputs=(), outputs=(), gamma=(8,), beta=(8,), **kw):
    net = Net(opset=opset)
    return net, net.model(affine(net, layernorm(net, **kw), rng, gamma=gamma, beta=beta), shape=shape,
                          inputs=inputs, outputs=outputs)


def _variance_of_input(rng):
    net = Net(opset=17)
    mean = net.mean("x", (-1,))
    var = net.mean(net.op("Pow", "x", net.const(2.0)), (-1,))
    std = net.op("Sqrt", net.op("Add", var, net.const(1e-5)))
    return net.model(net.op("Div", net.op("Sub", "x", mean), std))


def _mean_of_other_tensor(rng):
    net = Net(opset=17)
    t = layernorm(net)
    mean = next(n for n in net.nodes if n.op_type == "ReduceMean")
    mean.input[0] = "z"
    return net.model(t, inputs=[("z", F32, SHAPE)])


def _escaping(rng, what):
    net = Net(opset=17)
    t = layernorm(net)
    inner = next(n.output[0] for n in net.nodes if n.op_type == what)
    net.nodes.append(helper.make_node("Neg", [inner], ["side"]))
    return net.model(t, outputs=[("side", F32, SHAPE)])


def _graph_output(rng):
    """The centred x - mean is also a graph output (the mean itself would be the op's Mean output)."""
    net = Net(opset=17)
    t = layernorm(net)
    centred = net.nodes[1].output[0]
    return net.model(t, outputs=[(centred, F32, SHAPE)])


def _integer(rng):
    net = Net(opset=17, dtype=TensorProto.INT32)
    return net.model(layernorm(net, exponent=2, eps=1))


def _fp16_inside_fp32(rng):
    """float32 in, float32 affine and out, but the statistics in float16: fusing would change
    results beyond float32 tolerance. (Also with a float16 input: the output type decides.)"""
    net = Net(opset=17, dtype=F16)
    t = layernorm(net, net.op("Cast", "x", to=F16))
    return net.model(affine(net, net.op("Cast", t, to=F32), rng, dtype=F32), in_dtype=F32, out_dtype=F32)


def _fp16_statistics_fp32_output(rng):
    net = Net(opset=17, dtype=F16)
    t = affine(net, net.op("Cast", layernorm(net), to=F32), rng, dtype=F32)
    return net.model(t, in_dtype=F16, out_dtype=F32)


def _fp16_rounding_before_affine(rng):
    """float32 throughout, but the normalized tensor is rounded to float16 and back before the
    affine: the float32 LayerNormalization would not round it."""
    net = Net(opset=17)
    t = net.op("Cast", net.op("Cast", layernorm(net), to=F16), to=F32)
    return net.model(affine(net, t, rng))


def _constant_axes_missing(rng):
    net = Net(opset=18)
    t = layernorm(net)
    for node in net.nodes:
        if node.op_type == "ReduceMean":
            node.input[1] = "axes"
    return net.model(t, inputs=[("axes", TensorProto.INT64, [1])])


def _rank_unknown(rng):
    """x reshaped to a shape of unknown length: the rank is unknown, positive axis 2 can't be placed."""
    net = Net(opset=17)
    h = net.op("Reshape", "x", "shape")
    return net.model(layernorm(net, h, axes=(2,)), inputs=[("shape", TensorProto.INT64, ["n"])])


def _rank_growing(rng, op):
    """A 1-element constant of rank 4 as the Pow exponent, or as the 1 of 1/std, broadcasts the
    rank-3 core to rank 4 (with the ReduceMean axes then counted on the grown tensor): a
    LayerNormalization would keep rank 3."""
    net = Net(opset=17)
    t = layernorm(net, divide="div_one")
    at = 0 if op == "Div" else 1
    name = next(n.input[at] for n in net.nodes if n.op_type == op and n.input[at] in net.inits)
    net.inits[name] = net.inits[name].reshape(1, 1, 1, 1)
    net.nodes.append(helper.make_node("Identity", [t], ["y"]))
    return make_model(net.nodes, [("x", F32, SHAPE)], [("y", F32, [1, *SHAPE])], net.inits, opset=17)


NEAR_MISSES = {
    "rank_unknown_positive_axis": (_rank_unknown, "axes [2] cannot be placed (input rank unknown)"),
    "channels_first": (lambda rng: _model(rng, shape=[2, 8, 3, 3], axes=(1,), gamma=(8, 1, 1),
                                          beta=(8, 1, 1))[1], "not its trailing axes"),
    "keepdims_0": (lambda rng: _model(rng, shape=[4, 8], keepdims=0, gamma=None, beta=None)[1], "keepdims=0"),
    "different_axes": (lambda rng: _model(rng, var_axes=(-2, -1))[1], "reduce different axes"),
    "duplicated_mean_other_axes": (lambda rng: _model(rng, dup_mean_axes=(-2, -1))[1],
                                   "reduce different axes ([2] and [1, 2])"),
    "pow_3": (lambda rng: _model(rng, exponent=3.0)[1], "Pow exponent is 3, not 2"),
    "div_swapped": (lambda rng: _model(rng, divide="swapped")[1], "operands swapped"),
    "variance_of_other_tensor": (_variance_of_input, "variance is taken of 'x'"),
    "mean_of_other_tensor": (_mean_of_other_tensor, "mean is taken of 'z', not of the centred input 'x'"),
    "epsilon_graph_input": (lambda rng: _eps_input(rng), "epsilon 'eps' is not a constant"),
    "centred_used_elsewhere": (lambda rng: _escaping(rng, "Sub"), "is also used by Neg"),
    "std_used_elsewhere": (lambda rng: _escaping(rng, "Sqrt"), "is also used by Neg"),
    "centred_is_graph_output": (_graph_output, "graph output"),
    "integer_dtype": (_integer, "integer dtype int32"),
    "fp16_statistics_in_fp32_model": (_fp16_inside_fp32, "computed in float16, narrower than the output's float32"),
    "fp16_statistics_fp32_output": (_fp16_statistics_fp32_output, "computed in float16, narrower than the output's"),
    "fp16_rounding_before_affine": (_fp16_rounding_before_affine,
                                    "is computed in float16, narrower than the output's float32"),
    "axes_not_constant": (_constant_axes_missing, "has no constant axes"),
    "exponent_rank_4": (lambda rng: _rank_growing(rng, "Pow"), "exponent has rank 4, more than the input's 3"),
    "one_over_std_rank_4": (lambda rng: _rank_growing(rng, "Div"), "1 of 1 / std has rank 4, more than the input's 3"),
}


def _eps_input(rng):
    net = Net(opset=17)
    t = layernorm(net)
    add = next(n for n in net.nodes if n.op_type == "Add")
    add.input[1] = "eps"
    return net.model(affine(net, t, rng), inputs=[("eps", F32, [])])


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_fuse_layernorm_near_miss_is_left_unchanged(case, rng):
    build, reason = NEAR_MISSES[case]
    left_alone(build(rng), reason)


# ----------------------------------------------------------------------------- TF / Keras

def _tf(rng, form):
    """tf2onnx LayerNorm: s = gamma / sqrt(var + eps); y = x*s + (beta - mean*s) (tf.nn.batch_normalization),
    Keras 3's x*s + ((-mean)*s + beta), or neither gamma nor beta: x*r + (-mean)*r."""
    net = Net(opset=13)
    mean = net.mean("x", (-1,))
    d = net.op("Sub", "x", mean)
    var = net.mean(net.op("Mul", d, d), (-1,))
    r = net.op("Reciprocal", net.op("Sqrt", net.op("Add", var, net.const(1e-3))))
    s = r if form == "plain" else net.op("Mul", r, net.const(rng.uniform(0.5, 1.5, 8)))
    xs = net.op("Mul", "x", s)
    beta = net.const(rng.standard_normal(8))
    if form == "tf":
        bias = net.op("Sub", beta, net.op("Mul", mean, s))
    else:
        bias = net.op("Mul", net.op("Neg", mean), s)
        bias = bias if form == "plain" else net.op("Add", bias, beta)
    return net.model(net.op("Add", xs, bias))


@pytest.mark.parametrize("form, inputs", [("tf", 3), ("keras3", 3), ("plain", 2)])
def test_fuse_layernorm_tf_keras_form_is_fused(form, inputs, rng):
    model = _tf(rng, form)
    out, rec = fused(model)
    assert op_counts(out) == {LN: 1, "Identity": 1} and len(ln_node(out).input) == inputs
    assert attrs(ln_node(out))["epsilon"] == pytest.approx(1e-3)
    assert_equivalent(model, out)


def test_fuse_layernorm_tf_form_gamma_over_other_axes_is_rejected(rng):
    model = _tf(rng, "tf")
    gamma = next(i for i in model.graph.initializer if numpy_helper.to_array(i).shape == (8,))
    gamma.CopyFrom(numpy_helper.from_array(rng.uniform(0.5, 1.5, (5, 8)).astype(np.float32), gamma.name))
    left_alone(model, "varies over non-normalized axes")


# ----------------------------------------------------------------------------- ONNX function body

def _function_body(rng, opset, axis, bias, dtype=F32):
    """A LayerNormalization expanded by ONNX's own inliner (its context-dependent function body)."""
    d = tuple(SHAPE[axis:])
    inits = {"S": rng.uniform(0.5, 1.5, d).astype(NP[dtype])}
    if bias:
        inits["B"] = rng.standard_normal(d).astype(NP[dtype])
    node = helper.make_node(LN, ["x", "S", "B"] if bias else ["x", "S"], ["y"], axis=axis, epsilon=1e-4)
    model = make_model([node], [("x", dtype, SHAPE)], [("y", dtype, SHAPE)], inits, opset=opset)
    model.graph.value_info.extend(helper.make_tensor_value_info(k, dtype, v.shape) for k, v in inits.items())
    expanded = onnx.inliner.inline_selected_functions(model, [("", LN)], inline_schema_functions=True)
    assert LN not in op_counts(expanded)
    return expanded


@pytest.mark.parametrize("opset, axis, bias, dtype", [(17, -1, True, F32), (18, -1, False, F32),
                                                      (18, -2, True, F32), (17, -1, True, F16)])
def test_fuse_layernorm_onnx_function_body_is_fused_over_the_original_input(opset, axis, bias, dtype, rng):
    model = _function_body(rng, opset, axis, bias, dtype)
    out, rec = fused(model)
    assert op_counts(out) == {LN: 1}
    node = ln_node(out)
    assert node.input[0] == "x" and node.output[0] == "y" and attrs(node)["axis"] == axis
    assert len(node.input) == (3 if bias else 2) and attrs(node)["epsilon"] == pytest.approx(1e-4)
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- subgraphs

def _body(rng, name, x, out):
    net = Net(opset=17)
    net.count = 100 * len(name)
    t = affine(net, layernorm(net, x), rng)
    net.nodes.append(helper.make_node("Identity", [t], [out]))
    return net


def _if(rng):
    net = _body(rng, "then", "x", "then_y")
    then = helper.make_graph(net.nodes, "then", [], [helper.make_tensor_value_info("then_y", F32, SHAPE)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["else_y"])], "else", [],
                              [helper.make_tensor_value_info("else_y", F32, SHAPE)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
    return make_model([node], [("x", F32, SHAPE)], [("y", F32, SHAPE)], {**net.inits, "cond": np.array(True)},
                      opset=17)


def _loop(rng):
    net = _body(rng, "loop", "h", "h_out")
    net.nodes.append(helper.make_node("Identity", ["c"], ["c_out"]))
    body = helper.make_graph(net.nodes, "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("h", F32, SHAPE)],
                             [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("h_out", F32, SHAPE)])
    node = helper.make_node("Loop", ["trip", "keep", "x"], ["y"], body=body)
    inits = {**net.inits, "trip": np.array(2, np.int64), "keep": np.array(True)}
    return make_model([node], [("x", F32, SHAPE)], [("y", F32, SHAPE)], inits, opset=17)


def _scan(rng):
    net = _body(rng, "scan", "row", "row_out")
    body = helper.make_graph(net.nodes, "body", [helper.make_tensor_value_info("row", F32, SHAPE[1:])],
                             [helper.make_tensor_value_info("row_out", F32, SHAPE[1:])])
    node = helper.make_node("Scan", ["x"], ["y"], body=body, num_scan_inputs=1)
    return make_model([node], [("x", F32, SHAPE)], [("y", F32, SHAPE)], net.inits, opset=17)


@pytest.mark.parametrize("build", [_if, _loop, _scan], ids=["if", "loop", "scan"])
def test_fuse_layernorm_inside_subgraph_is_fused(build, rng):
    model = build(rng)
    out, rec = fused(model)
    assert op_counts(out).get(LN) == 1 and "ReduceMean" not in op_counts(out)
    assert rec.applied[0].graph  # found inside the body, not the main graph
    assert_equivalent(model, out)


def _centred_read_by_if_branch(rng):
    """The main-graph x - mean is also read, as an outer-scope value, by a node inside an If
    branch whose output is only that branch's output (no user in the main graph)."""
    net = Net(opset=17)
    t = layernorm(net)
    centred = net.nodes[1].output[0]
    branches = {k: helper.make_graph([helper.make_node(op, [centred], [f"{k}_m"])], k, [],
                                     [helper.make_tensor_value_info(f"{k}_m", F32, SHAPE)])
                for k, op in (("then", "Neg"), ("else", "Abs"))}
    net.nodes.append(helper.make_node("If", ["cond"], ["side"], then_branch=branches["then"],
                                      else_branch=branches["else"]))
    return net.model(t, inputs=[("cond", TensorProto.BOOL, [])], outputs=[("side", F32, SHAPE)])


def _core_split_across_scopes(rng):
    """Mean and Sub in the main graph, the rest of the core in an If branch; the centred tensor
    is also a main-graph output, which no check on the branch can see."""
    net = Net(opset=17)
    d = net.op("Sub", "x", net.mean("x", (-1,)))
    body = Net(opset=17)
    body.count = 100
    std = body.op("Sqrt", body.op("Add", body.mean(body.op("Pow", d, body.const(2.0)), (-1,)), body.const(1e-5)))
    body.nodes.append(helper.make_node("Div", [d, std], ["then_y"]))
    then = helper.make_graph(body.nodes, "then", [], [helper.make_tensor_value_info("then_y", F32, SHAPE)],
                             [numpy_helper.from_array(v, k) for k, v in body.inits.items()])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["else_y"])], "else", [],
                              [helper.make_tensor_value_info("else_y", F32, SHAPE)])
    net.nodes.append(helper.make_node("If", ["cond"], ["branch"], then_branch=then, else_branch=other))
    return net.model("branch", inputs=[("cond", TensorProto.BOOL, [])], outputs=[(d, F32, SHAPE)])


@pytest.mark.parametrize("build, reason", [
    (_centred_read_by_if_branch, "is also used by Abs"),
    (_core_split_across_scopes, "in an outer graph"),
], ids=["intermediate_read_by_branch", "core_split_across_scopes"])
def test_fuse_layernorm_outer_scope_use_is_left_unchanged(build, reason, rng):
    left_alone(build(rng), reason)


# ----------------------------------------------------------------------------- real TorchScript exports

@pytest.mark.parametrize("opset", [13, 14])
def test_fuse_layernorm_torchscript_transformer_export_is_fused_after_upgrade(opset, tmp_path):
    """A small pre-LN transformer exported below opset 17 (LayerNorm decomposed), through every pass."""
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16, eps=1e-12)
            self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
            self.ff = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))

        def forward(self, x):
            h = self.ln1(x)
            x = x + torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 4.0, -1) @ self.v(h)
            return x + self.ff(self.ln2(x))

    torch.manual_seed(0)
    net = torch.nn.Sequential(Block(), Block(), torch.nn.LayerNorm(16, elementwise_affine=False)).eval()
    path = tmp_path / f"block{opset}.onnx"
    torch.onnx.export(net, (torch.randn(2, 5, 16),), str(path), dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "seq"}})
    model = onnx.load(str(path))
    assert LN not in op_counts(model)
    out, result = run_pipeline(model)
    assert [(u.from_version, u.to_version) for u in result.upgrades] == [(opset, 17)]
    assert op_counts(out)[LN] == 5 and "ReduceMean" not in op_counts(out) and "Pow" not in op_counts(out)
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- tf2onnx's NHWC layer norms

def _tf_nchw(rng, axes=(1,), perm=None, spatial=(4, 4), c=6, views=True, view_target=None, gamma_shape=None,
             mean_output=False, opset=13, gamma=True, transposed_output=False):
    """A Keras NHWC LayerNormalization as tf2onnx writes it once its optimizer moved the Conv's
    NCHW Transposes through it: the statistics over ``axes`` of the NCHW tensor x ([N, C, H, W]),
    tf.nn.moments' SquaredDifference as Sub and Mul, the mean put back by a Reshape for the Sub;
    x scaled as x itself (``perm`` None: y stays NCHW) or as Transpose(x, perm), with 1/std and
    -mean moved along by Reshapes to ``view_target`` (``views``), Keras 3's x*s + ((-mean)*s + beta)
    with gamma/beta in the layout of what they scale."""
    net = Net(opset=opset)
    shape = [2, c, *spatial]
    stat = [1 if i in axes else d for i, d in enumerate(shape)]
    mean = net.mean("x", axes)
    centred = net.op("Sub", "x", net.op("Reshape", mean, net.const([-1, *stat[1:]], "int")))
    var = net.mean(net.op("Mul", centred, centred), axes)
    inv = net.op("Reciprocal", net.op("Sqrt", net.op("Add", var, net.const(1e-3))))
    neg = net.op("Neg", mean)
    x, out_shape = "x", shape
    if perm is not None:
        x, out_shape = net.op("Transpose", "x", perm=list(perm)), [shape[p] for p in perm]
        if views:
            target = view_target or [-1, *[stat[p] for p in perm][1:]]
            inv = net.op("Reshape", inv, net.const(target, "int"))
            neg = net.op("Reshape", neg, net.const(target, "int"))
    params = gamma_shape or [1, *[1 if i not in [list(perm or range(4)).index(a) for a in axes] else d
                                  for i, d in enumerate(out_shape)][1:]]
    s = net.op("Mul", inv, net.const(rng.uniform(0.5, 1.5, params))) if gamma else inv
    shift = net.op("Add", net.op("Mul", neg, s), net.const(rng.standard_normal(params)))
    y = net.op("Add", net.op("Mul", x, s), shift)
    net.nodes.append(helper.make_node("Identity", [y], ["y"]))
    outs = [("y", F32, out_shape)] + ([(mean, F32, stat)] if mean_output else []) + \
        ([(x, F32, out_shape)] if transposed_output else [])
    return make_model(net.nodes, [("x", F32, shape)], outs, net.inits, opset=opset)


@pytest.mark.parametrize("kwargs, expected, axis", [
    (dict(), {"Transpose": 2}, -1),                                       # over C of NCHW: moved last
    (dict(axes=(1, 2, 3), perm=(0, 2, 3, 1)), {"Transpose": 1}, -3),      # over (H, W, C): x' = Transpose(x)
    (dict(axes=(1,), perm=(0, 2, 3, 1)), {"Transpose": 1}, -1),           # over C, scaled as NHWC
    (dict(axes=(2, 3, 1), perm=(0, 2, 3, 1), opset=18), {"Transpose": 1}, -3),
    (dict(axes=(1,), spatial=(6,)), {"Transpose": 2}, -1),                # rank 3 (Conv1D)
    (dict(gamma=False), {"Transpose": 2}, -1),                            # ones of C, not of W
    (dict(axes=(1, 2, 3), perm=(0, 2, 3, 1), transposed_output=True), {"Transpose": 1}, -3),  # x' read elsewhere
    (dict(axes=(1, 2, 3), perm=(0, 2, 3, 1), gamma=False), {"Transpose": 1}, -3),
], ids=["channels_nchw", "hwc_transposed", "channels_transposed", "hwc_transposed_opset18", "channels_rank3",
        "channels_nchw_no_gamma", "transposed_input_also_an_output", "hwc_transposed_no_gamma"])
def test_fuse_layernorm_tf2onnx_nhwc_forms_are_fused(kwargs, expected, axis, rng):
    model = _tf_nchw(rng, **kwargs)
    out, rec = fused(model)
    assert op_counts(out) == {LN: 1, "Identity": 1, **expected}
    node = ln_node(out)
    assert attrs(node)["axis"] == axis and attrs(node)["epsilon"] == pytest.approx(1e-3)
    assert "TF/Keras" in rec.applied[0].info["variant"]
    assert_equivalent(model, out)


def test_fuse_layernorm_tf2onnx_channels_first_gamma_is_moved_with_the_axes(rng):
    """The channels-first op's gamma/beta are per channel, [C], taken from [1, C, 1, 1]."""
    model = _tf_nchw(rng)
    out, _ = fused(model)
    gamma = next(numpy_helper.to_array(i) for i in out.graph.initializer if i.name == ln_node(out).input[1])
    source = next(numpy_helper.to_array(i) for i in model.graph.initializer
                  if numpy_helper.to_array(i).shape == (1, 6, 1, 1) and np.all(numpy_helper.to_array(i) >= 0.5))
    np.testing.assert_array_equal(gamma, source.reshape(-1))


@pytest.mark.parametrize("kwargs, reason", [
    # x scaled as NWHC: the Reshape of the statistics keeps H before W, the Transpose swaps them
    (dict(axes=(1,), perm=(0, 3, 2, 1)), "is not the Transpose [0, 3, 2, 1] that the input goes through"),
    # 1/std [N, 1, H, W] meets the NHWC x' as it is: broadcasting pairs H, W, C with 1, H, W
    (dict(axes=(1,), perm=(0, 2, 3, 1), c=4, views=False), "the 1/std is not the Transpose [0, 2, 3, 1]"),
    # H and W swapped in x', the statistics [N, 1, H, W] used as they are: same shape, other order
    (dict(axes=(1,), perm=(0, 1, 3, 2), views=False), "the 1/std is not the Transpose [0, 1, 3, 2]"),
    (dict(gamma_shape=[1, 6, 4, 1]), "varies over non-normalized axes"),
    # the mean as reduced, before its Reshape back, is the graph output: not the fused op's Mean
    (dict(axes=(1, 2, 3), perm=(0, 2, 3, 1), mean_output=True), "is also used by graph output"),
    (dict(mean_output=True), "is also used by graph output"),
], ids=["view_is_no_transpose", "statistic_not_moved", "statistic_axes_swapped", "gamma_spatial",
         "mean_used_elsewhere",
        "channels_first_mean_used_elsewhere"])
def test_fuse_layernorm_tf2onnx_nhwc_near_miss_is_left_unchanged(kwargs, reason, rng):
    model = _tf_nchw(rng, **kwargs)
    out = left_alone(model, reason)
    assert_equivalent(model, out)


def test_inspect_names_a_channels_first_tf_layernorm_by_its_op(rng):
    """Transpose -> LayerNormalization -> Transpose: the site becomes LayerNormalization."""
    from normopt.sites import inspect_model
    (site,) = inspect_model(_tf_nchw(rng)).sites
    assert (site.kind, site.action, site.becomes) == ("LayerNorm", "rewrite", "LayerNormalization")

"""fuse-layernorm / fuse-rmsnorm: traps found in review, chained norms, shapes computed at run
time, dynamo's variance forms, and the record every normalization-shaped site gets."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from helpers import GraphBuilder, assert_equivalent, make_model, op_counts, run_pipeline

F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE
LN, RMS = "LayerNormalization", "RMSNormalization"


def run_ort(model, feeds):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def layernorm(net, x, axes=(-1,), eps=1e-5):
    mean = net.mean(x, axes)
    d = net.op("Sub", x, mean)
    var = net.mean(net.op("Pow", d, net.const(2.0)), axes)
    return net.op("Div", d, net.op("Sqrt", net.op("Add", var, net.const(eps))))


def rmsnorm(net, x, axes=(-1,), eps=1e-6):
    var = net.mean(net.op("Pow", x, net.const(2.0)), axes)
    return net.op("Div", x, net.op("Sqrt", net.op("Add", var, net.const(eps))))


def finish(net, out, x_shape, y_shape=None, dtype=F32, inputs=(), outputs=()):
    net.nodes.append(helper.make_node("Identity", [out], ["y"]))
    return make_model(net.nodes, [("x", dtype, x_shape), *inputs], [("y", dtype, y_shape or x_shape), *outputs],
                      net.inits, opset=net.opset)


def reasons(result):
    return [s.reason for r in result.passes for s in r.skipped]


def left_alone(model, reason, passes):
    out, result = run_pipeline(model, list(passes))
    assert op_counts(out) == op_counts(model)
    assert any(reason in r for r in reasons(result)), reasons(result)
    return out


# ----------------------------------------------------------------------------- epsilon

@pytest.mark.parametrize("family, build", [("fuse-layernorm", layernorm), ("fuse-rmsnorm", rmsnorm)])
def test_double_epsilon_below_float32_range_is_left_unchanged(family, build):
    """The fused op's epsilon is a float32 attribute: 1e-50 would become 0, and a row of equal
    values (all zeros for RMS) would give 0/0 = NaN where the original gives 0."""
    net = GraphBuilder(opset=18, dtype=F64)
    model = finish(net, build(net, "x", eps=1e-50), [2, 3, 8], dtype=F64)
    row = np.zeros((2, 3, 8))
    assert not np.isnan(run_ort(model, {"x": row})[0]).any()
    left_alone(model, "epsilon 1e-50 is not representable as the op's float32 attribute (it would be 0)",
               [family])


def test_double_epsilon_in_float32_subnormal_range_is_left_unchanged():
    net = GraphBuilder(opset=18, dtype=F64)
    model = finish(net, layernorm(net, "x", eps=3.3e-44), [2, 3, 8], dtype=F64)
    left_alone(model, "epsilon 3.3e-44 is not representable", ["fuse-layernorm"])


def test_double_epsilon_float32_can_hold_is_fused(rng):
    net = GraphBuilder(opset=18, dtype=F64)
    model = finish(net, layernorm(net, "x", eps=1e-30), [2, 3, 8], dtype=F64)
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert op_counts(out) == {LN: 1, "Identity": 1} and not reasons(result)
    assert result.passes[0].applied[0].info["epsilon"] == 1e-30
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- declared shapes

def _reshaped(declared):
    """x [2, 5, 8] -> Reshape(x, s) with s a run-time [4] shape, LayerNorm over axis 2."""
    net = GraphBuilder(opset=17)
    r = net.op("Reshape", "x", "s")
    model = finish(net, layernorm(net, r, axes=(2,)), [2, 5, 8], ["p", "q", "r", "t"],
                   inputs=[("s", TensorProto.INT64, [4])])
    if declared is not None:
        model.graph.value_info.append(helper.make_tensor_value_info(r, F32, declared))
    return model


def test_declared_rank_contradicting_inference_is_left_unchanged():
    """Declared rank 3, really rank 4: trusting it would fuse axis 2 as axis -1 (wrong)."""
    left_alone(_reshaped([2, 5, 8]), "declared shape [2, 5, 8] of 'reshape1' contradicts the inferred", ["fuse-layernorm"])


def test_rank_from_inference_places_a_positive_axis():
    """Without the wrong declaration, inference gives rank 4: axis 2 is axis -2, not trailing."""
    out, result = run_pipeline(_reshaped(None), ["fuse-layernorm"])
    assert op_counts(out) == op_counts(_reshaped(None))
    assert any("normalizes axes [2] of a rank-4 input" in r for r in reasons(result)), reasons(result)


# ----------------------------------------------------------------------------- chained norms

def _chained(opset, dtype=F32, contrib=False):
    """LayerNorm then RMSNorm. ``contrib``: x comes from an op shape inference does not know
    (com.microsoft Gelu), its shape only declared."""
    net = GraphBuilder(opset=opset, dtype=dtype)
    x = "x"
    if contrib:
        x = "g"
        net.nodes.append(helper.make_node("Gelu", ["x"], [x], domain="com.microsoft"))
    if dtype != F32:
        x = net.op("Cast", x, to=F32)
        net.dtype = F32
    t = layernorm(net, x)
    if dtype != F32:
        t = net.op("Cast", net.op("Cast", t, to=dtype), to=F32)
    t = rmsnorm(net, t)
    if dtype != F32:
        t = net.op("Cast", t, to=dtype)
    net.nodes.append(helper.make_node("Identity", [t], ["y"]))
    model = make_model(net.nodes, [("x", dtype, ["b", 5, 8])], [("y", dtype, ["b", 5, 8])], net.inits,
                       opset=opset, extra_opsets=[("com.microsoft", 1)] if contrib else ())
    if contrib:
        model.graph.value_info.append(helper.make_tensor_value_info("g", dtype, ["b", 5, 8]))
    return model


@pytest.mark.parametrize("opset, dtype, contrib", [(17, F32, False), (17, F32, True), (23, F32, True),
                                                   (17, TensorProto.FLOAT16, True)])
def test_layernorm_then_rmsnorm_both_fuse(opset, dtype, contrib):
    model = _chained(opset, dtype, contrib)
    out, result = run_pipeline(model, ["fuse-layernorm", "fuse-rmsnorm"])
    assert not reasons(result)
    counts = op_counts(out)
    assert counts[LN] == 1 and counts[RMS] == 1 and "ReduceMean" not in counts
    assert_equivalent(model, out)


def test_fused_outputs_declare_the_shape_and_dtype_of_what_they_replace():
    """A float16 LayerNorm computed in float32 gains Casts: each new tensor and the kept output
    are declared with the input's shape, for the passes that follow."""
    model = _chained(23, TensorProto.FLOAT16, True)
    out, _ = run_pipeline(model, ["fuse-layernorm"])
    declared = {vi.name: vi for vi in out.graph.value_info}
    before = {t for n in model.graph.node for t in n.output}
    ln = next(n for n in out.graph.node if n.op_type == LN)
    new = [t for t in (ln.input[0], *ln.output) if t not in before]
    assert new
    for name in new:
        dims = [d.dim_value or d.dim_param for d in declared[name].type.tensor_type.shape.dim]
        assert dims == ["b", 5, 8] and declared[name].type.tensor_type.elem_type == F32


# ----------------------------------------------------------------------------- shapes computed at run time

def _expanded(op, opset, axis, x_shape, inputs, rng):
    """``op`` expanded by ONNX's own inliner: RMSNormalization-23's body computes its axes as
    Range(rank + axis, rank, 1) with rank = Size(Shape(x))."""
    d = tuple(x_shape[axis:])
    inits = {name: rng.uniform(0.5, 1.5, d).astype(np.float32) for name in inputs[1:]}
    node = helper.make_node(op, inputs, ["y"], axis=axis, epsilon=1e-4)
    model = make_model([node], [("x", F32, x_shape)], [("y", F32, x_shape)], inits, opset=opset)
    model.graph.value_info.extend(helper.make_tensor_value_info(k, F32, v.shape) for k, v in inits.items())
    import onnx.inliner
    out = onnx.inliner.inline_selected_functions(model, [("", op)], inline_schema_functions=True)
    assert op not in op_counts(out) and "Range" in op_counts(out) | op_counts(model) or op == LN
    return out


@pytest.mark.parametrize("axis, x_shape", [(-1, ["b", 5, 8]), (-2, ["b", 5, 8]), (-1, [2, 5, 8])])
def test_rmsnorm_function_body_with_range_axes_is_fused(axis, x_shape, rng):
    model = _expanded(RMS, 23, axis, x_shape, ["x", "S"], rng)
    assert {"Shape", "Size", "Range"} <= set(op_counts(model))
    out, result = run_pipeline(model, ["fuse-rmsnorm"])
    assert op_counts(out) == {RMS: 1} and not reasons(result)
    node = out.graph.node[0]
    assert node.input[0] == "x" and helper.get_attribute_value(node.attribute[0]) == axis
    assert_equivalent(model, out)


def _range_axes(net, x, first):
    """ReduceMean axes computed from x's rank: Range(first (+ rank when negative), rank, 1)."""
    rank = net.op("Size", net.op("Shape", x))
    start = net.op("Add", rank, net.const(first, "int")) if first < 0 else net.const(first, "int")
    return net.op("Range", start, rank, net.const(1, "int"))


def _computed_layernorm(x_shape, first, slice_shape=False, runtime_shape=False):
    net = GraphBuilder(opset=18)
    x = net.op("Reshape", "x", "s") if runtime_shape else "x"
    if slice_shape:   # x reshaped to Concat(Shape(x)[0:2], [2, 4]) (a split of the last axis)
        shape = net.op("Concat", net.op("Slice", net.op("Shape", "x"), net.const([0], "int"), net.const([2], "int")),
                       net.const([2, 4], "int"), axis=0)
        x = net.op("Reshape", "x", shape)
    axes = _range_axes(net, x, first)
    mean = net.op("ReduceMean", x, axes)
    d = net.op("Sub", x, mean)
    var = net.op("ReduceMean", net.op("Mul", d, d), axes)
    t = net.op("Div", d, net.op("Sqrt", net.op("Add", var, net.const(1e-5))))
    t = net.op("Add", net.op("Mul", t, net.const(np.linspace(0.5, 1.5, 4 if slice_shape else 8))),
               net.const(np.linspace(-1, 1, 4 if slice_shape else 8)))
    if slice_shape:
        t = net.op("Reshape", t, net.op("Shape", "x"))
    if runtime_shape:
        return finish(net, t, x_shape, ["p", "q", "r"], inputs=[("s", TensorProto.INT64, ["n"])])
    return finish(net, t, x_shape)


@pytest.mark.parametrize("x_shape, first, slice_shape", [(["b", 5, 8], -1, False), ([2, 5, 8], 2, False),
                                                         (["b", "s", 8], -1, True)])
def test_layernorm_with_axes_computed_from_the_rank_is_fused(x_shape, first, slice_shape):
    model = _computed_layernorm(x_shape, first, slice_shape)
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert not reasons(result)
    assert op_counts(out).get(LN) == 1 and "ReduceMean" not in op_counts(out) and "Range" not in op_counts(out)
    assert_equivalent(model, out)


def test_axes_computed_from_a_rank_not_known_statically_are_left_unchanged():
    """x reshaped by a run-time shape of unknown length: Size(Shape(x)) is not known before run time."""
    model = _computed_layernorm([2, 5, 8], -1, runtime_shape=True)
    left_alone(model, "has no constant axes (computed, or absent)", ["fuse-layernorm"])


# ----------------------------------------------------------------------------- scale and bias at run time

def _affine_layernorm(x_shape, gamma=None, beta=None, inputs=(), opset=18):
    """LayerNorm over the last axis, then Mul(gamma) and Add(beta): constants (arrays), names of
    graph inputs, or None."""
    net = GraphBuilder(opset=opset)
    t = layernorm(net, "x")
    for op, param in (("Mul", gamma), ("Add", beta)):
        if param is not None:
            t = net.op(op, t, net.const(param) if isinstance(param, np.ndarray) else param)
    return finish(net, t, x_shape, inputs=inputs)


def _fused_ln(model):
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert not reasons(result), reasons(result)
    return out, result.passes[0].applied[0], next(n for n in out.graph.node if n.op_type == LN)


def test_symbolic_normalized_dim_without_gamma_gets_ones_at_run_time():
    """[M, N] with N symbolic: ones of Shape(x)[-1:] as the scale."""
    model = _affine_layernorm(["M", "N"])
    out, rec, node = _fused_ln(model)
    assert op_counts(out) == {LN: 1, "Shape": 1, "ConstantOfShape": 1, "Identity": 1}
    assert rec.info["scale"] is False and node.input[0] == "x"
    assert_equivalent(model, out)
    assert_equivalent(model, out, input_shapes={"x": [3, 16]})


def test_symbolic_normalized_dim_takes_its_size_from_a_constant_gamma(rng):
    model = _affine_layernorm(["M", "N"], rng.uniform(0.5, 1.5, 8).astype(np.float32),
                              rng.standard_normal(8).astype(np.float32))
    out, rec, node = _fused_ln(model)
    assert op_counts(out) == {LN: 1, "Identity": 1} and len(node.input) == 3
    assert_equivalent(model, out)


def test_gamma_and_beta_fed_at_run_time_are_the_op_inputs():
    model = _affine_layernorm([2, 5, 8], "g", "b", inputs=[("g", F32, [8]), ("b", F32, [8])])
    out, rec, node = _fused_ln(model)
    assert op_counts(out) == {LN: 1, "Identity": 1} and list(node.input) == ["x", "g", "b"]
    assert_equivalent(model, out)


def test_computed_gamma_with_leading_ones_is_squeezed():
    """gamma = g * 2 of shape [1, 1, D] (a computed tensor), beta a graph input of symbolic [N]."""
    net = GraphBuilder(opset=18)
    t = layernorm(net, "x")
    g = net.op("Mul", "g", net.const(2.0))
    t = net.op("Add", net.op("Mul", t, g), "b")
    model = finish(net, t, ["B", "S", "N"], inputs=[("g", F32, [1, 1, "N"]), ("b", F32, ["N"])])
    out, rec, node = _fused_ln(model)
    assert op_counts(out) == {LN: 1, "Mul": 1, "Squeeze": 1, "Identity": 1}
    assert rec.info["scale"] and rec.info["bias"] and node.input[2] == "b"
    assert_equivalent(model, out)


@pytest.mark.parametrize("gamma, inputs, reason", [
    (np.array([1.5], np.float32), (), "of shape [1] would broadcast over a normalized dim of unknown size [N]"),
    ("g", [("g", F32, ["K"])], "'g' is computed at run time with shape [K], not known to be the normalized shape [N]"),
    ("g", [("g", F32, ["M", "N"])], "'g' of shape [M, N] varies over non-normalized axes"),
])
def test_scale_not_known_to_be_per_normalized_element_stays_outside(gamma, inputs, reason):
    model = _affine_layernorm(["M", "N"], gamma, inputs=inputs)
    out, rec, node = _fused_ln(model)
    assert op_counts(out) == {LN: 1, "Shape": 1, "ConstantOfShape": 1, "Mul": 1, "Identity": 1}
    assert reason in rec.info["kept"], rec.info["kept"]
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- Mean and InvStdDev outputs

def _ln_with_statistics(uses, divide="reciprocal", dtype=F32, cast=False):
    """A LayerNorm whose mean and/or 1/std ("mean", "inv", "mean_output") are also used outside."""
    net = GraphBuilder(opset=18, dtype=dtype)
    x = net.op("Cast", "x", to=F32) if cast else "x"
    if cast:
        net.dtype = F32
    mean = net.mean(x, [-1])
    d = net.op("Sub", x, mean)
    var = net.mean(net.op("Mul", d, d), [-1])
    std = net.op("Sqrt", net.op("Add", var, net.const(1e-5)))
    inv = net.op("Reciprocal", std) if divide == "reciprocal" else net.op("Div", net.const(1.0), std)
    t = net.op("Mul", d, inv)
    if cast:
        t = net.op("Cast", t, to=dtype)
    t = net.op("Add", net.op("Mul", t, net.const(np.linspace(0.5, 1.5, 8), dtype)), net.const(np.linspace(-1, 1, 8), dtype))
    outputs = []
    if "mean" in uses:
        t = net.op("Add", t, net.op("Cast", mean, to=dtype) if cast else mean)
    if "inv" in uses:
        t = net.op("Mul", t, net.op("Cast", inv, to=dtype) if cast else inv)
    if "mean_output" in uses:
        net.nodes.append(helper.make_node("Identity", [mean], ["m"]))
        outputs.append(("m", F32, [2, 5, 1]))
    net.dtype = dtype
    return finish(net, t, [2, 5, 8], dtype=dtype, outputs=outputs)


@pytest.mark.parametrize("uses, divide, outputs", [
    (("mean",), "reciprocal", ["Mean"]),
    (("inv",), "div_one", ["InvStdDev"]),
    (("mean", "inv"), "reciprocal", ["Mean", "InvStdDev"]),
    (("mean_output",), "reciprocal", ["Mean"]),
])
def test_mean_and_inv_std_used_elsewhere_are_the_op_outputs(uses, divide, outputs):
    model = _ln_with_statistics(uses, divide)
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert not reasons(result), reasons(result)
    node = next(n for n in out.graph.node if n.op_type == LN)
    assert len(node.output) == 1 + (2 if "InvStdDev" in outputs else 1)
    assert result.passes[0].applied[0].info["outputs"] == outputs
    assert "ReduceMean" not in op_counts(out) and "Reciprocal" not in op_counts(out)
    assert_equivalent(model, out)


def test_float16_statistics_are_cast_from_the_stash_type():
    """x float16 cast to float32 for the statistics: the op's float32 Mean is the model's mean."""
    model = _ln_with_statistics(("mean", "inv"), dtype=TensorProto.FLOAT16, cast=True)
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert not reasons(result), reasons(result)
    assert op_counts(out)[LN] == 1 and "ReduceMean" not in op_counts(out)
    assert_equivalent(model, out)


def test_standard_deviation_used_elsewhere_is_left_unchanged():
    net = GraphBuilder(opset=18)
    t = layernorm(net, "x")
    std = next(n.output[0] for n in net.nodes if n.op_type == "Sqrt")
    model = finish(net, net.op("Mul", t, std), [2, 5, 8])
    left_alone(model, "is also used by Mul", ["fuse-layernorm"])


# ----------------------------------------------------------------------------- tf2onnx / Keras

def _keras_layernorm(form, rank_known=True):
    """Keras LayerNormalization through tf2onnx at opset 13 on [N, T, C]: moments' means over
    the last axis written as GlobalAveragePool (tf2onnx's optimizer), SquaredDifference as Sub
    and Mul, then tf.nn.batch_normalization's x*s + (beta - mean*s) or the plain core."""
    net = GraphBuilder(opset=13)
    x = "x" if rank_known else net.op("Reshape", "x", "s")
    mean = net.op("GlobalAveragePool", x)
    d = net.op("Sub", x, net.op("Identity", mean) if form == "tf" else mean)   # stop_gradient
    var = net.op("GlobalAveragePool", net.op("Mul", d, d))
    r = net.op("Reciprocal", net.op("Sqrt", net.op("Add", var, net.const(1e-3))))
    if form == "tf":
        s = net.op("Mul", r, net.const(np.linspace(0.5, 1.5, 8)))
        t = net.op("Add", net.op("Mul", x, s), net.op("Sub", net.const(np.linspace(-1, 1, 8)), net.op("Mul", mean, s)))
    else:
        t = net.op("Mul", net.op("Sub", x, mean), r)
    if not rank_known:
        return finish(net, t, [2, 5, 8], ["p", "q", "r"], inputs=[("s", TensorProto.INT64, ["n"])])
    return finish(net, t, ["N", "T", 8])


@pytest.mark.parametrize("form", ["tf", "core"])
def test_keras_layernorm_with_global_average_pool_means_is_fused(form):
    model = _keras_layernorm(form)
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert not reasons(result), reasons(result)
    assert op_counts(out) == {LN: 1, "Identity": 1}
    assert_equivalent(model, out)


def test_global_average_pool_of_unknown_rank_is_left_unchanged():
    left_alone(_keras_layernorm("core", rank_known=False),
               "has an input of unknown rank, or of rank below 3", ["fuse-layernorm"])


# ----------------------------------------------------------------------------- dynamo's variance forms

def _keepdims0(net, op, t, axes=(-1,)):
    return net.op(op, t, net.const(list(axes), "int"), keepdims=0)


def _broadcast_in_dim(net, t, reduced):
    """dynamo's keepdim restore: Reshape(t, Concat(Shape(t)[0:1], [5], [1])) then
    Expand(.., Concat(Shape(x)[0:1], [5], [1]))."""
    head = net.op("Reshape", net.op("Shape", reduced, start=0, end=1), net.const([-1], "int"))
    shape = net.op("Concat", head, net.const([5], "int"), net.const([1], "int"), axis=0)
    target = net.op("Concat", net.op("Shape", "x", start=0, end=1), net.const([5], "int"), net.const([1], "int"),
                    axis=0)
    return net.op("Expand", net.op("Reshape", t, shape), target)


def _dynamo_var(form, divisor=16.0, reshape_to=None):
    """torch.var_mean(x, -1, keepdim=True, correction=0) as dynamo exports it (opset 18), on [b, 5, 16]:
    var = broadcast_in_dim(ReduceMean(d*d, keepdims=0)), mean = broadcast_in_dim(ReduceSum(x, keepdims=0)) / 16.
    form "unsqueeze": keepdim=False then unsqueeze(-1); "bessel": var * 16 / 15 (correction=1)."""
    net = GraphBuilder(opset=18)
    d = net.op("Sub", "x", net.op("ReduceMean", "x", net.const([-1], "int"), keepdims=1))
    var = _keepdims0(net, "ReduceMean", net.op("Mul", d, d))
    total = _keepdims0(net, "ReduceSum", "x")
    if form == "unsqueeze":
        var = net.op("Unsqueeze", var, net.const([-1], "int"))
        mean = net.op("Unsqueeze", net.op("Div", total, net.const(divisor)), net.const([-1], "int"))
    else:
        if form == "bessel":
            var = net.op("Div", net.op("Mul", var, net.const(16.0)), net.const(15.0))
        var = _broadcast_in_dim(net, var, var)
        if reshape_to is not None:
            total = net.op("Reshape", total, net.const(reshape_to, "int"))
        mean = net.op("Div", _broadcast_in_dim(net, total, total), net.const(divisor))
    t = net.op("Div", net.op("Sub", "x", mean), net.op("Sqrt", net.op("Add", var, net.const(1e-5))))
    t = net.op("Add", net.op("Mul", t, net.const(np.linspace(0.5, 1.5, 16))), net.const(np.linspace(-1, 1, 16)))
    return finish(net, t, ["b", 5, 16] if reshape_to is None else [2, 5, 16])


@pytest.mark.parametrize("form", ["broadcast_in_dim", "unsqueeze"])
def test_dynamo_var_mean_with_keepdims_0_and_reduce_sum_is_fused(form):
    model = _dynamo_var(form)
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert not reasons(result), reasons(result)
    assert op_counts(out) == {LN: 1, "Identity": 1}
    assert_equivalent(model, out)


@pytest.mark.parametrize("build, reason", [
    (lambda: _dynamo_var("bessel"), "the variance is multiplied by N/(N-1) = 16/15: Bessel's correction"),
    (lambda: _dynamo_var("broadcast_in_dim", divisor=8.0), "is a sum of 16 elements scaled by 0.125, not a mean"),
    (lambda: _dynamo_var("broadcast_in_dim", reshape_to=[5, 2]),
     "reshapes [2, 5] to [5, 2], not only adding or removing axes of size 1"),
])
def test_dynamo_forms_that_are_not_a_mean_are_left_unchanged(build, reason):
    left_alone(build(), reason, ["fuse-layernorm"])


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_constants_cast_like_what_they_meet_are_constants(kind):
    """onnxscript (and dynamo with optimize=False) write a Python scalar as
    CastLike(Constant, t): ``mean + 1e-5`` is Add(mean, CastLike(1e-5, mean)), ``d ** 2`` is
    Pow(d, CastLike(2, d)). CastLike reads t only for its type (inferred here: t has no
    value_info)."""
    net = GraphBuilder(opset=18)

    def like(value, t):
        return net.op("CastLike", net.const(np.array(value, np.float64), "raw"), t)

    x = "x"
    d = net.op("Sub", x, net.mean(x, [-1])) if kind == "layernorm" else x
    var = net.mean(net.op("Pow", d, like(2.0, d)), [-1])
    t = net.op("Div", d, net.op("Sqrt", net.op("Add", var, like(1e-5, var))))
    model = finish(net, net.op("Mul", t, net.const(np.linspace(0.5, 1.5, 16))), ["b", 5, 16])
    fused = LN if kind == "layernorm" else RMS
    out, result = run_pipeline(model, [f"fuse-{kind}"])
    assert not reasons(result), reasons(result)
    assert op_counts(out) == {fused: 1, "Identity": 1}
    assert_equivalent(model, out)


def _scaled_mean_layernorm(reduction, factor, dtype=F32, also=None):
    """A LayerNorm on [b, 5, 12] whose mean is ``reduction`` (ReduceMean or ReduceSum) of x
    times ``factor`` (a constant of ``dtype``); ``also``: "raw" feeds the reduction's own
    output, "mean" the scaled mean, to an Add after the LayerNorm as well."""
    net = GraphBuilder(opset=18)
    reduced = net.op(reduction, "x", net.const([-1], "int"), keepdims=1)
    mean = net.op("Mul", reduced, net.const(factor, dtype))
    d = net.op("Sub", "x", mean)
    var = net.mean(net.op("Mul", d, d), [-1])
    t = net.op("Div", d, net.op("Sqrt", net.op("Add", var, net.const(1e-5))))
    if also:
        t = net.op("Add", t, reduced if also == "raw" else mean)
    return finish(net, t, ["b", 5, 12])


def test_sum_times_rounded_inverse_n_is_a_mean():
    """float32(1/12) is 1/12 to within float32's rounding: the fused op's exact mean is the
    original's to within that."""
    model = _scaled_mean_layernorm("ReduceSum", 1 / 12)
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert not reasons(result), reasons(result)
    assert op_counts(out) == {LN: 1, "Identity": 1}
    assert_equivalent(model, out)


def test_the_scaled_mean_used_elsewhere_becomes_the_fused_ops_mean_output():
    model = _scaled_mean_layernorm("ReduceSum", 1 / 12, also="mean")
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert not reasons(result), reasons(result)
    assert op_counts(out) == {LN: 1, "Add": 1, "Identity": 1}
    assert len([o for o in out.graph.node[0].output if o]) == 2   # Y and Mean
    assert_equivalent(model, out)


@pytest.mark.parametrize("build, reason", [
    # 1.000001 is no rounding of 1: a ReduceMean must be used as it is
    (lambda: _scaled_mean_layernorm("ReduceMean", 1.000001), "is a mean scaled by 1.00000095, not a mean"),
    (lambda: _scaled_mean_layernorm("ReduceMean", 1.000001, F64), "is a mean scaled by 1.000001, not a mean"),
    (lambda: _scaled_mean_layernorm("ReduceSum", 1.000001 / 12), "is a sum of 12 elements scaled by 0.0833334"),
    # the sum itself, used elsewhere, has no counterpart among the fused op's outputs
    (lambda: _scaled_mean_layernorm("ReduceSum", 1 / 12, also="raw"), "is also used by Add"),
])
def test_a_mean_that_is_not_exactly_one_is_left_unchanged(build, reason):
    left_alone(build(), reason, ["fuse-layernorm"])


@pytest.mark.parametrize("form", ["mean_unsqueeze", "sum_times_inverse_n"])
def test_rmsnorm_mean_of_squares_with_keepdims_0_and_unsqueeze_is_fused(form):
    net = GraphBuilder(opset=18)
    if form == "mean_unsqueeze":
        ms = net.op("Unsqueeze", _keepdims0(net, "ReduceMean", net.op("Mul", "x", "x")), net.const([-1], "int"))
    else:   # sum(x^2, keepdims) * (1/8)
        ms = net.op("Mul", net.op("ReduceSum", net.op("Mul", "x", "x"), net.const([-1], "int")), net.const(0.125))
    t = net.op("Mul", "x", net.op("Reciprocal", net.op("Sqrt", net.op("Add", ms, net.const(1e-6)))))
    model = finish(net, net.op("Mul", t, net.const(np.linspace(0.5, 1.5, 8))), ["b", 5, 8])
    out, result = run_pipeline(model, ["fuse-rmsnorm"])
    assert not reasons(result), reasons(result)
    assert op_counts(out) == {RMS: 1, "Identity": 1}
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- no silent misses

def test_mean_subtracted_from_its_input_in_no_known_layernorm_gets_a_record():
    """(x - mean) / mean(|x - mean|): normalization-shaped, no LayerNorm."""
    net = GraphBuilder(opset=18)
    d = net.op("Sub", "x", net.mean("x", [-1]))
    t = net.op("Div", d, net.op("Add", net.mean(net.op("Abs", d), [-1]), net.const(1e-5)))
    model = finish(net, t, [2, 5, 8])
    left_alone(model, "ReduceMean ReduceMean3 is subtracted from its input (Sub5), but what follows is no LayerNorm "
               "this pass knows: the centred tensor 'sub4' feeds Abs7, Div15", ["fuse-layernorm"])


def test_square_into_a_mean_in_no_known_rmsnorm_gets_a_record():
    """x / (mean(x^2) + eps), no square root."""
    net = GraphBuilder(opset=18)
    ms = net.mean(net.op("Pow", "x", net.const(2.0)), [-1])
    model = finish(net, net.op("Div", "x", net.op("Add", ms, net.const(1e-6))), [2, 5, 8])
    left_alone(model, "Pow Pow3 squares 'x' into ReduceMean ReduceMean6, but what follows is no RMSNorm this pass "
               "knows: the mean feeds Add9", ["fuse-rmsnorm"])


def test_a_fused_or_skipped_site_gets_exactly_one_record(rng):
    """The site's own anchor reports it: no second record from the site itself."""
    net = GraphBuilder(opset=18)
    model = finish(net, layernorm(net, "x", axes=(1,)), [2, 5, 8])    # not the trailing axis
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert len(reasons(result)) == 1 and "not its trailing axes" in reasons(result)[0]
    net = GraphBuilder(opset=18)
    fused_model = finish(net, rmsnorm(net, layernorm(net, "x")), [2, 5, 8])
    out, result = run_pipeline(fused_model, ["fuse-layernorm", "fuse-rmsnorm"])
    assert not reasons(result) and [len(p.applied) for p in result.passes] == [1, 1]


def test_rmsnorm_after_a_fused_layernorm_fuses_when_inference_loses_its_input(monkeypatch):
    """When inference on the model fuse-layernorm wrote does not type the fused
    LayerNormalization's output (an op it cannot infer through, say), the shape the rewrite
    declared is what fuse-rmsnorm reads."""
    from normopt import pipeline
    model = _chained(17)
    first, _ = run_pipeline(model, ["fuse-layernorm"])
    ln_out = next(n.output[0] for n in first.graph.node if n.op_type == LN)
    real = pipeline.inferred_index

    def lossy(m):
        index = real(m)
        index.pop(ln_out, None)
        return index
    monkeypatch.setattr(pipeline, "inferred_index", lossy)
    out, result = run_pipeline(first, ["fuse-rmsnorm"])
    assert not reasons(result), reasons(result)
    assert op_counts(out) == {LN: 1, RMS: 1, "Identity": 1}
    assert_equivalent(model, out)


def test_layernorm_function_body_with_mean_and_inv_std_outputs_is_fused(rng):
    """LayerNormalization-17 with all three outputs, expanded by ONNX's inliner: its body
    computes InvStdDev as Reciprocal(StdDev) beside Div(d, StdDev), and reshapes both statistics
    back from 2-D. The fused op writes them over the flattened input."""
    import onnx.inliner
    inits = {"S": rng.uniform(0.5, 1.5, 8).astype(np.float32), "B": rng.standard_normal(8).astype(np.float32)}
    node = helper.make_node(LN, ["x", "S", "B"], ["y", "mean", "inv"], axis=-1, epsilon=1e-4)
    stats = ["b", 5, 1]
    model = make_model([node], [("x", F32, ["b", 5, 8])], [("y", F32, ["b", 5, 8]), ("mean", F32, stats),
                                                          ("inv", F32, stats)], inits, opset=18)
    model.graph.value_info.extend(helper.make_tensor_value_info(k, F32, v.shape) for k, v in inits.items())
    model = onnx.inliner.inline_selected_functions(model, [("", LN)], inline_schema_functions=True)
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert not reasons(result), reasons(result)
    counts = op_counts(out)
    assert counts[LN] == 1 and "ReduceMean" not in counts and "Reciprocal" not in counts and "Sqrt" not in counts
    assert result.passes[0].applied[0].info["outputs"] == ["Mean", "InvStdDev"]
    assert_equivalent(model, out)


def test_a_variance_site_gets_only_the_layernorm_record():
    """The square of x - mean (the mean reshaped back, as dynamo writes it) is a LayerNorm's
    variance: fuse-rmsnorm leaves its record to fuse-layernorm."""
    model = _dynamo_var("bessel")
    out, result = run_pipeline(model, ["fuse-layernorm", "fuse-rmsnorm"])
    assert op_counts(out) == op_counts(model)
    assert [len(p.skipped) for p in result.passes] == [1, 0], reasons(result)
    assert "Bessel's correction" in reasons(result)[0]


def test_inv_std_computed_inside_a_subgraph_is_left_to_it():
    """1/std computed by a node of an If branch (reading the main graph's std) cannot become the
    fused op's output: the LayerNorm is left alone, the branch intact."""
    net = GraphBuilder(opset=18)
    t = layernorm(net, "x")
    std = next(n.output[0] for n in net.nodes if n.op_type == "Sqrt")
    mean = net.nodes[0].output[0]
    branches = {k: helper.make_graph([helper.make_node(op, [read], [f"{k}_s"])], k, [],
                                     [helper.make_tensor_value_info(f"{k}_s", F32, [2, 5, 1])])
                for k, op, read in (("then", "Reciprocal", std), ("else", "Neg", mean))}
    net.nodes.append(helper.make_node("If", ["cond"], ["side"], then_branch=branches["then"],
                                      else_branch=branches["else"]))
    model = finish(net, t, [2, 5, 8], inputs=[("cond", TensorProto.BOOL, [])], outputs=[("side", F32, [2, 5, 1])])
    out = left_alone(model, "is also used by Reciprocal(then_s)", ["fuse-layernorm"])
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- input of unknown rank

def _after_contrib(kind, axes=(-1,), gamma_shape=(16,), eps_shape=()):
    """x -> com.microsoft Gelu -> Cast(float): onnx's shape inference knows the Cast's type but
    not its rank (the contrib op has no schema there); then a LayerNorm or RMSNorm over ``axes``
    with a gamma Mul."""
    net = GraphBuilder(opset=14)
    net.nodes.append(helper.make_node("Gelu", ["x"], ["g0"], domain="com.microsoft"))
    net.nodes.append(helper.make_node("Cast", ["g0"], ["g"], to=F32))
    if kind == "ln":
        mean = net.mean("g", axes)
        d = net.op("Sub", "g", mean)
        var = net.mean(net.op("Pow", d, net.const(2.0)), axes)
        n = net.op("Div", d, net.op("Sqrt", net.op("Add", var, net.const(np.full(eps_shape, 1e-5)))))
    else:
        var = net.mean(net.op("Pow", "g", net.const(2.0)), axes)
        n = net.op("Mul", "g", net.op("Reciprocal", net.op("Sqrt", net.op("Add", var, net.const(np.full(eps_shape, 1e-6))))))
    gamma = np.random.default_rng(0).uniform(0.5, 1.5, gamma_shape)
    out = net.op("Mul", n, net.const(gamma))
    net.nodes.append(helper.make_node("Identity", [out], ["y"]))
    return make_model(net.nodes, [("x", F32, [2, 8, 16])], [("y", F32, [2, 8, 16])], net.inits, opset=14,
                      extra_opsets=[("com.microsoft", 1)])


@pytest.mark.parametrize("kind, op, passes", [("ln", LN, ["fuse-layernorm"]), ("rms", RMS, ["fuse-rmsnorm"])])
def test_a_norm_over_the_last_axes_of_an_input_of_unknown_rank_is_fused(kind, op, passes):
    # Before: "rank of input 'g' is unknown", though axis -1 is the last axis whatever the rank.
    model = _after_contrib(kind)
    out, result = run_pipeline(model, passes)
    assert op_counts(out) == {"Gelu": 1, "Cast": 1, op: 1, "Identity": 1}, reasons(result)
    node = next(n for n in out.graph.node if n.op_type == op)
    assert next(a.i for a in node.attribute if a.name == "axis") == -1
    assert_equivalent(model, out)


@pytest.mark.parametrize("kind, passes", [("ln", ["fuse-layernorm"]), ("rms", ["fuse-rmsnorm"])])
def test_unknown_rank_near_misses_are_left_with_their_reason(kind, passes):
    # axis 2 cannot be placed without the rank
    left_alone(_after_contrib(kind, axes=(2,)), "axes [2] cannot be placed (input rank unknown)", passes)
    # an epsilon of rank 2 would grow the output's rank for an input of rank 1
    left_alone(_after_contrib(kind, eps_shape=(1, 1)), "epsilon has rank 2, more than the 1 axes it normalizes", passes)


def test_unknown_rank_gamma_that_could_grow_the_rank_stays_outside():
    model = _after_contrib("ln", gamma_shape=(1, 16))
    out, result = run_pipeline(model, ["fuse-layernorm"])
    # no scale: ones of the normalized dims, known only at run time (Shape -> ConstantOfShape)
    assert op_counts(out) == {"Gelu": 1, "Cast": 1, "Shape": 1, "ConstantOfShape": 1, LN: 1, "Mul": 1, "Identity": 1}
    assert_equivalent(model, out)

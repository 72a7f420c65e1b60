"""fold-batchnorm: BatchNormalization folded into Conv / ConvTranspose / Gemm / MatMul.

Every model is built here by ``bn_model``: a producer (``conv``, ``gemm`` or ``matmul``) writes
tensor ``p``, BatchNormalization reads it and writes graph output ``Y``. Near misses mutate the
built ModelProto. onnxruntime (optimizations off) is the reference for equivalence.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from helpers import assert_equivalent, floats, make_model, op_counts, run_pass
from normopt.passes.fold_batchnorm import bn_scale_shift, scale_output_channels
from normopt.verify import run_model

PASS = "fold-batchnorm"
BN = "BatchNormalization"
BATCH, SIZE = 2, 5  # batch; each spatial dim (kernel 3, pads 1 keep it)
PARAMS = ("gamma", "beta", "mean", "var")


# ----------------------------------------------------------------------------- model builders

def conv(rng, dtype, *, op="Conv", dims=2, cin=4, cout=6, group=1, bias=True):
    """X -> Conv / ConvTranspose -> p. Weight: Conv [Cout, Cin/g, k...], ConvTranspose [Cin, Cout/g, k...]."""
    w_shape = (cout, cin // group) if op == "Conv" else (cin, cout // group)
    inits = {"W": floats(rng, *w_shape, *[3] * dims, dtype=dtype)}
    if bias:
        inits["B"] = floats(rng, cout, dtype=dtype)
    node = helper.make_node(op, ["X", *inits], ["p"], name="producer", group=group, pads=[1] * 2 * dims)
    spatial = [SIZE] * dims
    return [node], [BATCH, cin, *spatial], inits, [BATCH, cout, *spatial]


def gemm(rng, dtype, *, k=5, n=6, trans_b=0, c_shape=None, alpha=1.0, beta=1.0):
    """X [BATCH, k] -> Gemm -> p [BATCH, n]; C of any broadcastable shape (None: no C)."""
    inits = {"W": floats(rng, *((n, k) if trans_b else (k, n)), dtype=dtype)}
    if c_shape is not None:
        inits["C"] = np.asarray(floats(rng, *c_shape, dtype=dtype))
    node = helper.make_node("Gemm", ["X", *inits], ["p"], name="producer", transB=trans_b, alpha=alpha, beta=beta)
    return [node], [BATCH, k], inits, [BATCH, n]


def matmul(rng, dtype, *, k=5, f=6, bias=None, rows=()):
    """X [BATCH, *rows, k] -> MatMul(W [k, f]) [-> Add bias] -> p. bias: None, "right" [f], "left" [1, f]."""
    inits = {"W": floats(rng, k, f, dtype=dtype)}
    nodes = [helper.make_node("MatMul", ["X", "W"], ["mm" if bias else "p"], name="producer")]
    if bias:
        inits["b"] = floats(rng, *((f,) if bias == "right" else (1, f)), dtype=dtype)
        nodes.append(helper.make_node("Add", ["mm", "b"] if bias == "right" else ["b", "mm"], ["p"], name="bias_add"))
    return nodes, [BATCH, *rows, k], inits, [BATCH, *rows, f]


PRODUCERS = {"conv": conv, "gemm": gemm, "matmul": matmul}


def bn_model(rng, producer="conv", dtype=np.float32, *, param_dtype=None, opset=17, bn_attrs=None,
             params="initializer", small_var=False, **kwargs):
    """producer -> p -> BatchNormalization -> Y. params: "initializer", "constant" (Constant nodes) or "input"."""
    nodes, x_shape, inits, p_shape = PRODUCERS[producer](rng, dtype, **kwargs)
    pdt = param_dtype or dtype
    c = p_shape[1]
    # small_var: var ~ epsilon, so the output depends on epsilon; gamma shrinks alike so outputs stay ~1
    size = 3e-3 if small_var else 1.0
    values = {"gamma": floats(rng, c, low=0.5 * size, high=1.5 * size, dtype=pdt),
              "beta": floats(rng, c, dtype=pdt), "mean": floats(rng, c, dtype=pdt),
              "var": floats(rng, c, low=0.5 * size ** 2, high=1.5 * size ** 2, dtype=pdt)}
    inputs = [("X", _elem(dtype), x_shape)]
    if params == "initializer":
        inits.update(values)
    elif params == "constant":
        nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v))
                 for k, v in values.items()] + nodes
    else:
        inputs += [(k, _elem(pdt), [c]) for k in values]
    nodes.append(helper.make_node(BN, ["p", *PARAMS], ["Y"], name="bn", **(bn_attrs or {})))
    return make_model(nodes, inputs, [("Y", _elem(dtype), p_shape)], inits, opset=opset)


def _elem(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def initializers(model) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def folded_weights(model) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias (the Conv / Gemm input or the MatMul's bias Add) of the folded model."""
    node = next(n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul"))
    bias = node.input[2] if len(node.input) > 2 else next(n.input[1] for n in model.graph.node if n.op_type == "Add")
    return initializers(model)[node.input[1]], initializers(model)[bias]


def fold_then_check(model, expected_ops, applied=1):
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == expected_ops
    assert len(rec.applied) == applied and not rec.skipped, rec.skipped
    return out, rec


def assert_folded(model, expected_ops, applied=1):
    out, rec = fold_then_check(model, expected_ops, applied)
    assert_equivalent(model, out)
    return out, rec


# ----------------------------------------------------------------------------- folds

CONV = {"Conv": 1}
CONV_T = {"ConvTranspose": 1}
GEMM = {"Gemm": 1}
MATMUL = {"MatMul": 1, "Add": 1}


@pytest.mark.parametrize("producer, kwargs, expected", [
    ("conv", dict(dims=1), CONV),
    ("conv", dict(dims=2, bias=False), CONV),
    ("conv", dict(dims=3), CONV),
    ("conv", dict(group=2), CONV),
    ("conv", dict(dims=1, group=2, bias=False), CONV),
    ("conv", dict(cin=4, cout=4, group=4), CONV),  # depthwise
    ("conv", dict(cin=4, cout=8, group=4, bias=False), CONV),  # depthwise, channel multiplier 2
    ("conv", dict(op="ConvTranspose"), CONV_T),
    ("conv", dict(op="ConvTranspose", group=2, bias=False), CONV_T),  # Cin 4 != Cout 6
    ("conv", dict(op="ConvTranspose", group=2, cin=4, cout=4), CONV_T),
    ("conv", dict(op="ConvTranspose", group=3, cin=6, cout=9, dims=1), CONV_T),
    ("conv", dict(op="ConvTranspose", group=2, cin=6, cout=4, dims=3, bias=False), CONV_T),  # Cin > Cout
    ("conv", dict(op="ConvTranspose", group=4, cin=4, cout=4), CONV_T),  # depthwise
    ("gemm", dict(trans_b=0), GEMM),
    ("gemm", dict(trans_b=1), GEMM),
    ("gemm", dict(trans_b=0, c_shape=(6,), alpha=0.5, beta=2.0), GEMM),
    ("gemm", dict(trans_b=1, c_shape=(1, 6), alpha=1.5, beta=0.25), GEMM),
    ("gemm", dict(trans_b=0, c_shape=(BATCH, 6), beta=-1.0), GEMM),
    ("gemm", dict(trans_b=1, c_shape=(), alpha=2.0), GEMM),
    ("gemm", dict(trans_b=0, c_shape=(6,), beta=0.0), GEMM),
    ("matmul", {}, MATMUL),  # BatchNorm1d after Linear(bias=False): a bias Add is added
    ("matmul", dict(bias="right"), MATMUL),
    ("matmul", dict(bias="left"), MATMUL),
])
def test_fold_batchnorm_producer_variant_is_folded(producer, kwargs, expected, rng):
    model = bn_model(rng, producer, **kwargs)
    _out, rec = assert_folded(model, expected)
    assert rec.applied[0].output == "Y" and rec.applied[0].info["channels"] == initializers(model)["gamma"].size


@pytest.mark.parametrize("opset, attrs", [
    (5, dict(is_test=1, consumed_inputs=[0, 0, 0, 1, 1])),  # BatchNormalization-1
    (6, dict(is_test=1, spatial=1, epsilon=1e-3)),
    (7, dict(spatial=1)),
    (9, {}),  # spatial was removed in BatchNormalization-9
    (14, dict(training_mode=0)),
    (15, dict(epsilon=1e-3)),
    (17, {}),
])
def test_fold_batchnorm_every_opset_version_is_folded(opset, attrs, rng):
    model = bn_model(rng, opset=opset, bn_attrs=attrs, small_var=True)
    out, rec = fold_then_check(model, CONV)
    assert rec.applied[0].info["epsilon"] == pytest.approx(attrs.get("epsilon", 1e-5))
    reference = model
    if opset < 7:
        # onnxruntime has no BatchNormalization-1/6 kernel: the reference is the same model at
        # opset 7 (same semantics for is_test=1, spatial=1); the folded model (Conv-1) runs.
        reference = onnx.ModelProto()
        reference.CopyFrom(model)
        reference.opset_import[0].version = 7
        bn = reference.graph.node[-1]
        for attr in [a for a in bn.attribute if a.name in ("is_test", "consumed_inputs")]:
            bn.attribute.remove(attr)
    assert_equivalent(reference, out)


def test_fold_batchnorm_missing_epsilon_uses_default(rng):
    # var ~ 1e-6..1e-5 so that epsilon matters: 0 or 1e-3 would change the output by far more than atol
    model = bn_model(rng, small_var=True)
    assert not model.graph.node[-1].attribute
    _out, rec = assert_folded(model, CONV)
    assert rec.applied[0].info["epsilon"] == np.float32(1e-5)  # the attribute's type: float32


def test_fold_batchnorm_constant_node_parameters_are_folded(rng):
    model = bn_model(rng, params="constant")
    assert op_counts(model)["Constant"] == 4
    assert_folded(model, CONV)  # the Constant nodes are gone with the BatchNormalization


def test_fold_batchnorm_dynamo_unoptimized_computed_conv_bias_is_folded(rng):
    """dynamo with optimize=False writes a bias-free Conv's bias as
    Expand(CastLike(0, x), Expand(Shape(W)[0:1], [1])): a constant, computed."""
    model = bn_model(rng, bias=False)
    zero = numpy_helper.from_array(np.array(0.0, np.float32))
    model.graph.node.insert(0, helper.make_node("Constant", [], ["zero"], value=zero))
    model.graph.node.insert(1, helper.make_node("CastLike", ["zero", "X"], ["zero_like"]))
    model.graph.node.insert(2, helper.make_node("Shape", ["W"], ["cout"], start=0, end=1))
    model.graph.node.insert(3, helper.make_node("Constant", [], ["one"], value_ints=[1]))
    model.graph.node.insert(4, helper.make_node("Expand", ["cout", "one"], ["bias_shape"]))
    model.graph.node.insert(5, helper.make_node("Expand", ["zero_like", "bias_shape"], ["B"]))
    model.graph.node[6].input.append("B")
    onnx.checker.check_model(model)
    assert_folded(model, CONV)


def _affine_free(model, form="expand", leak=False):
    """dynamo with optimize=False writes BatchNorm(affine=False)'s ones and zeros as
    Expand(CastLike([1.0], p), Shape(p, start=1, end=2)) of the producer's output p (or a
    ConstantOfShape of that shape)."""
    nodes = []
    for key, fill in (("gamma", 1.0), ("beta", 0.0)):
        model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == key))
        nodes.append(helper.make_node("Shape", ["p"], [f"{key}_shape"], start=1, end=2))
        if form == "expand":
            nodes.append(helper.make_node("Constant", [], [f"{key}_fill"], value_floats=[fill]))
            nodes.append(helper.make_node("CastLike", [f"{key}_fill", "p"], [f"{key}_like"]))
            nodes.append(helper.make_node("Expand", [f"{key}_like", f"{key}_shape"], [key]))
        else:
            nodes.append(helper.make_node("ConstantOfShape", [f"{key}_shape"], [key],
                                          value=numpy_helper.from_array(np.array([fill], np.float32))))
    bn = model.graph.node[-1]
    del model.graph.node[-1]
    model.graph.node.extend(nodes + [bn])
    if leak:
        model.graph.output.append(helper.make_tensor_value_info("gamma_shape", onnx.TensorProto.INT64, [1]))
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("form", ["expand", "constant_of_shape"])
def test_fold_batchnorm_dynamo_unoptimized_affine_free_parameters_are_folded(form, rng):
    model = _affine_free(bn_model(rng, opset=18), form)
    out, rec = assert_folded(model, CONV)
    w, b = folded_weights(out)
    p = initializers(model)
    s = 1.0 / np.sqrt(p["var"].astype(np.float64) + 1e-5)
    np.testing.assert_allclose(b, (p["B"] - p["mean"]) * s, rtol=1e-6)


def test_fold_batchnorm_shape_computed_parameter_used_elsewhere_is_left_unchanged(rng):
    model = _affine_free(bn_model(rng, opset=18), leak=True)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert [s.reason for s in rec.skipped] == [
        "a computed parameter of the BatchNormalization is also used by graph output"]
    assert_equivalent(model, out)


def _filled(model, names, shape_input=False):
    """onnx's "light" test models write every weight and parameter as ConstantOfShape(shape)
    with the value as its attribute; ``shape_input``: the shape is a graph input instead."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for name in names:
        value = numpy_helper.to_array(inits[name])
        model.graph.initializer.remove(inits[name])
        fill = numpy_helper.from_array(np.array([value.reshape(-1)[0]], value.dtype))
        if shape_input:
            model.graph.input.append(helper.make_tensor_value_info(f"{name}_shape", onnx.TensorProto.INT64,
                                                                   [value.ndim]))
        else:
            model.graph.initializer.append(numpy_helper.from_array(np.array(value.shape, np.int64), f"{name}_shape"))
        nodes.append(helper.make_node("ConstantOfShape", [f"{name}_shape"], [name], value=fill))
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + rest)
    onnx.checker.check_model(model)
    return model


def test_fold_batchnorm_weights_filled_by_constant_of_shape_are_folded(rng):
    model = _filled(bn_model(rng), ["W", "B", *PARAMS])
    assert op_counts(model)["ConstantOfShape"] == 6
    out, _ = assert_folded(model, CONV)  # the ConstantOfShape nodes go with the fold
    w, b = folded_weights(out)
    assert w.shape == (6, 4, 3, 3) and b.shape == (6,)


def test_fold_batchnorm_weight_filled_to_a_shape_given_at_run_time_is_left_unchanged(rng):
    model = _filled(bn_model(rng), ["W"], shape_input=True)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert [s.reason for s in rec.skipped] == ["Conv weight 'W' is not a constant (graph input or computed)"]


@pytest.mark.parametrize("producer, dtype, param_dtype, opset", [
    ("conv", np.float16, None, 17),
    ("conv", np.float16, np.float32, 15),  # mixed: fp16 weights, fp32 BatchNormalization parameters
    ("gemm", np.float16, np.float32, 15),
    ("gemm", np.float64, None, 17),  # onnxruntime CPU has no float64 Conv
    ("matmul", np.float64, None, 17),
])
def test_fold_batchnorm_weight_dtype_is_kept(producer, dtype, param_dtype, opset, rng):
    extra = {"bias": "right"} if producer == "matmul" else {}
    model = bn_model(rng, producer, dtype, param_dtype=param_dtype, opset=opset, **extra)
    out, _rec = assert_folded(model, {"conv": CONV, "gemm": GEMM, "matmul": MATMUL}[producer])
    weight, bias = folded_weights(out)
    assert weight.dtype == dtype and bias.dtype == dtype


@pytest.mark.parametrize("dtype, opset", [
    (ml_dtypes.bfloat16, 22),  # Conv accepts bfloat16 from opset 22
    (np.float64, 17),
    (np.float32, 17),
])
def test_fold_batchnorm_conv_weights_match_float64_formula(dtype, opset, rng):
    # onnxruntime CPU has no bfloat16 or float64 Conv kernel, so the folded weights are checked
    # against the textbook formula in float64 instead of running the model. Bit for bit: W' is
    # the float64 product rounded once to W's dtype (float32 math would differ in some elements).
    model = bn_model(rng, dtype=dtype, opset=opset, cin=8, cout=8)
    out, _rec = fold_then_check(model, CONV)
    weight, bias = folded_weights(out)
    v = {k: a.astype(np.float64) for k, a in initializers(model).items()}
    s = v["gamma"] / np.sqrt(v["var"] + float(np.float32(1e-5)))  # the default epsilon is a float32
    assert weight.dtype == bias.dtype == dtype
    np.testing.assert_array_equal(weight, (v["W"] * s[:, None, None, None]).astype(dtype))
    eps = float(ml_dtypes.finfo(dtype).eps)
    np.testing.assert_allclose(bias.astype(np.float64), (v["B"] - v["mean"]) * s + v["beta"], rtol=eps, atol=eps)


def test_fold_batchnorm_tiny_diffs_are_within_fp32_tolerance(rng):
    # Folding changes fp32 rounding: outputs of magnitude ~10 differ by a few 1e-6, like the
    # 3.8e-6 / 2.8e-7 filed as a bug against onnx/optimizer; that is equivalence, not failure.
    model = bn_model(rng, cin=32, cout=8)
    out, _rec = assert_folded(model, CONV)
    assert assert_equivalent(model, out).passed
    diff = assert_equivalent(model, out, input_sets=("normal",)).outputs[0]
    assert diff.passed and diff.max_abs > 0 and diff.needed_atol == 0.0


# ----------------------------------------------------------------------------- several folds in one graph

FLOAT = onnx.TensorProto.FLOAT
X4 = ("X", FLOAT, [BATCH, 4, SIZE, SIZE])


def two_convs(rng, *, shared_weight=False, second_bn=True, split=False):
    """X -> (Split ->) two Convs -> a BatchNormalization each (the second optionally not)."""
    cin = 2 if split else 4
    inits = {"W1": floats(rng, 4, cin, 3, 3)}
    if not shared_weight:
        inits["W2"] = floats(rng, 4, cin, 3, 3)
    # Split outputs carry the names the pass would derive for its new tensors: fresh names must avoid them
    xs = ["W1_bnfolded", "conv0_bias_bnfolded"] if split else ["X", "X"]
    nodes = [helper.make_node("Split", ["X"], xs, axis=1)] if split else []
    outputs = []
    for i in range(2):
        out = f"c{i}"
        weight = "W1" if shared_weight else f"W{i + 1}"
        nodes.append(helper.make_node("Conv", [xs[i], weight], [out], name=f"conv{i}", pads=[1] * 4))
        if i == 0 or second_bn:
            names = [f"{k}{i}" for k in PARAMS]
            inits.update({n: floats(rng, 4, low=0.5, high=1.5) for n in names})
            nodes.append(helper.make_node(BN, [out, *names], [f"y{i}"], name=f"bn{i}"))
            out = f"y{i}"
        outputs.append((out, FLOAT, [BATCH, 4, SIZE, SIZE]))
    return make_model(nodes, [X4], outputs, inits)


def conv_weights(model) -> dict[str, str]:
    """Conv output name -> its weight's name."""
    return {n.output[0]: n.input[1] for n in model.graph.node if n.op_type == "Conv"}


@pytest.mark.parametrize("split", [False, True])
def test_fold_batchnorm_sibling_convs_get_unique_names(split, rng):
    model = two_convs(rng, split=split)
    out, rec = assert_folded(model, {"Conv": 2, **({"Split": 1} if split else {})}, applied=2)
    names = [i.name for i in out.graph.initializer] + [t for n in out.graph.node for t in n.output]
    assert len(names) == len(set(names))
    weights = set(conv_weights(out).values())
    assert len(weights) == 2 and not {"W1", "W2"} & weights


@pytest.mark.parametrize("second_bn", [True, False])
def test_fold_batchnorm_shared_weight_gets_folded_copies(second_bn, rng):
    model = two_convs(rng, shared_weight=True, second_bn=second_bn)
    out, _rec = assert_folded(model, {"Conv": 2}, applied=2 if second_bn else 1)
    weights = conv_weights(out)
    folded = [w for tensor, w in weights.items() if tensor.startswith("y")]
    assert len(set(folded)) == len(folded) and "W1" not in folded  # one new copy per folded Conv
    if not second_bn:  # the other Conv still reads the shared weight, unchanged
        assert weights["c1"] == "W1"
        np.testing.assert_array_equal(initializers(out)["W1"], initializers(model)["W1"])


def _chain_second_bn(model, rng):
    """Y = BatchNormalization(BatchNormalization(p)): the first now writes y1."""
    model.graph.node[-1].output[0] = "y1"
    for k in PARAMS:
        model.graph.initializer.append(numpy_helper.from_array(floats(rng, 6, low=0.5, high=1.5), f"{k}2"))
    model.graph.node.append(helper.make_node(BN, ["y1", *[f"{k}2" for k in PARAMS]], ["Y"], name="bn2"))
    return model


@pytest.mark.parametrize("producer, expected", [("conv", CONV), ("gemm", GEMM), ("matmul", MATMUL)])
def test_fold_batchnorm_chain_of_two_is_folded_twice(producer, expected, rng):
    model = _chain_second_bn(bn_model(rng, producer), rng)
    assert op_counts(model)[BN] == 2
    assert_folded(model, expected, applied=2)


# ----------------------------------------------------------------------------- near misses

def _graph_input(name, keep_initializer=False):
    """``name`` becomes a graph input; kept as initializer too, it is an old-PyTorch overridable default."""
    def mutate(model):
        init = next(i for i in model.graph.initializer if i.name == name)
        model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
        if not keep_initializer:
            model.graph.initializer.remove(init)
    return mutate


def _also_used(name, how):
    """``name`` also feeds a Relu ("consumer"), a second BatchNormalization ("bn") or is a graph output."""
    def mutate(model):
        if how != "output":
            model.graph.node.append(helper.make_node("Relu", [name], ["extra"]) if how == "consumer" else
                                    helper.make_node(BN, [name, *PARAMS], ["extra"]))
        extra = model.graph.output.add()
        extra.CopyFrom(model.graph.output[0])  # same type and shape as Y
        extra.name = name if how == "output" else "extra"
    return mutate


def _bn_outputs(*names, saved=True):
    """BatchNormalization also writes mean, var (and, before opset 14, saved mean and saved var);
    ``names`` (the first two) are graph outputs; without names they are written and unused."""
    def mutate(model):
        saved_stats = ("saved_mean", "saved_var") if saved else ()
        model.graph.node[-1].output.extend([*(names or ("mean_out", "var_out")), *saved_stats])
        model.graph.output.extend(helper.make_tensor_value_info(n, FLOAT, [6]) for n in names)
    return mutate


def _bn_reads(name, between=None):
    """BatchNormalization reads ``name`` directly (no producer), or through a ``between`` op."""
    def mutate(model):
        bn = model.graph.node[-1]
        if between:
            model.graph.node.insert(len(model.graph.node) - 1, helper.make_node(between, [bn.input[0]], ["r"]))
            bn.input[0] = "r"
            return
        del model.graph.node[:-1]
        bn.input[0] = name
        for init in [i for i in model.graph.initializer if i.name not in PARAMS]:
            model.graph.initializer.remove(init)
    return mutate


def _initializer(name, value):
    """Initializer ``name`` replaced by ``value`` (a shape the op does not take: no checker sees it)."""
    def mutate(model):
        for i, init in enumerate(model.graph.initializer):
            if init.name == name:
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
    return mutate


def _declared(name, dims):
    """A value_info for ``name`` that contradicts what the graph computes (no checker sees it)."""
    def mutate(model):
        model.graph.value_info.append(helper.make_tensor_value_info(name, FLOAT, dims))
    return mutate


NEAR_MISSES = {  # id: (bn_model kwargs, mutation, reason, onnxruntime can run it)
    "training_mode": (dict(opset=15, bn_attrs=dict(training_mode=1)), None, "training mode (training_mode=1)", False),
    "running_stats_used": (dict(opset=15), _bn_outputs("run_mean", "run_var", saved=False),
                           "(running statistics) is used", False),
    # TorchScript TrainingMode.TRAINING at opset 13: five outputs, none used, batch statistics
    "bn9_extra_outputs_unused": (dict(opset=13), _bn_outputs(), "training mode (5 outputs at opset 13)", True),
    "bn7_extra_outputs": (dict(opset=7), _bn_outputs("run_mean", "run_var"), "training mode (5 outputs at opset 7)",
                          False),
    "is_test_0": (dict(opset=6, bn_attrs=dict(is_test=0)), None, "training mode (is_test=0)", False),
    "spatial_0": (dict(opset=7, bn_attrs=dict(spatial=0)), None, "per-activation statistics (spatial=0)", False),
    "param_is_graph_input": (dict(params="input"), None, "scale 'gamma' is not a constant", True),
    "param_initializer_is_graph_input": ({}, _graph_input("mean", True), "mean 'mean' is an initializer also listed as a graph input", True),
    "weight_is_graph_input": ({}, _graph_input("W"), "Conv weight 'W' is not a constant", True),
    "weight_initializer_is_graph_input": ({}, _graph_input("W", True), "Conv weight 'W' is an initializer also listed as a graph input", True),
    "conv_bias_is_graph_input": ({}, _graph_input("B"), "Conv bias 'B' is not a constant", True),
    "gemm_c_initializer_is_graph_input": (dict(producer="gemm", c_shape=(6,)), _graph_input("C", True),
                                          "Gemm bias 'C' is an initializer also listed as a graph input", True),
    "matmul_weight_is_graph_input": (dict(producer="matmul"), _graph_input("W"),
                                     "MatMul weight 'W' is not a constant", True),
    "matmul_bias_is_graph_input": (dict(producer="matmul", bias="right"), _graph_input("b", True),
                                   "is not a MatMul plus constant bias", True),
    "producer_has_other_consumer": ({}, _also_used("p", "consumer"), "output also feeds Relu(extra)", True),
    "producer_feeds_two_bns": ({}, _also_used("p", "bn"), "output also feeds", True),
    "producer_is_graph_output": ({}, _also_used("p", "output"), "output also feeds graph output", True),
    "matmul_has_other_consumer": (dict(producer="matmul", bias="left"), _also_used("mm", "consumer"),
                                  "output also feeds Relu(extra)", True),
    "convtranspose_cin_not_divisible": (dict(op="ConvTranspose", cin=3, cout=6, group=2), None,
                                        "ConvTranspose input channels 3 are not divisible by group 2", False),
    # on [N, L, F] BatchNormalization normalizes L; L == F here so that only the axis is wrong
    "matmul_rank_3": (dict(producer="matmul", bias="right", rows=(6,)), None, "axis 1 of a rank-3 MatMul output", True),
    # the MatMul output is [N, L, F], declared [N*L, F]: the declaration must not place the axis
    "matmul_declared_rank_contradicts": (dict(producer="matmul", rows=(6,)), _declared("p", [12, 6]),
                                         "declared shape [12, 6] of 'p' contradicts the inferred [2, 6, 6]", True),
    # C that does not broadcast to the output [M, N] (onnxruntime refuses the model; the checker does not)
    "gemm_c_wrong_last_dim": (dict(producer="gemm", c_shape=(6, 4)), None,
                              "Gemm C 'C' of shape [6, 4] does not broadcast to the output's [M, 6]", False),
    "conv_bias_wrong_shape": ({}, _initializer("B", np.ones(3, np.float32)),
                              "Conv bias 'B' has shape [3], not [6]", False),
    "no_producer": (dict(cin=4, cout=4), _bn_reads("X"), "is a graph input: no producer", True),
    "producer_cannot_absorb": ({}, _bn_reads("p", between="Relu"), "(Relu) cannot absorb", True),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_fold_batchnorm_near_miss_is_left_unchanged(case, rng):
    kwargs, mutate, reason, runnable = NEAR_MISSES[case]
    model = bn_model(rng, kwargs.pop("producer", "conv"), **kwargs)
    if mutate:
        mutate(model)
        onnx.checker.check_model(model)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert not rec.applied
    assert any(reason in s.reason for s in rec.skipped), [s.reason for s in rec.skipped]
    if runnable:
        assert_equivalent(model, out)


# ----------------------------------------------------------------------------- subgraphs

def _conv_bn(x, out, suffix, dims=2):
    """Conv(x, W) -> BatchNormalization(gamma<suffix>, ...) -> out; W and the parameters are outer-scope names."""
    return [helper.make_node("Conv", [x, "W"], [f"c{suffix}"], pads=[1] * 2 * dims),
            helper.make_node(BN, [f"c{suffix}", *[f"{k}{suffix}" for k in PARAMS]], [out])]


def subgraph_model(rng, kind, weight_is_input=False):
    """BatchNormalization after Conv in both If branches (W also used outside), a Loop body or a Scan body.

    "if_outer_conv": the then branch normalizes the outer Conv's output, which is also a graph output.
    """
    x4 = [BATCH, 4, SIZE, SIZE]
    vi = helper.make_tensor_value_info
    inits = {"W": floats(rng, 4, 4, 3) if kind == "scan" else floats(rng, 4, 4, 3, 3)}
    for suffix in ("0", "1"):
        inits.update({f"{k}{suffix}": floats(rng, 4, low=0.5, high=1.5) for k in PARAMS})
    inputs, outputs = [X4], [("Z", FLOAT, x4)]
    if kind.startswith("if"):
        bodies = {"then": _conv_bn("X", "then", "0"), "else": _conv_bn("X", "else", "1")} if kind == "if" else \
            {"then": [helper.make_node(BN, ["outer", *[f"{k}0" for k in PARAMS]], ["then"])],
             "else": [helper.make_node("Relu", ["X"], ["else"])]}
        branches = {f"{b}_branch": helper.make_graph(body, b, [], [vi(b, FLOAT, x4)]) for b, body in bodies.items()}
        nodes = [helper.make_node("Conv", ["X", "W"], ["outer"], pads=[1] * 4),
                 helper.make_node("If", ["cond"], ["Z"], **branches)]
        inputs.append(("cond", onnx.TensorProto.BOOL, []))
        outputs.append(("outer", FLOAT, x4))
    elif kind == "loop":
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]), *_conv_bn("x_in", "x_out", "0")], "body",
            [vi("i", onnx.TensorProto.INT64, []), vi("cond_in", onnx.TensorProto.BOOL, []), vi("x_in", FLOAT, x4)],
            [vi("cond_out", onnx.TensorProto.BOOL, []), vi("x_out", FLOAT, x4)])
        inits["trips"] = np.array(2, np.int64)
        nodes = [helper.make_node("Loop", ["trips", "", "X"], ["Z"], body=body)]
    else:  # scan over the first axis of X [T, BATCH, 4, SIZE]: a Conv1d per step
        step = [BATCH, 4, SIZE]
        body = helper.make_graph(_conv_bn("x_t", "y_t", "0", dims=1), "body",
                                 [vi("x_t", FLOAT, step)], [vi("y_t", FLOAT, step)])
        inputs, outputs = [("X", FLOAT, [3, *step])], [("Z", FLOAT, [3, *step])]
        nodes = [helper.make_node("Scan", ["X"], ["Z"], body=body, num_scan_inputs=1)]
    if weight_is_input:  # an initializer that is also a graph input (old exporters): callers may override it
        inputs.append(("W", FLOAT, list(inits["W"].shape)))
    return make_model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("kind, expected", [
    ("if", {"If": 1, "Conv": 3}), ("loop", {"Loop": 1, "Conv": 1, "Identity": 1}), ("scan", {"Scan": 1, "Conv": 1})])
def test_fold_batchnorm_inside_subgraph_is_folded(kind, expected, rng, tmp_path):
    model = subgraph_model(rng, kind)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == expected and not rec.skipped
    branches = {"if": {"then_branch", "else_branch"}}.get(kind, {"body"})
    assert sorted(r.graph.rsplit(".", 1)[-1] for r in rec.applied) == sorted(branches)
    if kind != "if":
        assert_equivalent(model, out)
        return
    np.testing.assert_array_equal(initializers(out)["W"], initializers(model)["W"])  # the outer Conv's W
    assert_equivalent_both_branches(model, out, rng, tmp_path)


def assert_equivalent_both_branches(model, out, rng, tmp_path):
    for cond in (True, False):
        np.savez(tmp_path / "inputs.npz", X=floats(rng, BATCH, 4, SIZE, SIZE), cond=np.array(cond))
        assert_equivalent(model, out, inputs_file=str(tmp_path / "inputs.npz"))


@pytest.mark.parametrize("kind, weight_is_input, reason, skips", [
    ("if", True, "Conv weight 'W' is an initializer also listed as a graph input", 2),
    # folding would move the Conv into the branch, leaving the outer graph output without a producer
    ("if_outer_conv", False, "matched node Conv(outer) is in an outer graph", 1)])
def test_fold_batchnorm_inside_subgraph_near_miss_is_left_unchanged(kind, weight_is_input, reason, skips, rng,
                                                                     tmp_path):
    model = subgraph_model(rng, kind, weight_is_input)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert len(rec.skipped) == skips and all(reason in s.reason for s in rec.skipped), rec.skipped
    assert_equivalent_both_branches(model, out, rng, tmp_path)


# ----------------------------------------------------------------------------- math helpers

def test_fold_batchnorm_bn_scale_shift_matches_formula(rng):
    gamma, beta, mean = (floats(rng, 5, dtype=np.float16) for _ in range(3))
    var = floats(rng, 5, low=0.1, high=2.0, dtype=np.float16)
    s, t = bn_scale_shift(gamma, beta, mean, var, 1e-3)
    assert s.dtype == t.dtype == np.float64  # float64 math whatever the parameters' dtype
    x = floats(rng, 3, 5, 4, dtype=np.float64)
    g, b, m, v = (a.astype(np.float64)[:, None] for a in (gamma, beta, mean, var))
    np.testing.assert_allclose(x * s[:, None] + t[:, None], (x - m) / np.sqrt(v + 1e-3) * g + b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op, cin, cout, group", [
    ("Conv", 4, 6, 2), ("Conv", 4, 4, 4),
    ("ConvTranspose", 4, 6, 1), ("ConvTranspose", 4, 6, 2), ("ConvTranspose", 6, 4, 2),
    ("ConvTranspose", 6, 9, 3), ("ConvTranspose", 4, 4, 4)])
def test_fold_batchnorm_scaled_weights_scale_onnxruntime_output_channels(op, cin, cout, group, rng):
    # Independent of the pass: running the producer with scaled weights must scale output channel c by s[c].
    nodes, x_shape, inits, y_shape = conv(rng, np.float32, op=op, cin=cin, cout=cout, group=group, bias=False)
    s = rng.uniform(0.5, 2.0, cout)
    feeds = [{"X": floats(rng, *x_shape)}]

    def run(weight):
        model = make_model(nodes, [("X", FLOAT, x_shape)], [("p", FLOAT, y_shape)], {"W": weight})
        return run_model(model, feeds, "cpu")[0]["p"]
    scaled = scale_output_channels(inits["W"], s, op, group).astype(np.float32)
    np.testing.assert_allclose(run(scaled), run(inits["W"]) * s[:, None, None], rtol=1e-5, atol=1e-5)


def _channel_of(op, index, w_shape, group, trans_b):
    """Which output channel weight element ``index`` contributes to (the reference mapping)."""
    if op == "ConvTranspose":  # W [Cin, Cout/g, k...]: input channel i sits in group i // (Cin/g)
        return index[0] // (w_shape[0] // group) * w_shape[1] + index[1]
    if op == "Conv" or trans_b:
        return index[0]
    return index[1]  # Gemm transB=0, MatMul: [K, N]


@settings(max_examples=60, deadline=None)
@given(op=st.sampled_from(["Conv", "ConvTranspose", "Gemm", "MatMul"]), group=st.integers(1, 4),
       cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), kernel=st.lists(st.integers(1, 2), max_size=2),
       trans_b=st.integers(0, 1), seed=st.integers(0, 2 ** 16))
def test_fold_batchnorm_scale_output_channels_property(op, group, cin_g, cout_g, kernel, trans_b, seed):
    rng = np.random.default_rng(seed)
    if op in ("Gemm", "MatMul"):
        group, kernel = 1, []
    trans_b = trans_b if op == "Gemm" else 0
    cin, cout = group * cin_g, group * cout_g
    shape = {"Conv": (cout, cin_g), "ConvTranspose": (cin, cout_g)}.get(op, (cout, cin) if trans_b else (cin, cout))
    w = rng.standard_normal((*shape, *kernel))
    s = rng.uniform(0.5, 2.0, cout)
    got = scale_output_channels(w, s, op, group, trans_b)
    want = np.array([w[i] * s[_channel_of(op, i, w.shape, group, trans_b)] for i in np.ndindex(w.shape)])
    np.testing.assert_array_equal(got, want.reshape(w.shape))
    for dtype in (np.float16, np.float32):  # rounded once from float64, as .astype of the float64 result
        narrow = w.astype(dtype)
        wide = scale_output_channels(narrow, s, op, group, trans_b)
        once = scale_output_channels(narrow, s, op, group, trans_b, dtype=dtype)
        assert once.dtype == dtype
        np.testing.assert_array_equal(once.view(np.uint8), wide.astype(dtype).view(np.uint8))


# ----------------------------------------------------------------------------- Keras / TF arithmetic

def keras_bn(rng, producer="conv", *, param_shape=None, gamma=True, spelling="reciprocal", consumer=None):
    """Keras' batch_normalization as tf2onnx writes it without constant folding:
    x * a + (beta - mean * a), a = gamma * rsqrt(var + eps), rsqrt as Reciprocal(Sqrt) or 1 / Sqrt.
    producer: "conv" (NCHW, [C, 1, 1] parameters), "nhwc" (Conv -> Transpose to NHWC, [C]),
    "dense" (MatMul on [N, L, K], [F]), "gemm" ([N, K], [F]), "relu" (nothing to fold into)."""
    c = 6
    nodes, inits = [], {}
    if producer in ("conv", "nhwc", "relu"):
        inits["W"] = floats(rng, c, 4, 3, 3)
        nodes.append(helper.make_node("Conv", ["X", "W"], ["conv"], pads=[1, 1, 1, 1]))
        x_shape, y_shape = [BATCH, 4, SIZE, SIZE], [BATCH, c, SIZE, SIZE]
        x, shape = "conv", param_shape or [c, 1, 1]
        if producer == "nhwc":
            nodes.append(helper.make_node("Transpose", ["conv"], ["nhwc"], perm=[0, 2, 3, 1]))
            x, shape, y_shape = "nhwc", param_shape or [c], [BATCH, SIZE, SIZE, c]
        if producer == "relu":
            nodes.append(helper.make_node("Relu", ["conv"], ["relu"]))
            x = "relu"
    elif producer == "dense":
        inits["W"] = floats(rng, 5, c)
        nodes.append(helper.make_node("MatMul", ["X", "W"], ["dense"]))
        x_shape, y_shape, x, shape = [BATCH, 3, 5], [BATCH, 3, c], "dense", param_shape or [c]
    else:
        inits.update(W=floats(rng, 5, c), C=floats(rng, c))
        nodes.append(helper.make_node("Gemm", ["X", "W", "C"], ["gemm"]))
        x_shape, y_shape, x, shape = [BATCH, 5], [BATCH, c], "gemm", param_shape or [c]
    inits.update(gamma=floats(rng, *shape, low=0.5, high=1.5), beta=floats(rng, *shape),
                 mean=floats(rng, *shape), var=floats(rng, *shape, low=0.5, high=2.0), eps=np.array(1e-3, np.float32))
    nodes.append(helper.make_node("Add", ["var", "eps"], ["var_eps"]))
    nodes.append(helper.make_node("Sqrt", ["var_eps"], ["std"]))
    if spelling == "reciprocal":
        nodes.append(helper.make_node("Reciprocal", ["std"], ["rsqrt"]))
    else:
        inits["one"] = np.array(1.0, np.float32)
        nodes.append(helper.make_node("Div", ["one", "std"], ["rsqrt"]))
    nodes.append(helper.make_node("Mul", ["rsqrt", "gamma"] if gamma else ["rsqrt"], ["a"])
                 if gamma else helper.make_node("Identity", ["rsqrt"], ["a"]))
    nodes.append(helper.make_node("Mul", ["mean", "a"], ["mean_a"]))
    nodes.append(helper.make_node("Sub", ["beta", "mean_a"], ["b"]))
    nodes.append(helper.make_node("Mul", [x, "a"], ["xa"]))
    nodes.append(helper.make_node("Add", ["xa", "b"], ["Y"]))
    outputs = [("Y", FLOAT, y_shape)]
    if consumer == "xa":
        outputs.append(("xa", FLOAT, y_shape))
    elif consumer:
        nodes.append(helper.make_node("Relu", [x], ["extra"]))
        outputs.append(("extra", FLOAT, y_shape if producer != "nhwc" else [BATCH, SIZE, SIZE, 6]))
    return make_model(nodes, [("X", FLOAT, x_shape)], outputs, inits, opset=17)


@pytest.mark.parametrize("producer, kwargs, expected", [
    ("conv", {}, {"Conv": 1}),
    ("conv", dict(spelling="div", gamma=False), {"Conv": 1}),
    ("nhwc", {}, {"Conv": 1, "Transpose": 1}),
    ("dense", {}, {"MatMul": 1, "Add": 1}),
    ("gemm", {}, {"Gemm": 1}),
], ids=["conv_nchw", "conv_no_gamma_div", "conv_then_transpose_nhwc", "dense_rank3", "gemm"])
def test_fold_batchnorm_keras_arithmetic_is_folded_into_the_producer(producer, kwargs, expected, rng):
    model = keras_bn(rng, producer, **kwargs)
    out, rec = assert_folded(model, expected)
    assert rec.applied[0].info["form"] == "x * a + b"


@pytest.mark.parametrize("producer, kwargs, expected, reason", [
    ("relu", {}, {"Conv": 1, "Relu": 1, BN: 1}, "producer Relu(relu) (Relu) cannot absorb"),
    ("conv", dict(consumer=True), {"Conv": 1, "Relu": 1, BN: 1}, "output also feeds Relu(extra)"),
    # on [N, L, F] a and b vary over L (axis 1): a BatchNormalization with L channels, not the MatMul's
    ("dense", dict(param_shape=[3, 1]), {"MatMul": 1, BN: 1}, "not its features (axis 2)"),
], ids=["relu", "conv_other_consumer", "dense_rows"])
def test_fold_batchnorm_keras_arithmetic_no_producer_takes_becomes_batchnormalization(producer, kwargs, expected,
                                                                                      reason, rng):
    """x * a + b over axis 1 that no producer absorbs is BatchNormalization(scale a, bias b,
    mean 0, var 1, epsilon 0): exactly the arithmetic."""
    model = keras_bn(rng, producer, **kwargs)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == expected and len(rec.applied) == 1
    assert reason in rec.applied[0].info["not_folded"]
    bn = next(n for n in out.graph.node if n.op_type == BN)
    assert [a.f for a in bn.attribute if a.name == "epsilon"] == [0.0]
    # The new BatchNormalization is a site of its own: left, with the same kind of reason.
    assert len(rec.skipped) == 1 and rec.skipped[0].node in (bn.name, "MatMul(dense)")
    assert_equivalent(model, out)


@pytest.mark.parametrize("producer, kwargs, reason", [
    ("conv", dict(param_shape=[1, 1, SIZE]), "varies over axis 3 of the Conv output, not its channels"),
    ("conv", dict(param_shape=[6, 1, SIZE]), "the parameters vary over axes [1, 3]"),
    ("nhwc", dict(consumer=True), "output also feeds Relu"),
    ("conv", dict(consumer="xa"), "'xa' (x * a) is also used by graph output"),
], ids=["spatial", "two_axes", "transpose_other_consumer", "xa_used"])
def test_fold_batchnorm_keras_arithmetic_near_miss_is_left_unchanged(producer, kwargs, reason, rng):
    model = keras_bn(rng, producer, **kwargs)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert any(reason in s.reason for s in rec.skipped), [s.reason for s in rec.skipped]
    assert_equivalent(model, out)


@pytest.mark.parametrize("producer", ["Relu", "Conv"])
def test_fold_batchnorm_arithmetic_with_more_channels_than_its_input_is_left_unchanged(producer, rng):
    """x * a + b where b has 3 channels and x has 1: the result has 3 channels, which a
    BatchNormalization of x cannot give (nor a Conv with one output channel absorb)."""
    inits = {"var": np.full((1, 1, 1, 1), 2.0, np.float32), "eps": np.array(1e-5, np.float32),
             "b": np.array([0.1, 0.2, 0.3], np.float32).reshape(1, 3, 1, 1),
             "w": rng.standard_normal((1, 1, 3, 3)).astype(np.float32)}
    first = helper.make_node("Relu", ["x"], ["r"]) if producer == "Relu" else \
        helper.make_node("Conv", ["x", "w"], ["r"], pads=[1, 1, 1, 1])
    nodes = [first, helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Reciprocal", ["sd"], ["a"]), helper.make_node("Mul", ["r", "a"], ["ra"]),
             helper.make_node("Add", ["ra", "b"], ["y"])]
    model = make_model(nodes, [("x", FLOAT, [2, 1, 4, 4])], [("y", FLOAT, [2, 3, 4, 4])], inits, opset=17)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert [s.reason for s in rec.skipped] and all("cannot absorb" in s.reason or "channels" in s.reason
                                                    for s in rec.skipped), [s.reason for s in rec.skipped]
    onnx.checker.check_model(out, full_check=True)
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- constant-folded Keras arithmetic

def folded_bn(rng, producer="conv", *, param_shape=None, between=None, scale=None, consumer=None, nonfinite=False):
    """Keras BatchNormalization as tf2onnx really writes it: ``x * a + b`` with a and b
    constants computed at export time (grappler folded gamma * rsqrt(var + eps) and
    beta - mean * a). producer: "conv" (NCHW, a [1, C, 1, 1]), "depthwise" (group = C),
    "convtranspose", "conv1d" (Conv on [N, C, 1, L] then Squeeze of axis 2, a [1, C, 1]), "nhwc"
    (Conv -> Transpose to NHWC, a [C]), "dense" (MatMul on [N, K], a [F]), "tensordot"
    (Reshape [-1, K] -> MatMul -> Reshape [N, L, F], a [F]), "gemm", "input" (no producer).
    between: an op between the producer and the Mul; scale "input": Mul by a graph input."""
    c, k = 6, 4
    inits, nodes, ins = {}, [], [("X", FLOAT, [BATCH, k, SIZE, SIZE])]
    if producer in ("conv", "depthwise", "nhwc"):
        group = c if producer == "depthwise" else 1
        if group > 1:
            ins = [("X", FLOAT, [BATCH, c, SIZE, SIZE])]
        inits["W"] = floats(rng, c, (c if group > 1 else k) // group, 3, 3)
        nodes.append(helper.make_node("Conv", ["X", "W"], ["p"], pads=[1, 1, 1, 1], group=group))
        x, y_shape, shape = "p", [BATCH, c, SIZE, SIZE], [1, c, 1, 1]
        if producer == "nhwc":
            nodes.append(helper.make_node("Transpose", ["p"], ["nhwc"], perm=[0, 2, 3, 1]))
            x, y_shape, shape = "nhwc", [BATCH, SIZE, SIZE, c], [c]
    elif producer == "convtranspose":
        inits["W"] = floats(rng, k, c, 3, 3)
        nodes.append(helper.make_node("ConvTranspose", ["X", "W"], ["p"], strides=[2, 2], pads=[1, 1, 1, 1]))
        x, y_shape, shape = "p", [BATCH, c, 2 * SIZE - 1, 2 * SIZE - 1], [1, c, 1, 1]
    elif producer == "conv1d":
        ins = [("X", FLOAT, [BATCH, k, 1, 7])]
        inits.update(W=floats(rng, c, k, 1, 3), axes=np.array([2], np.int64))
        nodes += [helper.make_node("Conv", ["X", "W"], ["p"], pads=[0, 1, 0, 1]),
                  helper.make_node("Squeeze", ["p", "axes"], ["sq"])]
        x, y_shape, shape = "sq", [BATCH, c, 7], [1, c, 1]
    elif producer in ("dense", "gemm"):
        ins = [("X", FLOAT, [BATCH, k])]
        inits["W"] = floats(rng, k, c)
        nodes.append(helper.make_node("MatMul" if producer == "dense" else "Gemm", ["X", "W"], ["p"]))
        x, y_shape, shape = "p", [BATCH, c], [c]
    elif producer == "tensordot":
        ins = [("X", FLOAT, [BATCH, 3, k])]
        inits.update(W=floats(rng, k, c), flat=np.array([-1, k], np.int64), back=np.array([BATCH, 3, c], np.int64))
        nodes += [helper.make_node("Reshape", ["X", "flat"], ["rows"]), helper.make_node("MatMul", ["rows", "W"], ["p"]),
                  helper.make_node("Reshape", ["p", "back"], ["td"])]
        x, y_shape, shape = "td", [BATCH, 3, c], [c]
    else:
        x, y_shape, shape = "X", ins[0][2], [1, k, 1, 1]
    if between:
        nodes.append(helper.make_node(between, [x], ["between"]))
        x = "between"
    shape = param_shape or shape
    a, b = floats(rng, *shape, low=0.5, high=1.5), floats(rng, *shape)
    if nonfinite:
        a.reshape(-1)[0] = np.inf
    inits.update(a=a, b=b)
    if scale == "input":
        ins.append(("S", FLOAT, shape))
    nodes += [helper.make_node("Mul", [x, "S" if scale == "input" else "a"], ["xa"]),
              helper.make_node("Add", ["xa", "b"], ["Y"])]
    outputs = [("Y", FLOAT, y_shape)]
    if consumer == "xa":
        outputs.append(("xa", FLOAT, y_shape))
    elif consumer:
        nodes.append(helper.make_node("Relu", ["p"], ["extra"]))
        outputs.append(("extra", FLOAT, [BATCH, 6, SIZE, SIZE]))
    return make_model(nodes, ins, outputs, inits, opset=13)


@pytest.mark.parametrize("producer, expected", [
    ("conv", {"Conv": 1}), ("depthwise", {"Conv": 1}), ("convtranspose", {"ConvTranspose": 1}),
    ("conv1d", {"Conv": 1, "Squeeze": 1}), ("nhwc", {"Conv": 1, "Transpose": 1}), ("dense", {"MatMul": 1, "Add": 1}),
    ("tensordot", {"Reshape": 2, "MatMul": 1, "Add": 1}), ("gemm", {"Gemm": 1}),
])
def test_fold_batchnorm_constant_folded_keras_arithmetic_is_folded_into_the_producer(producer, expected, rng):
    model = folded_bn(rng, producer)
    out, rec = assert_folded(model, expected)
    assert rec.applied[0].info["form"] == "x * a + b, a and b constant"


def test_fold_batchnorm_constant_folded_scalars_are_folded(rng):
    model = folded_bn(rng, "conv", param_shape=[1])
    assert_folded(model, {"Conv": 1})


@pytest.mark.parametrize("producer, kwargs, reason", [
    ("conv", dict(param_shape=[1, 6, SIZE, SIZE]), "constant x * a + b after 'p': the parameters vary over axes "
                                                   "[1, 2, 3]"),
    ("conv", dict(param_shape=[1, 1, 1, SIZE]), "constant x * a + b varies over axis 3 of the Conv output"),
    ("nhwc", dict(param_shape=[SIZE, 1, 1]), "varies over axis 1 of 'nhwc' (axis 2 of the Conv output)"),
    ("tensordot", dict(param_shape=[3, 1]), "does not keep the axis the parameters vary over (1)"),
    ("conv", dict(between="Relu"), "Relu) is between Conv(p) and the per-channel x * a + b: nothing to fold into"),
    ("dense", dict(between="Sigmoid"), "Sigmoid) is between MatMul(p) and the per-channel x * a + b"),
    ("conv", dict(scale="input"), "x * y + b after 'p': the scale 'S' is not a constant"),
    ("conv", dict(consumer="xa"), "'xa' (x * a) is also used by graph output"),
    ("conv", dict(consumer=True), "Conv(p) output also feeds Relu(extra)"),
    ("conv", dict(nonfinite=True), "constant a has non-finite values"),
], ids=["per_element", "spatial", "nhwc_spatial", "tensordot_rows", "relu_between", "sigmoid_between",
        "scale_not_constant", "xa_used", "conv_other_consumer", "nonfinite"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the comparison
def test_fold_batchnorm_constant_folded_near_miss_is_left_unchanged(producer, kwargs, reason, rng):
    model = folded_bn(rng, producer, **kwargs)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert [s.reason for s in rec.skipped if reason in s.reason], [s.reason for s in rec.skipped]
    assert_equivalent(model, out)


@pytest.mark.parametrize("producer, between", [("input", None), ("input", "Relu")], ids=["graph_input", "relu_of_input"])
def test_fold_batchnorm_constant_affine_without_a_producer_is_not_a_candidate(producer, between, rng):
    """x * a + b with constant a, b and no Conv / Gemm / MatMul above is no batch norm anyone can
    tell: no record (a per-channel affine of an image input is preprocessing)."""
    model = folded_bn(rng, producer, between=between)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied and not rec.skipped


def test_inspect_lists_keras_batchnorm_arithmetic_as_batchnorm_sites(rng):
    from normopt.sites import inspect_model
    (site,) = inspect_model(folded_bn(rng, "nhwc")).sites
    assert (site.kind, site.action, site.becomes) == ("BatchNorm", "rewrite", "Conv")
    (site,) = inspect_model(folded_bn(rng, "conv", between="Relu")).sites
    assert (site.kind, site.action) == ("BatchNorm", "skip") and "is between Conv(p)" in site.reason


def test_fold_batchnorm_constant_affine_after_a_residual_add_is_not_a_candidate(rng):
    """MatMul + a residual (not a constant bias), then x * a + b: nothing to fold into, no record."""
    inits = {"W": floats(rng, 6, 6), "a": floats(rng, 6), "b": floats(rng, 6)}
    nodes = [helper.make_node("MatMul", ["X", "W"], ["mm"]), helper.make_node("Add", ["mm", "X"], ["res"]),
             helper.make_node("Mul", ["res", "a"], ["xa"]), helper.make_node("Add", ["xa", "b"], ["Y"])]
    model = make_model(nodes, [("X", FLOAT, [BATCH, 6])], [("Y", FLOAT, [BATCH, 6])], inits)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied and not rec.skipped


def test_fold_batchnorm_constant_affine_after_matmul_and_bias_is_folded(rng):
    """Dense with its bias kept (MatMul + constant Add), then constant x * a + b."""
    inits = {"W": floats(rng, 4, 6), "c": floats(rng, 6), "a": floats(rng, 6, low=0.5, high=1.5), "b": floats(rng, 6)}
    nodes = [helper.make_node("MatMul", ["X", "W"], ["mm"]), helper.make_node("Add", ["mm", "c"], ["dense"]),
             helper.make_node("Mul", ["dense", "a"], ["xa"]), helper.make_node("Add", ["xa", "b"], ["Y"])]
    model = make_model(nodes, [("X", FLOAT, [BATCH, 4])], [("Y", FLOAT, [BATCH, 6])], inits)
    assert_folded(model, {"MatMul": 1, "Add": 1})


# ----------------------------------------------------------------------------- folds that would change the output's shape or type

def test_fold_batchnorm_bias_with_more_axes_than_the_matmul_output_is_left_unchanged():
    """x[K] @ W[K, F] is [F]; + bias[1, F] makes it [1, F]: the folded [F] bias would drop the
    axis (a Softmax over axis 0 after it then normalizes over F, not over 1)."""
    rng = np.random.default_rng(0)
    k, f = 5, 4
    nodes = [helper.make_node("MatMul", ["x", "W"], ["p"]), helper.make_node("Add", ["p", "b"], ["z"]),
             helper.make_node("BatchNormalization", ["z", "gamma", "beta", "mean", "var"], ["n"]),
             helper.make_node("Softmax", ["n"], ["y"], axis=0)]
    inits = {"W": rng.standard_normal((k, f)).astype(np.float32), "b": rng.standard_normal((1, f)).astype(np.float32),
             "gamma": rng.uniform(0.5, 1.5, f).astype(np.float32), "beta": rng.standard_normal(f).astype(np.float32),
             "mean": rng.standard_normal(f).astype(np.float32), "var": rng.uniform(0.5, 2, f).astype(np.float32)}
    model = make_model(nodes, [("x", FLOAT, [k])], [("y", FLOAT, [1, f])], inits, opset=15)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert any("bias Add operand of shape [1, 4] has more axes than the MatMul output (rank 1)" in s.reason
               for s in rec.skipped), [s.reason for s in rec.skipped]
    assert_equivalent(model, out)


def test_fold_batchnorm_that_would_overflow_a_float16_weight_is_left_unchanged():
    """W = 1000 times s = 100 is 1e5, past float16's 65504: the folded weight would be inf and
    the outputs NaN where the original's are finite."""
    c = 4
    nodes = [helper.make_node("Conv", ["x", "W"], ["p"]),
             helper.make_node("BatchNormalization", ["p", "gamma", "beta", "mean", "var"], ["y"], epsilon=0.0)]
    inits = {"W": np.full((c, c, 1, 1), 1000, np.float16), "gamma": np.ones(c, np.float16),
             "beta": np.zeros(c, np.float16), "mean": np.zeros(c, np.float16), "var": np.full(c, 1e-4, np.float16)}
    model = make_model(nodes, [("x", onnx.TensorProto.FLOAT16, [1, c, 3, 3])],
                       [("y", onnx.TensorProto.FLOAT16, [1, c, 3, 3])], inits, opset=15)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert any("folding would overflow the float16 weight 'W'" in s.reason for s in rec.skipped), \
        [s.reason for s in rec.skipped]
    # within range, the same model folds
    inits["var"] = np.ones(c, np.float16)
    fine = make_model(nodes, [("x", onnx.TensorProto.FLOAT16, [1, c, 3, 3])],
                      [("y", onnx.TensorProto.FLOAT16, [1, c, 3, 3])], inits, opset=15)
    assert_folded(fine, CONV)


def _sparse(name, dense):
    flat = dense.reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int64)
    return helper.make_sparse_tensor(numpy_helper.from_array(flat[idx], name), numpy_helper.from_array(idx, name + "_idx"),
                                     list(dense.shape))


@pytest.mark.parametrize("where", ["initializer_mean", "constant_weight"])
def test_fold_batchnorm_sparse_tensors_are_not_read_and_are_written_back(where):
    """A sparse initializer read as its dense values was all zeros (a BatchNorm mean folded as
    0); a Constant's sparse_value was dropped on export (the output failed the checker)."""
    rng = np.random.default_rng(0)
    c = 4
    w = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    w[w < 0] = 0
    mean = np.array([1.5, 0, 0, -2], np.float32)
    params = {"gamma": np.ones(c, np.float32), "beta": np.zeros(c, np.float32), "var": np.ones(c, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["p"]),
             helper.make_node("BatchNormalization", ["p", "gamma", "beta", "mean", "var"], ["y"])]
    inits = [numpy_helper.from_array(v, k) for k, v in params.items()]
    sparse = []
    if where == "initializer_mean":
        inits.append(numpy_helper.from_array(w, "w"))
        sparse.append(_sparse("mean", mean))
        reason = "mean 'mean' is a sparse tensor"
    else:
        inits.append(numpy_helper.from_array(mean, "mean"))
        nodes.insert(0, helper.make_node("Constant", [], ["w"], sparse_value=_sparse("w", w)))
        reason = "weight 'w' is a sparse tensor"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", FLOAT, [1, c, 4, 4])], inits, sparse_initializer=sparse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    onnx.checker.check_model(model)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert any(reason in s.reason for s in rec.skipped), [s.reason for s in rec.skipped]
    onnx.checker.check_model(out)
    if where == "initializer_mean":
        assert [s.values.name for s in out.graph.sparse_initializer] == ["mean"]
    else:
        assert [a.name for a in out.graph.node[0].attribute] == ["sparse_value"]
    assert_equivalent(model, out)


def test_fold_batchnorm_opset_6_broadcast_from_an_axis_is_not_read_as_numpy_broadcasting():
    """Mul(mm, a[4], broadcast=1, axis=0) scales the ROWS of a [4, 4] product: folding a into
    the weight's columns (numpy broadcasting, from the last axis) was wrong."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]),
             helper.make_node("Mul", ["mm", "a"], ["ma"], axis=0, broadcast=1),
             helper.make_node("Add", ["ma", "b"], ["y"], axis=0, broadcast=1)]
    inits = {"W": rng.standard_normal((4, 4)).astype(np.float32), "a": rng.uniform(0.5, 2, 4).astype(np.float32),
             "b": rng.standard_normal(4).astype(np.float32)}
    model = make_model(nodes, [("x", FLOAT, [4, 4])], [("y", FLOAT, [4, 4])], inits, opset=6, ir_version=4)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    # the same model without the axis (numpy-like suffix broadcasting) folds
    for node in nodes[1:]:
        del node.attribute[:]
    plain = make_model(nodes, [("x", FLOAT, [4, 4])], [("y", FLOAT, [4, 4])], inits, opset=13)
    assert_folded(plain, {"MatMul": 1, "Add": 1})


def test_fold_batchnorm_with_a_zero_variance_and_epsilon_is_left_unchanged():
    """var + eps = 0: the scale is infinite; a fold would write NaN weights."""
    c = 4
    nodes = [helper.make_node("Conv", ["x", "W"], ["p"]),
             helper.make_node("BatchNormalization", ["p", "gamma", "beta", "mean", "var"], ["y"], epsilon=0.0)]
    inits = {"W": np.ones((c, c, 1, 1), np.float32), "gamma": np.ones(c, np.float32), "beta": np.zeros(c, np.float32),
             "mean": np.zeros(c, np.float32), "var": np.array([1, 0, 1, 1], np.float32)}
    model = make_model(nodes, [("x", FLOAT, [1, c, 3, 3])], [("y", FLOAT, [1, c, 3, 3])], inits, opset=15)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert any("scale or shift is not finite" in s.reason for s in rec.skipped), [s.reason for s in rec.skipped]


def test_fold_batchnorm_1d_bias_after_a_matmul_of_unknown_rank_still_folds():
    """A [F] bias never adds an axis: the rank check is for [1, F] only."""
    rng = np.random.default_rng(0)
    f = 3
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["p"]),
             helper.make_node("Add", ["p", "b"], ["z"]),
             helper.make_node("BatchNormalization", ["z", "gamma", "beta", "mean", "var"], ["y"])]
    inits = {"W": rng.standard_normal((4, f)).astype(np.float32), "b": rng.standard_normal(f).astype(np.float32),
             "gamma": rng.uniform(0.5, 1.5, f).astype(np.float32), "beta": rng.standard_normal(f).astype(np.float32),
             "mean": rng.standard_normal(f).astype(np.float32), "var": rng.uniform(0.5, 2, f).astype(np.float32)}
    model = make_model(nodes, [("x", FLOAT, [8]), ("shape", onnx.TensorProto.INT64, ["k"])], [("y", FLOAT, ["n", f])],
                       inits, opset=15)
    model.graph.value_info.append(helper.make_tensor_value_info("z", FLOAT, ["n", f]))   # the BN axis: known
    out, rec = run_pass(PASS, model)
    assert rec.applied and "BatchNormalization" not in op_counts(out)
    feeds = {"x": rng.standard_normal(8).astype(np.float32), "shape": np.array([2, 4], np.int64)}
    want, got = (run_model(m, [feeds], "cpu")[0]["y"] for m in (model, out))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

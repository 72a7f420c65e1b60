"""Property proof of fold-batchnorm over generated producers, attributes, dtypes and BN versions."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from propgen import (at_opset_7, F16, F32, F64, INT32, NEAR_MISS, NP, PROFILE, SLOW, SLOW_NEAR_MISS, Case, prove_left_alone,
                     prove_rewrite, seeds, typed_model)

PASS = "fold-batchnorm"
BN = "BatchNormalization"
PARAMS = ("gamma", "beta", "mean", "var")
# onnxruntime's CPU kernels: no float64 Conv / ConvTranspose.
DTYPES = {"Conv": [F32, F16], "ConvTranspose": [F32, F16], "Gemm": [F32, F16, F64], "MatMul": [F32, F16, F64]}
MISSES = {
    "consumer": "output also feeds Relu",
    "graph_output": "output also feeds graph output",
    "training_mode": "training mode (training_mode=1)",
    "extra_outputs": "training mode (5 outputs",
    "int_cast": "(Cast) cannot absorb",
    "matmul_rank3": "axis 1 of a rank-3 MatMul output",
    "param_input": "is not a constant",
    "convt_group": "are not divisible by group",
}


def _floats(rng, shape, dtype, low=None, high=None):
    values = rng.standard_normal(shape) if low is None else rng.uniform(low, high, shape)
    return np.asarray(values).astype(NP[dtype])


@st.composite
def conv_producer(draw, rng, op: str, dtype: int, miss):
    """Conv or ConvTranspose with random rank, group, channels, kernel, strides, pads, dilations."""
    dims = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    cin, cout = group * draw(st.integers(1, 3)), group * draw(st.integers(1, 3))
    if miss == "convt_group":
        op, group = "ConvTranspose", draw(st.integers(2, 3))
        cin = group * draw(st.integers(1, 2)) + draw(st.integers(1, group - 1))
        cout = group * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    strides = [draw(st.integers(1, 2)) for _ in range(dims)]
    dilations = [draw(st.integers(1, 2)) for _ in range(dims)]
    attrs = {"kernel_shape": kernel} if draw(st.booleans()) else {}
    if group > 1 or draw(st.booleans()):
        attrs["group"] = group
    if draw(st.booleans()):
        attrs["strides"] = strides
    else:
        strides = [1] * dims
    pad_mode = draw(st.sampled_from(["pads", "none", "SAME_UPPER", "SAME_LOWER", "VALID"] if op == "Conv" else
                                    ["pads", "none"]))
    if pad_mode.startswith("SAME"):  # onnxruntime: no dilation with SAME padding
        dilations = [1] * dims
    if draw(st.booleans()):
        attrs["dilations"] = dilations
    else:
        dilations = [1] * dims
    pads = [0] * (2 * dims)
    if pad_mode == "pads":
        pads = [draw(st.integers(0, 1)) for _ in range(2 * dims)]
        attrs["pads"] = pads
    elif pad_mode != "none":
        attrs["auto_pad"] = pad_mode
    if op == "ConvTranspose" and draw(st.booleans()):
        attrs["output_padding"] = [draw(st.integers(0, s - 1)) for s in strides]  # onnxruntime: < stride
    size = [(k - 1) * d + 1 + draw(st.integers(0, 2)) for k, d in zip(kernel, dilations)]
    if op == "ConvTranspose":  # output (size - 1) * stride + (k - 1) * d + 1 - pads stays >= 1
        size = [max(s, 3) for s in size]
    w_shape = [cout, cin // group] if op == "Conv" else [cin, cout // group]
    inits = {"W": _floats(rng, w_shape + kernel, dtype)}
    if draw(st.booleans()):
        inits["B"] = _floats(rng, [cout], dtype)
    batch = draw(st.sampled_from([1, 2, "N"]))
    node = helper.make_node(op, ["X", *inits], ["p"], name="producer", **attrs)
    return [node], [batch, cin, *size], inits, cout, {op: 1}


@st.composite
def gemm_producer(draw, rng, dtype: int, opset: int):
    m, k, n = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    attrs = {"broadcast": 1} if opset < 7 else {}   # Gemm-6 broadcasts C only when told
    for key, value in (("transA", trans_a), ("transB", trans_b)):
        if value or draw(st.booleans()):
            attrs[key] = value
    if draw(st.booleans()):
        attrs["alpha"] = draw(st.sampled_from([0.5, 1.0, 1.5, -2.0]))
    if draw(st.booleans()):
        attrs["beta"] = draw(st.sampled_from([0.0, 0.25, 1.0, 2.0, -1.0]))
    inits = {"W": _floats(rng, (n, k) if trans_b else (k, n), dtype)}
    c_shape = draw(st.sampled_from(([None] if opset >= 11 else []) + [(n,), (1, n), (m, n), (), (1,), (m, 1)]))
    if c_shape is not None:
        inits["C"] = _floats(rng, c_shape, dtype)
    node = helper.make_node("Gemm", ["X", *inits], ["p"], name="producer", **attrs)
    return [node], ([k, m] if trans_a else [m, k]), inits, n, {"Gemm": 1}


@st.composite
def matmul_producer(draw, rng, dtype: int, opset: int, miss):
    m, k, f = draw(st.sampled_from([1, 3, "N"])), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    inits = {"W": _floats(rng, (k, f), dtype)}
    # Add-6 broadcasts only its second input, and only with broadcast=1
    bias = draw(st.sampled_from([None, "right", "scalar", "one"] + (["left"] if opset >= 7 else [])))
    nodes = [helper.make_node("MatMul", ["X", "W"], ["mm" if bias else "p"], name="producer")]
    if bias:
        inits["b"] = _floats(rng, {"right": (f,), "left": (1, f), "scalar": (), "one": (1,)}[bias], dtype)
        nodes.append(helper.make_node("Add", ["mm", "b"] if bias != "left" else ["b", "mm"], ["p"], name="bias",
                                      **({"broadcast": 1} if opset < 7 else {})))
    rows = [f] if miss == "matmul_rank3" else []   # [M, L, F] with L == F: only the axis is wrong
    return nodes, [m, *rows, k], inits, f, {"MatMul": 1, "Add": 1}


@st.composite
def batchnorm_cases(draw, miss: str | None = None) -> Case:
    seed = draw(seeds())
    rng = np.random.default_rng(seed)
    op = draw(st.sampled_from(["Conv", "ConvTranspose", "Gemm", "MatMul"]))
    op = {"matmul_rank3": "MatMul", "convt_group": "ConvTranspose"}.get(miss, op)
    dtype = draw(st.sampled_from(DTYPES[op]))
    opsets = [6, 7, 9, 13, 14, 15, 17, 21]
    if miss == "training_mode":
        opsets = [14, 15, 17, 21]
    if miss == "extra_outputs":
        opsets = [9, 13]
    opset = draw(st.sampled_from(opsets))
    # BatchNormalization-15: scale/bias (T1) and mean/var (T2) may differ from X's type; onnxruntime
    # runs float16 X with float32 parameters (T1 == T2), no other mix
    param_dtype = draw(st.sampled_from([dtype, F32])) if opset >= 15 and dtype == F16 else dtype
    stat_dtype = param_dtype
    if op in ("Conv", "ConvTranspose"):
        nodes, x_shape, inits, channels, expected = draw(conv_producer(rng, op, dtype, miss))
    elif op == "Gemm":
        nodes, x_shape, inits, channels, expected = draw(gemm_producer(rng, dtype, opset))
    else:
        nodes, x_shape, inits, channels, expected = draw(matmul_producer(rng, dtype, opset, miss))
    # var sometimes ~ epsilon, so that epsilon matters; gamma shrinks alike to keep outputs ~1
    size = draw(st.sampled_from([1.0, 3e-3]))
    values = {"gamma": _floats(rng, channels, param_dtype, 0.5 * size, 1.5 * size),
              "beta": _floats(rng, channels, param_dtype), "mean": _floats(rng, channels, stat_dtype),
              "var": _floats(rng, channels, stat_dtype, 0.5 * size ** 2, 1.5 * size ** 2)}
    inputs = [("X", dtype, x_shape)]
    if miss == "param_input":
        name = draw(st.sampled_from(PARAMS))
        inputs.append((name, param_dtype if name in ("gamma", "beta") else stat_dtype, [channels]))
        values.pop(name)
    if draw(st.booleans()):
        inits.update(values)
    else:
        nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v)) for k, v in values.items()] \
            + nodes
    attrs = {}
    if draw(st.booleans()):
        attrs["epsilon"] = draw(st.sampled_from([1e-5, 1e-3, 1e-6, 0.1]))
    if draw(st.booleans()):
        attrs["momentum"] = draw(st.sampled_from([0.9, 0.99]))
    if opset < 7:
        attrs["is_test"] = 1
    if opset < 9 and draw(st.booleans()):
        attrs["spatial"] = 1
    if opset >= 14 and (miss == "training_mode" or draw(st.booleans())):
        attrs["training_mode"] = int(miss == "training_mode")
    source = "p"
    if miss == "int_cast":   # p rounded through int32: another function of x than the producer's
        nodes += [helper.make_node("Cast", ["p"], ["p_int"], to=INT32), helper.make_node("Cast", ["p_int"], ["p_f"],
                                                                                         to=dtype)]
        source = "p_f"
    outputs = ["Y"]
    if miss == "extra_outputs":
        outputs += ["run_mean", "run_var", "saved_mean", "saved_var"]
    elif miss == "training_mode":  # BatchNormalization-14 in training mode writes the running statistics
        outputs += ["run_mean", "run_var"]
    nodes.append(helper.make_node(BN, [source, *PARAMS], outputs, name="bn", **attrs))
    graph_outputs = [("Y", dtype)]
    if miss == "consumer":
        nodes.append(helper.make_node("Relu", ["p"], ["extra"]))
        graph_outputs.append(("extra", dtype))
    elif miss == "graph_output":
        graph_outputs.append(("p", dtype))
    model = typed_model(nodes, inputs, graph_outputs, inits, opset)
    spec = dict(seed=seed, op=op, dtype=dtype, param_dtype=(param_dtype, stat_dtype), opset=opset, x=x_shape, bn=attrs,
                producer=[helper.printable_node(n) for n in nodes if n.op_type != "Constant"], miss=miss)
    if miss:
        return Case(model, PASS, reason=MISSES[miss], seed=seed, spec=spec)
    if opset < 7:
        return Case(model, PASS, expected, seed=seed, spec=spec, reference=at_opset_7(model), runnable=at_opset_7)
    return Case(model, PASS, expected, seed=seed, spec=spec)





@PROFILE
@given(batchnorm_cases())
def test_batchnorm_positive_forms_fold_and_match_onnxruntime(case):
    prove_rewrite(case)


@pytest.mark.parametrize("miss", sorted(MISSES))
@NEAR_MISS
@given(data=st.data())
def test_batchnorm_near_misses_are_left_alone_with_a_reason(miss, data):
    prove_left_alone(data.draw(batchnorm_cases(miss=miss)))


@pytest.mark.slow
@SLOW
@given(batchnorm_cases())
def test_batchnorm_positive_forms_campaign(case):
    prove_rewrite(case)


@pytest.mark.slow
@pytest.mark.parametrize("miss", sorted(MISSES))
@SLOW_NEAR_MISS
@given(data=st.data())
def test_batchnorm_near_misses_campaign(miss, data):
    prove_left_alone(data.draw(batchnorm_cases(miss=miss)))

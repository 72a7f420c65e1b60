"""Examples the property suite found, kept as plain tests (each builds its model explicitly)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from onnx import helper

from helpers import op_counts, run_pass
from normopt.verify import run_model

from propgen import (F16, F32, F64, Case, Net, Spelling, at_opset_7, core, prove_left_alone, prove_rewrite,
                     typed_model)

PLAIN = Spelling(square="pow", exponent="float", divide="div", mul_first=False, eps=1e-5, eps_first=False,
                 eps_shape=(), eps_cast=False, dup_sub=False, dup_mean=False, fn_body=False, negative_axes=True)


@pytest.mark.parametrize("pass_name, kind", [("fuse-layernorm", "mean"), ("fuse-rmsnorm", "rms")])
@pytest.mark.parametrize("form, opset", [(1, 13), (0, 13), (0, 18), (0, 11)])
def test_bessel_corrected_variance_is_skipped_with_a_reason(pass_name, kind, form, opset):
    """torch.var's default (unbiased) variance, N / (N - 1) times the mean of squares (form 1) or
    ReduceSum / (N - 1) (form 0), was not a candidate at all: left alone, but with no skip record."""
    net = Net(opset, F32)
    t = core(net, "x", [-1], PLAIN, kind, F32, miss="bessel", miss_value=form, n_elems=8)
    model = net.finish(t, ["N", 5, 8], F32, ["N", 5, 8], F32)
    prove_left_alone(Case(model, pass_name, reason=("Bessel's correction", "not a mean"),
                          spec=dict(form=form, opset=opset)))


def test_rmsnorm_squares_of_an_int32_round_trip_are_skipped_with_a_reason():
    """x / sqrt(mean(float(int32(x))^2) + eps): the statistics of truncated values, not of x.
    It was not a candidate at all: left alone, but with no skip record."""
    net = Net(18, F32)
    t = core(net, "x", [-1], PLAIN, "rms", F32, miss="int_cast")
    model = net.finish(t, ["N", 8], F32, ["N", 8], F32)
    prove_left_alone(Case(model, "fuse-rmsnorm", reason="no RMSNorm this pass knows"))


def _bn_after(producer_nodes, x_shape, inits, params, opset, dtype, bn_attrs=None):
    nodes = [*producer_nodes, helper.make_node("BatchNormalization", ["p", "gamma", "beta", "mean", "var"], ["Y"],
                                               name="bn", **(bn_attrs or {}))]
    return typed_model(nodes, [("X", dtype, x_shape)], [("Y", dtype)], {**inits, **params}, opset)


def test_batchnorm_default_epsilon_is_the_float32_attribute_default():
    """Campaign example (float64 MatMul + BatchNormalization-9 without epsilon, var ~ 1e-5): the
    fold used exactly 1e-5 where onnxruntime (and the float32 attribute) use 1e-5 rounded to
    float32; the outputs differed by 4.7e-9 > float64's atol 1e-9, a correct fold rolled back."""
    params = {"gamma": np.array([0.00177575, 0.0033003, 0.00368568]),
              "beta": np.array([-0.32542284, 0.77380659, 0.28121067]),
              "mean": np.array([-0.55382284, 0.97756745, -0.31055655]),
              "var": np.array([8.39367712e-06, 1.05236757e-05, 8.30506206e-06])}
    model = _bn_after([helper.make_node("MatMul", ["X", "W"], ["p"])], [1, 1],
                      {"W": np.array([[0.18905338, -0.52274844, -0.41306354]])}, params, 9, F64)
    prove_rewrite(Case(model, "fold-batchnorm", {"MatMul": 1, "Add": 1}, seed=2))


@pytest.mark.parametrize("producer", ["Gemm", "MatMul"])
def test_batchnorm_fold_below_opset_7_keeps_broadcasting(producer):
    """Campaign example: at opset 6, Add broadcasts a [F] bias only with broadcast=1; the fold
    wrote the MatMul's bias Add without it, which then no longer broadcasts (Gemm keeps its own)."""
    rng = np.random.default_rng(0)
    inits = {"W": rng.standard_normal((4, 3)), "C": rng.standard_normal(3)}
    if producer == "Gemm":
        nodes = [helper.make_node("Gemm", ["X", "W", "C"], ["p"], broadcast=1)]
    else:
        nodes = [helper.make_node("MatMul", ["X", "W"], ["mm"]), helper.make_node("Add", ["mm", "C"], ["p"],
                                                                                      broadcast=1)]
    params = {"gamma": rng.uniform(0.5, 1.5, 3), "beta": rng.standard_normal(3), "mean": rng.standard_normal(3),
              "var": rng.uniform(0.5, 1.5, 3)}
    model = _bn_after(nodes, [2, 4], {k: v.astype(np.float32) for k, v in inits.items()},
                      {k: v.astype(np.float32) for k, v in params.items()}, 6, F32, {"is_test": 1})
    out = prove_rewrite(Case(model, "fold-batchnorm", {producer: 1, **({"Add": 1} if producer == "MatMul" else {})},
                             reference=at_opset_7(model), runnable=at_opset_7))
    node = next(n for n in out.graph.node if n.op_type == ("Gemm" if producer == "Gemm" else "Add"))
    assert {a.name: a.i for a in node.attribute}.get("broadcast") == 1


def test_function_body_variance_without_epsilon_fuses_to_the_exact_op():
    """Campaign example (seed 47): instance norm over rows of 2 written as ONNX's function body,
    var = mean(x*x) - mean(x)^2, epsilon 0. On a row of near-equal values the original cancels
    catastrophically (here 0.1 off); the fused InstanceNormalization is exact in math. The rewrite is
    kept and is far closer to float64 math than the original; generated examples of this form now use
    epsilon >= 0.1 so that the original is a fair reference."""
    sp = replace(PLAIN, fn_body=True, eps=None, negative_axes=False)
    net = Net(13, F32)
    t = core(net, "x", [2], sp, "mean", F32)
    t = net.op("Mul", t, net.const(np.array([[0.7], [1.3]])))
    model = net.finish(t, [1, 2, 2], F32, [1, 2, 2], F32)
    out = run_pass("fuse-instancenorm", model)[0]
    assert op_counts(out) == {"InstanceNormalization": 1, "Identity": 1}
    x = np.array([[[1.0, 1.001], [-0.5, 0.25]]], np.float32)
    truth = x.astype(np.float64) - x.mean(axis=2, keepdims=True, dtype=np.float64)
    truth = truth / np.sqrt((truth ** 2).mean(axis=2, keepdims=True)) * np.array([[0.7], [1.3]])
    original, fused = (run_model(m, [{"x": x}], "cpu")[0]["y"] for m in (model, out))
    # float32 rounding of x - mean alone is ~1e-4 of these tiny differences; the original is 0.1 off
    assert np.abs(fused - truth).max() < 2e-4
    assert np.abs(original - truth).max() > 1e-2


def test_function_body_layernorm_at_epsilon_1e_3_fuses_closer_to_exact_math():
    """Campaign example (seed 1251019): a LayerNorm over rows of 2 as ONNX's function body with
    epsilon 1e-3 was 6.5e-5 from the fused op; the original is the imprecise one."""
    sp = replace(PLAIN, fn_body=True, eps=1e-3, negative_axes=False)
    net = Net(13, F32)
    model = net.finish(core(net, "x", [1], sp, "mean", F32), [3, 2], F32, [3, 2], F32)
    out = run_pass("fuse-layernorm", model)[0]
    assert op_counts(out) == {"LayerNormalization": 1, "Identity": 1}
    x = np.array([[3.0, 3.0632], [0.3, -0.2], [-4.0, -4.0447]], np.float32)  # var ~ epsilon, mean(x*x) ~ 10
    x64 = x.astype(np.float64)
    d = x64 - x64.mean(axis=1, keepdims=True)
    truth = d / np.sqrt((d ** 2).mean(axis=1, keepdims=True) + float(np.float32(1e-3)))
    original, fused = (run_model(m, [{"x": x}], "cpu")[0]["y"] for m in (model, out))
    # float32 LayerNormalization stays within 1e-5 of float64 math; the original is 3e-4 off
    assert np.abs(fused - truth).max() < 2e-5
    assert np.abs(original - truth).max() > 1e-4


def test_float64_groupnorm_epsilon_is_rounded_to_the_float32_attribute():
    """Campaign example (seed 76372803): a float64 group norm with epsilon 0.1 fused to
    GroupNormalization(epsilon=float32(0.1)), 3.5e-9 from the original (float64 atol 1e-9).
    Exactly the attribute's rounding: each model matches float64 math with its own epsilon.
    Verification rolls such a fold back; generated float64 examples use float32-exact epsilons."""
    net = Net(13, F64)
    grouped = net.op("Reshape", "x", net.const([0, 1, -1], "int"))
    t = core(net, grouped, [2], replace(PLAIN, eps=0.1, negative_axes=False), "mean", F64)
    t = net.op("Reshape", t, net.op("Shape", "x"))
    eps_name = next(k for k, v in net.inits.items() if v.dtype == np.float64 and v.size == 1 and 0.09 < v < 0.11)
    net.inits[eps_name] = np.array(0.1)  # the generator now writes float32(0.1): the example had 0.1
    model = net.finish(t, [1, 2, 2, 2], F64, [1, 2, 2, 2], F64)
    out = run_pass("fuse-groupnorm", model)[0]
    assert op_counts(out) == {"GroupNormalization": 1, "Identity": 1}
    x = np.random.default_rng(76372803).standard_normal((1, 2, 2, 2)) * 0.05  # var << epsilon
    d = x - x.mean()
    for m, eps in ((model, 0.1), (out, float(np.float32(0.1)))):
        y = run_model(m, [{"x": x}], "cpu")[0]["y"]
        np.testing.assert_allclose(y, d / np.sqrt((d ** 2).mean() + eps), rtol=1e-12, atol=1e-14)


def test_torchscript_float16_layernorm_without_affine_fuses():
    """Campaign example (seed 0 of the centred-tensor Cast generator): float16 x [1, 2], mean and
    d in float16, d cast to float32 for the square and the division, then only a Cast back to
    float16 (no gamma or beta). It was skipped ("'sub' is computed in float16, narrower than
    the output's float32"): the Cast back is now the fused op's output."""
    net = Net(13, F16)
    d = net.op("Cast", net.op("Sub", "x", net.mean("x", [1])), to=F32)
    var = net.mean(net.op("Pow", d, net.const(2.0, F32)), [1])
    t = net.op("Cast", net.op("Div", d, net.op("Sqrt", var)), to=F16)
    model = net.finish(t, [1, 2], F16, [1, 2], F16)
    prove_rewrite(Case(model, "fuse-layernorm", {"LayerNormalization": 1, "Identity": 1}))

"""fuse-rmsnorm: LLaMA/T5/Gemma RMSNorm spellings fuse to RMSNormalization-23; near misses stay."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import GraphBuilder, assert_equivalent, make_model, op_counts, run_pass, run_pipeline

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
NP = {F32: np.float32, F16: np.float16, TensorProto.DOUBLE: np.float64,
      TensorProto.BFLOAT16: helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)}
RMS = "RMSNormalization"
SHAPE = [2, 5, 8]


class Net(GraphBuilder):
    def __init__(self, opset=14, dtype=F32):
        super().__init__(opset, dtype)

    def model(self, out, in_dtype=None, out_dtype=None, shape=SHAPE, inputs=(), outputs=()):
        self.nodes.append(helper.make_node("Identity", [out], ["y"]))
        return make_model(self.nodes, [("x", in_dtype or self.dtype, shape), *inputs],
                          [("y", out_dtype or self.dtype, shape), *outputs], self.inits, opset=self.opset)


def rms(net, x="x", axes=(-1,), square="pow", divide="div_one", eps=1e-6, eps_first=False, exponent=2.0,
        num=None, std_to=None, rsqrt_exponent=-0.5):
    """x / sqrt(mean(x^2) + eps); divide: div, reciprocal (dynamo rsqrt), div_one (TorchScript rsqrt),
    pow (x * (var + eps) ** -0.5 written by hand). num: the numerator when it is another tensor than
    x (a second Cast of it); std_to: Cast of std."""
    sq = net.op("Pow", x, net.const(exponent)) if square == "pow" else net.op("Mul", x, x)
    var = net.mean(sq, axes)
    e = net.const(eps)
    shifted = net.op("Add", *((e, var) if eps_first else (var, e)))
    if divide == "pow":
        return net.op("Mul", num or x, net.op("Pow", shifted, net.const(rsqrt_exponent)))
    std = net.op("Sqrt", shifted)
    if std_to is not None:
        std = net.op("Cast", std, to=std_to)
    num = num or x
    if divide == "div":
        return net.op("Div", num, std)
    if divide == "swapped":
        return net.op("Div", std, num)
    inv = net.op("Reciprocal", std) if divide == "reciprocal" else net.op("Div", net.const(1.0, std_to), std)
    return net.op("Mul", num, inv)


def weight(net, t, rng, shape=(8,), first=True, dtype=None):
    w = net.const(rng.uniform(0.5, 1.5, shape), dtype)
    return net.op("Mul", *((w, t) if first else (t, w)))


def rms_node(model):
    return next(n for n in model.graph.node if n.op_type == RMS)


def attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fused(model, passes=("fuse-rmsnorm",)):
    out, result = run_pipeline(model, list(passes))
    rec = result.passes[-1]
    assert len(rec.applied) >= 1 and not rec.skipped, [s.reason for s in rec.skipped]
    return out, result


def left_alone(model, reason):
    out, rec = run_pass("fuse-rmsnorm", model)
    assert op_counts(out) == op_counts(model)
    assert any(reason in s.reason for s in rec.skipped), [s.reason for s in rec.skipped]


# ----------------------------------------------------------------------------- must fuse

VARIANTS = {
    "hf_torchscript_rsqrt_div_one": dict(),
    "dynamo_reciprocal_op18": dict(opset=18, divide="reciprocal"),
    "div": dict(divide="div"),
    "square_as_mul": dict(square="mul"),
    "weight_on_the_right": dict(first=False),
    "eps_first": dict(eps_first=True, eps=1e-5),
    "two_trailing_axes": dict(axes=(-2, -1), wshape=(5, 8)),
    "positive_axis": dict(axes=(2,)),
    "pow_minus_half": dict(divide="pow"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_fuse_rmsnorm_variant_is_fused(variant, rng):
    kw = dict(VARIANTS[variant])
    net = Net(opset=kw.pop("opset", 14))
    first, wshape = kw.pop("first", True), kw.pop("wshape", (8,))
    model = net.model(weight(net, rms(net, **kw), rng, wshape, first))
    out, result = fused(model)
    assert op_counts(out) == {RMS: 1, "Identity": 1}
    assert [(u.from_version, u.to_version) for u in result.upgrades] == [(net.opset, 23)]
    a = attrs(rms_node(out))
    assert a["axis"] == -len(kw.get("axes", (-1,))) and a["stash_type"] == 1
    assert a["epsilon"] == pytest.approx(kw.get("eps", 1e-6), rel=1e-6)
    assert_equivalent(model, out)


def test_fuse_rmsnorm_dynamo_unoptimized_computed_axes_are_fused(rng):
    """dynamo with optimize=False: ReduceMean axes = Reshape(Constant [[-1]], Constant [-1])."""
    net = Net(opset=18)
    model = net.model(weight(net, rms(net, divide="reciprocal"), rng))
    mean = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["axes_2d"],
                                                value=numpy_helper.from_array(np.array([[-1]], np.int64))))
    model.graph.node.insert(1, helper.make_node("Constant", [], ["axes_shape"], value_ints=[-1]))
    model.graph.node.insert(2, helper.make_node("Reshape", ["axes_2d", "axes_shape"], ["axes_computed"]))
    mean.input[1] = "axes_computed"
    onnx.checker.check_model(model)
    out, _ = fused(model)
    assert op_counts(out) == {RMS: 1, "Identity": 1}
    assert attrs(rms_node(out))["axis"] == -1
    assert_equivalent(model, out)


def test_fuse_rmsnorm_without_weight_scales_by_ones(rng):
    net = Net(opset=23)
    model = net.model(rms(net, divide="reciprocal"))
    out, result = fused(model)
    assert op_counts(out) == {RMS: 1, "Identity": 1} and not result.upgrades
    scale = next(numpy_helper.to_array(i) for i in out.graph.initializer if i.name == rms_node(out).input[1])
    assert scale.shape == (8,) and np.all(scale == 1)
    assert_equivalent(model, out)


def test_fuse_rmsnorm_opset24_model_qualifies_without_upgrade(rng):
    net = Net(opset=24)
    model = net.model(weight(net, rms(net), rng))
    out, result = fused(model)
    assert op_counts(out) == {RMS: 1, "Identity": 1} and not result.upgrades
    assert out.opset_import[0].version == 24
    assert_equivalent(model, out)


def test_fuse_rmsnorm_upgrade_disabled_is_skipped_with_reason(rng):
    net = Net(opset=18)
    model = net.model(weight(net, rms(net), rng))
    out, result = run_pipeline(model, ["fuse-rmsnorm"], allow_opset_upgrade=False)
    assert op_counts(out) == op_counts(model) and out.opset_import[0].version == 18
    assert any("needs opset 23 (model has 18); opset upgrade disabled" in s.reason
               for s in result.passes[0].skipped)


def test_fuse_rmsnorm_gemma_one_plus_weight_is_folded(rng):
    """Gemma multiplies by (1 + w); with w constant the sum becomes the new scale."""
    net = Net(opset=18)
    w = rng.uniform(-0.5, 0.5, 8)
    scale = net.op("Add", net.const(1.0), net.const(w))
    model = net.model(net.op("Mul", rms(net, divide="reciprocal"), scale))
    out, _ = fused(model)
    assert op_counts(out) == {RMS: 1, "Identity": 1}
    got = next(numpy_helper.to_array(i) for i in out.graph.initializer if i.name == rms_node(out).input[1])
    np.testing.assert_array_equal(got, (np.float32(1) + w.astype(np.float32)))
    assert_equivalent(model, out)


def test_fuse_rmsnorm_weight_fed_at_run_time_is_the_scale_input(rng):
    """A weight that is a graph input is exact as the op's scale input when its shape is [D]."""
    net = Net(opset=23)
    model = net.model(net.op("Mul", rms(net), "w"), inputs=[("w", F32, [8])])
    out, _ = fused(model)
    assert op_counts(out) == {RMS: 1, "Identity": 1} and rms_node(out).input[1] == "w"
    assert_equivalent(model, out)


def test_fuse_rmsnorm_variable_weight_over_other_axes_stays_outside(rng):
    net = Net(opset=23)
    model = net.model(net.op("Mul", rms(net), "w"), inputs=[("w", F32, [5, 8])])
    out, result = fused(model)
    assert op_counts(out) == {RMS: 1, "Mul": 1, "Identity": 1}
    assert "'w' of shape [5, 8] varies over non-normalized axes" in result.passes[-1].applied[0].info["kept"]
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- mixed precision

def _cast_wrapped(rng, back, dtype=F16):
    """HF LLaMA: x.to(float32), statistics in float32, .to(input_dtype) before (or after) the weight."""
    net = Net(opset=18, dtype=F32)
    t = rms(net, net.op("Cast", "x", to=F32), divide="reciprocal")
    if back == "before":
        t = weight(net, net.op("Cast", t, to=dtype), rng, dtype=dtype)
    else:
        t = net.op("Cast", weight(net, t, rng), to=dtype)
    return net.model(t, in_dtype=dtype, out_dtype=dtype)


@pytest.mark.parametrize("back, rms_type, casts", [("before", "float16", 0), ("after", "float32", 2)])
def test_fuse_rmsnorm_cast_wrapped_fp16_keeps_output_type(back, rms_type, casts, rng):
    model = _cast_wrapped(rng, back)
    out, result = fused(model)
    assert op_counts(out) == {RMS: 1, "Identity": 1, **({"Cast": casts} if casts else {})}
    assert result.passes[0].applied[0].info["dtype"] == rms_type
    assert attrs(rms_node(out))["stash_type"] == TensorProto.FLOAT
    assert_equivalent(model, out)


def test_fuse_rmsnorm_cast_wrapped_bf16_is_fused_in_bf16(rng):
    """bfloat16 has no CPU Mul kernel in onnxruntime: checked by structure and onnx's reference."""
    from onnx.reference import ReferenceEvaluator

    model = _cast_wrapped(rng, "before", TensorProto.BFLOAT16)
    out, result = fused(model)
    assert op_counts(out) == {RMS: 1, "Identity": 1}
    assert result.passes[0].applied[0].info["dtype"] == "bfloat16"
    feed = {"x": rng.standard_normal(SHAPE).astype(NP[TensorProto.BFLOAT16])}
    ref, got = (ReferenceEvaluator(m).run(None, feed)[0].astype(np.float32) for m in (model, out))
    np.testing.assert_allclose(got, ref, atol=6e-2, rtol=6e-2)


def _t5_fp16(rng, num_to=F32):
    """TorchScript T5LayerNorm in float16: x is cast to float32 twice, once for the variance and
    once for x * rsqrt(var + eps); the product is cast back before the float16 weight."""
    net = Net(opset=14, dtype=F32)
    num = net.op("Cast", "x", to=num_to)
    t = rms(net, net.op("Cast", "x", to=F32), num=num, std_to=None if num_to == F32 else num_to)
    return net.model(weight(net, net.op("Cast", t, to=F16), rng, dtype=F16), in_dtype=F16, out_dtype=F16)


def test_fuse_rmsnorm_t5_fp16_input_cast_twice_is_fused(rng):
    model = _t5_fp16(rng)
    assert op_counts(model)["Cast"] == 3
    out, result = fused(model)
    assert op_counts(out) == {RMS: 1, "Identity": 1}
    assert result.passes[0].applied[0].info["dtype"] == "float16"
    assert attrs(rms_node(out))["stash_type"] == TensorProto.FLOAT
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- near misses

def _layernorm_core(net, x="x"):
    mean = net.mean(x, (-1,))
    d = net.op("Sub", x, mean)
    var = net.mean(net.op("Pow", d, net.const(2.0)), (-1,))
    return net.op("Div", d, net.op("Sqrt", net.op("Add", var, net.const(1e-5))))


def _centred(rng):
    net = Net(opset=23)
    return net.model(weight(net, _layernorm_core(net), rng))


def _escaping(rng):
    net = Net(opset=23)
    t = rms(net)
    square = next(n.output[0] for n in net.nodes if n.op_type == "Pow")
    net.nodes.append(helper.make_node("Neg", [square], ["side"]))
    return net.model(t, outputs=[("side", F32, SHAPE)])


def _eps_input(rng):
    net = Net(opset=23)
    t = rms(net)
    next(n for n in net.nodes if n.op_type == "Add").input[1] = "eps"
    return net.model(t, inputs=[("eps", F32, [])])


def _simple(rng, **kw):
    shape = kw.pop("shape", SHAPE)
    net = Net(opset=23)
    return net.model(rms(net, **kw), shape=shape)


NEAR_MISSES = {
    "mean_centred_input": (_centred, "is mean-centred (x - mean(x)): a LayerNorm"),
    "channels_axis": (lambda rng: _simple(rng, axes=(1,), shape=[2, 8, 3, 3]), "not its trailing axes"),
    "pow_3": (lambda rng: _simple(rng, exponent=3.0), "Pow exponent is 3, not 2"),
    "pow_half": (lambda rng: _simple(rng, exponent=0.5), "Pow exponent is 0.5, not 2"),
    "div_swapped": (lambda rng: _simple(rng, divide="swapped"), "operands swapped"),
    "pow_minus_0_49": (lambda rng: _simple(rng, divide="pow", rsqrt_exponent=-0.49),
                       "Pow exponent of the variance is -0.49, not -0.5"),
    "pow_plus_half": (lambda rng: _simple(rng, divide="pow", rsqrt_exponent=0.5),
                      "Pow exponent of the variance is 0.5, not -0.5"),
    "epsilon_graph_input": (_eps_input, "epsilon 'eps' is not a constant"),
    "square_used_elsewhere": (_escaping, "is also used by Neg"),
    "input_cast_to_two_types": (lambda rng: _t5_fp16(rng, num_to=TensorProto.DOUBLE), "is cast to 2 types"),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_fuse_rmsnorm_near_miss_is_left_unchanged(case, rng):
    build, reason = NEAR_MISSES[case]
    left_alone(build(rng), reason)


def test_fuse_rmsnorm_layernorm_goes_to_fuse_layernorm_first(rng):
    """Pass order: a mean-centred normalization is taken by fuse-layernorm, never by fuse-rmsnorm."""
    net = Net(opset=23)
    model = net.model(weight(net, _layernorm_core(net), rng))
    out, result = run_pipeline(model, ["fuse-layernorm", "fuse-rmsnorm"])
    assert op_counts(out) == {"LayerNormalization": 1, "Identity": 1}
    assert [len(r.applied) for r in result.passes] == [1, 0]
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- subgraphs, real exports

def test_fuse_rmsnorm_inside_if_branch_is_fused(rng):
    net = Net(opset=23)
    net.nodes.append(helper.make_node("Identity", [weight(net, rms(net), rng)], ["then_y"]))
    then = helper.make_graph(net.nodes, "then", [], [helper.make_tensor_value_info("then_y", F32, SHAPE)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["else_y"])], "else", [],
                              [helper.make_tensor_value_info("else_y", F32, SHAPE)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
    model = make_model([node], [("x", F32, SHAPE)], [("y", F32, SHAPE)], {**net.inits, "cond": np.array(True)},
                       opset=23)
    out, result = fused(model)
    assert op_counts(out) == {"If": 1, RMS: 1, "Identity": 1, "Neg": 1}
    assert result.passes[0].applied[0].graph
    assert_equivalent(model, out)


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_fuse_rmsnorm_llama_torchscript_export_is_upgraded_and_fused(half, tmp_path):
    """HF LLaMA's RMSNorm (x.float(), x * rsqrt(var + eps), weight * x.to(dtype)) exported at opset 14."""
    torch = pytest.importorskip("torch")

    class LlamaRMSNorm(torch.nn.Module):
        def __init__(self, d, eps=1e-6):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.rand(d) + 0.5), eps

        def forward(self, h):
            dtype = h.dtype
            h = h.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * h.to(dtype)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = LlamaRMSNorm(16), LlamaRMSNorm(16)
            self.up, self.down = torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(32, 16, bias=False)

        def forward(self, x):
            x = x + self.down(torch.nn.functional.silu(self.up(self.norm1(x))))
            return self.norm2(x)

    torch.manual_seed(0)
    net = Block().eval()
    x = torch.randn(2, 5, 16)
    if half:
        net, x = net.half(), x.half()
    path = tmp_path / "llama.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=14, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "seq"}})
    model = onnx.load(str(path))
    out, result = run_pipeline(model)
    assert [(u.from_version, u.to_version) for u in result.upgrades] == [(14, 23)]
    assert op_counts(out)[RMS] == 2 and "ReduceMean" not in op_counts(out) and "Sqrt" not in op_counts(out)
    assert all(a.info["dtype"] == ("float16" if half else "float32") for a in result.passes[-1].applied)
    assert_equivalent(model, out)


def test_fuse_rmsnorm_failed_opset_upgrade_is_skipped_with_reason(rng, monkeypatch):
    """The version converter reaches 23 on every export tried; if it ever fails, the model is kept."""
    from normopt import pipeline

    def refuse(model, target):
        raise RuntimeError("No Adapter From Version $14 for Frobnicate")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)  # node by node and whole model
    net = Net(opset=14)
    model = net.model(weight(net, rms(net), rng))
    out, result = run_pipeline(model, ["fuse-rmsnorm"])
    assert op_counts(out) == op_counts(model) and out.opset_import[0].version == 14
    assert any("opset upgrade 14 -> 23 failed: No Adapter From Version $14 for Frobnicate" in s.reason
               for s in result.passes[0].skipped)

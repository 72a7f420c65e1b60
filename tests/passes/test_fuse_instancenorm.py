"""fuse-instancenorm: hand-written instance normalization (statistics over every spatial axis,
per-channel affine) fuses to InstanceNormalization; LayerNorm-shaped cores are left to
fuse-layernorm without a record; near misses stay, with their reasons."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import GraphBuilder, assert_equivalent, make_model, op_counts, run_pass, run_pipeline

PASS = "fuse-instancenorm"
IN = "InstanceNormalization"
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
NP = {F32: np.float32, F16: np.float16}
BATCH, C = 2, 6


class Net(GraphBuilder):
    def __init__(self, rng, opset=14, dtype=F32):
        super().__init__(opset, dtype)
        self.rng = rng


def instance_norm(net, x, rank, *, axes=None, var_axes=None, square="pow", inverse="div", exponent=2.0,
                  eps="const", compute=None, scale="channel", bias="channel", round_to=None):
    """x [BATCH, C, ...] -> (x - mean) / sqrt(var + eps) [* scale] [+ bias], as exporters write it."""
    axes = axes or list(range(2, rank))
    dtype = compute or net.dtype
    src = net.op("Cast", x, to=compute) if compute else x
    d = net.op("Sub", src, net.mean(src, axes))
    sq = net.op("Pow", d, net.const(exponent, dtype)) if square == "pow" else net.op("Mul", d, d)
    e = "eps" if eps == "input" else net.const(1e-5, dtype)
    std = net.op("Sqrt", net.op("Add", e, net.mean(sq, var_axes or axes)))
    y = net.op("Div", d, std) if inverse == "div" else net.op("Mul", net.op("Reciprocal", std), d)
    if compute:
        y = net.op("Cast", y, to=net.dtype)
    if round_to:  # rounded and cast back before the affine
        y = net.op("Cast", net.op("Cast", y, to=round_to), to=net.dtype)
    ones = [1] * (rank - 2)
    shapes = {"channel": [C, *ones], "leading": [1, C, *ones], "scalar": [], "last": [4],
              "spatial": [C] + [4] * (rank - 2), "none": None}
    if shapes[scale] is not None:
        y = net.op("Mul", net.const(net.rng.standard_normal(shapes[scale])), y)
    if shapes[bias] is not None:
        y = net.op("Add", y, net.const(net.rng.standard_normal(shapes[bias])))
    return y


def in_model(rng, rank=4, opset=14, dtype=F32, shape=None, extra_outputs=(), **kwargs):
    net = Net(rng, opset, dtype)
    shape = shape or [BATCH, C] + [4] * (rank - 2)
    y = instance_norm(net, "X", rank, **kwargs)
    net.nodes.append(helper.make_node("Identity", [y], ["Y"]))
    inputs = [("X", dtype, shape)] + ([("eps", dtype, [])] if kwargs.get("eps") == "input" else [])
    outputs = [("Y", dtype, shape), *[(name, dtype, shape) for name in extra_outputs]]
    return make_model(net.nodes, inputs, outputs, net.inits, opset=opset)


FUSED = {IN: 1, "Identity": 1}


def fuse(model, expected=FUSED):
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == expected
    assert len(rec.applied) == 1 and not rec.skipped, rec.skipped
    return out, rec, assert_equivalent(model, out)


# ----------------------------------------------------------------------------- variants

@pytest.mark.parametrize("kwargs", [
    dict(rank=3), dict(rank=4), dict(rank=5),
    dict(square="mul"), dict(inverse="reciprocal"), dict(square="mul", inverse="reciprocal"),
    dict(opset=18), dict(opset=18, axes=[-2, -1]), dict(axes=[3, 2]),
    dict(scale="leading", bias="leading"), dict(scale="scalar", bias="channel"),
    dict(bias="none"), dict(scale="none"),
    dict(rank=4, scale="none", bias="none"),  # rank >= 4 without affine: ones / zeros
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_fuse_instancenorm_variant_is_fused(kwargs, rng):
    out, rec, _ = fuse(in_model(rng, **kwargs))
    node = next(n for n in out.graph.node if n.op_type == IN)
    assert [list(numpy_helper.to_array(i).shape) for i in out.graph.initializer] == [[C], [C]]
    assert rec.applied[0].info["epsilon"] == pytest.approx(1e-5) and node.output[0] == rec.applied[0].output


def test_fuse_instancenorm_cast_wrapped_float16_computes_in_float32(rng):
    # Cast(x -> float32) ... Cast(-> float16): InstanceNormalization has no stash type, so it
    # runs in float32 between Casts, as the original statistics did.
    model = in_model(rng, dtype=F16, compute=F32)
    out, _, report = fuse(model, {"Cast": 2, IN: 1, "Identity": 1})
    assert all(numpy_helper.to_array(i).dtype == np.float32 for i in out.graph.initializer)
    assert report.outputs[0].dtype == "float16"


def test_fuse_instancenorm_dynamic_spatial_dims_are_fused(rng):
    fuse(in_model(rng, shape=[BATCH, C, "h", "w"]))


def test_fuse_instancenorm_existing_instancenormalization_is_left_alone(rng):
    node = helper.make_node(IN, ["X", "s", "b"], ["Y"])
    model = make_model([node], [("X", F32, [BATCH, C, 4, 4])], [("Y", F32, [BATCH, C, 4, 4])],
                       {"s": np.ones(C, np.float32), "b": np.zeros(C, np.float32)})
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == {IN: 1} and not rec.applied and not rec.skipped


def test_fuse_instancenorm_inside_loop_body_is_fused(rng, tmp_path):
    body = Net(rng)
    y = instance_norm(body, "X", 4)
    body.nodes += [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", [y], ["out"])]
    graph = helper.make_graph(body.nodes, "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                                                   helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("out", F32, [BATCH, C, 4, 4])], list(map(
                                   lambda kv: numpy_helper.from_array(kv[1], kv[0]), body.inits.items())))
    loop = helper.make_node("Loop", ["n", ""], ["Y"], body=graph)
    model = make_model([loop], [("X", F32, [BATCH, C, 4, 4]), ("n", TensorProto.INT64, [])],
                       [("Y", F32, [2, BATCH, C, 4, 4])])
    out, result = run_pipeline(model, [PASS])
    assert op_counts(out) == {"Loop": 1, IN: 1, "Identity": 2} and len(result.applied) == 1
    path = tmp_path / "feeds.npz"
    np.savez(path, n=np.array(2, np.int64), X=rng.standard_normal((BATCH, C, 4, 4)).astype(np.float32))
    assert_equivalent(model, out, inputs_file=str(path))


# ----------------------------------------------------------------------------- left to fuse-layernorm

@pytest.mark.parametrize("kwargs", [
    dict(rank=3, scale="last", bias="last"),          # LayerNorm over D of [B, S, D]
    dict(rank=3, scale="none", bias="none"),          # LayerNorm without affine (DiT)
    dict(rank=4, axes=[1], scale="channel"),          # ConvNeXt channels-first LayerNorm
    dict(rank=4, scale="spatial", bias="none"),       # LayerNorm over [C, H, W]... not per channel
    dict(rank=4, axes=[3], scale="none", bias="none"),
], ids=["ln_last_axis", "ln_no_affine", "channels_first_ln", "spatial_scale", "last_axis_no_affine"])
def test_fuse_instancenorm_layernorm_shape_is_not_a_candidate(kwargs, rng):
    model = in_model(rng, **kwargs)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied and not rec.skipped


def test_fuse_instancenorm_runs_before_layernorm_in_the_pipeline(rng):
    model = in_model(rng)
    out, result = run_pipeline(model)
    assert op_counts(out) == FUSED and [r.pass_name for r in result.applied] == [PASS]


# ----------------------------------------------------------------------------- near misses

@pytest.mark.parametrize("kwargs, reason", [
    (dict(axes=[3]), "not over all spatial axes [2, 3]"),
    (dict(rank=5, axes=[3, 4]), "not over all spatial axes [2, 3, 4]"),
    (dict(bias="spatial"), "not per channel"),
    (dict(eps="input"), "epsilon 'eps' is not a constant"),
    (dict(exponent=3.0), "Pow exponent is 3, not 2"),
    (dict(var_axes=[2]), "reduce different axes"),
    (dict(compute=F16), "narrower than the output's float32"),
    (dict(round_to=F16), "is computed in float16, narrower than the output's float32"),
    (dict(extra_outputs=("sub3",)), "is also used by graph output"),
], ids=["one_spatial_axis", "rank5_two_axes", "bias_spatial", "eps_input", "pow3", "var_axes", "fp16_stats",
        "fp16_rounding_before_affine", "intermediate_output"])
def test_fuse_instancenorm_near_miss_is_left_unchanged(kwargs, reason, rng):
    model = in_model(rng, **kwargs)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model)
    assert not rec.applied and any(reason in s.reason for s in rec.skipped), [s.reason for s in rec.skipped]


def test_fuse_instancenorm_declared_shape_contradicting_inference_is_skipped(rng):
    """The core's output declared [N, C, H*W] while the graph computes [N, C, H, W]: the
    declaration cannot place the spatial axes, and it is not trusted."""
    model = in_model(rng)
    div = next(n for n in model.graph.node if n.op_type == "Div")
    model.graph.value_info.append(helper.make_tensor_value_info(div.output[0], F32, [BATCH, C, 16]))
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert [s.reason for s in rec.skipped] == [
        f"declared shape [2, 6, 16] of '{div.output[0]}' contradicts the inferred [2, 6, 4, 4]"]
    assert_equivalent(model, out)


def test_fuse_instancenorm_epsilon_float32_cannot_hold_is_left_unchanged(rng):
    net = Net(rng, 14, TensorProto.DOUBLE)
    y = instance_norm(net, "X", 4)
    eps = next(n for n in net.nodes if n.op_type == "Add" and any(i in net.inits for i in n.input))
    net.inits[next(i for i in eps.input if i in net.inits)] = np.array(1e-50)
    net.nodes.append(helper.make_node("Identity", [y], ["Y"]))
    shape = [BATCH, C, 4, 4]
    model = make_model(net.nodes, [("X", TensorProto.DOUBLE, shape)], [("Y", TensorProto.DOUBLE, shape)], net.inits)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert [s.reason for s in rec.skipped] == [
        "epsilon 1e-50 is not representable as the op's float32 attribute (it would be 0)"]
    assert_equivalent(model, out)

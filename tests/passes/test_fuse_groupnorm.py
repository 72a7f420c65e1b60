"""fuse-groupnorm: every exporter spelling of GroupNorm fuses to GroupNormalization-21 (or to
InstanceNormalization when G == C); near misses stay, with their reasons.

``group_norm`` writes the graphs exporters emit: TorchScript (Constant nodes, Reshape [0, G, -1],
InstanceNormalization with ones/zeros, Reshape(Shape(x)), Mul gamma [C, 1, ...], Add beta), the
dynamo exporter (initializers, static reshape back), and hand-written decompositions (ReduceMean,
Sub, Pow or Mul, Sqrt, Div or Reciprocal; Cast-wrapped float16).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import pytest
from onnx import TensorProto, helper, numpy_helper

import helpers
from helpers import GraphBuilder, make_model, op_counts, run_pass, run_pipeline
from normopt import registry
from normopt.fold import FoldOptions, optimize
from normopt.inputs import DEGENERATE, NORMAL, OFFSET

PASS = "fuse-groupnorm"
GN, IN = "GroupNormalization", "InstanceNormalization"
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
NP = {F32: np.float32, F16: np.float16}
BATCH = 2


def assert_equivalent(model, out, **kwargs):
    """Equivalence on normal and degenerate inputs. Not on the offset set: onnxruntime runs
    GroupNormalization-21 through its function body (E[x^2] - E[x]^2), about 0.2 off at a group
    mean of 1000 where the exported forms are exact; fold rolls those rewrites back
    (test_fuse_groupnorm_precision_loss_at_an_offset_is_rolled_back)."""
    return helpers.assert_equivalent(model, out, input_sets=(NORMAL, DEGENERATE), **kwargs)


class Net(GraphBuilder):
    def __init__(self, rng, opset=17, dtype=F32, constants="node"):
        super().__init__(opset, dtype, constants)
        self.rng = rng

    def dims(self, x, indices):
        """Concat(Unsqueeze(Gather(Shape(x), i)) ...): TorchScript's dynamic shape arithmetic."""
        shape = self.op("Shape", x)
        parts = [self.op("Unsqueeze", self.op("Gather", shape, self.const(i, "int"), axis=0), self.const([0], "int"))
                 for i in indices]
        return parts

    def model(self, y, shape, out_shape=None, extra_inputs=()):
        self.nodes.append(helper.make_node("Identity", [y], ["Y"]))
        ins = [("X", self.dtype, shape), *extra_inputs]
        return make_model(self.nodes, ins, [("Y", self.dtype, out_shape or shape)], self.inits, opset=self.opset)


def normalize(net, t, axes, square="pow", inverse="div", eps=1e-5, eps_input=None, compute=None):
    """The decomposed mean/variance core over ``axes`` (maybe Cast to ``compute`` and back)."""
    dtype = compute or net.dtype
    src = net.op("Cast", t, to=compute) if compute else t
    d = net.op("Sub", src, net.mean(src, axes))
    sq = net.op("Pow", d, net.const(2.0, dtype)) if square == "pow" else net.op("Mul", d, d)
    std = net.op("Sqrt", net.op("Add", net.mean(sq, axes), eps_input or net.const(eps, dtype)))
    y = net.op("Div", d, std) if inverse == "div" else net.op("Mul", d, net.op("Reciprocal", std))
    return net.op("Cast", y, to=net.dtype) if compute else y


def group_norm(net, x, c, g, spatial, *, core="instancenorm", split="zero", back="shape", affine="both",
               in_scale=1.0, in_bias=0.0, axes=None, eps=1e-5, **core_kwargs):
    """x [BATCH, c, *spatial] -> group normalization, spelled as ``split``/``core``/``back``/``affine`` say."""
    rank, size = 2 + len(spatial), int(np.prod(spatial))
    shapes = {"zero": [0, g, -1], "static": [BATCH, g, -1], "neg": [-1, g, c // g * size],
              "subgroups": [0, g, c // g, -1], "wrong_axis": [0, -1, g]}
    if split == "concat":
        target = net.op("Concat", *net.dims(x, [0]), net.const([g], "int"), net.const([-1], "int"), axis=0)
    else:
        target = net.const(shapes[split], "int")
    grouped = net.op("Reshape", x, target, **({"allowzero": 1} if split == "static" and net.opset >= 14 else {}))
    if core == "instancenorm":
        normed = net.op("InstanceNormalization", grouped, net.const(np.full(g, in_scale)),
                        net.const(np.full(g, in_bias)), epsilon=eps)
    else:
        grouped_rank = 4 if split == "subgroups" else 3
        normed = normalize(net, grouped, axes or list(range(2, grouped_rank)), eps=eps, **core_kwargs)
    backs = {"const": lambda: net.const([BATCH, c, *spatial], "int"),
             "zero_neg": lambda: net.const([0, c, -1, *spatial[1:]], "int"),
             "flat": lambda: net.const([0, c, -1], "int"),
             "swapped": lambda: net.const([0, c, *spatial[::-1]], "int"),
             "shape_start": lambda: net.op("Shape", x, start=0),  # dynamo, opset >= 15
             "concat": lambda: net.op("Concat", *net.dims(x, range(rank)), axis=0)}
    y = net.op("Reshape", normed, backs[back]() if back in backs else net.op("Shape", x))
    ones = [1] * (rank - 2)
    params = {"both": ([c, *ones], [c, *ones]), "scale": ([c, *ones], None), "bias": (None, [c, *ones]),
              "leading": ([1, c, *ones], [1, c, *ones]), "scale_spatial": ([c, *spatial], [c, *ones]),
              "bias_spatial": ([c, *ones], [1, 1, *spatial]), "none": (None, None)}
    if affine == "unsqueeze":  # TorchScript without constant folding: Unsqueeze(weight [C], [1, 2])
        axes_ = net.const(list(range(1, rank - 1)), "int")
        y = net.op("Mul", y, net.op("Unsqueeze", net.const(net.rng.standard_normal(c)), axes_))
        return net.op("Add", y, net.op("Unsqueeze", net.const(net.rng.standard_normal(c)), axes_))
    if affine == "identity":  # nn.GroupNorm(affine=False): Mul by [1, 1, 1] ones, Add [1, 1, 1] zeros
        return net.op("Add", net.op("Mul", y, net.const(np.ones([1] * (rank - 1)))), net.const(np.zeros([1] * (rank - 1))))
    scale, bias = params[affine]
    if scale is not None:
        y = net.op("Mul", y, net.const(net.rng.standard_normal(scale)))
    if bias is not None:
        y = net.op("Add", net.const(net.rng.standard_normal(bias)), y)  # beta first: either order
    return y


def gn_model(rng, c=8, g=2, spatial=(4, 4), opset=17, dtype=F32, constants="node", silu=False, **kwargs):
    net = Net(rng, opset, dtype, constants)
    y = group_norm(net, "X", c, g, list(spatial), **kwargs)
    if silu:
        y = net.op("Mul", y, net.op("Sigmoid", y))
    shape = [BATCH, c, *spatial]
    out_shape = {"flat": [BATCH, c, int(np.prod(spatial))], "swapped": [BATCH, c, *spatial[::-1]]}.get(
        kwargs.get("back"), shape)
    return net.model(y, shape, out_shape)


def fuse(model, expected, applied=1, **options):
    out, result = run_pipeline(model, [PASS], **options)
    rec = result.passes[0]
    assert op_counts(out) == expected
    assert len(rec.applied) == applied and not rec.skipped, rec.skipped
    report = assert_equivalent(model, out)
    return out, result, report


FUSED = {GN: 1, "Identity": 1}


# ----------------------------------------------------------------------------- variants

@pytest.mark.parametrize("opset", [13, 14, 17])
@pytest.mark.parametrize("spatial", [(6,), (4, 4), (2, 3, 3)], ids=["audio_rank3", "image_rank4", "video_rank5"])
def test_fuse_groupnorm_torchscript_export_is_fused(opset, spatial, rng):
    model = gn_model(rng, spatial=spatial, opset=opset)
    out, result, _ = fuse(model, FUSED)
    assert [(u.from_version, u.to_version) for u in result.upgrades] == [(opset, 21)]
    assert out.opset_import[0].version == 21
    node = next(n for n in out.graph.node if n.op_type == GN)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_groups"] == 2 and attrs["stash_type"] == 1
    assert [list(numpy_helper.to_array(i).shape) for i in out.graph.initializer] == [[8], [8]]


@pytest.mark.parametrize("kwargs", [
    dict(constants="init", back="const", opset=18),            # dynamo exporter, static shapes
    dict(constants="init", opset=18),                          # dynamo exporter, dynamic shapes
    dict(split="static"), dict(split="neg"), dict(split="concat"),
    dict(back="concat"), dict(back="zero_neg"), dict(back="const"), dict(back="shape_start", opset=18),
    dict(affine="none"), dict(affine="scale"), dict(affine="bias"), dict(affine="leading"),
    dict(affine="identity"), dict(affine="unsqueeze"),
    dict(c=12, g=3), dict(c=8, g=1), dict(c=16, g=8, spatial=(3, 5)), dict(eps=1e-6),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_fuse_groupnorm_spelling_is_fused(kwargs, rng):
    fuse(gn_model(rng, **kwargs), FUSED)


@pytest.mark.parametrize("kwargs", [
    dict(square="pow", inverse="div"), dict(square="mul", inverse="div"),
    dict(square="pow", inverse="reciprocal"), dict(square="mul", inverse="reciprocal"),
    dict(opset=18), dict(split="subgroups"), dict(split="concat", back="concat"),
    dict(spatial=(7,)), dict(spatial=(2, 2, 3)), dict(axes=[-1]), dict(eps=1e-3),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_fuse_groupnorm_decomposed_core_is_fused(kwargs, rng):
    fuse(gn_model(rng, core="decomposed", **kwargs), FUSED)


def test_fuse_groupnorm_cast_wrapped_float16_keeps_float32_statistics(rng):
    model = gn_model(rng, core="decomposed", dtype=F16, compute=F32)
    out, _, report = fuse(model, FUSED)
    node = next(n for n in out.graph.node if n.op_type == GN)
    assert {a.name: a.i for a in node.attribute if a.name == "stash_type"} == {"stash_type": 1}
    assert all(numpy_helper.to_array(i).dtype == np.float16 for i in out.graph.initializer)
    assert report.outputs[0].dtype == "float16"


def test_fuse_groupnorm_float16_torchscript_export_is_fused(rng):
    fuse(gn_model(rng, dtype=F16), FUSED)


def mixed_gn(rng, dtype, cast_in=None, cast_out=None, tail_cast=None, out=None):
    """TorchScript GroupNorm on a ``dtype`` input with Casts after the split, after the
    InstanceNormalization and after the reshape back (the affine in the type reached)."""
    net = Net(rng, 17, dtype)
    t = net.op("Reshape", "X", net.const([0, 2, -1], "int"))
    t = net.op("Cast", t, to=cast_in) if cast_in else t
    inner = cast_in or dtype
    t = net.op("InstanceNormalization", t, net.const(np.ones(2), inner), net.const(np.zeros(2), inner))
    t = net.op("Cast", t, to=cast_out) if cast_out else t
    t = net.op("Reshape", t, net.op("Shape", "X"))
    t = net.op("Cast", t, to=tail_cast) if tail_cast else t
    last = tail_cast or cast_out or inner
    t = net.op("Add", net.op("Mul", t, net.const(rng.standard_normal((8, 1, 1)), last)),
               net.const(rng.standard_normal((8, 1, 1)), last))
    net.nodes.append(helper.make_node("Identity", [t], ["Y"]))
    return make_model(net.nodes, [("X", dtype, [BATCH, 8, 4, 4])], [("Y", out or last, [BATCH, 8, 4, 4])],
                      net.inits, opset=17)


def test_fuse_groupnorm_narrowing_cast_after_split_is_kept(rng):
    """float32 x rounded to float16 after the split: the fused op must see the rounded values,
    so x is cast to float16 in front of a float16 GroupNormalization."""
    model = mixed_gn(rng, F32, cast_in=F16)
    out, result = run_pipeline(model, [PASS])
    assert op_counts(out) == {"Cast": 1, GN: 1, "Identity": 1} and result.applied[0].info["dtype"] == "float16"
    cast = next(n for n in out.graph.node if n.op_type == "Cast")
    assert cast.input[0] == "X" and next(n for n in out.graph.node if n.op_type == GN).input[0] == cast.output[0]
    assert_equivalent(model, out)


def test_fuse_groupnorm_silu_tail_stays_outside(rng):
    fuse(gn_model(rng, silu=True), {GN: 1, "Sigmoid": 1, "Mul": 1, "Identity": 1})


def test_fuse_groupnorm_groups_equal_channels_become_instancenorm_without_upgrade(rng):
    model = gn_model(rng, c=4, g=4, opset=13)
    out, result, _ = fuse(model, {IN: 1, "Identity": 1})
    assert not result.upgrades and out.opset_import[0].version == 13


def test_fuse_groupnorm_groups_equal_channels_of_a_rank_2_input_are_left_with_their_reason(rng):
    """torch.nn.GroupNorm(C, C) on an [N, C] input: InstanceNormalization takes rank 3 and up
    (onnxruntime refused the fused model)."""
    model = gn_model(rng, c=4, g=4, spatial=(), opset=13)
    out, result = run_pipeline(model, [PASS])
    assert op_counts(out) == op_counts(model) and not result.passes[0].applied
    assert any("InstanceNormalization needs rank 3 or more" in s.reason for s in result.passes[0].skipped), \
        [s.reason for s in result.passes[0].skipped]
    assert_equivalent(model, out)


def unet_block(rng, opset=14, core="instancenorm"):
    """diffusers ResnetBlock2D: GN -> SiLU -> Conv3x3 -> + temb -> GN -> SiLU -> Conv3x3 -> + shortcut."""
    net, c, spatial = Net(rng, opset), 8, [6, 6]
    h = "X"
    for i in range(2):
        h = group_norm(net, h, c, 4, spatial, core=core, eps=1e-6)
        h = net.op("Mul", h, net.op("Sigmoid", h))
        h = net.op("Conv", h, net.const(rng.standard_normal((c, c, 3, 3)) * 0.2), net.const(rng.standard_normal(c)),
                   pads=[1, 1, 1, 1])
        if i == 0:
            h = net.op("Add", h, net.const(rng.standard_normal((c, 1, 1))))
    return net.model(net.op("Add", h, "X"), [BATCH, c, *spatial])


@pytest.mark.parametrize("opset, core", [(13, "instancenorm"), (14, "instancenorm"), (17, "instancenorm"),
                                         (14, "decomposed"), (17, "decomposed")])
def test_fuse_groupnorm_unet_block_both_norms_are_fused(opset, core, rng):
    model = unet_block(rng, opset, core)
    out, _, _ = fuse(model, {GN: 2, "Sigmoid": 2, "Mul": 2, "Conv": 2, "Add": 2, "Identity": 1, "Constant": 5},
                     applied=2)
    assert out.opset_import[0].version == 21


def test_fuse_groupnorm_chain_at_opset13_mixed_forms_are_all_fused(rng):
    # Reshape-13 shape inference loses shapes after Reshape(t, Shape(x)); the first norm needs no
    # upgrade (G == C) and the second does: both must still be fused.
    net = Net(rng, 13)
    h = group_norm(net, "X", 4, 4, [5])
    h = net.op("Conv", h, net.const(rng.standard_normal((8, 4, 3)) * 0.3), pads=[1, 1])
    h = group_norm(net, h, 8, 2, [5])
    model = net.model(h, [BATCH, 4, 5], [BATCH, 8, 5])
    out, result, _ = fuse(model, {IN: 1, GN: 1, "Conv": 1, "Constant": 1, "Identity": 1}, applied=2)
    assert [(u.from_version, u.to_version) for u in result.upgrades] == [(13, 21)]


def test_fuse_groupnorm_opset_upgrade_disabled_is_skipped_with_reason(rng):
    model = gn_model(rng, opset=17)
    out, result = run_pipeline(model, [PASS], allow_opset_upgrade=False)
    assert op_counts(out) == op_counts(model) and not result.upgrades
    assert any("needs opset 21 (model has 17); opset upgrade disabled" in s.reason for s in result.skipped)


@pytest.mark.parametrize("opset", [18, 21])
def test_fuse_groupnorm_opset18_model_gets_opset21_form(opset, rng):
    # GroupNormalization-18 (per-group scale) is deprecated: onnx's checker rejects it at opsets
    # 18-20, so even a per-group-constant gamma is emitted in the opset-21 form.
    model = gn_model(rng, opset=opset, affine="identity")
    out, result, _ = fuse(model, FUSED)
    assert out.opset_import[0].version == 21 and len(result.upgrades) == (opset < 21)
    onnx.checker.check_model(out, full_check=True)


def test_fuse_groupnorm_inside_if_branch_is_fused(rng, tmp_path):
    body = Net(rng, 17)
    y = group_norm(body, "X", 8, 2, [4, 4])
    body.nodes.append(helper.make_node("Identity", [y], ["then_out"]))
    then = helper.make_graph(body.nodes, "then", [], [helper.make_tensor_value_info("then_out", F32, None)])
    other = helper.make_graph([helper.make_node("Identity", ["X"], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", F32, None)])
    node = helper.make_node("If", ["cond"], ["Y"], then_branch=then, else_branch=other)
    model = make_model([node], [("X", F32, [BATCH, 8, 4, 4]), ("cond", TensorProto.BOOL, [])],
                       [("Y", F32, [BATCH, 8, 4, 4])], opset=17)
    out, result = run_pipeline(model, [PASS])
    assert op_counts(out) == {"If": 1, GN: 1, "Identity": 2}
    assert len(result.applied) == 1 and result.applied[0].graph.endswith("then_branch")
    for cond in (True, False):
        path = tmp_path / f"cond_{cond}.npz"
        np.savez(path, cond=np.array(cond), X=rng.standard_normal((BATCH, 8, 4, 4)).astype(np.float32))
        assert_equivalent(model, out, inputs_file=str(path))


def test_fuse_groupnorm_precision_loss_at_an_offset_is_rolled_back(rng):
    """The offset input set (mean 1000, spread 1) shows what N(0, 1) inputs hide: the fused op
    loses precision there, so fold takes the rewrite back and names the input set."""
    model = gn_model(rng)
    result = optimize(model, FoldOptions(passes=[PASS], provider="cpu"))
    assert result.verified and op_counts(result.model) == op_counts(model)
    assert len(result.rollbacks) == 1 and "on offset inputs (seed 0)" in result.rollbacks[0].reason
    assert result.verification.input_sets == [NORMAL, OFFSET, DEGENERATE]


def test_fuse_groupnorm_runs_before_instancenorm_and_layernorm():
    # Their decomposed forms contain a LayerNorm-shaped core over the grouped tensor.
    names = list(registry.available())
    assert names.index(PASS) < names.index("fuse-instancenorm") < names.index("fuse-layernorm")


def test_fuse_groupnorm_layernorm_of_flattened_rows_is_not_a_candidate(rng):
    # Reshape [N, C, T] -> [N*C, T], normalize rows, reshape back: a LayerNorm, fuse-layernorm's.
    net = Net(rng, 17)
    rows = net.op("Reshape", "X", net.const([-1, 6], "int"))
    model = net.model(net.op("Reshape", normalize(net, rows, [1]), net.op("Shape", "X")), [BATCH, 4, 6])
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied and not rec.skipped


@pytest.mark.parametrize("kwargs", [
    dict(in_scale=[2.0, -0.5]), dict(in_bias=[0.5, -1.0]), dict(in_scale=[1.5, 0.25], in_bias=[-0.3, 2.0]),
    dict(in_scale=[0.5, 2.0, -1.0], in_bias=[1.0, 0.0, -2.0], c=12, g=3, affine="none"),
    dict(in_scale=[3.0, 0.5], in_bias=[1.0, -1.0], affine="scale"),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_fuse_groupnorm_instancenorm_scale_bias_are_folded_per_group_channel(kwargs, rng):
    """InstanceNormalization's per-group s[g], b[g] before the per-channel gamma, beta:
    gamma[c] * (s[g] * n + b[g]) + beta[c], with channel c in group c // (C / G)."""
    model = gn_model(rng, **kwargs)
    out, result, _ = fuse(model, FUSED)
    assert "per-group scale/bias" in result.applied[0].info["variant"]
    c, g = kwargs.get("c", 8), kwargs.get("g", 2)
    scale = np.repeat(np.full(g, kwargs.get("in_scale", 1.0)), c // g)
    fused = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    node = next(n for n in out.graph.node if n.op_type == GN)
    gamma = fused[node.input[1]]
    if kwargs.get("affine") == "none":
        np.testing.assert_allclose(gamma, scale, rtol=1e-6)
    else:
        assert not np.allclose(gamma, scale)


@pytest.mark.parametrize("affine, expected", [
    ("scale_spatial", {GN: 1, "Mul": 1, "Add": 1, "Constant": 2, "Identity": 1}),
    ("bias_spatial", {GN: 1, "Add": 1, "Constant": 1, "Identity": 1}),
])
def test_fuse_groupnorm_tail_not_per_channel_stays_outside(affine, expected, rng):
    """A Mul / Add by a tensor that varies over spatial axes is not a GroupNorm affine: the
    fused op takes what is per channel, and the rest stays after it."""
    model = gn_model(rng, affine=affine)
    out, result, _ = fuse(model, expected)
    assert "kept outside" in result.applied[0].info["kept"]


# ----------------------------------------------------------------------------- near misses

def escaping_instancenorm(rng):
    model = gn_model(rng)
    inorm = next(n for n in model.graph.node if n.op_type == IN)
    model.graph.output.append(helper.make_tensor_value_info(inorm.output[0], F32, [BATCH, 2, 16]))
    return model


def int_cast_gn(rng, where):
    """InstanceNormalization -> Cast(int32) -> Reshape -> Cast(float): the Cast rounds the
    normalized values to integers (or the grouped input, before the statistics)."""
    net = Net(rng, 17)
    t = net.op("Reshape", "X", net.const([0, 2, -1], "int"))
    if where == "in":
        t = net.op("Cast", net.op("Cast", t, to=TensorProto.INT32), to=F32)
    t = net.op("InstanceNormalization", t, net.const(np.ones(2)), net.const(np.zeros(2)))
    if where == "out":
        t = net.op("Cast", t, to=TensorProto.INT32)
    t = net.op("Reshape", t, net.op("Shape", "X"))
    if where == "out":
        t = net.op("Cast", t, to=F32)
    t = net.op("Add", net.op("Mul", t, net.const(rng.standard_normal((8, 1, 1)))), net.const(rng.standard_normal((8, 1, 1))))
    return net.model(t, [BATCH, 8, 4, 4])


def in_scale_input(rng):
    net = Net(rng, 17)
    t = net.op("Reshape", "X", net.const([0, 2, -1], "int"))
    t = net.op("InstanceNormalization", t, "s", net.const(np.zeros(2)))
    t = net.op("Reshape", t, net.op("Shape", "X"))
    return net.model(t, [BATCH, 8, 4, 4], extra_inputs=[("s", F32, [2])])


def channels_unknown(rng):
    model = gn_model(rng)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
    return model


def eps_as_input(rng):
    net = Net(rng, 17)
    y = group_norm(net, "X", 8, 2, [4, 4], core="decomposed", eps_input="eps")
    return net.model(y, [BATCH, 8, 4, 4], extra_inputs=[("eps", F32, [])])


@pytest.mark.parametrize("build, reason", [
    (lambda rng: gn_model(rng, split="wrong_axis"), "does not split the channels"),
    (lambda rng: gn_model(rng, c=6, g=4, spatial=(2, 2)), "4 groups do not divide 6 channels"),
    (lambda rng: int_cast_gn(rng, "out"), "Cast Cast9 to int32 inside the group normalization is not a float cast"),
    (lambda rng: int_cast_gn(rng, "in"), "Cast Cast5 to int32 inside the group normalization"),
    (in_scale_input, "InstanceNormalization scale 's' is not a constant"),
    (escaping_instancenorm, "is also used by graph output"),
    (eps_as_input, "epsilon 'eps' is not a constant"),
    (channels_unknown, "channel count of 'X' is unknown"),
    (lambda rng: gn_model(rng, core="decomposed", split="subgroups", axes=[3]), "not over each whole group"),
    (lambda rng: gn_model(rng, back="flat"), "does not restore the shape"),
    (lambda rng: gn_model(rng, back="swapped", spatial=(3, 5)), "does not restore the shape"),
    (lambda rng: gn_model(rng, core="decomposed", spatial=(2, 2), back="const", split="static", c=4, g=2,
                          dtype=F32, compute=F16), "narrower than the output's float32"),
    (lambda rng: mixed_gn(rng, F32, cast_out=F16, tail_cast=F32), "is computed in float16, narrower than the output's"),
    (lambda rng: mixed_gn(rng, F16, cast_out=F32, out=F32), "is computed in float16, narrower than the output's"),
], ids=["wrong_axis", "g_not_dividing_c", "int_cast_after_norm", "int_cast_before_norm", "in_scale_input",
        "intermediate_output", "eps_input", "channels_unknown", "partial_group_axes", "not_restored_rank",
        "not_restored_dims", "fp16_statistics", "fp16_rounding_before_affine", "fp16_statistics_fp32_output"])
def test_fuse_groupnorm_near_miss_is_left_unchanged(build, reason, rng):
    model = build(rng)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model)
    assert not rec.applied and any(reason in s.reason for s in rec.skipped), [s.reason for s in rec.skipped]


def test_fuse_groupnorm_declared_shape_contradicting_inference_is_skipped(rng):
    """x = Reshape(X, Shape(S)) is [N, C, H, W] at run time but declared [N, C, H*W]: the
    declaration is not trusted to place the channel and spatial axes."""
    net = Net(rng, 17)
    x = net.op("Reshape", "X", net.op("Shape", "S"))
    y = group_norm(net, x, 8, 2, [4, 4])
    model = net.model(y, [BATCH, 8, 16], [BATCH, 8, 4, 4], extra_inputs=[("S", F32, [BATCH, 8, 4, 4])])
    model.graph.value_info.append(helper.make_tensor_value_info(x, F32, [BATCH, 8, 16]))
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert [s.reason for s in rec.skipped] == [
        f"declared shape [2, 8, 16] of '{x}' contradicts the inferred [2, 8, 4, 4]"]
    assert_equivalent(model, out)


def unwrapped_gn(rng, c=8, spatial=(19,), target=None, in_scale=1.0, affine=True, opset=18):
    """dynamo (opset 18, default optimizer) export of wav2vec2's GroupNorm(C, C) on [N, C, T]:
    the reshape back is gone (the reshape to [0, C, -1] left x as it was)."""
    net = Net(rng, opset, constants="init")
    t = net.op("Reshape", "X", net.const(target or [0, c, -1], "int"))
    t = net.op("InstanceNormalization", t, net.const(np.full(c, in_scale)), net.const(np.zeros(c)), epsilon=1e-5)
    if affine:
        t = net.op("Add", net.op("Mul", t, net.const(rng.uniform(0.5, 1.5, (c, 1)))), net.const(rng.standard_normal((c, 1))))
    shape = [BATCH, c, *spatial]
    out = [BATCH, c, int(np.prod(spatial))] if target is None and len(spatial) > 1 else shape
    return net.model(t, shape, out)


@pytest.mark.parametrize("kwargs", [dict(), dict(affine=False), dict(in_scale=2.0), dict(opset=17)],
                         ids=["affine", "no_affine", "in_scale", "opset17"])
def test_fuse_groupnorm_dynamo_groups_equal_channels_without_reshape_back_is_fused(kwargs, rng):
    model = unwrapped_gn(rng, **kwargs)
    out, result, _ = fuse(model, {IN: 1, "Identity": 1})
    assert result.applied[0].info["op"] == IN and not result.upgrades


def test_fuse_groupnorm_flattening_reshape_before_instancenorm_is_not_a_candidate(rng):
    """[N, C, H, W] -> [N, C, H*W] -> InstanceNormalization, no reshape back: the output keeps
    the flattened shape, so it is no normalization of x's shape."""
    model = unwrapped_gn(rng, spatial=(4, 5))
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied and not rec.skipped


def keras_gn(rng, c=8, g=2, spatial=(4, 4), keras3=False, axes=None, gamma_shape=None, opset=17, scale=True,
             center=True, stack=False, channels_first=False, nchw=None, shape_cast=TensorProto.INT32, back_dims=None,
             x_view=None):
    """Keras GroupNormalization (axis=-1) as tf2onnx writes it: x [N, ..., C] reshaped to
    [-1, ..., G, C/G], tf.nn.moments (SquaredDifference as Sub, Mul) or Keras 3's
    E[x^2] - E[x]^2, then tf.nn.batch_normalization's x*s + (beta - mean*s) (Keras 3:
    x*s + ((-mean)*s + beta)) with gamma, beta [1, ..., G, C/G], reshaped back to Shape(x).

    ``nchw``: the input X is channels first and x = Transpose(X, nchw) (tf2onnx's NCHW Conv
    output moved back to NHWC); the shape back is then tf2onnx's
    Cast(Concat(Slice(Cast(Gather(Shape(X), perm), int32)), spatial..., C), int64) (``back_dims``
    in place of spatial..., C: a near miss).

    ``x_view``: the grouped x is scaled as Transpose(xg, x_view), not as xg (a near miss)."""
    net = Net(rng, opset, constants="init")
    rank = 2 + len(spatial)
    x = "X"
    if nchw is not None:
        x = net.op("Transpose", "X", perm=list(nchw))
    if nchw is not None and not stack and not channels_first:
        dims = net.op("Cast", net.op("Gather", net.op("Shape", "X"), net.const(list(nchw), "int"), axis=0),
                      to=shape_cast)
        first = net.op("Slice", dims, net.const([0], "int"), net.const([1], "int"), net.const([0], "int"))
        rest = [net.const(np.asarray([d], helpers.NP_TYPES[shape_cast]), "raw") for d in back_dims or (*spatial, c)]
        back = net.op("Cast", net.op("Concat", first, *rest, axis=0), to=TensorProto.INT64)
    else:
        back = None
    if stack:  # tf.keras: tf.stack([shape[0], ..., shape[-1] // G]) with G inserted, from tf.shape(x)
        shape = net.op("Shape", "X")
        dims = [net.op("Gather", shape, net.const(i, "int"), axis=0) for i in range(rank)]
        dims[-1] = net.op("Div", dims[-1], net.const(g, "int"))
        pieces = [net.op("Unsqueeze", d, net.const([0], "int")) for d in dims]
        pieces.insert(rank - 1, net.const([g], "int"))
        target = net.op("Concat", *pieces, axis=0)
    elif channels_first:  # GroupNormalization(axis=1): groups inserted before the channels
        target = net.const([-1, g, c // g, *spatial], "int")
    else:
        target = net.const([-1, *spatial, g, c // g], "int")
    xg = net.op("Reshape", x, target)
    axes = axes or ([*range(2, rank + 1)] if channels_first else [*range(1, rank - 1), rank])
    mean = net.mean(xg, axes)
    if keras3:
        var = net.op("Sub", net.mean(net.op("Mul", xg, xg), axes), net.op("Mul", mean, mean))
    else:
        d = net.op("Sub", xg, mean)
        var = net.mean(net.op("Mul", d, d), axes)
    inv = net.op("Reciprocal", net.op("Sqrt", net.op("Add", var, net.const(1e-3))))
    bshape = [1, g, c // g] + [1] * (rank - 2) if channels_first else [1] * (rank - 1) + [g, c // g]
    pshape = gamma_shape or bshape
    s = net.op("Mul", inv, net.const(rng.uniform(0.5, 1.5, pshape))) if scale else inv
    beta = net.const(rng.standard_normal(bshape))
    xs = xg if x_view is None else net.op("Transpose", xg, perm=list(x_view))
    if not center:  # tf.nn.batch_normalization without offset: x*s + (-mean*s)
        y = net.op("Sub", net.op("Mul", xs, s), net.op("Mul", mean, s))
    else:
        if keras3:
            shift = net.op("Add", net.op("Mul", net.op("Neg", mean), s), beta)
        else:
            shift = net.op("Sub", beta, net.op("Mul", mean, s))
        y = net.op("Add", net.op("Mul", xs, s), shift)
    y = net.op("Reshape", y, back or net.op("Shape", x))
    if nchw is not None:
        shape = [BATCH, *spatial, c]
        return net.model(y, [shape[i] for i in np.argsort(nchw)], shape)
    return net.model(y, [BATCH, c, *spatial] if channels_first else [BATCH, *spatial, c])


@pytest.mark.parametrize("kwargs", [dict(), dict(keras3=True), dict(spatial=(6,)), dict(scale=False)],
                         ids=["tf_nn_moments", "keras3", "rank3", "no_gamma"])
def test_fuse_groupnorm_keras_channels_first_is_fused(kwargs, rng):
    model = keras_gn(rng, channels_first=True, **kwargs)
    out, result, _ = fuse(model, FUSED)
    assert "TF/Keras" in result.applied[0].info["variant"] and "layout" not in result.applied[0].info


@pytest.mark.parametrize("keras3", [False, True], ids=["tf_nn_moments", "keras3"])
def test_fuse_groupnorm_keras_form_scaling_a_transpose_of_x_is_no_candidate(keras3, rng):
    """fuse-layernorm's tf2onnx views (x scaled as Transpose(x)) are no group-norm form: with H
    and W swapped the grouped statistics still fit, but the result is transposed."""
    model = keras_gn(rng, keras3=keras3, x_view=[0, 2, 1, 3, 4])
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied


def test_fuse_groupnorm_keras_channels_first_gamma_over_spatial_is_left_unchanged(rng):
    model = keras_gn(rng, channels_first=True, gamma_shape=[1, 2, 4, 4, 1])
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert any("of shape [1, 2, 4, 4, 1] does not broadcast to the normalized shape [2, 4, 1, 1]" in s.reason
               for s in rec.skipped), [s.reason for s in rec.skipped]
    assert_equivalent(model, out)


@pytest.mark.parametrize("kwargs, op", [
    (dict(), GN), (dict(keras3=True), GN), (dict(spatial=(6,)), GN), (dict(c=12, g=3, spatial=(2, 3, 2)), GN),
    (dict(c=4, g=4), IN), (dict(opset=18), GN), (dict(scale=False), GN), (dict(scale=False, center=False), GN),
    (dict(stack=True), GN),
], ids=["tf_nn_moments", "keras3", "rank3", "rank5", "groups_equal_channels", "opset18", "no_gamma", "no_affine",
        "shape_stack"])
def test_fuse_groupnorm_keras_channels_last_is_fused_between_transposes(kwargs, op, rng):
    model = keras_gn(rng, **kwargs)
    out, result, _ = fuse(model, {op: 1, "Transpose": 2, "Identity": 1})
    info = result.applied[0].info
    assert info["layout"] == "channels last" and "TF/Keras" in info["variant"]


@pytest.mark.parametrize("kwargs, reason", [
    (dict(axes=[1, 2, 3, 4]), "not over each whole group [1, 2, 4]"),
    (dict(axes=[1, 2]), "not over each whole group [1, 2, 4]"),
    (dict(gamma_shape=[1, 4, 1, 2, 4]), "gamma 'c"),
], ids=["over_groups_too", "spatial_only", "gamma_spatial"])
def test_fuse_groupnorm_keras_channels_last_near_miss_is_left_unchanged(kwargs, reason, rng):
    model = keras_gn(rng, **kwargs)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert any(reason in s.reason for s in rec.skipped), [s.reason for s in rec.skipped]
    assert_equivalent(model, out)


@pytest.mark.parametrize("kwargs, op", [
    (dict(), GN), (dict(spatial=(6,)), GN), (dict(c=4, g=4), IN), (dict(shape_cast=TensorProto.INT64), GN),
    (dict(opset=18, keras3=True), GN),
], ids=["nhwc", "rank3", "groups_equal_channels", "int64_shape", "keras3_opset18"])
def test_fuse_groupnorm_keras_tf2onnx_nhwc_reads_the_channels_first_tensor(kwargs, op, rng):
    """tf2onnx's real export: the Conv's NCHW output X transposed to NHWC, grouped, normalized,
    reshaped back by a shape computed in int32 from Shape(X). The fused op reads X itself (its
    Transpose and the one to channels first cancel): one Transpose is left, back to NHWC."""
    rank = 2 + len(kwargs.get("spatial", (4, 4)))
    model = keras_gn(rng, nchw=[0, *range(2, rank), 1], **kwargs)
    out, result, _ = fuse(model, {op: 1, "Transpose": 1, "Identity": 1})
    assert result.applied[0].info["layout"] == "channels last"
    node = next(n for n in out.graph.node if n.op_type == op)
    assert node.input[0] == "X"


def test_fuse_groupnorm_keras_transpose_that_does_not_cancel_is_kept(rng):
    """x = Transpose(X) with another perm than channels first -> last: the fused op gets its own
    Transpose to channels first."""
    model = keras_gn(rng, nchw=[0, 2, 1, 3])
    fuse(model, {GN: 1, "Transpose": 3, "Identity": 1})


def test_fuse_groupnorm_keras_tf2onnx_reshape_back_to_other_dims_is_left_unchanged(rng):
    model = keras_gn(rng, spatial=(4, 6), nchw=[0, 2, 3, 1], back_dims=(6, 4, 8))
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert any("does not restore the shape of 'transpose" in s.reason for s in rec.skipped), \
        [s.reason for s in rec.skipped]


def test_fuse_groupnorm_layernorm_after_a_tensordot_reshape_is_not_a_candidate(rng):
    """tf2onnx's Dense on rank 3: MatMul on [rows, F], Reshape to [N, L, F], then a Keras
    LayerNorm over F. The Reshape groups nothing: no record here (fuse-layernorm fuses it)."""
    net = Net(rng, constants="init")
    x = net.op("Reshape", "X", net.const([BATCH, 3, 8], "int"))
    mean = net.mean(x, [2])
    d = net.op("Sub", x, mean)
    inv = net.op("Reciprocal", net.op("Sqrt", net.op("Add", net.mean(net.op("Mul", d, d), [2]), net.const(1e-3))))
    s = net.op("Mul", inv, net.const(rng.uniform(0.5, 1.5, [8])))
    y = net.op("Add", net.op("Mul", x, s), net.op("Add", net.op("Mul", net.op("Neg", mean), s),
                                                  net.const(rng.standard_normal([8]))))
    model = net.model(net.op("Reshape", y, net.const([BATCH * 3, 8], "int")), [BATCH * 3, 8])
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied and not rec.skipped
    out, result = run_pipeline(model, ["fuse-groupnorm", "fuse-layernorm"])
    assert op_counts(out)["LayerNormalization"] == 1 and not [s for r in result.passes for s in r.skipped]


def test_fuse_groupnorm_epsilon_float32_cannot_hold_is_left_unchanged(rng):
    """A float64 group norm with epsilon 1e-50: the op's float32 attribute would hold 0, and a
    constant group would become NaN where the original gives 0."""
    model = gn_model(rng, core="decomposed", dtype=TensorProto.DOUBLE, eps=1e-50)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert [s.reason for s in rec.skipped] == [
        "epsilon 1e-50 is not representable as the op's float32 attribute (it would be 0)"]
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- ONNX's GroupNormalization-21 body

def gn21_body(rng, dtype=F32, shape=(BATCH, 8, 3, 5), groups=2, eps=1e-5):
    """A GroupNormalization-21 node on x expanded by onnx's inliner into the op's own function
    body: Cast(x) -> Reshape [N, G, C/G, D...] -> Reshape [0, 0, -1] -> E[x^2] - E[x]^2
    statistics -> Reshape(Shape(Cast(x))) -> Reshape [0, 0, -1] -> Cast back -> Mul / Add by
    scale / bias reshaped to [1, C, 1] -> Reshape(Shape(Cast(x)))."""
    c = shape[1]
    inits = {"S": rng.uniform(0.5, 1.5, c).astype(NP[dtype]), "B": rng.standard_normal(c).astype(NP[dtype])}
    node = helper.make_node(GN, ["x", "S", "B"], ["y"], num_groups=groups, epsilon=eps)
    model = make_model([node], [("x", dtype, list(shape))], [("y", dtype, list(shape))], inits, opset=21)
    model.graph.value_info.extend(helper.make_tensor_value_info(k, dtype, v.shape) for k, v in inits.items())
    model = onnx.inliner.inline_selected_functions(model, [("", GN)], inline_schema_functions=True)
    assert GN not in op_counts(model) and op_counts(model)["Reshape"] == 7
    return model


def body_node(model, output_prefix):
    return next(n for n in model.graph.node if n.output and n.output[0].startswith(output_prefix))


@pytest.mark.parametrize("dtype", [F32, F16], ids=["float32", "float16_stash_float32"])
@pytest.mark.parametrize("shape, groups", [((BATCH, 6, 7), 3), ((BATCH, 8, 3, 5), 2), (("N", 8, 3, 5), 4),
                                           (("N", 4, 9), 2)],
                         ids=["rank3", "rank4", "rank4_symbolic_batch", "rank3_symbolic_batch"])
def test_fuse_groupnorm_onnx_groupnorm21_function_body_is_fused(dtype, shape, groups, rng):
    model = gn21_body(rng, dtype, shape, groups)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == {GN: 1} and len(rec.applied) == 1 and not rec.skipped, [s.reason for s in rec.skipped]
    node = out.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (list(node.input[:1]), list(node.output)) == (["x"], ["y"])
    assert attrs["num_groups"] == groups and attrs["stash_type"] == TensorProto.FLOAT
    assert attrs["epsilon"] == pytest.approx(1e-5, rel=1e-6)
    values = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in out.graph.node if n.op_type == "Constant"})
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert values[node.input[1]].dtype == NP[dtype]
    np.testing.assert_array_equal(values[node.input[1]], original["S"])
    np.testing.assert_array_equal(values[node.input[2]], original["B"])
    onnx.checker.check_model(out, full_check=True)
    assert_equivalent(model, out)


def test_fuse_groupnorm_onnx_groupnorm21_body_groups_equal_channels_is_instancenorm(rng):
    model = gn21_body(rng, F32, (BATCH, 4, 3, 5), groups=4)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == {IN: 1} and not rec.skipped
    assert_equivalent(model, out)


def body_axes(model, axes):
    """The body's statistics over other axes of [N, G, -1]."""
    node = body_node(model, "Axes2")
    node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(axes, np.int64)))
    return model


def body_output(model, prefix, rank=3):
    """One of the body's intermediates also a graph output."""
    name = body_node(model, prefix).output[0]
    model.graph.output.append(helper.make_tensor_value_info(name, F32, [None] * rank))
    return model


@pytest.mark.parametrize("build, reason", [
    (lambda rng: body_axes(gn21_body(rng), [1]), "not over each whole group"),
    (lambda rng: body_output(gn21_body(rng), "Mean__"), "is also used by graph output"),
    (lambda rng: body_output(gn21_body(rng), "StdDev__"), "is also used by graph output"),
], ids=["axes", "mean_output", "std_output"])
def test_fuse_groupnorm_onnx_groupnorm21_body_near_miss_is_left_unchanged(build, reason, rng):
    model = build(rng)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model)
    assert not rec.applied and any(reason in s.reason for s in rec.skipped), [s.reason for s in rec.skipped]


def body_scale_per_position(rng):
    """The body's scale and bias reshaped to [1, 1, -1]: a value per position of a channel's row."""
    model = gn21_body(rng, shape=(BATCH, 8, 3, 5))
    body_node(model, "ScaleShape").attribute[0].ints[:] = [1, 1, -1]
    for name in ("S", "B"):
        param = next(i for i in model.graph.initializer if i.name == name)
        param.CopyFrom(numpy_helper.from_array(rng.uniform(0.5, 1.5, 15).astype(np.float32), name))
        next(v for v in model.graph.value_info if v.name == name).type.tensor_type.shape.dim[0].dim_value = 15
    return model


def body_reshaped_to_rows(rng):
    """The body's result left as [N, C, H*W] rows: no reshape back to x's shape."""
    model = gn21_body(rng, shape=(BATCH, 8, 3, 5))
    final = next(n for n in model.graph.node if n.output[0] == "y")
    final.input[1] = body_node(model, "Shape3D").output[0]
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", F32, [BATCH, 8, 15]))
    return model


# What stays: Cast(x), the rows Reshape, the Cast after it, Cast / Reshape of scale and bias,
# Mul, Add and the last Reshape (by Shape(Cast(x)) when that is the shape).
KEPT = {"Cast": 4, "Constant": 2, GN: 1, "Reshape": 4, "Mul": 1, "Add": 1}


@pytest.mark.parametrize("build, kept, counts", [
    (body_scale_per_position, "kept outside: 'ScaleReshaped", {**KEPT, "Shape": 1}),
    (body_reshaped_to_rows, "not a reshape back to the shape of 'x'", KEPT),
], ids=["scale_per_position", "no_reshape_back"])
def test_fuse_groupnorm_onnx_groupnorm21_body_affine_not_per_channel_stays_after_the_op(build, kept, counts, rng):
    """A body whose affine is not per channel, or which is not reshaped back to x's shape: the
    normalization (up to its reshape back to x's shape) fuses, on the float32 Cast of x; the rows
    reshape and what follows stay as they were, with the reason."""
    model = build(rng)
    out, rec = run_pass(PASS, model)
    assert not rec.skipped and len(rec.applied) == 1 and kept in rec.applied[0].info["kept"], rec.applied
    assert op_counts(out) == counts
    assert next(n for n in out.graph.node if n.op_type == GN).input[0] == body_node(model, "XU__").output[0]
    assert_equivalent(model, out)


def rows_gn(rng, c=8, g=2, spatial=(3, 5), axes=(2,), scale_shape=None, back=None, rows_output=False):
    """Hand-written: x -> Reshape [0, G, -1] -> normalized -> Reshape [0, C, -1] -> Mul scale [C, 1]
    -> Add bias [C, 1] -> Reshape(Shape(x))."""
    net = Net(rng, 18, F32, "initializer")
    normed = normalize(net, net.op("Reshape", "X", net.const([0, g, -1], "int")), list(axes))
    rows = net.op("Reshape", normed, net.const([0, c, -1], "int"))
    y = net.op("Mul", rows, net.const(rng.uniform(0.5, 1.5, scale_shape or [c, 1])))
    y = net.op("Add", y, net.const(rng.standard_normal([c, 1])))
    y = net.op("Reshape", y, net.const(back, "int") if back else net.op("Shape", "X"))
    shape = [BATCH, c, *spatial]
    model = net.model(y, shape, [BATCH, c, *(back[2:] if back else spatial)])
    if rows_output:
        model.graph.output.append(helper.make_tensor_value_info(rows, F32, [BATCH, c, int(np.prod(spatial))]))
    return model


def test_fuse_groupnorm_affine_on_per_channel_rows_is_fused(rng):
    model = rows_gn(rng)
    out, _, _ = fuse(model, FUSED)
    assert op_counts(out) == FUSED


@pytest.mark.parametrize("kwargs, reason", [
    (dict(scale_shape=[1, 15]), "does not restore the shape of 'X' (to [N, C, -1]: Mul"),
    (dict(back=[0, 8, 5, 3]), "does not restore the shape of 'X' (to [N, C, -1]: Reshape"),
    (dict(axes=(1,)), "not over each whole group"),
    (dict(rows_output=True), "does not restore the shape of 'X' (to [N, C, -1]: no reshape back"),
], ids=["scale_per_position", "back_to_other_dims", "axes", "rows_output"])
def test_fuse_groupnorm_affine_on_per_channel_rows_near_miss_is_left_unchanged(kwargs, reason, rng):
    model = rows_gn(rng, **kwargs)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model)
    assert not rec.applied and any(reason in s.reason for s in rec.skipped), [s.reason for s in rec.skipped]


def test_fuse_groupnorm_float32_affine_on_rows_of_a_float16_model_runs_the_op_in_float32(rng):
    """float16 x, statistics and affine in float32, cast back to float16 before the reshape back:
    a float16 op would round the affine's float32 scale and bias, so the op runs in float32
    between Casts."""
    net = Net(rng, 18, F16, "initializer")
    grouped = net.op("Cast", net.op("Reshape", "X", net.const([0, 2, -1], "int")), to=F32)
    net.dtype = F32   # the statistics' constants
    rows = net.op("Reshape", normalize(net, grouped, [2]), net.const([0, 8, -1], "int"))
    net.dtype = F16
    y = net.op("Add", net.op("Mul", rows, net.const(rng.uniform(0.5, 1.5, [8, 1]), F32)),
               net.const(rng.standard_normal([8, 1]), F32))
    y = net.op("Reshape", net.op("Cast", y, to=F16), net.op("Shape", "X"))
    model = net.model(y, [BATCH, 8, 3, 5])
    out, result, _ = fuse(model, {"Cast": 2, GN: 1, "Identity": 1})
    assert result.passes[0].applied[0].info["dtype"] == "float32"

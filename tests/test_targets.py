"""--target: onnxruntime keeps the forms it runs best, portable fuses every site."""
import numpy as np
import onnx
from click.testing import CliRunner
from onnx import helper

from helpers import FLOAT, assert_equivalent, make_model, op_counts
from normopt.cli import cli
from normopt.fold import FoldOptions, optimize
from normopt.inputs import DEGENERATE, NORMAL
from normopt.pattern import Match
from normopt.pipeline import model_opset
from normopt.targets import GROUP_NORM_REASON, veto_for


def torchscript_groupnorm(rng, c=8, g=2, opset=17):
    """nn.GroupNorm as TorchScript exports it: Reshape [0, G, -1], InstanceNormalization(ones, zeros),
    Reshape(Shape(x)), Mul gamma, Add beta."""
    inits = {"split": np.array([0, g, -1], np.int64), "ones": np.ones(g, np.float32),
             "zeros": np.zeros(g, np.float32), "gamma": rng.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32),
             "beta": rng.standard_normal((c, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Reshape", ["x", "split"], ["grouped"], name="split"),
             helper.make_node("InstanceNormalization", ["grouped", "ones", "zeros"], ["normed"], name="inorm"),
             helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Reshape", ["normed", "shape"], ["back"], name="back"),
             helper.make_node("Mul", ["back", "gamma"], ["scaled"], name="gamma_mul"),
             helper.make_node("Add", ["scaled", "beta"], ["y"], name="beta_add")]
    return make_model(nodes, [("x", FLOAT, [2, c, 4, 4])], [("y", FLOAT, [2, c, 4, 4])], inits, opset=opset)


def test_target_onnxruntime_keeps_the_instancenorm_form_of_groupnorm(rng):
    model = torchscript_groupnorm(rng)
    result = optimize(model, FoldOptions(provider="cpu", target="onnxruntime"))
    assert op_counts(result.model) == op_counts(model) and model_opset(result.model) == 17
    (skip,) = result.pipeline.skipped
    assert skip.pass_name == "fuse-groupnorm" and skip.reason == GROUP_NORM_REASON and result.verified
    # Inputs in a range the user vouches for: on the default offset set (mean 1000) onnxruntime's
    # function body of GroupNormalization loses precision and verification rolls the fusion back
    # (test_fuse_groupnorm_precision_loss_at_an_offset_is_rolled_back).
    portable = optimize(model, FoldOptions(provider="cpu", input_ranges={"x": (-3.0, 3.0)}))
    assert op_counts(portable.model) == {"GroupNormalization": 1} and model_opset(portable.model) == 21
    assert_equivalent(model, portable.model, input_sets=(NORMAL, DEGENERATE))


def test_target_onnxruntime_still_emits_instancenormalization_when_groups_equal_channels(rng):
    model = torchscript_groupnorm(rng, c=4, g=4)
    result = optimize(model, FoldOptions(provider="cpu", target="onnxruntime"))
    assert op_counts(result.model) == {"InstanceNormalization": 1} and result.verified


def test_target_onnxruntime_vetoes_only_what_it_runs_worse():
    veto = veto_for("onnxruntime")
    m = Match(output=None)
    m.info.update(op="GroupNormalization")
    assert veto("fuse-groupnorm", m) == GROUP_NORM_REASON
    for pass_name in ("fuse-layernorm", "fuse-rmsnorm"):
        for dtype, vetoed in (("bfloat16", True), ("float16", False), ("float32", False)):
            m = Match(output=None)
            m.info.update(dtype=dtype)
            assert bool(veto(pass_name, m)) == vetoed, (pass_name, dtype)
    m = Match(output=None)
    m.info.update(op="InstanceNormalization")
    assert veto("fuse-groupnorm", m) is None and veto("fold-batchnorm", Match(output=None)) is None
    assert veto_for("portable") is None


def test_cli_fold_target_onnxruntime(rng, tmp_path):
    path = tmp_path / "gn.onnx"
    onnx.save(torchscript_groupnorm(rng), path)
    res = CliRunner().invoke(cli, ["fold", str(path), "--target", "onnxruntime", "-v", "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 0, res.output
    assert "--target onnxruntime: onnxruntime has no GroupNormalization kernel" in res.output
    assert op_counts(onnx.load(tmp_path / "o.onnx"))["InstanceNormalization"] == 1
    res = CliRunner().invoke(cli, ["fold", str(path), "--target", "tensorrt"])
    assert res.exit_code == 2 and "Invalid value for '--target'" in res.output

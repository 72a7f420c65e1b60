"""normopt inspect / normopt.inspect: every normalization site, what fold does with it, and why not."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from helpers import FLOAT, GraphBuilder, make_model, op_counts
from normopt.cli import cli
from normopt.sites import inspect_model

OPSET = 17


def _layernorm(net, x, axes):
    mean = net.mean(x, axes)
    d = net.op("Sub", x, mean)
    var = net.mean(net.op("Pow", d, net.const(2.0)), axes)
    return net.op("Div", d, net.op("Sqrt", net.op("Add", var, net.const(1e-5))))


def zoo(rng):
    """One of each: a foldable BatchNormalization, one with nothing to fold into, a decomposed
    LayerNorm, a channels-first one (not fusable), a native LayerNormalization, weight norm."""
    net = GraphBuilder(OPSET)
    w = net.const(rng.standard_normal((4, 4, 3, 3)) * 0.3)
    bn_params = [net.const(rng.uniform(0.5, 1.5, 4)), net.const(rng.standard_normal(4)),
                 net.const(rng.standard_normal(4)), net.const(rng.uniform(0.5, 2, 4))]
    conv = net.op("Conv", "x", w, pads=[1, 1, 1, 1])
    net.nodes.append(helper.make_node("BatchNormalization", [conv, *bn_params], ["bn_out"], name="bn_foldable"))
    net.nodes.append(helper.make_node("BatchNormalization", ["x2", *bn_params], ["bn2_out"], name="bn_on_input"))
    ln = _layernorm(net, "t", (-1,))
    ln_cf = _layernorm(net, "x", (1,))
    net.nodes.append(helper.make_node("LayerNormalization", ["t", net.const(np.ones(8))], ["native_out"],
                                      name="native_ln", axis=-1))
    v, g = net.const(rng.standard_normal((4, 4, 1, 1))), net.const(rng.uniform(0.5, 1.5, (4, 1, 1, 1)))
    norm = net.op("ReduceL2", v, axes=[1, 2, 3], keepdims=1)  # axes as attribute below opset 18
    weight = net.op("Mul", net.op("Div", v, norm), g)
    wn_out = net.op("Conv", "x", weight)
    img, seq = [1, 4, 6, 6], [2, 5, 8]
    return make_model(net.nodes, [("x", FLOAT, img), ("x2", FLOAT, img), ("t", FLOAT, seq)],
                      [("bn_out", FLOAT, img), ("bn2_out", FLOAT, img), (ln, FLOAT, seq), (ln_cf, FLOAT, img),
                       ("native_out", FLOAT, seq), (wn_out, FLOAT, img)], net.inits, opset=OPSET)


def test_inspect_weight_norm_without_its_pass_is_a_skip_that_says_so(rng):
    found = inspect_model(zoo(rng), passes=["fold-batchnorm", "fuse-layernorm"])
    weight_norm = by_kind(found)[("WeightNorm", "skip")]
    assert weight_norm.reason == "weight normalization of constant weights: fold-weightnorm was not run"


def by_kind(found):
    return {(s.kind, s.action): s for s in found.sites}


def test_inspect_lists_every_site_with_action_and_reason(rng):
    model = zoo(rng)
    before = model.SerializeToString()
    found = inspect_model(model)
    sites = by_kind(found)
    assert sorted(sites) == sorted([("BatchNormalization", "rewrite"), ("BatchNormalization", "skip"),
                                    ("LayerNorm", "rewrite"), ("LayerNorm", "skip"),
                                    ("LayerNormalization", "keep"), ("WeightNorm", "rewrite")])
    assert len(found.sites) == 6
    folded = sites[("BatchNormalization", "rewrite")]
    assert folded.nodes == ["bn_foldable"] and folded.output == "bn_out" and folded.becomes == "folded into Conv"
    kept = sites[("BatchNormalization", "skip")]
    assert kept.nodes == ["bn_on_input"] and "graph input" in kept.reason
    fused = sites[("LayerNorm", "rewrite")]
    assert fused.becomes == "LayerNormalization" and fused.pass_name == "fuse-layernorm" and len(fused.nodes) == 7
    assert "not its trailing axes" in sites[("LayerNorm", "skip")].reason
    assert sites[("LayerNormalization", "keep")].nodes == ["native_ln"]
    weight_norm = sites[("WeightNorm", "rewrite")]
    assert [n.split("(")[0].rstrip("0123456789") for n in weight_norm.nodes] == ["ReduceL", "Div", "Mul"]
    assert weight_norm.pass_name == "fold-weightnorm" and weight_norm.becomes == "Constant"
    assert len(found.pending) == 3
    assert model.SerializeToString() == before  # nothing rewritten in the caller's model


def test_inspect_site_in_a_subgraph_is_located(rng):
    body_net = GraphBuilder(OPSET)
    ln = _layernorm(body_net, "t", (-1,))
    body = helper.make_graph(body_net.nodes + [helper.make_node("Identity", [ln], ["then_out"])], "then_body", [],
                             [helper.make_tensor_value_info("then_out", FLOAT, [2, 5, 8])],
                             [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in body_net.inits.items()])
    other = helper.make_graph([helper.make_node("Identity", ["t"], ["else_out"])], "else_body", [],
                              [helper.make_tensor_value_info("else_out", FLOAT, [2, 5, 8])])
    nodes = [helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=body, else_branch=other)]
    model = make_model(nodes, [("flag", onnx.TensorProto.BOOL, []), ("t", FLOAT, [2, 5, 8])],
                       [("y", FLOAT, [2, 5, 8])], opset=OPSET)
    (site,) = inspect_model(model).sites
    assert (site.kind, site.action, site.graph) == ("LayerNorm", "rewrite", "/branch.then_branch")


def test_inspect_native_op_in_a_local_function_is_located_and_kept():
    fn = helper.make_function("local", "Norm", ["a", "s", "b"], ["o"],
                              [helper.make_node("InstanceNormalization", ["a", "s", "b"], ["o"], name="fn_in")],
                              [helper.make_opsetid("", OPSET)])
    nodes = [helper.make_node("Norm", ["x", "s", "b"], ["z"], domain="local")]
    model = make_model(nodes, [("x", FLOAT, [1, 4, 6])], [("z", FLOAT, [1, 4, 6])],
                       {"s": np.ones(4, np.float32), "b": np.zeros(4, np.float32)}, opset=OPSET,
                       extra_opsets=[("local", 1)])
    model.functions.append(fn)
    (site,) = inspect_model(model).sites
    assert (site.kind, site.action, site.graph, site.nodes) == ("InstanceNormalization", "keep", "function local:Norm",
                                                                ["fn_in"])
    assert site.reason == "already a single standard op"


def test_inspect_target_onnxruntime_skips_groupnorm_with_reason(rng):
    from test_targets import torchscript_groupnorm
    found = inspect_model(torchscript_groupnorm(rng), target="onnxruntime")
    site = next(s for s in found.sites if s.kind == "GroupNorm")
    assert site.action == "skip" and "--target onnxruntime" in site.reason and "function body" in site.reason
    assert not found.pipeline.upgrades  # no opset 21 for a rewrite that is not made
    assert by_kind(inspect_model(torchscript_groupnorm(rng)))[("GroupNorm", "rewrite")].becomes == "GroupNormalization"


def test_cli_inspect_text_and_json(rng, tmp_path):
    path = tmp_path / "zoo.onnx"
    onnx.save(zoo(rng), path)
    before = path.read_bytes()
    res = CliRunner().invoke(cli, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"{path}: 6 normalization site(s): 3 to rewrite, 2 skipped, 1 already single ops")
    assert "native BatchNormalization at bn_on_input -> 'bn2_out': skip: input 'x2' is a graph input" in res.output
    res = CliRunner().invoke(cli, ["inspect", str(path), "--format", "json"])
    data = json.loads(res.output)
    assert data["kind"] == "inspect" and data["summary"] == {"rewrite": 3, "skip": 2, "keep": 1}
    assert {s["kind"] for s in data["sites"]} == {"BatchNormalization", "LayerNorm", "LayerNormalization", "WeightNorm"}
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["zoo.onnx"]


def test_cli_inspect_bad_input_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.onnx")])
    assert res.exit_code == 2 and res.output.strip() == f"error: cannot read '{tmp_path / 'missing.onnx'}': no such file"


@pytest.mark.parametrize("passes", [["fuse-layernorm"]])
def test_inspect_only_selected_passes_report_decomposed_sites(rng, passes):
    found = inspect_model(zoo(rng), passes)
    kinds = {(s.kind, s.action) for s in found.sites}
    assert ("LayerNorm", "rewrite") in kinds
    # fold-batchnorm did not run: its sites are listed, as left alone for that reason
    bn = [s for s in found.sites if s.kind == "BatchNormalization"]
    assert len(bn) == 2 and all(s.action == "skip" and s.reason == "fold-batchnorm was not run" for s in bn)
    assert op_counts(zoo(rng))["BatchNormalization"] == 2

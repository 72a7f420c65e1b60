"""Unusual structure: control flow nested three deep with a rewrite at every level, several
outputs, unused inputs, empty graphs, symbolic dims, nameless nodes, unusual names, and
initializers listed as graph inputs (constants below IR version 4, overridable from it on)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from helpers import assert_equivalent, make_model, op_counts, run_pipeline
from normopt.cli import cli

FLOAT = TensorProto.FLOAT
D = 8


def layer_norm(p: str, x: str, out: str, names: bool = True):
    """A TorchScript-style decomposed LayerNorm over the last axis, its constants prefixed ``p``."""
    def node(op, ins, outs, **attrs):
        return helper.make_node(op, ins, outs, name=f"{p}{op}{len(nodes)}" if names else "", **attrs)
    nodes = []
    for op, ins, outs, attrs in [
            ("ReduceMean", [x], [f"{p}mean"], dict(axes=[-1])), ("Sub", [x, f"{p}mean"], [f"{p}d"], {}),
            ("Pow", [f"{p}d", f"{p}two"], [f"{p}sq"], {}), ("ReduceMean", [f"{p}sq"], [f"{p}var"], dict(axes=[-1])),
            ("Add", [f"{p}var", f"{p}eps"], [f"{p}ve"], {}), ("Sqrt", [f"{p}ve"], [f"{p}std"], {}),
            ("Div", [f"{p}d", f"{p}std"], [f"{p}xhat"], {}), ("Mul", [f"{p}xhat", f"{p}g"], [f"{p}ng"], {}),
            ("Add", [f"{p}ng", f"{p}b"], [out], {})]:
        nodes.append(node(op, ins, outs, **attrs))
    return nodes


def ln_constants(p: str, rng) -> dict[str, np.ndarray]:
    return {f"{p}two": np.array(2.0, np.float32), f"{p}eps": np.array(1e-5, np.float32),
            f"{p}g": rng.uniform(0.5, 1.5, D).astype(np.float32), f"{p}b": rng.standard_normal(D).astype(np.float32)}


def nested_model(rng):
    """main: LayerNorm -> If; then: LayerNorm -> Loop; Loop body: LayerNorm -> Scan; Scan body:
    LayerNorm. Every level's constants live in the main graph and are read across scopes."""
    vi = helper.make_tensor_value_info
    scan_body = helper.make_graph(layer_norm("s_", "s_in", "s_out"), "scan_body",
                                  [vi("s_in", FLOAT, [3, D])], [vi("s_out", FLOAT, [3, D])])
    loop_nodes = layer_norm("l_", "l_v", "l_n") + [
        helper.make_node("Scan", ["l_n"], ["l_scanned"], name="scan", body=scan_body, num_scan_inputs=1),
        helper.make_node("Identity", ["l_cond"], ["l_cond_out"], name="loop_cond")]
    loop_body = helper.make_graph(loop_nodes, "loop_body",
                                  [vi("l_i", TensorProto.INT64, []), vi("l_cond", TensorProto.BOOL, []),
                                   vi("l_v", FLOAT, [2, 3, D])],
                                  [vi("l_cond_out", TensorProto.BOOL, []), vi("l_scanned", FLOAT, [2, 3, D])])
    then_nodes = layer_norm("t_", "n0", "t_n") + [
        helper.make_node("Loop", ["trips", ""], ["t_out"], name="loop", body=loop_body)]
    # Loop's initial condition is omitted: with a trip count it runs that many times.
    then_nodes[-1].input[:] = ["trips", "", "t_n"]
    then_branch = helper.make_graph(then_nodes, "then", [], [vi("t_out", FLOAT, [2, 3, D])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["n0"], ["e_out"], name="else_id")], "else", [],
                                    [vi("e_out", FLOAT, [2, 3, D])])
    nodes = layer_norm("m_", "x", "n0") + [
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)]
    inits = {"trips": np.array(2, np.int64)}
    for p in ("m_", "t_", "l_", "s_"):
        inits.update(ln_constants(p, rng))
    return make_model(nodes, [("x", FLOAT, [2, 3, D]), ("cond", TensorProto.BOOL, [])], [("y", FLOAT, [2, 3, D])],
                      inits, opset=17)


def test_control_flow_nested_three_deep_rewritten_at_every_level(rng, tmp_path):
    model = nested_model(rng)
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert op_counts(out) == {"LayerNormalization": 4, "If": 1, "Loop": 1, "Scan": 1, "Identity": 2}
    assert sorted(r.graph for r in result.applied) == ["", "/if.then_branch", "/if.then_branch/loop.body",
                                                       "/if.then_branch/loop.body/scan.body"]
    for cond in (True, False):
        np.savez(tmp_path / "in.npz", x=rng.standard_normal((2, 3, D)).astype(np.float32), cond=np.array(cond))
        assert_equivalent(model, out, inputs_file=str(tmp_path / "in.npz"))
    again, second = run_pipeline(out, ["fuse-layernorm"])  # a second fold changes nothing
    assert not second.applied and op_counts(again) == op_counts(out)


ODD = ["a/b:c.0", "名前 с пробелом", "x" * 200, "semi;colon'quote\"", "tab\there"]


def odd_names_model(rng):
    """Symbolic dims everywhere, an unused input, three outputs (one a graph input passed
    through), nodes without names and tensor names with unusual characters."""
    vi = helper.make_tensor_value_info
    nodes = layer_norm("p1_", ODD[0], ODD[1], names=False) + layer_norm("p2_", ODD[1], ODD[2], names=False)
    nodes.append(helper.make_node("Relu", [ODD[2]], [ODD[3]]))
    inits = {**ln_constants("p1_", rng), **ln_constants("p2_", rng)}
    return make_model(nodes, [vi(ODD[0], FLOAT, ["batch", "seq", D]), vi(ODD[4], FLOAT, ["n"])],
                      [vi(ODD[3], FLOAT, ["batch", "seq", D]), vi(ODD[1], FLOAT, ["batch", "seq", D]),
                       vi(ODD[4], FLOAT, ["n"])], inits, opset=17)


def test_several_outputs_unused_inputs_symbolic_dims_nameless_nodes_unusual_names(rng, tmp_path):
    model = odd_names_model(rng)
    onnx.save(model, tmp_path / "m.onnx")
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--provider",
                                   "cpu", "-v"])
    assert res.exit_code == 0, res.output
    out = onnx.load(tmp_path / "o.onnx")
    onnx.checker.check_model(out, full_check=True)
    # The first LayerNorm's output is also a graph output: it stays, its consumer is fused.
    assert op_counts(out) == {"LayerNormalization": 2, "Relu": 1}
    assert [o.name for o in out.graph.output] == [ODD[3], ODD[1], ODD[4]]
    assert [i.name for i in out.graph.input] == [ODD[0], ODD[4]]
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim[:2]] == ["batch", "seq"]
    assert_equivalent(model, out)


def test_empty_graph(tmp_path):
    """No nodes: the input is the output. Folds to the same model, verified."""
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([], "empty", [vi("x", FLOAT, ["n", 4])], [vi("x", FLOAT, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "m.onnx")
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--provider",
                                   "cpu"])
    assert res.exit_code == 0, res.output
    out = onnx.load(tmp_path / "o.onnx")
    assert len(out.graph.node) == 0 and [o.name for o in out.graph.output] == ["x"]


def conv_bn_listed(rng, ir_version, opset):
    """Conv + BatchNormalization whose parameters are initializers also listed as graph inputs."""
    c = 4
    inits = {"w": (rng.standard_normal((c, c, 3, 3)) * 0.3).astype(np.float32),
             "g": rng.uniform(0.5, 1.5, c).astype(np.float32), "b": rng.standard_normal(c).astype(np.float32),
             "m": rng.standard_normal(c).astype(np.float32), "v": rng.uniform(0.5, 2, c).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")]
    ins = [("x", FLOAT, [1, c, 5, 5])] + [(k, FLOAT, list(v.shape)) for k, v in inits.items()]
    return make_model(nodes, ins, [("y", FLOAT, [1, c, 3, 3])], inits, opset=opset, ir_version=ir_version)


def test_listed_initializers_below_ir4_are_constants(rng):
    """IR 3 requires every initializer to be listed as a graph input: they are constants; the
    fold keeps the listing the format requires (new initializers listed, dropped ones unlisted)."""
    model = conv_bn_listed(rng, ir_version=3, opset=8)
    out, result = run_pipeline(model, ["fold-batchnorm"])
    assert op_counts(out) == {"Conv": 1} and len(result.applied) == 1
    assert out.ir_version == 3
    inits = [t.name for t in out.graph.initializer]
    assert [i.name for i in out.graph.input] == ["x"] + inits
    assert_equivalent(model, out)


def test_listed_initializers_from_ir4_are_overridable_defaults(rng):
    model = conv_bn_listed(rng, ir_version=4, opset=8)
    out, result = run_pipeline(model, ["fold-batchnorm"])
    assert op_counts(out) == {"Conv": 1, "BatchNormalization": 1} and not result.applied
    (skip,) = result.skipped
    assert skip.node == "bn" and "is an initializer also listed as a graph input: from IR version 4 on, a " \
        "default that callers may override" in skip.reason
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]


@pytest.mark.parametrize("ir_version", [3, 8])
def test_listed_initializers_fold_end_to_end(rng, tmp_path, ir_version):
    onnx.save(conv_bn_listed(rng, ir_version=ir_version, opset=8), tmp_path / "m.onnx")
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--provider",
                                   "cpu"])
    assert res.exit_code == 0, res.output
    out = onnx.load(tmp_path / "o.onnx")
    assert op_counts(out) == ({"Conv": 1} if ir_version == 3 else {"Conv": 1, "BatchNormalization": 1})


assert numpy_helper  # tensors are built through helpers.make_model

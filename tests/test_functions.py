"""Passes inside model-local function bodies (ModelProto.functions).

A function body is treated like a graph: its inputs and outputs are the graph's, its constants
are Constant nodes, its shapes are what every call gives it, its opset is its own. Records name
the function (graph path ``function domain:name``)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from helpers import FLOAT, assert_equivalent, make_model, run_pass, run_pipeline
from normopt import fold, pipeline
from normopt.cli import cli

DOMAIN = "local"
WHERE = "function local:Norm"


def const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.float32)))


def ref_attr(name, ref):
    """A float attribute that takes the value of the function's attribute ``ref``."""
    return onnx.AttributeProto(name=name, type=onnx.AttributeProto.FLOAT, ref_attr_name=ref)


def ln_body(rng, width=8, eps_node=None, axes=(-1,), scale=True):
    """A decomposed LayerNorm over ``axes`` of function input ``x``; gamma and beta as Constant
    nodes (or function inputs ``g``, ``b`` with ``scale=False``)."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=list(axes), name="mean"),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="sub"),
        helper.make_node("Mul", ["d", "d"], ["sq"], name="sq"),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=list(axes), name="var"),
        eps_node or const("eps", 1e-5),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
        helper.make_node("Div", ["d", "sd"], ["n"], name="div"),
    ]
    if scale:
        nodes += [const("g", rng.standard_normal(width) + 1), const("b", rng.standard_normal(width))]
    nodes += [helper.make_node("Mul", ["n", "g"], ["y0"], name="scale"),
              helper.make_node("Add", ["y0", "b"], ["y"], name="shift")]
    return nodes


def with_function(body, fn_inputs, calls, inputs, outputs, opset=17, fn_opset=None, inits=(), attributes=(),
                  attribute_protos=(), extra_functions=()):
    """A model whose main graph calls function local:Norm (``calls``: main-graph nodes)."""
    fn = helper.make_function(DOMAIN, "Norm", fn_inputs, ["y"], body,
                              [helper.make_opsetid("", fn_opset or opset)], attributes=list(attributes),
                              attribute_protos=list(attribute_protos))
    model = make_model(calls, inputs, outputs, inits, opset=opset, extra_opsets=[(DOMAIN, 1)])
    model.functions.extend([fn, *extra_functions])
    onnx.checker.check_model(model, full_check=True)
    return model


def call(x, y, *extra, name=None, **attrs):
    return helper.make_node("Norm", [x, *extra], [y], domain=DOMAIN, name=name or f"call_{y}", **attrs)


def body_ops(model, name="Norm") -> dict[str, int]:
    fn = next(f for f in model.functions if f.name == name)
    return dict(Counter(n.op_type for n in fn.node))


def main_ops(model) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def ln_model(rng, shapes=((2, 5, 8),), **body_kw):
    calls = [call(f"x{i}", f"y{i}") for i in range(len(shapes))]
    inputs = [(f"x{i}", FLOAT, list(s)) for i, s in enumerate(shapes)]
    outputs = [(f"y{i}", FLOAT, list(s)) for i, s in enumerate(shapes)]
    return with_function(ln_body(rng, **body_kw), ["x"], calls, inputs, outputs)


def skips(rec):
    return [(s.node, s.graph, s.reason) for s in rec.skipped]


# ----------------------------------------------------------------------------- fusions in a body

def test_layernorm_in_a_function_body_is_fused_there(rng):
    model = ln_model(rng)
    out, rec = run_pass("fuse-layernorm", model)
    (rw,) = rec.applied
    assert (rw.graph, rw.output) == (WHERE, "y")
    assert body_ops(out) == {"LayerNormalization": 1, "Constant": 2}  # gamma and beta, now Constant nodes
    assert main_ops(out) == main_ops(model) == {"Norm": 1}
    fn = out.functions[0]
    assert list(fn.input) == ["x"] and list(fn.output) == ["y"]
    ln = next(n for n in fn.node if n.op_type == "LayerNormalization")
    assert ln.output == ["y"] and helper.get_attribute_value(ln.attribute[0]) == -1
    onnx.checker.check_model(out, full_check=True)
    assert_equivalent(model, out)


def test_a_second_fold_changes_nothing_and_output_is_deterministic(rng):
    model = ln_model(rng)
    once, _ = run_pipeline(model)
    again, result = run_pipeline(once)
    assert not result.applied
    assert once.SerializeToString() == again.SerializeToString()
    assert run_pipeline(model)[0].SerializeToString() == once.SerializeToString()


def test_untouched_function_is_written_byte_identical(rng):
    other = helper.make_function(DOMAIN, "Plain", ["a"], ["o"], [helper.make_node("Relu", ["a"], ["o"])],
                                 [helper.make_opsetid("", 17)])
    model = with_function(ln_body(rng), ["x"], [call("x", "t"), helper.make_node("Plain", ["t"], ["y"], domain=DOMAIN)],
                          [("x", FLOAT, [2, 5, 8])], [("y", FLOAT, [2, 5, 8])], extra_functions=[other])
    out, rec = run_pass("fuse-layernorm", model)
    assert len(rec.applied) == 1
    assert out.functions[1].SerializeToString() == model.functions[1].SerializeToString()
    assert_equivalent(model, out)


def test_rmsnorm_in_a_function_body_at_opset_23(rng):
    body = [helper.make_node("Mul", ["x", "x"], ["sq"], name="sq"),
            helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="ms"),
            helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([-1], np.int64))),
            const("eps", 1e-6),
            helper.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
            helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt"),
            helper.make_node("Reciprocal", ["rms"], ["inv"], name="inv"),
            helper.make_node("Mul", ["x", "inv"], ["n"], name="norm"),
            const("w", rng.standard_normal(8)),
            helper.make_node("Mul", ["n", "w"], ["y"], name="scale")]
    body = [body[2]] + body[:2] + body[3:]
    model = with_function(body, ["x"], [call("x", "y")], [("x", FLOAT, [2, 5, 8])], [("y", FLOAT, [2, 5, 8])],
                          opset=23)
    out, rec = run_pass("fuse-rmsnorm", model)
    assert [r.graph for r in rec.applied] == [WHERE]
    assert body_ops(out) == {"RMSNormalization": 1, "Constant": 1}
    assert_equivalent(model, out)


def gamma_input_model(rng, gamma_shapes):
    calls, inputs, outputs, inits = [], [], [], {}
    for i, shape in enumerate(gamma_shapes):
        inits[f"g{i}"] = rng.standard_normal(shape).astype(np.float32)
        inits[f"b{i}"] = rng.standard_normal(8).astype(np.float32)
        calls.append(call(f"x{i}", f"y{i}", f"g{i}", f"b{i}"))
        inputs.append((f"x{i}", FLOAT, [2, 5, 8]))
        outputs.append((f"y{i}", FLOAT, [2, 5, 8]))
    return with_function(ln_body(rng, scale=False), ["x", "g", "b"], calls, inputs, outputs, inits=inits)


def test_layernorm_whose_gamma_and_beta_are_function_inputs_of_the_normalized_shape_is_fused(rng):
    model = gamma_input_model(rng, [(8,), (8,)])
    out, rec = run_pass("fuse-layernorm", model)
    assert [r.graph for r in rec.applied] == [WHERE]
    assert body_ops(out) == {"LayerNormalization": 1}
    ln = out.functions[0].node[0]
    assert list(ln.input) == ["x", "g", "b"]
    assert_equivalent(model, out)


def test_gamma_input_whose_shape_differs_between_calls_is_left(rng):
    # [5, 8] varies over a non-normalized axis at the second call: no LayerNormalization scale.
    # The calls disagree on its shape, so it is unknown in the body: the normalization is fused
    # without affine, and the Mul and Add stay after it.
    model = gamma_input_model(rng, [(8,), (5, 8)])
    out, rec = run_pass("fuse-layernorm", model)
    (rw,) = rec.applied
    assert rw.graph == WHERE and "scale" not in rw.removed and "shift" not in rw.removed
    assert rw.info["kept"] == "Mul scale kept outside: 'g' is computed at run time and its shape is unknown"
    assert body_ops(out) == {"Constant": 1, "LayerNormalization": 1, "Mul": 1, "Add": 1}
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- BatchNormalization

def bn_body(rng, params_as_inputs=False, eps_ref=False):
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [const("w", w), helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv")]
    names = ["scale", "bias", "mean", "var"]
    if not params_as_inputs:
        values = [rng.uniform(0.5, 1.5, 4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4)]
        nodes += [const(n, v) for n, v in zip(names, values)]
    bn = helper.make_node("BatchNormalization", ["c", *names], ["y"], name="bn")
    if eps_ref:
        bn.attribute.append(ref_attr("epsilon", "eps"))
    return nodes + [bn]


def test_batchnorm_with_constant_weights_in_a_body_is_folded(rng):
    model = with_function(bn_body(rng), ["x"], [call("x", "y")], [("x", FLOAT, [1, 3, 6, 6])],
                          [("y", FLOAT, [1, 4, 6, 6])])
    out, rec = run_pass("fold-batchnorm", model)
    assert [(r.anchor, r.graph) for r in rec.applied] == [("bn", WHERE)]
    assert body_ops(out) == {"Conv": 1, "Constant": 2}  # folded weight and bias
    conv = next(n for n in out.functions[0].node if n.op_type == "Conv")
    assert conv.output == ["y"] and len(conv.input) == 3
    onnx.checker.check_model(out, full_check=True)
    assert_equivalent(model, out)


def test_batchnorm_whose_parameters_are_function_inputs_is_left_with_reason(rng):
    rng_values = [rng.uniform(0.5, 1.5, 4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4)]
    inits = {f"p{i}": v.astype(np.float32) for i, v in enumerate(rng_values)}
    model = with_function(bn_body(rng, params_as_inputs=True), ["x", "scale", "bias", "mean", "var"],
                          [call("x", "y", "p0", "p1", "p2", "p3")], [("x", FLOAT, [1, 3, 6, 6])],
                          [("y", FLOAT, [1, 4, 6, 6])], inits=inits)
    out, rec = run_pass("fold-batchnorm", model)
    assert not rec.applied
    (node, graph, reason), = skips(rec)
    assert (node, graph) == ("bn", WHERE)
    assert reason == ("BatchNormalization scale 'scale' is an input of function local:Norm: its value is given per "
                      "call, not known in the body")
    assert out.functions[0].SerializeToString() == model.functions[0].SerializeToString()


def test_batchnorm_whose_epsilon_refers_to_a_function_attribute_is_left_with_reason(rng):
    model = with_function(bn_body(rng, eps_ref=True), ["x"], [call("x", "y", eps=1e-3)],
                          [("x", FLOAT, [1, 3, 6, 6])], [("y", FLOAT, [1, 4, 6, 6])], attributes=["eps"])
    out, rec = run_pass("fold-batchnorm", model)
    assert not rec.applied
    (node, graph, reason), = skips(rec)
    assert (node, graph) == ("bn", WHERE)
    assert "attribute 'epsilon' of bn refers to attribute 'eps' of function local:Norm" in reason
    assert out.functions[0].SerializeToString() == model.functions[0].SerializeToString()
    assert_equivalent(model, out)


def test_layernorm_whose_epsilon_constant_refers_to_a_function_attribute_is_left_with_reason(rng):
    eps = helper.make_node("Constant", [], ["eps"])
    eps.attribute.append(ref_attr("value_float", "eps"))
    model = with_function(ln_body(rng, eps_node=eps), ["x"], [call("x", "y", eps=1e-5)], [("x", FLOAT, [2, 5, 8])],
                          [("y", FLOAT, [2, 5, 8])], attributes=["eps"])
    out, rec = run_pass("fuse-layernorm", model)
    assert not rec.applied
    reasons = [(g, r) for _n, g, r in skips(rec)]
    assert reasons and all(g == WHERE for g, _r in reasons)
    assert any("refers to attribute 'eps' of function local:Norm" in r for _g, r in reasons), reasons
    assert out.functions[0].SerializeToString() == model.functions[0].SerializeToString()


def test_torchscript_groupnorm_function_with_per_call_constants_is_left_with_reason(rng):
    # As TorchScript writes nn.GroupNorm as a function: the group reshape and the
    # InstanceNormalization ones/zeros are function attributes, given by each call.
    def ref_const(out, ref):
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(onnx.AttributeProto(name="value", type=onnx.AttributeProto.TENSOR, ref_attr_name=ref))
        return node
    body = [ref_const("shape", "shape_value"),
            helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
            ref_const("ones", "ones_value"), ref_const("zeros", "zeros_value"),
            helper.make_node("InstanceNormalization", ["r", "ones", "zeros"], ["n"], epsilon=1e-5, name="in"),
            helper.make_node("Shape", ["x"], ["xs"], name="shape_of_x"),
            helper.make_node("Reshape", ["n", "xs"], ["back"], name="reshape_back"),
            helper.make_node("Mul", ["back", "g"], ["m"], name="scale"),
            helper.make_node("Add", ["m", "b"], ["y"], name="shift")]
    calls, inits = [], {}
    for i, groups in enumerate((4, 2)):
        inits[f"g{i}"] = rng.standard_normal((8, 1)).astype(np.float32)
        inits[f"b{i}"] = rng.standard_normal((8, 1)).astype(np.float32)
        attrs = {"shape_value": numpy_helper.from_array(np.array([0, groups, -1], np.int64)),
                 "ones_value": numpy_helper.from_array(np.ones(groups, np.float32)),
                 "zeros_value": numpy_helper.from_array(np.zeros(groups, np.float32))}
        calls.append(call("x" if i == 0 else "y0", f"y{i}", f"g{i}", f"b{i}", **attrs))
    model = with_function(body, ["x", "g", "b"], calls, [("x", FLOAT, [2, 8, 16])], [("y1", FLOAT, [2, 8, 16])],
                          inits=inits, attributes=["shape_value", "ones_value", "zeros_value"])
    out, rec = run_pass("fuse-groupnorm", model)
    assert not rec.applied
    (node, graph, reason), = skips(rec)
    assert graph == WHERE
    assert "refers to attribute" in reason and "of function local:Norm: its value is given per call" in reason
    assert out.functions[0].SerializeToString() == model.functions[0].SerializeToString()
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- calls and shapes

def test_function_called_with_the_same_rank_from_two_sites_is_fused(rng):
    model = ln_model(rng, shapes=((2, 5, 8), (3, 7, 8)), axes=(2,))
    out, rec = run_pass("fuse-layernorm", model)
    assert [r.graph for r in rec.applied] == [WHERE]
    assert body_ops(out)["LayerNormalization"] == 1
    assert_equivalent(model, out)


def test_positive_axis_that_is_last_at_one_call_and_not_at_another_is_left(rng):
    # axes=[2] is the last axis of the rank-3 call, not of the rank-4 one: no single LN is exact.
    model = ln_model(rng, shapes=((2, 5, 8), (2, 5, 8, 8)), axes=(2,))
    out, rec = run_pass("fuse-layernorm", model)
    assert not rec.applied
    (node, graph, reason), = skips(rec)
    assert graph == WHERE and "input rank unknown" in reason
    assert out.functions[0].SerializeToString() == model.functions[0].SerializeToString()
    assert_equivalent(model, out)


def test_body_names_do_not_borrow_main_graph_shapes(rng):
    # The main graph has its own 'x' of rank 4; the function's 'x' is rank 3 at its only call.
    model = ln_model(rng, axes=(2,))
    model.graph.input[0].name = "outer"
    model.graph.node[0].input[0] = "outer"
    model.graph.value_info.append(helper.make_tensor_value_info("x", FLOAT, [1, 2, 3, 4]))
    model.graph.node.append(helper.make_node("Identity", ["outer"], ["x"]))
    model.graph.output.append(helper.make_tensor_value_info("x", FLOAT, [2, 5, 8]))
    del model.graph.value_info[:]
    out, rec = run_pass("fuse-layernorm", model)
    assert [r.graph for r in rec.applied] == [WHERE]
    assert_equivalent(model, out)


def test_function_never_called_knows_no_shapes(rng):
    model = ln_model(rng, axes=(2,))
    model.graph.node[0].op_type, model.graph.node[0].domain = "Identity", ""
    out, rec = run_pass("fuse-layernorm", model)
    assert not rec.applied and skips(rec)[0][1] == WHERE


# ----------------------------------------------------------------------------- opsets

def test_function_opset_raised_with_the_model_when_its_ops_do_not_change(rng):
    model = with_function(ln_body(rng), ["x"], [call("x", "y")], [("x", FLOAT, [2, 5, 8])],
                          [("y", FLOAT, [2, 5, 8])], opset=15)
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert [(u.from_version, u.to_version) for u in result.upgrades] == [(15, 17)]
    assert [r.graph for r in result.applied] == [WHERE]
    fn = out.functions[0]
    assert [(i.domain, i.version) for i in fn.opset_import] == [("", 17)]
    assert body_ops(out)["LayerNormalization"] == 1
    onnx.checker.check_model(out, full_check=True)
    assert_equivalent(model, out)


def test_function_needing_a_newer_opset_without_upgrade_is_left_with_reason(rng):
    model = with_function(ln_body(rng), ["x"], [call("x", "y")], [("x", FLOAT, [2, 5, 8])],
                          [("y", FLOAT, [2, 5, 8])], opset=15)
    out, rec = run_pass("fuse-layernorm", model, allow_opset_upgrade=False)
    (node, graph, reason), = skips(rec)
    assert graph == WHERE
    assert reason == ("needs opset 17, function local:Norm imports 15 (the model imports 15); "
                      "opset upgrade disabled")
    assert out.SerializeToString() == model.SerializeToString()


def test_function_at_an_older_opset_than_the_model_is_raised_when_legal(rng):
    model = with_function(ln_body(rng), ["x"], [call("x", "y")], [("x", FLOAT, [2, 5, 8])],
                          [("y", FLOAT, [2, 5, 8])], opset=17, fn_opset=15)
    out, rec = run_pass("fuse-layernorm", model)
    assert [r.graph for r in rec.applied] == [WHERE]
    assert [(i.domain, i.version) for i in out.functions[0].opset_import] == [("", 17)]
    assert_equivalent(model, out)


def upgrade_model(rng, body):
    """A main-graph LayerNorm at opset 15 (it needs 17) and a call of function local:Plain."""
    fn = helper.make_function(DOMAIN, "Plain", ["a"], ["o"], body, [helper.make_opsetid("", 15)],
                              attributes=["v"] if any(a.ref_attr_name for n in body for a in n.attribute) else [])
    ln = [n for n in ln_body(rng) if n.op_type != "Constant"]
    for n in ln:
        n.input[:] = ["t" if i == "x" else i for i in n.input]
    plain = helper.make_node("Plain", ["x"], ["t"], domain=DOMAIN)
    if fn.attribute:
        plain.attribute.append(helper.make_attribute("v", numpy_helper.from_array(np.float32(0))))
    model = make_model([plain, *ln], [("x", FLOAT, [2, 5, 8])], [("y", FLOAT, [2, 5, 8])],
                       {"eps": np.float32(1e-5), "g": rng.standard_normal(8).astype(np.float32),
                        "b": rng.standard_normal(8).astype(np.float32)}, opset=15, extra_opsets=[(DOMAIN, 1)])
    model.functions.append(fn)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("body_op, converted", [("Relu", False), ("Identity", True)])
def test_model_upgrade_keeps_or_converts_each_function_body(rng, body_op, converted):
    # Relu is the same at opsets 15 and 17: the body keeps its import. Identity differs at 16:
    # the body is converted to 17 with the model.
    model = upgrade_model(rng, [helper.make_node(body_op, ["a"], ["o"])])
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert [(u.from_version, u.to_version) for u in result.upgrades] == [(15, 17)]
    assert len(result.applied) == 1 and result.applied[0].graph == ""
    fn = out.functions[0]
    assert [(i.domain, i.version) for i in fn.opset_import] == [("", 17 if converted else 15)]
    assert [n.op_type for n in fn.node] == [body_op]
    if not converted:
        assert fn.SerializeToString() == model.functions[0].SerializeToString()
    onnx.checker.check_model(out, full_check=True)
    assert_equivalent(model, out)


def test_model_upgrade_that_cannot_convert_a_function_body_is_refused_with_reason(rng):
    value = helper.make_node("Constant", [], ["c"])
    value.attribute.append(onnx.AttributeProto(name="value", type=onnx.AttributeProto.TENSOR, ref_attr_name="v"))
    model = upgrade_model(rng, [value, helper.make_node("Add", ["a", "c"], ["s"]),
                                helper.make_node("Identity", ["s"], ["o"])])
    out, result = run_pipeline(model, ["fuse-layernorm"])
    assert not result.upgrades and not result.applied
    (skip,) = result.skipped
    assert skip.graph == "" and skip.reason.startswith(
        "needs opset 17 (model has 15); opset upgrade 15 -> 17 failed: function local:Plain: ")
    assert out.SerializeToString() == model.SerializeToString()


# ----------------------------------------------------------------------------- reports and rollback

def test_cli_verbose_and_json_name_the_function(rng, tmp_path):
    path, dest = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(ln_model(rng), path)
    res = CliRunner().invoke(cli, ["fold", str(path), "-o", str(dest), "-v"])
    assert res.exit_code == 0, res.output
    assert "applied at div in function local:Norm: -> 'y'" in res.output
    report = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["fold", str(path), "-o", str(dest), "--report", str(report)])
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    applied = [r for p in data["passes"] for r in p["applied"]]
    assert [(r["anchor"], r["graph"]) for r in applied] == [("div", WHERE)]


def test_excluded_rewrite_in_a_function_is_keyed_by_the_function(rng):
    model = ln_model(rng)
    key = pipeline.exclusion_key(WHERE, "y")
    assert key != "y"
    out, rec = run_pass("fuse-layernorm", model, exclude={"y": "main-graph name"})
    assert len(rec.applied) == 1  # a main-graph 'y' is another tensor
    out, rec = run_pass("fuse-layernorm", model, exclude={key: "test"})
    assert not rec.applied and skips(rec) == [("div", WHERE, "rolled back: test")]


def test_wrong_rewrite_in_a_function_is_found_and_rolled_back(rng, monkeypatch):
    from normopt.passes.fuse_layernorm import FuseLayerNorm
    original = FuseLayerNorm.rewrite

    def broken(self, m, ctx):
        nodes = original(self, m, ctx)
        for n in nodes:
            if n.op == "LayerNormalization":
                n.attrs["epsilon"] = 0.5  # a wrong model
        return nodes

    monkeypatch.setattr(FuseLayerNorm, "rewrite", broken)
    model = ln_model(rng)
    result = fold.optimize(model, fold.FoldOptions(passes=["fuse-layernorm"], provider="cpu"))
    assert result.verified
    (rb,) = result.rollbacks
    assert (rb.anchor, rb.graph) == ("div", WHERE)
    assert rb.reason.startswith("function local:Norm (its rewrites rolled back together) changed 'y0'")
    assert result.model.functions[0].SerializeToString() == model.functions[0].SerializeToString()


@pytest.mark.parametrize("name", ["transformer_ln_modfuncs_ts_op15.onnx"])
def test_torchscript_modules_as_functions_export_folds(name):
    from pathlib import Path
    path = Path(__file__).parent.parent / "models" / name
    model = onnx.load(path)
    result = fold.optimize(model, fold.FoldOptions(provider="cpu"), source=path)
    assert result.verified and not result.rollbacks
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    applied = Counter((r.pass_name, r.graph) for r in result.pipeline.applied)
    assert applied == {("fuse-layernorm", "function __main__:HandLayerNorm"): 1,
                       ("fuse-layernorm", "function torch.nn.modules.normalization:LayerNorm"): 1}
    skipped = {(s.pass_name, s.graph): s.reason for s in result.pipeline.skipped}
    assert "is an input of function torch.nn.modules.batchnorm:BatchNorm1d" in \
        skipped[("fold-batchnorm", "function torch.nn.modules.batchnorm:BatchNorm1d")]
    assert body_ops(out, "LayerNorm") == {"LayerNormalization": 1}
    assert body_ops(out, "HandLayerNorm") == {"LayerNormalization": 1}
    again = fold.optimize(out, fold.FoldOptions(provider="cpu"))
    assert not again.pipeline.applied

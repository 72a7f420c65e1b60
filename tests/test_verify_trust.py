"""The verifier cannot be fooled: per-output tolerances, inputs that stress precision, bounds
that follow the computation, and perturbed models that must fail for every dtype."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from helpers import FLOAT, INT64, make_model, op_counts
from normopt import inputs, verify
from normopt.cli import cli
from normopt.fold import FoldOptions, optimize
from normopt.inputs import DEGENERATE, NORMAL, OFFSET
from test_fold import broken_pass, conv_bn_chain  # noqa: F401  (fixture reuse)

DOUBLE, FLOAT16, BFLOAT16 = TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16


def _decomposed_layernorm(x, y, eps_name, prefix=""):
    p = prefix
    return [helper.make_node("ReduceMean", [x], [p + "mu"], axes=[-1]),
            helper.make_node("Sub", [x, p + "mu"], [p + "d"]),
            helper.make_node("Mul", [p + "d", p + "d"], [p + "d2"]),
            helper.make_node("ReduceMean", [p + "d2"], [p + "var"], axes=[-1]),
            helper.make_node("Add", [p + "var", eps_name], [p + "ve"]),
            helper.make_node("Sqrt", [p + "ve"], [p + "sd"]),
            helper.make_node("Div", [p + "d", p + "sd"], [y])]


# ----------------------------------------------------------------------------- per-output tolerances

def _layernorm_beside_fp16_round_trip(epsilon):
    """y = LayerNorm(x) in float32; w = z rounded through float16 on its own branch."""
    d = 16
    nodes = [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1, epsilon=epsilon),
             helper.make_node("Cast", ["z"], ["h"], to=FLOAT16), helper.make_node("Cast", ["h"], ["w"], to=FLOAT)]
    inits = {"s": np.ones(d, np.float32), "b": np.zeros(d, np.float32)}
    return make_model(nodes, [("x", FLOAT, [2, 4, d]), ("z", FLOAT, [2, 4, d])],
                      [("y", FLOAT, [2, 4, d]), ("w", FLOAT, [2, 4, d])], inits, opset=17)


def test_tolerance_of_an_output_ignores_an_fp16_round_trip_on_another_branch():
    model, wrong = _layernorm_beside_fp16_round_trip(1e-5), _layernorm_beside_fp16_round_trip(5e-3)
    assert verify.compute_dtypes(model, ["y", "w"]) == {"y": "float32", "w": "float16"}
    assert verify.compute_dtype(model) == "float16"  # the model as a whole still has an fp16 path
    report = verify.compare(model, wrong, provider="cpu")
    assert [o.name for o in report.failures] == ["y"]
    y = report.failures[0]
    assert y.rtol == verify.TOLERANCES["float32"][1] and y.atol < verify.TOLERANCES["float16"][0]
    normal = verify.compare(model, wrong, provider="cpu", input_sets=(NORMAL,))
    assert [o.name for o in normal.failures] == ["y"] and normal.failures[0].atol_rule == "dtype default"
    # Held to float16 bounds (one fp16 Cast anywhere loosening every output), the wrong epsilon
    # passed on normal inputs; only the degenerate set's low-variance rows still showed it.
    assert verify.compare(model, wrong, provider="cpu", atol=1e-2, rtol=1e-2, input_sets=(NORMAL,)).passed


def test_tolerance_follows_casts_and_initializers_on_the_path_only():
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=FLOAT16), helper.make_node("Mul", ["h", "k16"], ["m"]),
             helper.make_node("Cast", ["m"], ["a"], to=FLOAT), helper.make_node("Relu", ["x"], ["b"])]
    model = make_model(nodes, [("x", FLOAT, [4])], [("a", FLOAT, [4]), ("b", FLOAT, [4])],
                       {"k16": np.ones(4, np.float16)}, opset=13)
    assert verify.compute_dtypes(model, ["a", "b", "m", "x"]) == {"a": "float16", "b": "float32", "m": "float16",
                                                                  "x": "float32"}


@pytest.mark.parametrize("through", ["shape", "bool cast", "comparison"])
def test_tolerance_ignores_a_float16_tensor_read_only_where_no_float_comes_out(through):
    """A float16 tensor whose values reach the output only through an op with no float output
    (its Shape, a Cast to bool, a comparison) brings no float16 rounding: the float32 output
    keeps float32 bounds, and a 0.9% change of it fails."""
    def pair(k):
        if through == "shape":
            nodes = [helper.make_node("Shape", ["h16"], ["sh"]), helper.make_node("Reshape", ["x", "sh"], ["xr"]),
                     helper.make_node("Mul", ["xr", "k"], ["y"])]
        else:
            mask = [helper.make_node("Cast", ["h16"], ["c"], to=TensorProto.BOOL)] if through == "bool cast" else \
                [helper.make_node("Less", ["h16", "zero16"], ["c"])]
            nodes = mask + [helper.make_node("Mul", ["x", "k"], ["xk"]), helper.make_node("Where", ["c", "xk", "x"], ["y"])]
        inits = {"h16": np.array([[1, -1] * 4] * 2, np.float16), "zero16": np.zeros((), np.float16),
                 "k": np.array(k, np.float32)}
        return make_model(nodes, [("x", FLOAT, [2, 8])], [("y", FLOAT, [2, 8])], inits, opset=17)

    model, changed = pair(1.0), pair(1.009)
    assert verify.compute_dtypes(model, ["y"]) == {"y": "float32"}
    report = verify.compare(model, changed, provider="cpu")
    assert [o.name for o in report.failures] == ["y"] and report.failures[0].rtol == verify.TOLERANCES["float32"][1]


# ----------------------------------------------------------------------------- input sets

def _embedding_and_features():
    table = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["g"]), helper.make_node("Add", ["g", "x"], ["y"])]
    return make_model(nodes, [("ids", INT64, [1, 6]), ("x", FLOAT, [1, 6, 4])], [("y", FLOAT, [1, 6, 4])],
                      {"table": table}, opset=13)


def test_offset_and_degenerate_sets_change_float_inputs_only():
    model = _embedding_and_features()
    assert inputs.stress_kinds(model) == [OFFSET, DEGENERATE]
    offset, specs = inputs.make_feeds(model, seed=0, kind=OFFSET)
    assert offset["ids"].min() >= 0 and offset["ids"].max() < 50  # token ids keep their safe range
    assert abs(offset["x"].mean() - 1000) < 2 and 0.5 < offset["x"].std() < 2
    assert specs[1].source == "normal(1000, 1)" and "embedding index" in specs[0].source
    degenerate, specs = inputs.make_feeds(model, seed=0, kind=DEGENERATE)
    x = degenerate["x"][0]
    # blocks in turn: low variance (normal(0, 1e-3)), constant, zeros, normal(0, 1)
    assert (x[2] == 0).all() and len(set(x[1])) == 1 and len(set(x[5])) == 1
    assert 0 < x[0].std() < 1e-2 and 0 < x[4].std() < 1e-2 and x[3].std() > 0.1
    assert degenerate["ids"].max() < 50


@pytest.mark.parametrize("eps, other", [(1e-12, 1e-5), (1e-5, 1e-6), (1e-6, 1e-5)])
def test_an_epsilon_changed_where_unit_variance_hides_it_fails_on_low_variance_rows(eps, other):
    """A LayerNorm's epsilon left at the default (BERT's 1e-12 becoming 1e-5) or moved by 10x
    changes nothing visible at a variance of 1 (or 0); the degenerate set's low-variance rows
    show it."""
    d = 32
    original = make_model(_decomposed_layernorm("x", "y", "eps"), [("x", FLOAT, [1, 8, d])], [("y", FLOAT, [1, 8, d])],
                          {"eps": np.asarray(eps, np.float32)}, opset=13)
    fused = make_model([helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=-1, epsilon=other)],
                       [("x", FLOAT, [1, 8, d])], [("y", FLOAT, [1, 8, d])], {"s": np.ones(d, np.float32)}, opset=17)
    right = make_model([helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=-1, epsilon=eps)],
                       [("x", FLOAT, [1, 8, d])], [("y", FLOAT, [1, 8, d])], {"s": np.ones(d, np.float32)}, opset=17)
    report = verify.compare(original, fused, provider="cpu")
    assert not report.passed and report.failures[0].inputs == "degenerate inputs (seed 0)"
    assert verify.compare(original, right, provider="cpu").passed


def _cast_wrapped_layernorm(elem, eps, shape, fused=False):
    """A half-precision LayerNorm with its statistics in float32 (the form exporters write for
    float16 and bfloat16), or the fused op with stash_type float32."""
    d = shape[-1]
    if fused:
        graph = helper.make_graph([helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=-1, epsilon=eps)],
                                  "t", [helper.make_tensor_value_info("x", elem, shape)],
                                  [helper.make_tensor_value_info("y", elem, shape)],
                                  [helper.make_tensor("s", elem, [d], [1.0] * d)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        return model
    nodes = [helper.make_node("Cast", ["x"], ["x32"], to=FLOAT)] + _decomposed_layernorm("x32", "n", "eps") + \
        [helper.make_node("Cast", ["n"], ["y"], to=elem)]
    return make_model(nodes, [("x", elem, shape)], [("y", elem, shape)], {"eps": np.asarray(eps, np.float32)},
                      opset=13)


@pytest.mark.parametrize("elem", [FLOAT16, BFLOAT16])
@pytest.mark.parametrize("eps, other", [(1e-6, 1e-5), (1e-5, 1e-3)])
def test_a_changed_epsilon_in_half_precision_fails_beside_rows_that_rounding_makes_noise(elem, eps, other):
    """The degenerate set's constant rows are ill-conditioned in float16 and bfloat16: an ulp move
    makes their variance one of rounding noise, which the LayerNorm blows up to order 1. Taken as
    one number for the whole output, that bound (3 to 6) let the changed epsilon pass on the
    low-variance rows beside them; each row now keeps its own."""
    shape = [2, 8, 64]
    original = _cast_wrapped_layernorm(elem, eps, shape)
    report = verify.compare(original, _cast_wrapped_layernorm(elem, other, shape, fused=True), provider="cpu")
    assert not report.passed and report.failures[0].inputs == "degenerate inputs (seed 0)"
    assert verify.compare(original, _cast_wrapped_layernorm(elem, eps, shape, fused=True), provider="cpu").passed


def test_a_changed_epsilon_of_a_layernorm_on_a_batch_of_vectors_fails():
    """A [B, F] input has only its batch axis for the degenerate blocks: two rows at the default
    batch, which must hold a low-variance one (they were all zeros and constant)."""
    d = 64
    original = make_model(_decomposed_layernorm("x", "y", "eps"), [("x", FLOAT, ["B", d])], [("y", FLOAT, ["B", d])],
                          {"eps": np.asarray(1e-6, np.float32)}, opset=13)
    fused = make_model([helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=-1, epsilon=1e-5)],
                       [("x", FLOAT, ["B", d])], [("y", FLOAT, ["B", d])], {"s": np.ones(d, np.float32)}, opset=17)
    report = verify.compare(original, fused, provider="cpu")
    assert not report.passed and report.failures[0].inputs == "degenerate inputs (seed 0)"


def test_an_fp16_side_branch_on_an_input_does_not_loosen_its_float32_outputs():
    """x feeds a float32 LayerNorm (y) and, beside it, a Cast to float16 (h). Only h is computed
    from the rounded value: y keeps float32 moves, so a one-pass variance, E[x^2] - E[x]^2, that
    loses 0.2 at a mean of 1000 fails there."""
    d = 32
    side = [helper.make_node("Cast", ["x"], ["x16"], to=FLOAT16), helper.make_node("Relu", ["x16"], ["h"])]
    outs = [("y", FLOAT, [2, 8, d]), ("h", FLOAT16, [2, 8, d])]
    original = make_model(_decomposed_layernorm("x", "y", "eps") + side, [("x", FLOAT, [2, 8, d])], outs,
                          {"eps": np.asarray(1e-5, np.float32)}, opset=13)
    one_pass = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]), helper.make_node("Mul", ["x", "x"], ["x2"]),
                helper.make_node("ReduceMean", ["x2"], ["m2"], axes=[-1]), helper.make_node("Mul", ["mu", "mu"], ["mu2"]),
                helper.make_node("Sub", ["m2", "mu2"], ["var"]), helper.make_node("Add", ["var", "eps"], ["ve"]),
                helper.make_node("Sqrt", ["ve"], ["sd"]), helper.make_node("Sub", ["x", "mu"], ["d"]),
                helper.make_node("Div", ["d", "sd"], ["y"])]
    wrong = make_model(one_pass + side, [("x", FLOAT, [2, 8, d])], outs, {"eps": np.asarray(1e-5, np.float32)},
                       opset=13)
    assert verify.input_widths(original, ["y", "h"]) == {"y": {"x": None}, "h": {"x": "float16"}}
    report = verify.compare(original, wrong, provider="cpu")
    assert [d.name for d in report.failures] == ["y"] and report.failures[0].inputs == "offset inputs (seed 0)"


def test_an_array_given_for_an_overridable_initializer_is_fed(tmp_path):
    """From IR version 4 an initializer that is also a graph input is a default a caller may
    replace: an --inputs array for it is fed (it was accepted and dropped), so a candidate that
    baked the default in fails."""
    d = 16
    nodes = [helper.make_node("LayerNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-5)]
    gamma = np.linspace(0.5, 1.5, d).astype(np.float32)
    original = make_model(nodes, [("x", FLOAT, [2, d]), ("g", FLOAT, [d])], [("y", FLOAT, [2, d])], {"g": gamma},
                          opset=17)
    baked = make_model([helper.make_node("LayerNormalization", ["x", "k"], ["y"], axis=-1, epsilon=1e-5),
                        helper.make_node("Identity", ["g"], ["unused"])],
                       [("x", FLOAT, [2, d]), ("g", FLOAT, [d])], [("y", FLOAT, [2, d])], {"g": gamma, "k": gamma},
                       opset=17)
    npz = tmp_path / "in.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x=rng.standard_normal((2, d)).astype(np.float32), g=rng.standard_normal(d).astype(np.float32))
    feeds, specs = inputs.make_feeds(original, seed=0, npz=str(npz))
    assert set(feeds) == {"x", "g"} and specs[-1].source.endswith("in place of its initializer")
    assert verify.compare(original, original, provider="cpu", inputs_file=str(npz)).passed
    assert not verify.compare(original, baked, provider="cpu", inputs_file=str(npz)).passed
    assert verify.compare(original, baked, provider="cpu").passed  # its default: nothing to tell them apart


def _classifier(rng, shift=0.0):
    """Conv + BatchNormalization + GlobalAveragePool + Flatten, labels by ArgMax: the logits are
    no output. ``shift`` moves the BatchNormalization's mean, as a fold that lost part of it would."""
    c = 6
    inits = {"w": rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3,
             "g": rng.uniform(0.5, 1.5, c).astype(np.float32), "b": rng.standard_normal(c).astype(np.float32) * 0.1,
             "m": rng.standard_normal(c).astype(np.float32) * 0.1, "v": rng.uniform(0.5, 1.5, c).astype(np.float32)}
    inits["m2"] = inits["m"] + np.float32(shift)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m2", "v"], ["n"]),
             helper.make_node("GlobalAveragePool", ["n"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"]),
             helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)]
    return make_model(nodes, [("x", FLOAT, [2, 3, 8, 8])], [("label", INT64, [2])], inits, opset=15)


def test_the_scores_behind_an_argmax_output_are_compared_too():
    """A handful of labels rarely shows a fold that moved every logit by 3e-3; the logits do."""
    original, wrong = _classifier(np.random.default_rng(1)), _classifier(np.random.default_rng(1), shift=3e-3)
    assert verify.witnesses(original) == ["logits"]
    report = verify.compare(original, wrong, provider="cpu")
    assert [d.name for d in report.outputs] == ["label", "logits"]
    assert not report.outputs[1].passed and report.outputs[1].max_abs > 1e-3
    assert report.outputs[1].note == "the ArgMax input behind output 'label', compared too"
    result = optimize(original, FoldOptions(passes=["fold-batchnorm"], provider="cpu"))
    assert result.verified and op_counts(result.model)["Conv"] == 1 and "BatchNormalization" not in op_counts(result.model)


def test_a_subgraph_name_that_shadows_a_rounded_tensor_is_not_a_read_of_it():
    """A Loop body's own input named like the main graph's fp16 Cast of x reads its own value:
    the Loop's output is not computed from the rounded x, and keeps x's float32 moves."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["x16", "x16"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", INT64, []), helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("x16", FLOAT, [2, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", FLOAT, [2, 8])])
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=FLOAT16), helper.make_node("Relu", ["x16"], ["h"]),
             helper.make_node("Loop", ["n", "", "y0"], ["z"], body=body)]
    model = make_model(nodes, [("x", FLOAT, [2, 8]), ("y0", FLOAT, [2, 8]), ("n", INT64, [])],
                       [("h", FLOAT16, [2, 8]), ("z", FLOAT, [2, 8])], opset=17)
    widths = verify.input_widths(model, ["h", "z"])
    assert widths["h"]["x"] == "float16" and widths["z"]["x"] is None


def test_below_ir_4_an_initializer_listed_as_an_input_is_a_constant_on_the_way_to_a_cast():
    """x * c -> Cast(float16): x reaches the Cast still itself (scaled by a constant) at IR 3 as at
    IR 4, where c is listed as an input only because IR 3 lists every initializer."""
    nodes = [helper.make_node("Mul", ["x", "c"], ["xc"]), helper.make_node("Cast", ["xc"], ["y"], to=FLOAT16)]
    model = make_model(nodes, [("x", FLOAT, [2, 8]), ("c", FLOAT, [])], [("y", FLOAT16, [2, 8])],
                       {"c": np.asarray(1.1, np.float32)}, opset=7, ir_version=3)
    assert verify.input_widths(model, ["y"])["y"]["x"] == "float16"
    model.ir_version = 4   # now c is a default a caller may replace: x * c is no longer x itself
    assert verify.input_widths(model, ["y"])["y"]["x"] is None


def test_a_witness_the_candidate_reuses_for_another_tensor_or_type_is_not_compared():
    """The logits behind an ArgMax are compared only where the candidate computes them as such:
    a tensor of that name that is something else (here transposed), or the scores in float16
    inside a converted model, leave the labels to decide."""
    def model(transposed=False, half=False):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["l0"])]
        if half:
            nodes += [helper.make_node("Cast", ["l0"], ["logits"], to=FLOAT16)]
        else:
            nodes += [helper.make_node("Identity", ["l0"], ["logits"])]
        if transposed:
            nodes = [helper.make_node("MatMul", ["x", "w"], ["l0"]), helper.make_node("Transpose", ["l0"], ["logits"])]
        source = "l0" if transposed else "logits"
        nodes.append(helper.make_node("ArgMax", [source], ["label"], axis=1, keepdims=0))
        w = np.eye(5, dtype=np.float32)
        return make_model(nodes, [("x", FLOAT, [2, 5])], [("label", INT64, [2])], {"w": w}, opset=13)

    original = model()
    for candidate in (model(transposed=True), model(half=True)):
        report = verify.compare(original, candidate, provider="cpu")
        assert report.passed and [d.name for d in report.outputs] == ["label"]


@pytest.mark.parametrize("elem, kinds, mean", [(FLOAT16, [OFFSET, DEGENERATE], 100.0),
                                               (DOUBLE, [OFFSET, DEGENERATE], 1000.0),
                                               (BFLOAT16, [DEGENERATE], None)])
def test_offset_follows_what_the_input_type_resolves(elem, kinds, mean):
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", elem, [2, 3, 8])], [("y", elem, [2, 3, 8])],
                       opset=13)
    assert inputs.stress_kinds(model) == kinds
    feeds, specs = inputs.make_feeds(model, seed=0, kind=OFFSET)
    centre = float(np.asarray(feeds["x"], np.float64).mean())
    assert abs(centre - (mean or 0.0)) < 1.0
    assert ("no offset" in specs[0].source) == (mean is None)


def test_no_stress_sets_for_real_inputs_user_ranges_or_integer_models(tmp_path):
    model = _embedding_and_features()
    assert inputs.stress_kinds(model, ranges={"x": (0, 1)}) == []
    assert inputs.stress_kinds(model, npz=str(tmp_path / "in.npz")) == []
    ints = make_model([helper.make_node("Identity", ["i"], ["o"])], [("i", INT64, [3])], [("o", INT64, [3])], opset=13)
    assert inputs.stress_kinds(ints) == []


def test_report_lists_the_input_sets_that_ran(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_embedding_and_features(), path)
    res = CliRunner().invoke(cli, ["verify", str(path), str(path), "--provider", "cpu", "--trials", "2",
                                   "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "seed 0, 2 normal input set(s) + offset + degenerate; inputs" in res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["verification"]["input_sets"] == [NORMAL, NORMAL, OFFSET, DEGENERATE]


# ----------------------------------------------------------------------------- degenerate inputs

def _double_layernorm(epsilon_op):
    shape = [1, 6, 8]
    if epsilon_op is None:  # the decomposed original, epsilon 1e-50
        nodes = _decomposed_layernorm("x", "y", "eps")
        inits = {"eps": np.asarray(1e-50, np.float64)}
        opset = 13
    else:  # what a rewrite emitting a float32 epsilon attribute makes of it: 0.0
        nodes = [helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=-1, epsilon=epsilon_op)]
        inits = {"s": np.ones(8, np.float64)}
        opset = 17
    return make_model(nodes, [("x", DOUBLE, shape)], [("y", DOUBLE, shape)], inits, opset=opset)


def test_degenerate_inputs_catch_an_epsilon_lost_to_float32():
    original, rewritten = _double_layernorm(None), _double_layernorm(float(np.float32(1e-50)))
    assert float(np.float32(1e-50)) == 0.0
    assert verify.compare(original, rewritten, provider="cpu", input_sets=(NORMAL, OFFSET)).passed  # random inputs miss it
    report = verify.compare(original, rewritten, provider="cpu")
    assert not report.passed
    bad = report.failures[0]
    assert bad.inputs == "degenerate inputs (seed 0)" and "NaN/Inf" in bad.problem


# ----------------------------------------------------------------------------- bounds that follow the computation

def _conv_bn_large_sums(rng):
    """Conv over 32 channels x 3x3 (288-term sums), then BatchNormalization scaling by ~40:
    outputs in the hundreds."""
    c = 32
    inits = {"w": rng.standard_normal((c, c, 3, 3)).astype(np.float32),
             "g": rng.uniform(30, 45, c).astype(np.float32), "b": rng.standard_normal(c).astype(np.float32),
             "m": (rng.standard_normal(c) * 0.1).astype(np.float32), "v": rng.uniform(0.9, 1.1, c).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")]
    return make_model(nodes, [("x", FLOAT, [1, c, 8, 8])], [("y", FLOAT, [1, c, 8, 8])], inits, opset=15)


def _conv_float64(x, w):
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((x.shape[0], w.shape[0], x.shape[2], x.shape[3]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + x.shape[2], j:j + x.shape[3]], w[:, :, i, j].astype(np.float64))
    return out


def test_correct_fold_with_large_sums_verifies_and_a_small_real_error_fails(rng):
    model = _conv_bn_large_sums(rng)
    result = optimize(model, FoldOptions(passes=["fold-batchnorm"], provider="cpu"))
    assert result.verified and not result.rollbacks and op_counts(result.model) == {"Conv": 1}
    # Both models are about equally far from float64 math; a constant atol of 1e-5 would have
    # rolled the fold back.
    feeds, _ = inputs.make_feeds(model, seed=0)
    ref, folded = (verify.run_model(m, [feeds], "cpu")[0]["y"] for m in (model, result.model))
    p = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    exact = (_conv_float64(feeds["x"], p["w"]) - p["m"][:, None, None]) \
        * (p["g"] / np.sqrt(p["v"] + 1e-5))[:, None, None] + p["b"][:, None, None]
    err_ref, err_fold, diff = (float(np.abs(a - b).max()) for a, b in ((ref, exact), (folded, exact), (ref, folded)))
    assert np.abs(ref).max() > 500 and diff > 1e-5 and max(err_ref, err_fold) > 0.4 * diff
    assert not verify.compare(model, result.model, provider="cpu", atol=1e-5).passed
    # One folded weight changed by 1e-3 relative: caught.
    w = next(t for t in result.model.graph.initializer if t.name == result.model.graph.node[0].input[1])
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[3, 5, 1, 1] *= 1.001
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    report = verify.compare(model, result.model, provider="cpu")
    assert not report.passed and report.failures[0].inputs == "normal inputs (seed 0)"


def test_original_precision_loss_at_an_offset_is_not_blamed_on_a_more_precise_rewrite():
    """The decomposed layer norm loses digits at a mean of 1000 (x - mean in float32); the fused
    op loses fewer. The difference is within what the original itself moves by there."""
    d = 64
    original = make_model(_decomposed_layernorm("x", "y", "eps"), [("x", FLOAT, [1, 4, d])], [("y", FLOAT, [1, 4, d])],
                          {"eps": np.asarray(1e-5, np.float32)}, opset=13)
    fused = make_model([helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=-1, epsilon=1e-5)],
                       [("x", FLOAT, [1, 4, d])], [("y", FLOAT, [1, 4, d])], {"s": np.ones(d, np.float32)}, opset=17)
    report = verify.compare(original, fused, provider="cpu", input_sets=(OFFSET,))
    assert report.passed and report.outputs[0].atol_rule == "input sensitivity"
    assert report.outputs[0].max_abs > verify.TOLERANCES["float32"][0]  # a constant atol would have failed it


def _layernorm_then_fp16(form: str):
    """LayerNorm statistics of a float32 input, the normalized value Cast to float16 for the
    affine, as onnxruntime's layer_norm_with_cast test writes it ("decomposed"); the same fused
    ("fused"); or a wrong version ("fp16 statistics"): the input rounded to float16 first, then
    LayerNormalization in float16 (normal(1000, 1) inputs lie 0.5 apart there)."""
    d = 32
    rng = np.random.default_rng(3)
    inits = {"g": rng.uniform(0.5, 1.5, d).astype(np.float16), "b": rng.uniform(-1, 1, d).astype(np.float16)}
    if form == "fp16 statistics":
        nodes = [helper.make_node("Cast", ["x"], ["x16"], to=FLOAT16),
                 helper.make_node("LayerNormalization", ["x16", "g", "b"], ["y"], axis=-1, epsilon=1e-2)]
        return make_model(nodes, [("x", FLOAT, [4, 8, d])], [("y", FLOAT16, [4, 8, d])], inits, opset=17)
    if form == "decomposed":
        core = _decomposed_layernorm("x", "n", "eps")
        inits["eps"] = np.asarray(1e-2, np.float32)
    else:
        core = [helper.make_node("LayerNormalization", ["x", "s"], ["n"], axis=-1, epsilon=1e-2)]
        inits["s"] = np.ones(d, np.float32)
    nodes = core + [helper.make_node("Cast", ["n"], ["n16"], to=FLOAT16),
                    helper.make_node("Mul", ["n16", "g"], ["gn"]), helper.make_node("Add", ["gn", "b"], ["y"])]
    return make_model(nodes, [("x", FLOAT, [4, 8, d])], [("y", FLOAT16, [4, 8, d])], inits, opset=17)


def test_an_fp16_cast_after_the_statistics_does_not_widen_the_input_moves():
    """The input moves of the sensitivity probe follow a Cast only where the input reaches it
    still itself. Here the Cast rounds the normalized output: moving the float32 input by float16
    ulps (about 1.5 at a mean of 1000) widened the offset set's bound to tens, on outputs near 1,
    and statistics taken in float16 passed there."""
    right, wrong = _layernorm_then_fp16("decomposed"), _layernorm_then_fp16("fp16 statistics")
    assert verify.input_widths(right, ["y"]) == {"y": {"x": None}}
    assert verify.input_widths(wrong, ["y"]) == {"y": {"x": "float16"}}  # rounded on its way in: that precise
    report = verify.compare(right, wrong, provider="cpu", input_sets=(OFFSET,))
    assert not report.passed and not report.failures[0].problem  # out of bounds, no NaN needed
    assert report.failures[0].atol < 1.0 and report.failures[0].max_abs > 0.05
    # The fused form (statistics in float32, then the Cast) passes on every set.
    assert verify.compare(right, _layernorm_then_fp16("fused"), provider="cpu").passed


def test_the_original_runs_once_across_rollback_rounds(rng, monkeypatch, broken_pass):
    calls = []
    real = verify.reference_outputs

    def counting(model, **kwargs):
        calls.append((model, tuple(kwargs.get("extra_outputs") or ())))
        return real(model, **kwargs)

    monkeypatch.setattr(verify, "reference_outputs", counting)   # fold looks it up there when it runs
    model = conv_bn_chain(rng)
    result = optimize(model, FoldOptions(passes=[broken_pass], provider="cpu"))
    assert result.rollbacks and result.verified
    assert all(m is model for m, _ in calls)  # never a rewritten model as the reference
    assert [extra for _, extra in calls] == [(), ("n1", "n2", "n3")]  # once each, though verified twice


# ----------------------------------------------------------------------------- perturbed models fail, per dtype

def _verify_cli(tmp_path, a, b):
    paths = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for model, path in zip((a, b), paths):
        onnx.save(model, path)
    return CliRunner().invoke(cli, ["verify", *map(str, paths), "--provider", "cpu"])


def _joined(small_factor, axis=-1, shape=(2, 8, 4)):
    """y = Concat(x * k, x * 1e7) along ``axis``: a part near 1 beside a part near 1e7."""
    nodes = [helper.make_node("Mul", ["x", "k"], ["xs"]), helper.make_node("Mul", ["x", "big"], ["xb"]),
             helper.make_node("Concat", ["xs", "xb"], ["y"], axis=axis)]
    out = list(shape)
    out[axis] *= 2
    return make_model(nodes, [("x", FLOAT, list(shape))], [("y", FLOAT, out)],
                      {"k": np.asarray(small_factor, np.float32), "big": np.asarray(1e7, np.float32)}, opset=13)


@pytest.mark.parametrize("axis", [-1, 1])
def test_a_part_near_1e7_does_not_set_the_tolerance_of_a_part_near_1(axis):
    # One max over the whole output gave an atol of ~1e3 to every element: the small half could
    # be off by 1% (or 100%) and pass.
    report = verify.compare(_joined(1.0, axis), _joined(1.01, axis), provider="cpu")
    bad = report.failures
    assert not report.passed and bad[0].name == "y" and bad[0].atol < 1e-2
    assert verify.compare(_joined(1.0, axis), _joined(1.0, axis), provider="cpu").passed


def test_local_max_is_the_scale_of_each_part():
    a = np.concatenate([np.ones((2, 8, 4)), np.full((2, 8, 4), 1e7)], axis=-1)
    local = verify.local_max(a)
    assert local.shape == a.shape and (local[..., :4] == 1).all() and (local[..., 4:] == 1e7).all()
    assert (verify.local_max(np.arange(16.0)) == 15).all()   # one axis: the whole array's max
    # slices of fewer than LOCAL_MIN_ELEMENTS elements are not used: the [2, 3] rows here
    assert (verify.local_max(np.array([[1.0, 2, 3], [10, 20, 30]])) == 30).all()


def test_a_conv_channel_with_a_small_batchnorm_scale_is_held_to_its_own_scale(rng):
    """A correct fold verifies; the same fold with the small channel's weights 1% off fails,
    though 1% of that channel is far below 8 ulps of the large channels."""
    c = 4
    inits = {"w": rng.standard_normal((c, c, 3, 3)).astype(np.float32),
             "g": np.array([1e6, 1.0, 1e6, 1e6], np.float32), "b": np.zeros(c, np.float32),
             "m": np.zeros(c, np.float32), "v": np.ones(c, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])]
    model = make_model(nodes, [("x", FLOAT, [1, c, 8, 8])], [("y", FLOAT, [1, c, 8, 8])], inits, opset=15)
    result = optimize(model, FoldOptions(passes=["fold-batchnorm"], provider="cpu"))
    assert result.verified and op_counts(result.model) == {"Conv": 1}
    folded = result.model
    w = next(t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[1])
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[1] *= 1.01
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    report = verify.compare(model, folded, provider="cpu")
    assert not report.passed and report.failures[0].atol < 0.1   # the large channels' 8 ulps: about 1


def _perturbed(model, name, index=None, factor=1.001):
    """A copy of ``model`` with one element of initializer ``name`` times ``factor`` (rounded to
    its dtype); by default its largest weight, the one a wrong fold of it would move most."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    t = next(t for t in out.graph.initializer if t.name == name)
    arr = onnx.numpy_helper.to_array(t).copy()
    if index is None:
        index = int(np.argmax(np.abs(arr.astype(np.float64))))
    arr.flat[index] = float(arr.flat[index]) * factor
    t.CopyFrom(onnx.numpy_helper.from_array(arr, name))
    return out


def test_verify_fails_a_weight_perturbed_by_1e3_float32(tmp_path, rng):
    model = conv_bn_chain(rng)
    res = _verify_cli(tmp_path, model, _perturbed(model, "w2"))
    assert res.exit_code == 1 and "error: output 'r3' differs" in res.output


def test_verify_fails_a_weight_perturbed_by_1e3_float64(tmp_path, rng):
    d = 8
    inits = {"W": rng.standard_normal((d, d)), "B": rng.standard_normal(d), "S": np.ones(d)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "B"], ["a"]),
             helper.make_node("LayerNormalization", ["a", "S"], ["y"], axis=-1, epsilon=1e-5)]
    model = make_model(nodes, [("x", DOUBLE, [1, 4, d])], [("y", DOUBLE, [1, 4, d])], inits, opset=17)
    assert verify.compare(model, model, provider="cpu").passed
    res = _verify_cli(tmp_path, model, _perturbed(model, "W", 10))
    assert res.exit_code == 1 and "error: output 'y' differs" in res.output


def _embedding_layernorm(rng, elem):
    """Token embeddings (mean 100, spread 1) and a layer norm: a weight's change reaches the
    outputs at 100 times its size relative to them, and token ids give the original no input
    rounding to hide it in."""
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    d = 16
    table = (100 + rng.standard_normal((20, d))).astype(np_type)
    inits = {"table": table, "S": np.ones(d, np_type), "B": np.zeros(d, np_type)}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("LayerNormalization", ["e", "S", "B"], ["y"], axis=-1, epsilon=1e-5)]
    return make_model(nodes, [helper.make_tensor_value_info("ids", INT64, [1, 12])],
                      [helper.make_tensor_value_info("y", elem, [1, 12, d])], inits, opset=17)


def test_verify_fails_a_weight_perturbed_by_1e3_float16(tmp_path, rng):
    """float16 has 11 significant bits: 1e-3 relative is one or two ulps of the weight, the size of
    float16 rounding itself. It shows where the weight is large against the outputs it feeds."""
    model = _embedding_layernorm(rng, FLOAT16)
    perturbed = _perturbed(model, "table", 3)
    assert onnx.numpy_helper.to_array(perturbed.graph.initializer[0]).flat[3] != \
        onnx.numpy_helper.to_array(model.graph.initializer[0]).flat[3]
    assert verify.compare(model, model, provider="cpu").passed
    res = _verify_cli(tmp_path, model, perturbed)
    assert res.exit_code == 1 and "error: output 'y' differs" in res.output


def _one_ulp_up(model, name, index):
    """A copy of ``model`` with element ``index`` of bfloat16 initializer ``name`` moved to the
    next representable bfloat16 value: exactly one ulp, the smallest change the type holds."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    t = next(t for t in out.graph.initializer if t.name == name)
    arr = onnx.numpy_helper.to_array(t).copy()
    bits = arr.view(np.uint16)
    assert float(arr.flat[index]) > 0
    bits.flat[index] += 1   # a positive value's next bfloat16 up
    t.CopyFrom(onnx.numpy_helper.from_array(arr, name))
    return out


def test_verify_bfloat16_cannot_hold_a_1e3_change_and_fails_a_one_ulp_change(tmp_path, rng):
    """bfloat16 keeps 8 significant bits: neighbouring values are 2^-8 to 2^-7 apart relative to
    them, so a 1e-3 relative change (below half that spacing, 2^-9 = 1.95e-3) rounds back to the
    same bytes for every weight, and the "perturbed" model is the model itself: it passes, as it
    must. The self-test for bfloat16 is therefore a change of exactly one ulp (the next
    representable value, 2^-8 to 2^-7 relative), the smallest change the type can hold: verify
    fails it. onnxruntime's CPU provider runs Gather and LayerNormalization in bfloat16 (not Add,
    Mul, MatMul or Conv)."""
    model = _embedding_layernorm(rng, BFLOAT16)
    table = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "table"))
    wide = table.astype(np.float64)
    assert np.array_equal((wide * 1.001).astype(table.dtype).view(np.uint16), table.view(np.uint16))
    same = _perturbed(model, "table", 3)
    assert same.SerializeToString() == model.SerializeToString()
    assert _verify_cli(tmp_path, model, same).exit_code == 0
    one_ulp = _one_ulp_up(model, "table", 3)
    moved = onnx.numpy_helper.to_array(next(t for t in one_ulp.graph.initializer if t.name == "table"))
    changed = np.flatnonzero(moved.view(np.uint16) != table.view(np.uint16))
    assert changed.tolist() == [3]
    step = float(moved.flat[3]) / float(table.flat[3]) - 1
    assert 2 ** -8 <= step <= 2 ** -7, step
    res = _verify_cli(tmp_path, model, one_ulp)
    assert res.exit_code == 1 and "error: output 'y' differs" in res.output


def test_real_inputs_run_alone_and_are_named_so(tmp_path):
    model = _embedding_and_features()
    np.savez(tmp_path / "in.npz", ids=np.zeros((1, 6), np.int64), x=np.ones((1, 6, 4), np.float32))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    res = CliRunner().invoke(cli, ["verify", str(path), str(path), "--provider", "cpu", "--inputs",
                                   str(tmp_path / "in.npz"), "-v"])
    assert res.exit_code == 0, res.output
    assert "seed 0, inputs from file; inputs" in res.output and "on inputs from file" in res.output


def test_sensitivity_is_not_taken_from_a_model_that_is_not_deterministic():
    """Dropout in training mode moves outputs between two runs: what moved with the inputs is
    not rounding, and must not widen the bound."""
    d = 16
    norm = _decomposed_layernorm("x", "n", "eps")
    inits = {"eps": np.asarray(1e-5, np.float32), "ratio": np.asarray(0.5, np.float32), "train": np.asarray(True)}
    dropout = make_model(norm + [helper.make_node("Dropout", ["n", "ratio", "train"], ["y"])],
                         [("x", FLOAT, [1, 4, d])], [("y", FLOAT, [1, 4, d])], inits, opset=13)
    plain = make_model(norm + [helper.make_node("Identity", ["n"], ["y"])],
                       [("x", FLOAT, [1, 4, d])], [("y", FLOAT, [1, 4, d])], {"eps": inits["eps"]}, opset=13)
    choice = verify.select_provider("cpu")
    offset = [s.kind for s in verify.reference_outputs(plain, choice=choice).sets].index(OFFSET)
    assert np.min(verify.reference_outputs(plain, choice=choice).sensitivity[offset]["y"]) > 1e-5  # x - mean at 1000
    assert all(np.all(s["y"] == 0.0) for s in verify.reference_outputs(dropout, choice=choice).sensitivity)

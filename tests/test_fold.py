"""Verification inside fold: a wrong rewrite is caught, localized, rolled back."""
import numpy as np
import pytest
from onnx import helper

from helpers import FLOAT, assert_equivalent, make_model, op_counts
from normopt.errors import VerificationError
from normopt.fold import FoldOptions, optimize
from normopt.passes.fold_batchnorm import FoldBatchNorm
from normopt.registry import _PASSES, register_pass

BROKEN = "test-broken-fold"


@pytest.fixture
def broken_pass():
    """fold-batchnorm, except that it corrupts the folded bias of the node named 'bn2'."""

    @register_pass(BROKEN)
    class BrokenFold(FoldBatchNorm):
        """Test only: a fold that is wrong at bn2."""

        def rewrite(self, m, ctx):
            if m["bn"].name == "bn2":
                m.values["t"] = m.values["t"] + 0.5   # the folded bias is b * s + t
            return super().rewrite(m, ctx)

    yield BROKEN
    del _PASSES[BROKEN]


INVALID = "test-invalid-fold"


@pytest.fixture
def invalid_pass():
    """fold-batchnorm, except that the Conv it writes for 'bn2' has group=3 (4 channels):
    a model onnxruntime cannot run."""

    @register_pass(INVALID)
    class InvalidFold(FoldBatchNorm):
        """Test only: a fold that writes an invalid Conv at bn2."""

        def rewrite(self, m, ctx):
            nodes = super().rewrite(m, ctx)
            if m["bn"].name == "bn2":
                nodes[0].attrs["group"] = 3
            return nodes

    yield INVALID
    del _PASSES[INVALID]


def conv_bn_chain(rng, layers=3, c=4):
    nodes, inits, x = [], {}, "x"
    for i in range(1, layers + 1):
        inits.update({f"w{i}": rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.3,
                      f"g{i}": rng.uniform(0.5, 1.5, c).astype(np.float32), f"b{i}": rng.standard_normal(c).astype(np.float32),
                      f"m{i}": rng.standard_normal(c).astype(np.float32), f"v{i}": rng.uniform(0.5, 2, c).astype(np.float32)})
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"bn{i}"),
                  helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    return make_model(nodes, [("x", FLOAT, [1, c, 6, 6])], [(x, FLOAT, [1, c, 6, 6])], inits, opset=15)


def test_optimize_wrong_rewrite_is_localized_and_rolled_back(rng, broken_pass):
    model = conv_bn_chain(rng)
    result = optimize(model, FoldOptions(passes=[broken_pass], provider="cpu"))
    assert result.verified
    assert [(r.anchor, r.output) for r in result.rollbacks] == [("bn2", "n2")]
    assert op_counts(result.model) == {"Conv": 3, "BatchNormalization": 1, "Relu": 3}
    skipped = result.pipeline.passes[0].skipped
    assert len(skipped) == 1 and skipped[0].node == "bn2" and skipped[0].reason.startswith("rolled back")
    assert_equivalent(model, result.model)


def _nan_everywhere(model):
    """``model`` whose only output is Sqrt(out - 1e6): NaN on every input verification makes."""
    out = model.graph.output[0].name
    model.graph.node.extend([helper.make_node("Sub", [out, "far"], ["below"]),
                             helper.make_node("Sqrt", ["below"], ["nan"])])
    model.graph.initializer.append(helper.make_tensor("far", FLOAT, [], [1e6]))
    model.graph.output[0].name = "nan"
    return model


def test_an_output_nan_everywhere_proves_nothing_each_rewrite_is_compared_at_its_own_output(rng, broken_pass):
    # NaN = NaN on every element: before, the broken fold passed verification behind it.
    model = _nan_everywhere(conv_bn_chain(rng))
    result = optimize(model, FoldOptions(passes=[broken_pass], provider="cpu"))
    assert result.verified and [(r.anchor, r.output) for r in result.rollbacks] == [("bn2", "n2")]
    assert op_counts(result.model) == {"Conv": 3, "BatchNormalization": 1, "Relu": 3, "Sub": 1, "Sqrt": 1}
    assert "compared at their own outputs" in result.verification.outputs[0].note
    good = optimize(_nan_everywhere(conv_bn_chain(rng)), FoldOptions(passes=["fold-batchnorm"], provider="cpu"))
    assert good.verified and not good.rollbacks and "BatchNormalization" not in op_counts(good.model)


def test_optimize_strict_makes_rollback_an_error(rng, broken_pass):
    with pytest.raises(VerificationError, match="rolled back"):
        optimize(conv_bn_chain(rng), FoldOptions(passes=[broken_pass], provider="cpu", strict=True))


def test_optimize_correct_rewrites_verify_without_rollback(rng):
    model = conv_bn_chain(rng)
    result = optimize(model, FoldOptions(passes=["fold-batchnorm"], provider="cpu"))
    assert result.verified and not result.rollbacks
    assert op_counts(result.model) == {"Conv": 3, "Relu": 3}
    assert result.verification.provider == "cpu"


def test_optimize_no_verify_returns_unverified_result(rng, broken_pass):
    result = optimize(conv_bn_chain(rng), FoldOptions(passes=[broken_pass], verify=False))
    assert result.verification is None and not result.rollbacks
    assert op_counts(result.model) == {"Conv": 3, "Relu": 3}


def test_optimize_rolls_back_when_onnxruntime_cannot_run_the_rewritten_model(rng, invalid_pass):
    """A rewrite that leaves a model onnxruntime cannot run (a bug in a pass) costs the run its
    rewrites, not its result: every rewrite is rolled back with onnxruntime's reason, and the
    output is the verified original."""
    model = conv_bn_chain(rng)
    result = optimize(model, FoldOptions(passes=[invalid_pass], provider="cpu"))
    assert result.verified
    assert sorted(r.anchor for r in result.rollbacks) == ["bn1", "bn2", "bn3"]
    assert all(r.reason.startswith("the rewritten model failed in onnxruntime: failed to run the model")
               for r in result.rollbacks), result.rollbacks
    assert op_counts(result.model) == op_counts(model)
    assert_equivalent(model, result.model)
    with pytest.raises(VerificationError, match="rolled back"):
        optimize(model, FoldOptions(passes=[invalid_pass], provider="cpu", strict=True))


def _layernorm_in_a_branch(threshold: float):
    """y = If(max(x) > threshold, then: a decomposed LayerNorm of x, else: x)."""
    from onnx import TensorProto, numpy_helper
    d = 8
    body = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]), helper.make_node("Sub", ["x", "m"], ["c"]),
            helper.make_node("Mul", ["c", "c"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["v"], axes=[-1]),
            helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
            helper.make_node("Div", ["c", "s"], ["yt"])]
    then = helper.make_graph(body, "then", [], [helper.make_tensor_value_info("yt", TensorProto.FLOAT, [2, 4, d])],
                             [numpy_helper.from_array(np.array(1e-5, np.float32), "eps")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["ye"])], "else", [],
                              [helper.make_tensor_value_info("ye", TensorProto.FLOAT, [2, 4, d])])
    nodes = [helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
             helper.make_node("Greater", ["mx", "limit"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    return make_model(nodes, [("x", FLOAT, [2, 4, d])], [("y", FLOAT, [2, 4, d])],
                      {"limit": np.array(threshold, np.float32)}, opset=17)


def test_a_rewrite_in_a_branch_the_verification_inputs_never_take_is_rolled_back():
    """Matching outputs prove nothing of a branch that never ran: its rewrite is not kept."""
    model = _layernorm_in_a_branch(1e4)
    result = optimize(model, FoldOptions(passes=["fuse-layernorm"], provider="cpu"))
    assert result.verified and [(r.anchor, r.graph) for r in result.rollbacks] == [("Div(yt)", "/branch.then_branch")]
    assert "then_branch of branch never ran on the verification inputs" in result.rollbacks[0].reason
    assert op_counts(result.model) == op_counts(model)
    taken = _layernorm_in_a_branch(-1e4)
    result = optimize(taken, FoldOptions(passes=["fuse-layernorm"], provider="cpu"))
    assert result.verified and not result.rollbacks and len(result.pipeline.applied) == 1


def test_a_rewrite_in_a_loop_body_that_never_runs_is_rolled_back():
    """A Loop whose trip count is 0 on every input set never runs its body: its rewrite is not
    proven, and is rolled back."""
    from onnx import TensorProto, numpy_helper
    d = 8
    body_nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                  helper.make_node("ReduceMean", ["h_in"], ["m"], axes=[-1]), helper.make_node("Sub", ["h_in", "m"], ["c"]),
                  helper.make_node("Mul", ["c", "c"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["v"], axes=[-1]),
                  helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
                  helper.make_node("Div", ["c", "s"], ["h_out"])]
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [2, 4, d])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [2, 4, d])],
        [numpy_helper.from_array(np.array(1e-5, np.float32), "eps")])
    nodes = [helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
             helper.make_node("Greater", ["mx", "limit"], ["big"]),
             helper.make_node("Cast", ["big"], ["trips"], to=TensorProto.INT64),
             helper.make_node("Loop", ["trips", "", "x"], ["y"], name="repeat", body=body)]
    model = make_model(nodes, [("x", FLOAT, [2, 4, d])], [("y", FLOAT, [2, 4, d])],
                       {"limit": np.array(1e4, np.float32)}, opset=17)
    result = optimize(model, FoldOptions(passes=["fuse-layernorm"], provider="cpu"))
    assert result.verified and [(r.anchor, r.graph) for r in result.rollbacks] == [("Div(h_out)", "/repeat.body")]
    assert "body of repeat never ran on the verification inputs" in result.rollbacks[0].reason


def _layernorm_nodes(x, y, p):
    return [helper.make_node("ReduceMean", [x], [p + "mu"], axes=[-1]), helper.make_node("Sub", [x, p + "mu"], [p + "d"]),
            helper.make_node("Mul", [p + "d", p + "d"], [p + "sq"]),
            helper.make_node("ReduceMean", [p + "sq"], [p + "var"], axes=[-1]),
            helper.make_node("Add", [p + "var", "eps"], [p + "ve"]), helper.make_node("Sqrt", [p + "ve"], [p + "sd"]),
            helper.make_node("Div", [p + "d", p + "sd"], [y])]


def _if_layernorm(out):
    """out = If(sum(x) > -1e9) then LayerNorm(x) else x: the then branch always runs."""
    then = helper.make_graph(_layernorm_nodes("x", "t_out", "t_"), "then", [],
                             [helper.make_tensor_value_info("t_out", FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e_out"])], "else", [],
                              [helper.make_tensor_value_info("e_out", FLOAT, None)])
    return [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "lo"], ["c"]),
            helper.make_node("If", ["c"], [out], then_branch=then, else_branch=other)]


def _nan_of(t, out):
    """out = Sqrt(-(t^2 + 1)): NaN everywhere."""
    return [helper.make_node("Mul", [t, t], [t + "_sq"]), helper.make_node("Add", [t + "_sq", "one"], [t + "_sq1"]),
            helper.make_node("Neg", [t + "_sq1"], [t + "_neg"]), helper.make_node("Sqrt", [t + "_neg"], [out])]


_NAN_INITS = {"eps": np.asarray(1e-5, np.float32), "one": np.asarray(1.0, np.float32), "lo": np.asarray(-1e9, np.float32)}


def test_a_rewrite_in_an_if_branch_beside_an_unrelated_nan_output_is_kept():
    """y2 = Sqrt(-(x^2 + 1)) is NaN everywhere and reads neither LayerNorm: the top-level one is
    proven at its own output, the one in the If branch does not reach y2. Both were rolled back
    as 'could not be traced to one rewrite'."""
    d = 8
    nodes = [*_if_layernorm("y1"), *_nan_of("x", "y2"), *_layernorm_nodes("x", "y3", "b_")]
    model = make_model(nodes, [("x", FLOAT, ["N", 4, d])],
                       [("y1", FLOAT, ["N", 4, d]), ("y2", FLOAT, ["N", 4, d]), ("y3", FLOAT, ["N", 4, d])], _NAN_INITS)
    result = optimize(model, FoldOptions(passes=["fuse-layernorm"], provider="cpu", strict=True))
    assert result.verified and not result.rollbacks and len(result.pipeline.passes[0].applied) == 2
    assert "compared at their own outputs" in next(o for o in result.verification.outputs if o.name == "y2").note


def test_one_ulp_run_to_run_noise_in_a_large_part_keeps_the_sensitivity_term():
    """y2 joins a part near 1000 that moves by about an ulp between runs with a part near 1.
    The change, one number, was held against the small part's magnitude term: the model counted
    as not deterministic, lost its sensitivity term, and a correct LayerNorm fusion was rolled back."""
    d = 8
    nodes = [*_layernorm_nodes("x", "y1", "a_"),
             helper.make_node("RandomUniformLike", ["x"], ["u"], low=0.0, high=1e-4),
             helper.make_node("Add", ["u", "k"], ["big"]), helper.make_node("Concat", ["big", "x"], ["y2"], axis=1)]
    model = make_model(nodes, [("x", FLOAT, ["N", 4, d])], [("y1", FLOAT, ["N", 4, d]), ("y2", FLOAT, ["N", 8, d])],
                       {"eps": np.asarray(1e-5, np.float32), "k": np.asarray(1000.0, np.float32)})
    result = optimize(model, FoldOptions(passes=["fuse-layernorm"], provider="cpu"))
    assert result.verified and not result.rollbacks and result.pipeline.passes[0].applied


def test_a_rewrite_in_an_if_branch_behind_a_nan_output_only_is_rolled_back():
    """The If branch's LayerNorm feeds only y2, NaN everywhere: nothing can prove it."""
    d = 8
    nodes = [*_if_layernorm("t"), *_nan_of("t", "y2"), helper.make_node("Relu", ["x"], ["y1"])]
    model = make_model(nodes, [("x", FLOAT, ["N", 4, d])], [("y1", FLOAT, ["N", 4, d]), ("y2", FLOAT, ["N", 4, d])],
                       _NAN_INITS)
    result = optimize(model, FoldOptions(passes=["fuse-layernorm"], provider="cpu"))
    assert len(result.rollbacks) == 1 and "it could not be compared" in result.rollbacks[0].reason
    assert result.verified and not result.pipeline.passes[0].applied

"""The verifier: providers, inputs, tolerances, comparison."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import FLOAT, INT64, make_model
from normopt import inputs, providers, verify
from normopt.errors import ProviderUnavailableError, UsageError


def _relu_model(shape=(2, 3), scale=1.0):
    inits = {"k": np.asarray([scale], np.float32)}
    return make_model([helper.make_node("Mul", ["x", "k"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                      [("x", FLOAT, list(shape))], [("y", FLOAT, list(shape))], inits, opset=13)


def test_verify_same_model_passes_on_cpu():
    model = _relu_model()
    report = verify.compare(model, model, provider="cpu")
    assert report.passed and report.provider == "cpu"
    assert report.outputs[0].max_abs == 0.0


def test_verify_different_model_fails_and_names_output():
    report = verify.compare(_relu_model(), _relu_model(scale=1.001), provider="cpu")
    assert not report.passed
    assert report.failures[0].name == "y"
    assert 0 < report.failures[0].mismatched <= 1


def test_verify_auto_reports_cpu_with_reason_when_cuda_unusable():
    choice = providers.select_provider("auto")
    if choice.name == "cuda":
        pytest.skip("CUDA is usable here")
    assert choice.note  # says why CUDA was not used
    with pytest.raises(ProviderUnavailableError, match="CUDA provider requested but not usable"):
        providers.select_provider("cuda")


@pytest.mark.gpu
def test_verify_cuda_really_in_use_with_tf32_off():
    choice = providers.select_provider("cuda")
    assert choice.name == "cuda" and choice.tf32 is False
    report = verify.compare(_relu_model(), _relu_model(), provider="cuda")
    assert report.passed and report.provider == "cuda"


def test_compare_arrays_nan_inf_positions():
    ref = np.array([1.0, np.nan, np.inf, -np.inf], np.float32)
    assert verify.compare_arrays("o", ref, ref.copy()).passed
    moved = np.array([np.nan, 1.0, np.inf, -np.inf], np.float32)
    assert not verify.compare_arrays("o", ref, moved).passed
    flipped = np.array([1.0, np.nan, -np.inf, -np.inf], np.float32)
    assert not verify.compare_arrays("o", ref, flipped).passed


def test_compare_arrays_combined_tolerance_near_zero():
    ref = np.array([0.0, 1e-8, 100.0], np.float32)
    got = ref + np.array([5e-6, 5e-6, 5e-3], np.float32)
    d = verify.compare_arrays("o", ref, got)
    assert d.passed  # atol covers the zeros, rtol the large value
    assert d.max_abs == pytest.approx(5e-3, rel=1e-2)
    assert not verify.compare_arrays("o", ref, got, atol=1e-7, rtol=1e-6).passed


def test_compare_arrays_fp32_diff_filed_as_bug_upstream_is_within_tolerance():
    # onnx/optimizer#255: max_abs 3.8e-6, max_rel 2.8e-7 after folding: a correct fold.
    ref = np.full(16, 13.6, np.float32)
    assert verify.compare_arrays("o", ref, ref + np.float32(3.8e-6)).passed


def test_compare_arrays_shape_and_dtype_mismatch_fail():
    a = np.zeros((2, 3), np.float32)
    assert "shape" in verify.compare_arrays("o", a, np.zeros((3, 2), np.float32)).problem
    assert "dtype" in verify.compare_arrays("o", a, np.zeros((2, 3), np.float64)).problem


def test_compare_arrays_dtype_aware_defaults():
    assert verify.tolerance(np.float16) > verify.tolerance(np.float32)
    assert verify.tolerance(np.int64) == (0.0, 0.0)
    ints = np.array([1, 2, 3])
    assert not verify.compare_arrays("o", ints, ints + np.array([0, 0, 1])).passed


def _embedding_model():
    table = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    return make_model([helper.make_node("Gather", ["table", "ids"], ["y"])],
                      [helper.make_tensor_value_info("ids", INT64, ["batch", "seq"])],
                      [helper.make_tensor_value_info("y", FLOAT, ["batch", "seq", 4])], {"table": table}, opset=13)


def test_feeds_dynamic_dims_and_integer_ranges_inferred():
    feeds, specs = inputs.make_feeds(_embedding_model(), seed=0)
    ids = feeds["ids"]
    assert ids.shape == (inputs.DEFAULT_BATCH, inputs.DEFAULT_DYNAMIC_DIM)
    assert ids.min() >= 0 and ids.max() < 50
    assert "embedding index" in specs[0].source


def test_feeds_user_shapes_and_ranges():
    shapes = inputs.parse_shapes(["ids:2x5"])
    ranges = inputs.parse_ranges(["ids:3:4"])
    feeds, specs = inputs.make_feeds(_embedding_model(), seed=0, shapes=shapes, ranges=ranges)
    assert feeds["ids"].shape == (2, 5) and (feeds["ids"] == 3).all()
    assert specs[0].shape == [2, 5]


def test_dynamic_and_integer_model_verifies_without_flags():
    model = _embedding_model()
    assert verify.compare(model, model, provider="cpu").passed


def test_feeds_same_seed_same_inputs_and_npz(tmp_path):
    a, _ = inputs.make_feeds(_embedding_model(), seed=7)
    b, _ = inputs.make_feeds(_embedding_model(), seed=7)
    assert np.array_equal(a["ids"], b["ids"])
    np.savez(tmp_path / "in.npz", ids=np.array([[1, 2, 3]], np.int64))
    c, specs = inputs.make_feeds(_embedding_model(), seed=0, npz=str(tmp_path / "in.npz"))
    assert c["ids"].tolist() == [[1, 2, 3]] and "file" in specs[0].source


@pytest.mark.parametrize("bad", ["ids", "ids:", ":1x2", "ids:1xa", "ids:-1x2"])
def test_parse_shapes_rejects_malformed(bad):
    with pytest.raises(UsageError, match="--input-shape"):
        inputs.parse_shapes([bad])


@pytest.mark.parametrize("bad", ["ids:1", "ids:5:1", "ids:a:b"])
def test_parse_ranges_rejects_malformed(bad):
    with pytest.raises(UsageError, match="--input-range"):
        inputs.parse_ranges([bad])


def test_feeds_unknown_input_name_is_usage_error():
    with pytest.raises(UsageError, match="no input 'nope'"):
        inputs.make_feeds(_embedding_model(), seed=0, shapes={"nope": [1]})


def test_trials_use_several_seeds():
    model = _relu_model()
    report = verify.compare(model, model, provider="cpu", trials=3, seed=5)
    assert report.trials == 3 and report.passed


def test_different_interfaces_are_usage_errors():
    other = make_model([helper.make_node("Relu", ["x"], ["z"])], [("x", FLOAT, [2, 3])], [("z", FLOAT, [2, 3])], opset=13)
    with pytest.raises(UsageError, match="different outputs"):
        verify.compare(_relu_model(), other, provider="cpu")


def test_expose_intermediate_outputs_compares_them():
    model = _relu_model()
    report = verify.compare(model, model, provider="cpu", extra_outputs=["m"])
    assert [o.name for o in report.outputs] == ["y", "m"]


def test_tolerance_follows_the_narrowest_compute_dtype():
    fp16_inside = make_model([helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
                              helper.make_node("Relu", ["h"], ["r"]),
                              helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)],
                             [("x", FLOAT, [4])], [("y", FLOAT, [4])], opset=13)
    assert verify.compute_dtype(fp16_inside) == "float16"
    assert verify.compute_dtype(_relu_model()) == "float32"
    ref = np.ones(4, np.float32)
    assert verify.compare_arrays("y", ref, ref + 1e-3, compute="float16").passed  # fp16 rounding
    assert not verify.compare_arrays("y", ref, ref + 1e-3, compute="float32").passed
    assert verify.tolerance(np.float32, atol=1e-6, compute="float16")[0] == 1e-6  # explicit wins


def test_dynamic_spatial_dims_too_small_for_the_model_are_retried_larger():
    w = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"])],
                       [helper.make_tensor_value_info("x", FLOAT, ["n", 3, "h", "w"])],
                       [helper.make_tensor_value_info("y", FLOAT, ["n", 2, "oh", "ow"])], {"w": w}, opset=13)
    report = verify.compare(model, model, provider="cpu")  # a 16x16 kernel cannot run on 8x8
    assert report.passed and report.inputs[0].shape == [inputs.DEFAULT_BATCH, 3, 32, 32]
    with pytest.raises(verify.ModelRunError, match="--input-shape"):
        verify.compare(model, model, provider="cpu", input_shapes={"x": [1, 3, 8, 8]})


def _decoder_with_past(mask_dim):
    """past [b, past, 4] ++ new [b, seq, 4] along time, times the attention mask [b, mask_dim]: the
    mask must be past + seq long (HF decoder-with-past exports)."""
    return make_model([helper.make_node("Concat", ["past", "new"], ["kv"], axis=1),
                       helper.make_node("Unsqueeze", ["mask", "axes"], ["m3"]),
                       helper.make_node("Cast", ["m3"], ["mf"], to=FLOAT),
                       helper.make_node("Mul", ["kv", "mf"], ["y"])],
                      [helper.make_tensor_value_info("past", FLOAT, ["batch_size", "past_sequence_length", 4]),
                       helper.make_tensor_value_info("new", FLOAT, ["batch_size", "sequence_length", 4]),
                       helper.make_tensor_value_info("mask", INT64, ["batch_size", mask_dim])],
                      [helper.make_tensor_value_info("y", FLOAT, ["batch_size", mask_dim, 4])],
                      {"axes": np.asarray([2], np.int64)}, opset=13)


@pytest.mark.parametrize("mask_dim, length", [
    ("past_sequence_length + sequence_length", 2 * inputs.DEFAULT_DYNAMIC_DIM),  # a sum of the two sizes
    ("past_sequence_length + 1", 2),  # holds for one new token only: every dynamic dim at 1
])
def test_attention_mask_dim_named_as_a_sum_verifies(mask_dim, length):
    report = verify.compare(_decoder_with_past(mask_dim), _decoder_with_past(mask_dim), provider="cpu")
    assert report.passed
    assert [s.shape for s in report.inputs][2] == [inputs.DEFAULT_BATCH, length]


def _layernorm_over(axes):
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=axes), helper.make_node("Sub", ["x", "mu"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["d2"]), helper.make_node("ReduceMean", ["d2"], ["var"], axes=axes),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", FLOAT, ["batch", 8, 16])],
                      [helper.make_tensor_value_info("y", FLOAT, ["batch", 8, 16])],
                      {"eps": np.asarray(1e-5, np.float32)}, opset=13)


def test_statistics_taken_across_the_batch_differ_at_the_default_batch_of_two():
    # Over [0, -1] and over [-1] are the same at a batch of 1.
    report = verify.compare(_layernorm_over([-1]), _layernorm_over([0, -1]), provider="cpu")
    assert not report.passed and report.inputs[0].shape == [2, 8, 16]
    assert verify.compare(_layernorm_over([-1]), _layernorm_over([0, -1]), provider="cpu",
                          input_shapes={"x": [1, 8, 16]}).passed


def test_a_model_that_runs_only_at_batch_one_is_verified_at_batch_one():
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                       [helper.make_tensor_value_info("x", FLOAT, ["batch", 8, 4])],
                       [helper.make_tensor_value_info("y", FLOAT, [1, 32])],
                       {"shape": np.asarray([1, 32], np.int64)}, opset=13)
    report = verify.compare(model, model, provider="cpu")
    assert report.passed and report.inputs[0].shape == [1, 8, 4]


def _beside_nan(k):
    """y = x * k beside z = Sqrt(x - 1e6): NaN everywhere on generated inputs."""
    nodes = [helper.make_node("Mul", ["x", "k"], ["y"]), helper.make_node("Sub", ["x", "far"], ["b"]),
             helper.make_node("Sqrt", ["b"], ["z"]), helper.make_node("Mul", ["z", "k"], ["w"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", FLOAT, [2, 4])],
                      [helper.make_tensor_value_info("y", FLOAT, [2, 4]), helper.make_tensor_value_info("w", FLOAT, [2, 4])],
                      {"k": np.asarray(k, np.float32), "far": np.asarray(1e6, np.float32)}, opset=13)


def test_an_output_nan_everywhere_is_not_compared_even_beside_a_finite_one():
    report = verify.compare(_beside_nan(1.0), _beside_nan(1.0), provider="cpu")
    assert [o.name for o in report.failures] == ["w"] and report.failures[0].problem == verify.NOTHING_FINITE


def _two_input_model():
    model = make_model([helper.make_node("Gather", ["table", "ids"], ["g"]), helper.make_node("Add", ["g", "x"], ["y"])],
                       [helper.make_tensor_value_info("ids", INT64, [1, 3]),
                        helper.make_tensor_value_info("x", FLOAT, [1, 3, 4])],
                       [helper.make_tensor_value_info("y", FLOAT, [1, 3, 4])],
                       {"table": np.zeros((50, 4), np.float32)}, opset=13)
    return model


@pytest.mark.parametrize("arrays, message", [
    (dict(ids=np.array([[1, 2, 3]])), "no array for input(s) x"),
    (dict(ids=np.array([[1, 2, 3]]), x=np.zeros((1, 3, 4)), idz=np.zeros(1)), "model has no input(s) idz"),
    (dict(ids=np.array([["a", "b", "c"]]), x=np.zeros((1, 3, 4))), "array 'ids' is <U1, the model expects int64"),
    (dict(ids=np.array([[1.5, 2, 3]]), x=np.zeros((1, 3, 4))), "array 'ids' is float64, the model expects int64"),
])
def test_feeds_npz_missing_unknown_or_wrong_kind_is_usage_error(tmp_path, arrays, message):
    np.savez(tmp_path / "in.npz", **arrays)
    with pytest.raises(UsageError) as err:
        inputs.make_feeds(_two_input_model(), seed=0, npz=str(tmp_path / "in.npz"))
    assert message in str(err.value)


def test_feeds_npz_float64_is_cast_to_the_input_dtype(tmp_path):
    np.savez(tmp_path / "in.npz", ids=np.array([[1, 2, 3]], np.int32), x=np.ones((1, 3, 4)))
    feeds, _ = inputs.make_feeds(_two_input_model(), seed=0, npz=str(tmp_path / "in.npz"))
    assert feeds["x"].dtype == np.float32 and feeds["ids"].dtype == np.int64


def test_model_without_cpu_kernels_gets_a_provider_hint():
    bf16 = make_model([helper.make_node("Sub", ["x", "x"], ["y"])], [("x", TensorProto.BFLOAT16, [4])],
                      [("y", TensorProto.BFLOAT16, [4])], opset=14)
    with pytest.raises(UsageError, match="no kernel for one of its ops .* --no-verify"):
        verify.compare(bf16, bf16, provider="cpu")


def test_an_opset_newer_than_onnxruntimes_says_which_in_one_line():
    """onnxruntime's reason comes after a disclaimer longer than the message keeps."""
    import onnxruntime as ort
    newest = onnx.defs.onnx_opset_version()
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [4])], [("y", FLOAT, [4])],
                       opset=newest, ir_version=10)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        pytest.skip(f"this onnxruntime runs opset {newest}")
    except Exception as err:
        if "under development" not in str(err):
            pytest.skip(f"onnxruntime refuses it otherwise: {err}")
    with pytest.raises(UsageError, match=rf"opset {newest} of ai.onnx is newer than it supports \(\d+\); "
                                         r"use --no-verify, or export at opset \d+ or lower$"):
        verify.compare(model, model, provider="cpu")


@pytest.mark.parametrize("content", [b"garbage", b"PK\x03\x04garbage"], ids=["not_zip", "broken_zip"])
def test_feeds_npz_that_is_no_npz_is_usage_error(tmp_path, content):
    (tmp_path / "in.npz").write_bytes(content)
    with pytest.raises(UsageError, match="not an .npz file"):
        inputs.make_feeds(_two_input_model(), seed=0, npz=str(tmp_path / "in.npz"))


def test_sessions_prepack_weights_only_where_that_costs_less(tmp_path, monkeypatch):
    """onnxruntime's prepacking costs time and memory per weight byte; going without costs
    session time per squared node (120,000 nodes: minutes). Each verification session takes the
    cheaper: a long chain of small weights prepacks, a few large weights do not."""
    from onnx import numpy_helper
    from normopt import verify

    def chain(n, width):
        nodes = [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(n)]
        inits = [numpy_helper.from_array(np.eye(width, dtype=np.float32), f"w{i}") for i in range(n)]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h0", FLOAT, [1, width])],
                                  [helper.make_tensor_value_info(f"h{n}", FLOAT, [1, width])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    many_small, few_large = chain(3000, 8), chain(2, 2048)
    assert verify.prepack_pays(many_small) and not verify.prepack_pays(few_large)
    assert verify.prepack_pays(verify.Loaded("m.onnx", many_small))
    onnx.save(many_small, tmp_path / "m.onnx")
    assert not verify.prepack_pays(str(tmp_path / "m.onnx"))   # a path alone: its nodes are not read
    seen = []
    real = verify.session_options
    monkeypatch.setattr(verify, "session_options", lambda prepack=False: seen.append(prepack) or real(prepack))
    x = {"h0": np.ones((1, 2048), np.float32)}
    out = verify.run_model(few_large, [x], "cpu")
    assert seen == [False] and np.allclose(out[0]["h2"], x["h0"])


def test_a_model_without_outputs_has_nothing_to_compare():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", FLOAT, [1, 2])], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(UsageError, match="the model has no outputs: there is nothing to compare"):
        verify.compare(model, model, provider="cpu")


def test_a_scalar_float_input_verifies_through_every_input_set(tmp_path, rng):
    """A rank-0 float input (a Clip bound, a temperature) is fed as a 0-d array in every input
    set: numpy's arithmetic on a 0-d array gives a scalar, which onnxruntime refuses (the offset
    set and the ulp-moved inputs were such scalars). A LayerNorm scaled by one folds, verified."""
    from click.testing import CliRunner
    from normopt.cli import cli

    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]), helper.make_node("Sub", ["x", "mu"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
             helper.make_node("Div", ["d", "std"], ["n"]), helper.make_node("Mul", ["n", "t"], ["y"])]
    model = make_model(nodes, [("x", FLOAT, [2, 4, 8]), ("t", FLOAT, [])], [("y", FLOAT, [2, 4, 8])],
                       {"eps": np.asarray(1e-5, np.float32)}, opset=17)
    feeds, _ = inputs.make_feeds(model, 0, kind=inputs.OFFSET)
    assert type(feeds["t"]) is np.ndarray and feeds["t"].shape == ()
    moved = verify._move_by_ulps(feeds, 0, {})
    assert type(moved["t"]) is np.ndarray and moved["t"].shape == ()
    onnx.save(model, tmp_path / "m.onnx")
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "f.onnx"), "--provider", "cpu"])
    assert res.exit_code == 0, res.output
    assert [n.op_type for n in onnx.load(tmp_path / "f.onnx").graph.node] == ["LayerNormalization", "Mul"]


def test_an_input_of_a_type_onnxruntimes_binding_cannot_take_is_one_line(tmp_path):
    """float8 and 4-bit inputs have numpy types only through ml_dtypes, which onnxruntime's
    Python binding does not convert: the run says so and names --no-verify, which folds it."""
    from click.testing import CliRunner
    from normopt.cli import cli

    model = make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                       [("x", TensorProto.FLOAT8E4M3FN, [2, 3])], [("y", FLOAT, [2, 3])], opset=19)
    onnx.save(model, tmp_path / "m.onnx")
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "f.onnx"), "--provider", "cpu"])
    assert res.exit_code == 2 and not (tmp_path / "f.onnx").exists()
    assert "input 'x' is FLOAT8E4M3FN" in res.output and "--no-verify" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "f.onnx"), "--no-verify", "-q"])
    assert res.exit_code == 0 and (tmp_path / "f.onnx").exists()


def test_a_declared_dim_of_0_is_fed_empty():
    """A dim whose value is set to 0 is an empty axis, not an unknown one: onnxruntime checks
    the fed array against it ("Got: 2 Expected: 0"). CastLike's 'like' input is often that."""
    model = make_model([helper.make_node("CastLike", ["x", "like"], ["y"])],
                       [("x", FLOAT, [2, "n"]), ("like", TensorProto.DOUBLE, [0])],
                       [("y", TensorProto.DOUBLE, [2, "n"])], opset=19)
    feeds, _ = inputs.make_feeds(model, 0)
    assert feeds["like"].shape == (0,) and feeds["x"].shape == (2, inputs.DEFAULT_DYNAMIC_DIM)
    assert verify.compare(model, model, provider="cpu").passed

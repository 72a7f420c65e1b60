"""Pipeline, registry and model-level guarantees (metadata, determinism, opset upgrade)."""
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from helpers import FLOAT, assert_equivalent, make_model, op_counts, parse_model, run_pipeline
from test_fold import conv_bn_chain
from normopt import ir, model_io, pipeline, registry
from normopt.errors import UnknownPassError
from normopt.inputs import DEGENERATE, NORMAL
from normopt.pattern import Match, Op, Var, match
from normopt.pipeline import Pass, Reject
from normopt.registry import _PASSES, register_pass

UPGRADE = "test-double-relu"


@pytest.fixture
def double_relu_pass():
    """Test only: Relu(Relu(x)) -> Relu(x), pretending its output op needs opset 17."""

    @register_pass(UPGRADE)
    class DoubleRelu(Pass):
        """Test only: drop a redundant Relu."""

        anchor_ops = ("Relu",)
        opset = 17
        pattern = Op("Relu", [Op("Relu", [Var("x")], name="inner")], name="outer")

        def match(self, node, ctx):
            m = match(self.pattern, node.outputs[0], ctx.graph)
            if m is None:
                return None
            if m.escapes(ctx.graph):
                return Reject("inner Relu output is used elsewhere")
            m.matched = [m["outer"], m["inner"]]
            return m

        def rewrite(self, m, ctx):
            return [gs.Node("Relu", m["outer"].name, {}, [m.tensors["x"]], [m.output])]

    yield UPGRADE
    del _PASSES[UPGRADE]


def relu_relu(opset=13):
    model = make_model([helper.make_node("Relu", ["x"], ["a"], name="r1"), helper.make_node("Relu", ["a"], ["y"], name="r2")],
                       [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])], opset=opset)
    model.producer_name, model.producer_version, model.doc_string = "exporter", "9.9", "a doc"
    helper.set_model_props(model, {"author": "me"})
    return model


def test_pipeline_opset_upgrade_then_rewrite(double_relu_pass):
    model = relu_relu(opset=13)
    out, result = run_pipeline(model, [double_relu_pass])
    assert pipeline.model_opset(out) == 17
    assert [(u.from_version, u.to_version) for u in result.upgrades] == [(13, 17)]
    assert op_counts(out) == {"Relu": 1}
    assert out.ir_version >= model_io.min_ir_version(17)
    assert_equivalent(model, out)


def test_pipeline_no_opset_upgrade_skips_with_reason(double_relu_pass):
    model = relu_relu(opset=13)
    out, result = run_pipeline(model, [double_relu_pass], allow_opset_upgrade=False)
    assert pipeline.model_opset(out) == 13 and op_counts(out) == {"Relu": 2}
    reasons = [s.reason for s in result.skipped]
    assert reasons == ["needs opset 17 (model has 13); opset upgrade disabled"]


def test_pipeline_keeps_model_metadata_and_interface(double_relu_pass):
    model = relu_relu(opset=17)
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    out, _ = run_pipeline(model, [double_relu_pass])
    assert (out.ir_version, out.producer_name, out.producer_version, out.doc_string) == \
        (model.ir_version, "exporter", "9.9", "a doc")
    assert [(p.key, p.value) for p in out.metadata_props] == [("author", "me")]
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 17), ("com.example", 1)]
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]


def test_pipeline_is_deterministic_and_idempotent(double_relu_pass):
    model = relu_relu(opset=17)
    first, _ = run_pipeline(model, [double_relu_pass])
    second, _ = run_pipeline(model, [double_relu_pass])
    assert model_io.serialize(first) == model_io.serialize(second)
    again, result = run_pipeline(first, [double_relu_pass])
    assert not result.modified
    assert model_io.serialize(again) == model_io.serialize(first)


def test_pipeline_escaping_intermediate_is_rejected(double_relu_pass):
    model = relu_relu(opset=17)
    model.graph.output.append(helper.make_tensor_value_info("a", FLOAT, [2, 3]))
    out, result = run_pipeline(model, [double_relu_pass])
    assert op_counts(out) == {"Relu": 2}
    assert [s.reason for s in result.skipped] == ["inner Relu output is used elsewhere"]


def test_pipeline_input_model_is_not_modified(double_relu_pass):
    model = relu_relu(opset=13)
    before = model_io.serialize(model)
    run_pipeline(model, [double_relu_pass])
    assert model_io.serialize(model) == before


def test_registry_order_and_descriptions():
    table = registry.available()
    assert list(table)[:2] == ["fold-weightnorm", "fold-batchnorm"]
    for cls in table.values():
        assert registry.describe(cls)


def test_registry_unknown_pass_message():
    with pytest.raises(UnknownPassError, match=r"unknown pass 'fold-bn'; available: .*fold-batchnorm.*see 'normopt passes'"):
        registry.resolve(["fold-bn"])


def test_registry_duplicate_name_raises():
    with pytest.raises(ValueError, match="registered twice"):
        register_pass("fold-batchnorm")(type("Again", (), {}))


def test_registry_skip_and_order():
    assert registry.resolve(None, ["fold-batchnorm"]) == [n for n in registry.available() if n != "fold-batchnorm"]


def test_passes_package_is_never_imported_bare():
    import normopt.passes  # noqa: F401
    registry.available()
    assert "passes" not in sys.modules
    assert normopt.passes.__name__ == "normopt.passes"


def test_pattern_duplicated_subexpression_and_commutative_add():
    x = Var("x")
    pat = Op("Add", [Op("Sub", [x, Var("m")]), Op("Sub", [x, Var("m")])])
    model = make_model([helper.make_node("Sub", ["x", "m"], ["d1"]), helper.make_node("Sub", ["x", "m"], ["d2"]),
                        helper.make_node("Add", ["d2", "d1"], ["y"])],
                       [("x", FLOAT, [2]), ("m", FLOAT, [2])], [("y", FLOAT, [2])], opset=13)
    graph = gs.import_onnx(model)
    m = match(pat, graph.outputs[0], graph)
    assert isinstance(m, Match) and len(m.matched) == 3


def test_pipeline_pass_error_on_one_node_becomes_a_skip():
    @register_pass("test-crashing")
    class Crashing(Pass):
        """Test only: cannot analyse Relu."""

        anchor_ops = ("Relu",)

        def match(self, node, ctx):
            raise KeyError("unexpected form")

    try:
        model = relu_relu(opset=13)
        out, result = run_pipeline(model, ["test-crashing"])
    finally:
        del _PASSES["test-crashing"]
    assert op_counts(out) == {"Relu": 2}
    assert [s.reason for s in result.skipped] == ["not analysed: KeyError: 'unexpected form'"] * 2


def test_pipeline_keeps_node_metadata_and_value_info(double_relu_pass):
    model = make_model([helper.make_node("Relu", ["x"], ["a"], name="r1"), helper.make_node("Relu", ["a"], ["b"], name="r2"),
                        helper.make_node("Sigmoid", ["b"], ["y"], name="s", doc_string="kept")],
                       [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])], opset=17)
    helper.set_metadata_props(model.graph.node[2], {"namespace": "block.act"})
    model.graph.value_info.extend([helper.make_tensor_value_info("a", FLOAT, [2, 3]),
                                   helper.make_tensor_value_info("b", FLOAT, [2, 3])])
    helper.set_metadata_props(model.graph.value_info[1], {"origin": "relu"})
    out, _ = run_pipeline(model, [double_relu_pass])
    sig = out.graph.node[-1]
    assert sig.doc_string == "kept" and [(p.key, p.value) for p in sig.metadata_props] == [("namespace", "block.act")]
    # 'a' was fused away; 'b' is kept by the rewrite with the same meaning.
    assert [vi.name for vi in out.graph.value_info] == ["b"]
    assert out.graph.value_info[0] == model.graph.value_info[1]


def _ts_group_norm(x, out, groups, scope):
    """PyTorch TorchScript's GroupNorm(affine=False) below opset 18: per-channel Mul/Add by [1, 1, 1]."""
    return f"""
        {scope}_g = Constant <value = int64[3] {{0, {groups}, -1}}> ()
        {scope}_r = Reshape ({x}, {scope}_g)
        {scope}_one = Constant <value = float[{groups}] {{{', '.join(['1.0'] * groups)}}}> ()
        {scope}_zero = Constant <value = float[{groups}] {{{', '.join(['0.0'] * groups)}}}> ()
        {scope}_n = InstanceNormalization <epsilon = 1e-5> ({scope}_r, {scope}_one, {scope}_zero)
        {scope}_s = Shape ({x})
        {scope}_b = Reshape ({scope}_n, {scope}_s)
        {scope}_w = Constant <value = float[1, 1, 1] {{1.0}}> ()
        {scope}_m = Mul ({scope}_b, {scope}_w)
        {scope}_c = Constant <value = float[1, 1, 1] {{0.0}}> ()
        {out} = Add ({scope}_m, {scope}_c)"""


def test_pipeline_opset_upgrade_keeps_shapes_after_reshape_to_shape():
    """The version converter's own value_info has unknown dims after Reshape(t, Shape(u)); the
    second GroupNorm, reading the first one's output, must still see its channel count."""
    model = parse_model(f"""
        <ir_version: 8, opset_import: ["" : 14]>
        g (float[1, 4, 2, 2] x) => (float[1, 4, 2, 2] y) {{
            {_ts_group_norm("x", "a", 2, "gn1")}
            {_ts_group_norm("a", "y", 1, "gn2")}
        }}""")
    out, result = run_pipeline(model, ["fuse-groupnorm"])
    assert [(u.from_version, u.to_version) for u in result.upgrades] == [(14, 21)]
    assert op_counts(out) == {"GroupNormalization": 2}
    assert not result.skipped
    # Not on the offset inputs: GroupNormalization-21 runs as E[x^2] - E[x]^2 there (see
    # test_fuse_groupnorm_precision_loss_at_an_offset_is_rolled_back).
    assert_equivalent(model, out, input_sets=(NORMAL, DEGENERATE))


def test_pipeline_output_is_a_fixed_point_for_typed_constants(double_relu_pass):
    shape = helper.make_tensor("", onnx.TensorProto.INT64, [2], [3, 2])  # typed field, as converters write
    shape.ClearField("name")
    model = make_model([helper.make_node("Constant", [], ["s"], value=shape),
                        helper.make_node("Reshape", ["x", "s"], ["r"]),
                        helper.make_node("Relu", ["r"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
                       [("x", FLOAT, [2, 3])], [("y", FLOAT, [3, 2])], opset=17)
    first, _ = run_pipeline(model, [double_relu_pass])
    # A node no pass touched is written as it was read: same encoding, no re-encoding drift.
    assert first.graph.node[0] == model.graph.node[0]
    second, _ = run_pipeline(first, [double_relu_pass])
    assert model_io.serialize(second) == model_io.serialize(first)
    assert_equivalent(model, first)


def test_census_and_kept_graphs_do_not_outlive_a_run(rng, monkeypatch):
    """The census cache holds no model once a fold returns; in keep mode (the command, which ends
    with os._exit) each run's graph is kept, frozen out of the cyclic collector, until released."""
    import gc

    from normopt import fold as F, model_io

    model = conv_bn_chain(rng)
    F.optimize(model, F.FoldOptions(verify=False))
    assert model_io._CENSUS == {}
    monkeypatch.setattr(pipeline, "_kept", None)
    pipeline.keep_graphs_until_exit()
    try:
        F.optimize(model, F.FoldOptions(verify=False))
        F.optimize(model, F.FoldOptions(verify=False))
        assert len(pipeline._kept) == 2 and gc.get_freeze_count() > 0
        pipeline.release_kept()
        assert pipeline._kept == [] and gc.get_freeze_count() == 0
        F.optimize(model, F.FoldOptions())   # verification frees what was kept before it runs
        assert pipeline._kept == []
    finally:
        gc.unfreeze()


MODELS = Path(__file__).parent.parent / "models"


def _reaped(pid: int) -> bool:
    import os
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="background inference forks: Linux only")
def test_background_inference_gives_the_in_process_index(rng):
    """The forked child's table (decoded there) is what in-process inference gives, entry for
    entry, element types included, and the child is reaped."""
    model = onnx.load(str(MODELS / "gpt_decoder_causal_ts_op14.onnx"))
    index = pipeline.inferred_index(model)
    in_process = pipeline.Shapes(model)
    shapes = pipeline.Shapes(model, background=True)
    pid = shapes._child.pid
    names = list(index) + ["no_such_tensor"]
    got = {name: (shapes.get(name), shapes.elem_type(name)) for name in names}
    assert shapes._complete and shapes._decoded == pipeline.infer_shapes(model)
    assert got == {name: (in_process.get(name), in_process.elem_type(name)) for name in names}
    assert sum(1 for name in index if got[name][0] is not None) > 100
    assert _reaped(pid) and shapes._child is None
    shapes.close()   # nothing left to stop


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="background inference forks: Linux only")
def test_background_inference_falls_back_in_process_when_the_child_fails(rng, monkeypatch):
    """A child that fails (here: inference raises in it) sends nothing; the parent infers itself."""
    import os

    model = conv_bn_chain(rng)
    parent, real = os.getpid(), pipeline.inferred_index
    monkeypatch.setattr(pipeline, "inferred_index",
                        lambda m: real(m) if os.getpid() == parent else 1 / 0)
    shapes = pipeline.Shapes(model, background=True)
    pid = shapes._child.pid
    expected = pipeline.infer_shapes(model)
    assert {name: shapes.get(name) for name in expected} == expected
    assert not shapes._complete and shapes._index.keys() == real(model).keys()
    assert _reaped(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="background inference forks: Linux only")
def test_background_inference_not_asked_for_is_stopped(rng):
    shapes = pipeline.Shapes(conv_bn_chain(rng), background=True)
    pid = shapes._child.pid
    shapes.close()
    assert _reaped(pid) and shapes._child is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="background inference forks: Linux only")
@pytest.mark.parametrize("name", ["gpt_decoder_causal_ts_op14.onnx", "audio_gn_ts_op13.onnx",
                                  "cnn_bn_dynamo_op18.onnx"])
def test_fold_with_background_inference_writes_the_same_bytes(name, monkeypatch):
    """The command's mode (inference in a forked child from BACKGROUND_NODES nodes on; here
    every model) changes nothing in the output."""
    from normopt import fold as F

    model = onnx.load(str(MODELS / name))
    plain = model_io.serialize(F.optimize(model, F.FoldOptions(verify=False)).model)
    monkeypatch.setattr(pipeline, "BACKGROUND_NODES", 0)
    monkeypatch.setattr(pipeline, "_background", False)
    pipeline.infer_in_background()
    assert pipeline._background
    forks = []
    start = pipeline._ForkedIndex.start
    monkeypatch.setattr(pipeline._ForkedIndex, "start", classmethod(lambda cls, m, check=False: forks.append(1) or start(m, check)))
    assert model_io.serialize(F.optimize(model, F.FoldOptions(verify=False)).model) == plain
    assert forks


@pytest.fixture
def command_mode(monkeypatch):
    """The command's mode for every model: inference, and the input's checker, in a forked child."""
    monkeypatch.setattr(pipeline, "BACKGROUND_NODES", 0)
    monkeypatch.setattr(pipeline, "_background", False)
    pipeline.infer_in_background()
    assert pipeline._background


def _fold_cli(*args):
    from click.testing import CliRunner
    from normopt.cli import cli
    return CliRunner().invoke(cli, [str(a) for a in args])


def _checks_in_parent(monkeypatch) -> list:
    """Names of the models the ONNX checker ran on in this process (a forked child's runs do
    not count: its memory is its own)."""
    import os
    parent, real, seen = os.getpid(), model_io.input_verdict, []
    monkeypatch.setattr(model_io, "input_verdict",
                        lambda m: (seen.append(m.graph.name) if os.getpid() == parent else None) or real(m))
    monkeypatch.setattr(pipeline, "input_verdict", model_io.input_verdict)
    return seen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="background inference forks: Linux only")
def test_command_leaves_the_input_checker_to_the_forked_child(tmp_path, rng, command_mode, monkeypatch):
    """The same output bytes as with the checker run at load, and the checker did not run in
    the command's own process (the output's full check aside)."""
    model = conv_bn_chain(rng)
    model.graph.name = "input"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    monkeypatch.setattr(pipeline, "_background", False)
    assert _fold_cli("fold", path, "-o", tmp_path / "plain.onnx", "--no-verify", "-q").exit_code == 0
    monkeypatch.setattr(pipeline, "_background", True)
    seen = _checks_in_parent(monkeypatch)
    res = _fold_cli("fold", path, "-o", tmp_path / "out.onnx", "--no-verify", "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
    assert "input" not in seen and not model_io._unchecked


def _unknown_op(model):
    model.graph.node.append(helper.make_node("NoSuchOp", ["r3"], ["extra"]))
    model.graph.output.append(helper.make_tensor_value_info("extra", FLOAT, [1, 4, 6, 6]))
    return "the ONNX checker rejects it: No Op registered for NoSuchOp with domain_version of 15"


def _short_weight(model):
    w = next(t for t in model.graph.initializer if t.name == "w2")
    w.raw_data = w.raw_data[:40]   # the BatchNormalization fold reads it
    return "initializer 'w2' holds fewer bytes than its shape [4, 4, 3, 3] needs"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="background inference forks: Linux only")
@pytest.mark.parametrize("failing_pass", [False, True])
@pytest.mark.parametrize("damage", [_unknown_op, _short_weight])
def test_command_reports_the_checkers_error_found_beside_the_run(tmp_path, rng, command_mode, monkeypatch,
                                                                failing_pass, damage):
    """A model the whole-model checks reject, checked in the child: the command's error is
    theirs, as at load (exit 2, one line, no output), also when a pass fails on it first."""
    model = conv_bn_chain(rng)
    reason = damage(model)
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    if failing_pass:
        monkeypatch.setattr(pipeline, "_run_passes", lambda *a: 1 / 0)
    seen = _checks_in_parent(monkeypatch)
    res = _fold_cli("fold", path, "-o", tmp_path / "out.onnx")
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read '{path}': {reason}"), lines
    assert not seen
    assert not (tmp_path / "out.onnx").exists() and not model_io._unchecked


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="background inference forks: Linux only")
@pytest.mark.parametrize("where, count", [(b"conv2", -1), (b"n2", -1), (b"bn2", -1), (b"SAME_UPPER", -1), (b"n2", 1)])
def test_command_reports_text_not_utf8_found_beside_the_run(tmp_path, rng, command_mode, monkeypatch, where, count):
    """Text is checked in the child too (the load only reads the order): a node name, a tensor
    name a BatchNormalization fold reads, or a string attribute that is not UTF-8 gets the
    load's one-line error (exit 2, no output), whatever the passes made of it first. Only the
    producer's name damaged (count 1), the load's sort finds a read of a tensor nothing
    provides: the error still names the text first."""
    model = conv_bn_chain(rng)
    model.graph.node[0].ClearField("attribute")   # pads=1 becomes auto_pad (not both)
    model.graph.node[0].attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER"))
    data = model.SerializeToString()
    assert data.count(where) >= 1
    path = tmp_path / "bad.onnx"
    path.write_bytes(data.replace(where, b"\xaf" + where[1:], count))
    seen = _checks_in_parent(monkeypatch)
    res = _fold_cli("fold", path, "-o", tmp_path / "out.onnx", "--no-verify")
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: cannot read '{path}': file is not an ONNX model (a name or text field is not UTF-8"), lines
    assert not seen
    assert not (tmp_path / "out.onnx").exists() and not model_io._unchecked


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="background inference forks: Linux only")
def test_command_checks_in_process_when_the_child_sends_no_verdict(tmp_path, rng, command_mode, monkeypatch):
    model = conv_bn_chain(rng)
    model.graph.name = "input"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    monkeypatch.setattr(pipeline._ForkedIndex, "verdict", lambda self: (self.cancel(), (False, None))[1])
    seen = _checks_in_parent(monkeypatch)
    res = _fold_cli("fold", path, "-o", tmp_path / "out.onnx", "--no-verify", "-q")
    assert res.exit_code == 0, res.output
    assert seen.count("input") == 1


def _layernorm_beside(other: onnx.NodeProto, opset: int, extra_inputs=(), out_shape=(1, 2, 8, 16), inits=None):
    """A decomposed LayerNorm of x [1, 2, 4, 8] (output y) beside ``other`` (output z)."""
    import numpy as np
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]), helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["v"], axes=[-1]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["y"]), other]
    values = {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32), **(inits or {})}
    return make_model(nodes, [("x", FLOAT, [1, 2, 4, 8]), *extra_inputs],
                      [("y", FLOAT, [1, 2, 4, 8]), ("z", FLOAT, list(out_shape))], values, opset=opset)


@pytest.mark.parametrize("other, opset, inits, out_shape, hazard", [
    (helper.make_node("Resize", ["x", "scales"], ["z"], mode="linear"), 10, "scales", (1, 2, 8, 16),
     "onnx's converter changes Resize from opset 10: its coordinates become half_pixel"),
    (helper.make_node("Upsample", ["x", "scales"], ["z"], mode="linear"), 9, "scales", (1, 2, 8, 16),
     "onnx's converter changes Upsample from opset 9"),
    (helper.make_node("Hardmax", ["x"], ["z"]), 12, None, (1, 2, 4, 8),
     "onnx's converter changes Hardmax from opset 12: its axis is kept, but below opset 13 it flattens"),
    (helper.make_node("Hardmax", ["x"], ["z"], axis=-1), 12, None, (1, 2, 4, 8), None),
], ids=["resize10", "upsample9", "hardmax12", "hardmax12_last_axis"])
def test_opset_upgrade_is_refused_where_onnxs_converter_changes_another_op(other, opset, inits, out_shape, hazard):
    """Raising the opset for a fusion converts every node; where onnx's converter changes what
    a node computes (its Resize 10 -> 11 adapter drops the asymmetric coordinates, Hardmax
    keeps a 2-D coercion's axis as one axis), the upgrade is refused and the fusion left, with
    that reason. Hardmax over the last axis means the same at every opset: upgraded."""
    import numpy as np
    values = {"scales": np.array([1, 1, 2, 2], np.float32)} if inits else None
    model = _layernorm_beside(other, opset, out_shape=out_shape, inits=values)
    out, result = run_pipeline(model, ["fuse-layernorm"])
    skipped = [s.reason for r in result.passes for s in r.skipped]
    if hazard:
        assert not result.applied and not result.upgrades
        assert any(f"needs opset 17 (model has {opset}); opset upgrade {opset} -> 17 refused: {hazard}" in r
                   for r in skipped), skipped
        assert out.graph == model.graph
    else:
        assert len(result.applied) == 1 and result.upgrades and op_counts(out)["LayerNormalization"] == 1
    assert_equivalent(model, out)


@pytest.mark.parametrize("attr", ["value_ints", "value_floats"])
def test_empty_list_attribute_survives_a_rewrite_of_its_node(attr):
    """dynamo (optimize=False) writes the shape of a scalar as Constant(value_ints=[]), with its
    stack trace in metadata_props. Raising the opset 20 -> 23 for an RMSNormalization probes the
    Constant (it changed at 21 and 23): the converter drops metadata, which made every such node
    look changed and rebuilt, and the rebuilt empty list could not be written (onnx cannot infer
    the type of []). Metadata is not part of the comparison: the node stays as it was."""
    d = 8
    kind = onnx.AttributeProto.INTS if attr == "value_ints" else onnx.AttributeProto.FLOATS
    empty = helper.make_node("Constant", [], ["empty"])
    empty.attribute.append(helper.make_attribute(attr, [], attr_type=kind))
    helper.set_metadata_props(empty, {"pkg.torch.onnx.stack_trace": "File \"model.py\", line 1, in forward"})
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
             helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Div", ["x", "rms"], ["n"]), helper.make_node("Mul", ["n", "gamma"], ["y"]),
             helper.make_node("ReduceSum", ["y"], ["total"], keepdims=0),
             empty,
             helper.make_node("Reshape", ["total", "shape"], ["scalar"]),
             helper.make_node("Shape", ["empty"], ["n_empty"]),
             helper.make_node("Cast", ["n_empty"], ["n_empty_f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["n_empty_f"], ["zero"], keepdims=0),
             helper.make_node("Add", ["scalar", "zero"], ["out"])]
    model = make_model(nodes, [("x", FLOAT, [2, 4, d])], [("out", FLOAT, [])],
                       {"two": np.array(2.0, np.float32), "axes": np.array([-1], np.int64),
                        "eps": np.array(1e-6, np.float32), "gamma": np.ones(d, np.float32),
                        "shape": np.zeros(0, np.int64)}, opset=20)
    out, result = pipeline.run(model)
    assert op_counts(out)["RMSNormalization"] == 1 and result.upgrades
    const = next(n for n in out.graph.node if n.op_type == "Constant")
    assert const == empty
    assert_equivalent(model, out)


@pytest.mark.parametrize("kind", [onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.STRINGS])
def test_empty_list_attribute_keeps_its_type_when_its_node_is_written_anew(kind):
    """A node written from its attributes (not its source proto: renamed here, as a rewrite
    would) keeps an empty list attribute's type."""
    name, elem = {onnx.AttributeProto.INTS: ("value_ints", TensorProto.INT64),
                  onnx.AttributeProto.FLOATS: ("value_floats", TensorProto.FLOAT),
                  onnx.AttributeProto.STRINGS: ("value_strings", TensorProto.STRING)}[kind]
    node = helper.make_node("Constant", [], ["empty"], name="c")
    node.attribute.append(helper.make_attribute(name, [], attr_type=kind))
    g = ir.import_model(make_model([node], [], [("empty", elem, [0])], ir_version=10), ir.Weights(""))
    imported = g.nodes[0]
    assert imported.attrs[node.attribute[0].name] == []
    imported.name = "renamed"
    written = ir.node_proto(imported)
    assert written.name == "renamed" and [(a.name, a.type) for a in written.attribute] == \
        [(node.attribute[0].name, kind)]

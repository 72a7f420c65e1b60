"""Loading and saving: external data, atomic writes, clear errors."""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper

from helpers import FLOAT, assert_equivalent, make_model, op_counts
from normopt import ir, model_io
from normopt.cli import cli
from normopt.errors import ModelLoadError, ModelSaveError
from test_fold import conv_bn_chain


def test_default_output_name():
    assert model_io.default_output("dir/net.onnx") == Path("dir/net.normopt.onnx")
    assert model_io.default_output("net") == Path("net.normopt.onnx")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, rng):
    model = conv_bn_chain(rng)
    written = model_io.save(model, tmp_path / "m.onnx")
    assert written == [tmp_path / "m.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert onnx.load(tmp_path / "m.onnx") == model


def test_save_into_missing_folder_fails_cleanly(tmp_path, rng):
    with pytest.raises(ModelSaveError, match="does not exist"):
        model_io.save(conv_bn_chain(rng), tmp_path / "nope" / "m.onnx")


def test_external_data_roundtrip_through_cli(tmp_path, rng):
    model = conv_bn_chain(rng, c=16)  # 9 KB weights: over the size kept in the model file
    src = tmp_path / "ext.onnx"
    onnx.save(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.weights",
              size_threshold=0)
    assert (tmp_path / "ext.weights").exists()
    loaded = model_io.load(src)  # large weights stay in the data file; small ones are read in
    assert sorted(t.name for t in loaded.graph.initializer if t.external_data) == ["w1", "w2", "w3"]
    assert all(t.HasField("raw_data") for t in loaded.graph.initializer if not t.external_data)
    out = tmp_path / "out.onnx"
    res = CliRunner().invoke(cli, ["fold", str(src), "-o", str(out), "--external-data"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.onnx.data").exists()
    assert op_counts(onnx.load(out)) == {"Conv": 3, "Relu": 3}


def test_missing_external_data_is_a_load_error(tmp_path, rng):
    src = tmp_path / "ext.onnx"
    onnx.save(conv_bn_chain(rng), src, save_as_external_data=True, location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(ModelLoadError, match="external data"):
        model_io.load(src)


@pytest.mark.parametrize("kind, says", [("missing", "'w.bin' not found"), ("folder", "'w.bin' is a folder"),
                                        ("fifo", "'w.bin' is not a regular file")])
def test_an_external_data_file_that_cannot_be_read_says_why(tmp_path, rng, kind, says):
    """Missing, a folder, or a FIFO (reading it would wait for a writer): each is named as such."""
    import os

    src = tmp_path / "ext.onnx"
    onnx.save(conv_bn_chain(rng), src, save_as_external_data=True, location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").unlink()
    if kind == "folder":
        (tmp_path / "w.bin").mkdir()
    elif kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(tmp_path / "w.bin")
    with pytest.raises(ModelLoadError, match=f"external data file {says}"):
        model_io.load(src)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="no /proc")
def test_a_file_whose_size_says_0_but_that_has_bytes_is_not_called_empty():
    """/proc files report size 0; read, it is no ONNX model, and the error says that."""
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        model_io.load("/proc/self/status")


def test_external_data_of_a_constant_node_is_refused_with_its_reason(tmp_path, rng):
    """A Constant node's value may keep its data in a file (valid ONNX, onnxruntime runs it);
    only initializers' data is read and written here, so such a model is refused in one line
    that says so, not with the checker's complaint about a file it cannot see."""
    w = rng.standard_normal((4, 3)).astype(np.float32)
    (tmp_path / "w.bin").write_bytes(w.tobytes())
    value = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[4, 3])
    value.data_location = onnx.TensorProto.EXTERNAL
    for key, entry in (("location", "w.bin"), ("offset", "0"), ("length", str(w.nbytes))):
        value.external_data.add(key=key, value=entry)
    nodes = [helper.make_node("Constant", [], ["W"], name="const_w", value=value),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [2, 4])],
                                                [helper.make_tensor_value_info("y", FLOAT, [2, 3])]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, tmp_path / "m.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])   # a model that runs
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "--no-verify"])
    assert res.exit_code == 2, res.output
    assert "attribute 'value' of Constant node 'const_w' keeps its data in an external file" in res.stderr
    assert not (tmp_path / "m.normopt.onnx").exists()


def test_full_check_is_detected():
    good = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [2])], opset=13)
    assert model_io.passes_full_check(good)
    bad = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [3])], opset=13)
    assert not model_io.passes_full_check(bad)


def test_min_ir_version_table():
    assert model_io.min_ir_version(13) == 7
    assert model_io.min_ir_version(17) == 8
    assert model_io.min_ir_version(21) == 10


def test_external_data_keeps_small_tensors_inline_and_reruns_in_place(tmp_path, rng, monkeypatch):
    """onnxruntime cannot read Unsqueeze axes from external data; a second save in the output's
    own folder must not trip over the data file of the first."""
    w = rng.standard_normal((64, 8)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Unsqueeze", ["h", "axes"], ["y"])],
                       [("x", FLOAT, [2, 64])], [("y", FLOAT, [1, 2, 8])],
                       {"w": w, "axes": np.array([0], np.int64)}, opset=13)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert model_io.save(model, "out.onnx", external_data=True) == [Path("out.onnx"), Path("out.onnx.data")]
    header = onnx.load("out.onnx", load_external_data=False)
    assert [t.name for t in header.graph.initializer if t.external_data] == ["w"]
    assert (tmp_path / "out.onnx.data").stat().st_mode == (tmp_path / "out.onnx").stat().st_mode
    x = rng.standard_normal((2, 64)).astype(np.float32)
    got = ort.InferenceSession("out.onnx", providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, (x @ w)[None], rtol=1e-5, atol=1e-5)


def test_byte_size_is_counted_from_dims_past_protobufs_limit():
    """protobuf takes seconds to size a large model and raises EncodeError at 2 GiB (a 2.6 GB
    LLaMA export stopped with an internal error): sizes are counted from dims instead."""
    huge = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[2**29])  # 2 GiB, no bytes held
    huge.data_location = onnx.TensorProto.EXTERNAL
    huge.external_data.add(key="location", value="w.bin")
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [2])], opset=13)
    assert model_io.byte_size(model) == model.ByteSize()
    model.graph.initializer.append(huge)
    assert model_io.byte_size(model) >= 2**31 and model_io.needs_external_data(model)

@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.uint16,
                                   np.int32, np.uint32, np.int64, np.uint64, np.bool_])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4)])
def test_tensor_codec_matches_numpy_helper(dtype, shape):
    """ir.encode / ir.decode give exactly numpy_helper's bytes and arrays (read-only included)."""
    values = (np.random.default_rng(0).standard_normal(shape) * 100).astype(dtype)
    if len(shape) == 3:
        values = values.transpose(2, 0, 1)  # not contiguous: still C-order bytes
    mine, theirs = ir.encode(values, "t"), onnx.numpy_helper.from_array(values, "t")
    assert mine.SerializeToString() == theirs.SerializeToString()
    back, ref = ir.decode(theirs), onnx.numpy_helper.to_array(theirs)
    assert back.dtype == ref.dtype and back.shape == ref.shape and np.array_equal(back, ref)
    assert back.flags.writeable == ref.flags.writeable


def test_tensor_codec_falls_back_for_packed_and_typed_fields():
    """Types with packing or no raw bytes go through numpy_helper."""
    as_floats = onnx.helper.make_tensor("f", onnx.TensorProto.FLOAT, [2], [1.5, -2.0])  # float_data, no raw
    assert ir.decode(as_floats).tolist() == [1.5, -2.0]
    int4 = onnx.numpy_helper.from_array(np.array([1, -2, 3], dtype=onnx.helper.tensor_dtype_to_np_dtype(
        onnx.TensorProto.INT4)), "q")
    assert np.array_equal(ir.decode(int4), onnx.numpy_helper.to_array(int4))
    with pytest.raises(ValueError):   # as numpy_helper: no big-endian dtype
        ir.encode(np.arange(4, dtype=">f4"), "b")


def test_import_attributes_reads_as_graphsurgeon_does():
    """Plain attributes read directly equal graphsurgeon's reading; other kinds go through it."""
    from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

    node = helper.make_node("X", ["a"], ["b"], f=1.5, i=-3, s="same_upper", fs=[0.5, 2.0], is_=[1, -2, 3],
                            t=onnx.numpy_helper.from_array(np.arange(3, dtype=np.float32)))
    plain = [a for a in node.attribute if a.name != "t"]
    assert ir.import_attributes(plain) == OnnxImporter.import_attributes(plain, {}, {}, None, None)
    mine = ir.import_attributes(node.attribute)
    assert list(mine) == [a.name for a in node.attribute]
    assert np.array_equal(mine["t"].values, np.arange(3, dtype=np.float32))
    ref = helper.make_attribute_ref("axis", onnx.AttributeProto.INT)
    ref.name = "axis"
    assert type(ir.import_attributes([ref])["axis"]).__name__ == "AttributeRef"


def test_census_follows_the_model_it_describes(tmp_path, rng):
    """One walk answers the whole-model questions; a model changed in place (another weight,
    another node) is walked again, and a different model never gets another's answer."""
    model = conv_bn_chain(rng)
    first = model_io.census(model)
    assert model_io.census(model) is first and not first.large and not first.subgraphs
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(4096, np.float32), "big"))
    grown = model_io.census(model)
    assert grown.large and grown.large_bytes == 4096 * 4 and grown.nodes == first.nodes
    other = conv_bn_chain(rng)
    assert model_io.census(other) is not grown and not model_io.census(other).large
    model_io.forget_census()
    assert model_io._CENSUS == {}


def test_folded_weights_are_held_as_arrays_and_written_as_encoded(tmp_path, rng):
    """A large folded weight stays the array the pass computed (no copy, read-only); the file
    written from it has the bytes that encoding it into a TensorProto first would give, in a
    single file and in external data."""
    from normopt import fold as F

    model = conv_bn_chain(rng, layers=2, c=96)   # 96x96x3x3 float32 weights: 324 KB each
    result = F.optimize(model, F.FoldOptions(verify=False))
    skel = result.rewritten
    held = [m for m in skel.weights.memory if isinstance(m, ir.ArrayTensor)]
    assert len(held) == 2 and all(not m.array.flags.writeable and not m.proto.HasField("raw_data") for m in held)
    headers = [t for t in skel.model.graph.initializer if ir.is_header(t)]
    assert sorted(id(skel.weights.source(t)[0]) for t in headers) == sorted(id(m) for m in held)
    written = {}
    for external in (False, True):
        for form in ("held", "encoded"):
            if form == "encoded":
                skel.weights.memory[:] = [m.whole() if isinstance(m, ir.ArrayTensor) else m
                                          for m in skel.weights.memory]
            out = tmp_path / form / ("x.onnx" if external else "s.onnx")
            out.parent.mkdir(exist_ok=True)
            model_io.save(skel, out, external_data=external)
            data = out.with_name(out.name + ".data")
            written[external, form] = (out.read_bytes(), data.read_bytes() if external else b"")
        skel = F.optimize(model, F.FoldOptions(verify=False)).rewritten   # held again for the next layout
    assert written[False, "held"] == written[False, "encoded"]
    assert written[True, "held"] == written[True, "encoded"]
    loaded = onnx.load(str(tmp_path / "held" / "s.onnx"))
    assert loaded == result.model and op_counts(loaded) == {"Conv": 2, "Relu": 2}
    assert_equivalent(model, str(tmp_path / "held" / "x.onnx"))   # onnxruntime reads the data file


def test_held_weight_in_a_constant_node_is_written_whole(rng):
    """A folded weight that a rewrite puts in a Constant node's value (weight norm does) is
    exported complete, not as the value-less proto that holds its type."""
    import onnx_graphsurgeon as gs

    big = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    const = ir.new_constant("w", big)
    assert const._values.held and np.shares_memory(ir.constant_array(const), big)
    node = gs.Node("Constant", "c", {"value": const}, [], [gs.Variable("out")])
    proto = ir.node_proto(node)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(proto.attribute[0].t), big)


def test_load_parses_binary_models_from_a_mapping_and_text_formats_as_onnx_does(tmp_path, rng):
    model = conv_bn_chain(rng)
    binary, text = tmp_path / "m.onnx", tmp_path / "m.textproto"
    onnx.save(model, str(binary))
    onnx.save(model, str(text), format="textproto")
    assert model_io.load(binary) == onnx.load(str(binary))
    assert model_io.load(text) == onnx.load(str(text))
    binary.write_bytes(binary.read_bytes()[:-7])   # cut inside the last record
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        model_io.load(binary)

"""Loading and saving: external data, atomic writes, clear errors."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from helpers import FLOAT, make_model, op_counts
from normopt import model_io
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
    model = conv_bn_chain(rng)
    src = tmp_path / "ext.onnx"
    onnx.save(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.weights",
              size_threshold=0)
    assert (tmp_path / "ext.weights").exists()
    loaded = model_io.load(src)
    assert all(not t.external_data for t in loaded.graph.initializer)
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


def test_full_check_is_detected():
    good = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [2])], opset=13)
    assert model_io.passes_full_check(good)
    bad = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [3])], opset=13)
    assert not model_io.passes_full_check(bad)


def test_min_ir_version_table():
    assert model_io.min_ir_version(13) == 7
    assert model_io.min_ir_version(17) == 8
    assert model_io.min_ir_version(21) == 10

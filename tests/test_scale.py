"""Cost follows the work: weights no pass rewrites are never decoded nor copied, external data is
streamed from the input's files to the output's, the output keeps the input's layout, and the
input's files are never touched."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from helpers import FLOAT, assert_equivalent, make_model, op_counts
from normopt import ir, model_io, pipeline
from normopt.cli import cli
from normopt.errors import ModelSaveError


def rms_decoder(rng, layers=2, d=64, ff=128, opset=17, scale=1.0, check=True):
    """A LLaMA-like stack: decomposed RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul)
    then an MLP whose weights no pass touches."""
    nodes, inits, x = [], {"two": np.array(2.0, np.float32), "eps": np.array(1e-6, np.float32)}, "x"
    for i in range(layers):
        nodes += [helper.make_node("Pow", [x, "two"], [f"p{i}"]),
                  helper.make_node("ReduceMean", [f"p{i}"], [f"ms{i}"], axes=[-1]),
                  helper.make_node("Add", [f"ms{i}", "eps"], [f"mse{i}"]),
                  helper.make_node("Sqrt", [f"mse{i}"], [f"rs{i}"]),
                  helper.make_node("Reciprocal", [f"rs{i}"], [f"r{i}"]),
                  helper.make_node("Mul", [x, f"r{i}"], [f"xn{i}"]),
                  helper.make_node("Mul", [f"nw{i}", f"xn{i}"], [f"xw{i}"]),
                  helper.make_node("MatMul", [f"xw{i}", f"up{i}"], [f"u{i}"]),
                  helper.make_node("Relu", [f"u{i}"], [f"ur{i}"]),
                  helper.make_node("MatMul", [f"ur{i}", f"dn{i}"], [f"dd{i}"]),
                  helper.make_node("Add", [x, f"dd{i}"], [f"h{i}"])]
        inits.update({f"nw{i}": rng.uniform(0.5, 1.5, d).astype(np.float32),
                      f"up{i}": (rng.standard_normal((d, ff)) * scale / np.sqrt(d)).astype(np.float32),
                      f"dn{i}": (rng.standard_normal((ff, d)) * scale / np.sqrt(ff)).astype(np.float32)})
        x = f"h{i}"
    if not check:  # over 2 GB: the checker cannot serialize it in memory
        graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", FLOAT, [1, 4, d])],
                                  [helper.make_tensor_value_info(x, FLOAT, [1, 4, d])],
                                  [numpy_helper.from_array(v, k) for k, v in inits.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return make_model(nodes, [("x", FLOAT, [1, 4, d])], [(x, FLOAT, [1, 4, d])], inits, opset=opset)


def save_external(model, path: Path, location: str) -> None:
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=1024)


def drop_lengths(path: Path) -> None:
    """Remove every external tensor's ``length`` entry (optional in the format) from the model file."""
    header = onnx.load(path, load_external_data=False)
    for t in header.graph.initializer:
        kept = [(e.key, e.value) for e in t.external_data if e.key != "length"]
        del t.external_data[:]
        for key, value in kept:
            t.external_data.add(key=key, value=value)
    onnx.save(header, path)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def tensors(path: Path) -> dict[str, bytes]:
    model = onnx.load(path)
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def test_external_data_in_means_external_data_out(tmp_path, rng):
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir(), out_dir.mkdir()
    model = rms_decoder(rng)
    save_external(model, src_dir / "m.onnx", "m.weights")
    before = digests(src_dir)
    res = CliRunner().invoke(cli, ["fold", str(src_dir / "m.onnx"), "-o", str(out_dir / "f.onnx"), "--provider", "cpu"])
    assert res.exit_code == 0, res.output
    assert digests(src_dir) == before  # the input's files, data file included, are untouched
    assert sorted(p.name for p in out_dir.iterdir()) == ["f.onnx", "f.onnx.data"]
    header = onnx.load(out_dir / "f.onnx", load_external_data=False)
    locations = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"f.onnx.data"}  # relative, beside the output
    assert op_counts(header) == {"RMSNormalization": 2, "MatMul": 4, "Relu": 2, "Add": 2}
    # Untouched tensors come out byte for byte.
    old, new = tensors(src_dir / "m.onnx"), tensors(out_dir / "f.onnx")
    for name in ("up0", "dn0", "up1", "dn1"):
        assert new[name] == old[name]
    assert_equivalent(src_dir / "m.onnx", out_dir / "f.onnx")


def test_tensors_sharing_their_bytes_in_the_input_share_them_in_the_output(tmp_path, rng):
    """Tied weights stored once (two headers to one range of the data file) are copied once."""
    model = rms_decoder(rng)
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "dn1"))
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "dn0")), "dn1"))
    save_external(model, tmp_path / "m.onnx", "m.weights")
    header = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    by_name = {t.name: t for t in header.graph.initializer}
    del by_name["dn1"].external_data[:]
    by_name["dn1"].external_data.extend(by_name["dn0"].external_data)  # dn1 reads dn0's bytes
    onnx.save(header, tmp_path / "m.onnx")
    size = (tmp_path / "m.weights").stat().st_size
    out = tmp_path / "f.onnx"
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(out), "--provider", "cpu"])
    assert res.exit_code == 0, res.output
    where = {t.name: {e.key: e.value for e in t.external_data} for t in onnx.load(out, load_external_data=False).graph.initializer}
    assert where["dn1"] == where["dn0"]
    assert (tmp_path / "f.onnx.data").stat().st_size <= size  # the shared range once, not twice
    assert tensors(out)["dn1"] == tensors(tmp_path / "m.onnx")["dn0"]
    assert_equivalent(tmp_path / "m.onnx", out)


def test_single_file_stays_a_single_file(tmp_path, rng):
    model = rms_decoder(rng)
    onnx.save(model, tmp_path / "m.onnx")
    out = tmp_path / "f.onnx"
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(out), "--no-verify", "-q"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "m.onnx"]
    onnx.checker.check_model(str(out), full_check=True)
    loaded = onnx.load(out)
    assert [t.name for t in loaded.graph.initializer][:4] == ["up0", "dn0", "up1", "dn1"]
    assert_equivalent(model, loaded)
    # The streamed file is deterministic and a fixed point.
    again = tmp_path / "g.onnx"
    CliRunner().invoke(cli, ["fold", str(out), "-o", str(again), "--no-verify", "-q"])
    assert again.read_bytes() == out.read_bytes()


def test_untouched_weights_are_never_decoded_nor_copied(rng, monkeypatch):
    model = rms_decoder(rng, d=128, ff=256)
    read = []
    real = ir.Weights.array
    monkeypatch.setattr(ir.Weights, "array", lambda self, t: read.append(t.name) or real(self, t))
    out, result = pipeline.run(model, lazy=True)
    assert len(result.applied) == 2
    assert not {"up0", "dn0", "up1", "dn1"} & set(read)  # only the norm weights are read
    headers = {t.name for t in out.model.graph.initializer if ir.is_header(t)}
    assert headers == {"up0", "dn0", "up1", "dn1"}  # the skeleton holds no copy of their bytes
    # Their bytes are the input model's own tensors, referenced, not copied.
    referenced = {id(t) for t in out.weights.memory}
    assert all(id(t) in referenced for t in model.graph.initializer if t.name in headers)


@pytest.mark.parametrize("data_name, output, report, flags, message", [
    ("f.onnx.data", "f.onnx", None, ["--no-verify"], "cannot write '{d}/f.onnx.data' (the output's data file): it "
                                                     "is a data file of the input ('f.onnx.data')"),
    ("f.onnx.data", "f.onnx", None, [], "(the output's data file): it is a data file of the input"),
    ("m.normopt.onnx.data", None, None, [], "(the output's data file): it is a data file of the input"),
    ("f.onnx", "f.onnx", None, [], "cannot write '{d}/f.onnx' (the output): it is a data file of the input"),
    ("w.bin", "o.onnx", "m.onnx", [], "cannot write report '{d}/m.onnx': the file there is not a normopt report"),
    ("w.bin", "o.onnx", "w.bin", [], "cannot write report '{d}/w.bin': the file there is not a normopt report"),
    ("w.bin", "o.onnx", "o.onnx", [], "cannot write report '{d}/o.onnx': it is where the model is written"),
    ("w.bin", "o.onnx", "o.onnx.data", [], "cannot write report '{d}/o.onnx.data': it is where the model is written"),
], ids=["data_no_verify", "data_verified", "data_default_output", "output_is_data", "report_is_model",
        "report_is_data", "report_is_output", "report_is_output_data"])
def test_output_data_file_never_overwrites_the_inputs(tmp_path, rng, data_name, output, report, flags, message):
    """Nothing the run writes (the output, its data file, the report) is one of the input's
    files: refused before any work, one line, exit 2, every file as it was."""
    model = rms_decoder(rng)
    save_external(model, tmp_path / "m.onnx", data_name)
    before = digests(tmp_path)
    args = ["fold", str(tmp_path / "m.onnx")] + (["-o", str(tmp_path / output)] if output else []) + \
        (["--report", str(tmp_path / report)] if report else []) + flags
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert message.format(d=tmp_path) in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert digests(tmp_path) == before


def test_external_data_outside_the_models_folder_is_refused(tmp_path, rng):
    (tmp_path / "a").mkdir()
    save_external(rms_decoder(rng), tmp_path / "a" / "m.onnx", "w.bin")
    model = onnx.load(tmp_path / "a" / "m.onnx", load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../w.bin"
    os.replace(tmp_path / "a" / "w.bin", tmp_path / "w.bin")
    onnx.save(model, tmp_path / "a" / "m.onnx")
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "a" / "m.onnx"), "--no-verify"])
    assert res.exit_code == 2 and "outside the model's folder" in res.output


def test_outer_initializers_stay_in_the_outer_graph(rng):
    """A weight that If branches read is declared once, in the graph that holds it."""
    w = rng.standard_normal((8, 8)).astype(np.float32)
    branch = lambda name: helper.make_graph([helper.make_node("MatMul", ["x", "w"], [f"{name}_y"])], name, [],
                                             [helper.make_tensor_value_info(f"{name}_y", FLOAT, [2, 8])])
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))],
                       [("x", FLOAT, [2, 8]), ("c", onnx.TensorProto.BOOL, [])], [("y", FLOAT, [2, 8])], {"w": w},
                       opset=17)
    out, _ = pipeline.run(model)
    assert [t.name for t in out.graph.initializer] == ["w"]
    assert all(not a.g.initializer for a in out.graph.node[0].attribute)
    assert out == model


# The peak of this process alone: ru_maxrss would carry over the forking test process's peak.
MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from normopt.cli import main
    code = 0
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"code": code, "peak": int(hwm.split()[1]) * 1024}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak from /proc")
def test_fold_of_an_external_data_model_stays_in_a_fraction_of_its_size(tmp_path, rng):
    """A 400 MB external-data decoder folds (without verification) in less memory than half its
    size: its weights are streamed, not loaded."""
    model = rms_decoder(rng, layers=4, d=2048, ff=6144, scale=0.0)  # zeros: cheap to make
    save_external(model, tmp_path / "m.onnx", "m.onnx.data")
    size = (tmp_path / "m.onnx.data").stat().st_size
    assert size > 380e6
    del model
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, "fold", str(tmp_path / "m.onnx"), "-o",
                          str(tmp_path / "f.onnx"), "--no-verify", "-q"], capture_output=True, text=True, timeout=300)
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["code"] in (0, None), run.stderr
    assert found["peak"] < 0.5 * size, f"peak RSS {found['peak'] / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
    assert (tmp_path / "f.onnx.data").stat().st_size >= size - 4096


@pytest.mark.slow
def test_model_over_2gb_folds_with_external_data_in_and_out(tmp_path, rng):
    """Over protobuf's 2 GB limit: external data in and out, outputs verified, untouched tensors
    byte-identical, input files unchanged."""
    model = rms_decoder(rng, layers=5, d=4096, ff=14336, scale=0.02, check=False)
    save_external(model, tmp_path / "m.onnx", "m.onnx.data")
    del model
    assert (tmp_path / "m.onnx.data").stat().st_size > 2**31
    before = digests(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(out_dir / "f.onnx"), "--provider", "cpu"])
    assert res.exit_code == 0, res.output
    assert "verify: passed" in res.output
    assert digests(tmp_path) == before
    src = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    dst = onnx.load(out_dir / "f.onnx", load_external_data=False)
    assert op_counts(dst)["RMSNormalization"] == 5
    where = {t.name: {e.key: e.value for e in t.external_data} for t in dst.graph.initializer}
    for t in src.graph.initializer:
        if t.name.startswith(("up", "dn")):
            a, b = {e.key: e.value for e in t.external_data}, where[t.name]
            with open(tmp_path / a["location"], "rb") as f1, open(out_dir / b["location"], "rb") as f2:
                f1.seek(int(a["offset"]))
                f2.seek(int(b["offset"]))
                assert f1.read(int(a["length"])) == f2.read(int(b["length"]))


def test_plain_model_saves_as_one_file_in_order(tmp_path, rng):
    """A plain in-memory model saves as one file, with its initializers in order; a missing folder
    is a save error."""
    model = rms_decoder(rng)
    model_io.save(model, tmp_path / "m.onnx")
    assert onnx.load(tmp_path / "m.onnx") == model
    with pytest.raises(ModelSaveError):
        model_io.save(model, tmp_path / "missing" / "m.onnx")


def test_large_weights_inside_subgraphs_fold_in_both_layouts(tmp_path, rng):
    """Weights of If branches (kept whole: the checker reads them there) with a LayerNorm in each
    branch, in one file and with external data, in and out."""
    def branch(name):
        nodes = [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_m"]),
                 helper.make_node("ReduceMean", [f"{name}_m"], [f"{name}_mu"], axes=[-1]),
                 helper.make_node("Sub", [f"{name}_m", f"{name}_mu"], [f"{name}_d"]),
                 helper.make_node("Pow", [f"{name}_d", f"{name}_two"], [f"{name}_sq"]),
                 helper.make_node("ReduceMean", [f"{name}_sq"], [f"{name}_v"], axes=[-1]),
                 helper.make_node("Add", [f"{name}_v", f"{name}_eps"], [f"{name}_ve"]),
                 helper.make_node("Sqrt", [f"{name}_ve"], [f"{name}_s"]),
                 helper.make_node("Div", [f"{name}_d", f"{name}_s"], [f"{name}_y"])]
        inits = [numpy_helper.from_array(rng.standard_normal((512, 64)).astype(np.float32), f"{name}_w"),
                 numpy_helper.from_array(np.array(2.0, np.float32), f"{name}_two"),
                 numpy_helper.from_array(np.array(1e-5, np.float32), f"{name}_eps")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", FLOAT, [2, 64])], inits)
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch("t"), else_branch=branch("e"))],
                       [("x", FLOAT, [2, 512]), ("c", onnx.TensorProto.BOOL, [])], [("y", FLOAT, [2, 64])], opset=17)
    onnx.save(model, tmp_path / "m.onnx")
    for flags, name in (([], "one.onnx"), (["--external-data"], "ext.onnx")):
        res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / name), "--provider", "cpu",
                                       "--strict", *flags])
        assert res.exit_code == 0, res.output
        assert op_counts(onnx.load(tmp_path / name)) == {"If": 1, "MatMul": 2, "LayerNormalization": 2}
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "ext.onnx"), "-o", str(tmp_path / "again.onnx"), "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again.onnx.data").exists()


def test_inspect_and_check_read_external_data_from_the_models_folder(tmp_path, rng, monkeypatch):
    """From another working directory, without reading the untouched weights."""
    (tmp_path / "m").mkdir()
    save_external(rms_decoder(rng), tmp_path / "m" / "m.onnx", "m.weights")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["inspect", "m/m.onnx", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert [s["action"] for s in json.loads(res.output)["sites"]].count("rewrite") == 2
    res = CliRunner().invoke(cli, ["fold", "m/m.onnx", "--check", "--provider", "cpu"])
    assert res.exit_code == 4, res.output


def test_external_data_out_even_when_every_weight_is_rewritten(tmp_path, rng):
    from test_fold import conv_bn_chain
    save_external(conv_bn_chain(rng, c=16), tmp_path / "m.onnx", "m.weights")
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "f.onnx"), "--provider", "cpu"])
    assert res.exit_code == 0, res.output
    header = onnx.load(tmp_path / "f.onnx", load_external_data=False)
    assert op_counts(header) == {"Conv": 3, "Relu": 3}
    folded = [t for t in header.graph.initializer if t.name.endswith("_bnfolded") and "bias" not in t.name]
    assert len(folded) == 3 and all(t.external_data for t in folded)
    assert (tmp_path / "f.onnx.data").exists()


@pytest.mark.parametrize("path", ["in place", "model"])
def test_opset_upgrade_converts_each_node_form_once(rng, monkeypatch, path):
    """Raising the opset converts one node per form (op, attributes, input types), not every
    node: 6 ReduceMeans whose axes attribute becomes an input at opset 18 cost one conversion
    (plus the probe of the form); the model converted node by node is the whole-graph
    converter's, names aside, and computes the same."""
    from onnx import version_converter
    from normopt import opset

    model = rms_decoder(rng, layers=6)
    calls = []
    real = opset._convert_one
    monkeypatch.setattr(opset, "_convert_one", lambda node, *a, **k: calls.append(node.op_type) or real(node, *a, **k))
    if path == "model":
        model = onnx.shape_inference.infer_shapes(model)   # the types its node-by-node path needs
        monkeypatch.setattr(opset, "NODEWISE_MIN_NODES", 0)
        out = opset.convert(model, 23)
        whole = version_converter.convert_version(model, 23)
        assert [n.op_type for n in out.graph.node] == [n.op_type for n in whole.graph.node]
        assert_equivalent(model, out)
    else:
        out, result = pipeline.run(model)
        assert op_counts(out)["RMSNormalization"] == 6 and result.upgrades
        assert_equivalent(model, out)
    assert calls.count("ReduceMean") == 2


def test_opset_upgrade_probes_every_changed_form_in_one_conversion(monkeypatch):
    """The node forms of ops that changed between two opsets are probed in one conversion of a
    graph holding one node of each (a converter call costs milliseconds whatever its size); the
    verdicts are those of probing each form alone, and when that conversion fails each form is
    probed alone. Forms of ops whose every step is one of the converter's no-op adapters are not
    probed at all. A TorchScript LLaMA at opset 14 raised to 23: 2 calls, not 9."""
    from onnx import version_converter
    from normopt import opset

    model = onnx.load(Path(__file__).parent.parent / "models" / "llama_rms_ts_op14.onnx")
    forms = {}
    for n in model.graph.node:
        forms.setdefault((n.op_type, tuple(a.name for a in n.attribute), len(n.input), len(n.output)), n)
    changed = opset.changed_ops({k[0] for k in forms}, 14, 23)
    forms = {k: n for k, n in forms.items() if k[0] in changed}
    table = opset._COMPATIBLE_STEPS
    monkeypatch.setattr(opset, "_COMPATIBLE_STEPS", {})   # first every form through the converter
    alone = {k: opset._unchanged_forms({k: n}, 14, 23, {})[k] for k, n in forms.items()}
    assert len(forms) >= 5 and any(alone.values()) and not all(alone.values()), alone
    real = version_converter.convert_version
    calls = []

    def counted(m, target):
        calls.append(len(m.graph.node))
        return real(m, target)

    monkeypatch.setattr(opset.version_converter, "convert_version", counted)
    assert opset._unchanged_forms(forms, 14, 23, {}) == alone
    assert calls == [len(forms)]

    def batch_fails(m, target):
        if len(m.graph.node) > 1:
            raise RuntimeError("no adapter")
        return real(m, target)

    calls.clear()
    monkeypatch.setattr(opset.version_converter, "convert_version", batch_fails)
    assert opset._unchanged_forms(forms, 14, 23, {}) == alone

    # With the table: the same verdicts, only the forms of ops with a real adapter probed.
    monkeypatch.setattr(opset, "_COMPATIBLE_STEPS", table)
    monkeypatch.setattr(opset.version_converter, "convert_version", counted)
    calls.clear()
    assert opset._unchanged_forms(forms, 14, 23, {}) == alone
    probed = [k for k in forms if not opset.compatible(k[0], 14, 23)]
    assert calls == [len(probed)] and 0 < len(probed) < len(forms), (calls, probed)
    calls.clear()
    out, result = pipeline.run(model)
    assert op_counts(out)["RMSNormalization"] == op_counts(model)["Pow"] and result.upgrades
    assert len(calls) == 2, calls   # the probe of the forms that change, then ReduceMean's conversion
    assert_equivalent(model, out)


def _converter_header() -> str | None:
    header = Path(onnx.__file__).parent / "version_converter" / "convert.h"
    return header.read_text() if header.exists() else None


@pytest.mark.skipif(_converter_header() is None, reason="the installed onnx ships no version_converter/convert.h")
def test_every_step_taken_as_a_no_op_is_the_installed_converters_no_op_adapter():
    """``opset.compatible`` skips the converter for a node only where the installed onnx's
    converter would leave it as it is: every step in the table is registered there as its
    CompatibleAdapter (which returns the node), and as nothing else."""
    import re
    from normopt import opset

    src = _converter_header()
    registered: dict[tuple[str, int, int], set[str]] = {}
    for kind, op, a, b in re.findall(r'make_unique<(\w+)>\(\s*"(\w+)",\s*OpSetID\((\d+)\),\s*OpSetID\((\d+)\)', src):
        registered.setdefault((op, int(a), int(b)), set()).add(kind)
    for op, a, b in re.findall(r'registerAdapter\(\s*"(\w+)",\s*(\d+),\s*(\d+),', src):
        registered.setdefault((op, int(a), int(b)), set()).add("generic")
    for op, a, b in re.findall(r'make_unique<([A-Za-z]+)_(\d+)_(\d+)>\(\)', src):
        registered.setdefault((op, int(a), int(b)), set()).add("own")
    assert sum(1 for kinds in registered.values() if "CompatibleAdapter" in kinds) > 300   # the parse works
    steps = [(op, v) for op, versions in opset._COMPATIBLE_STEPS.items() for v in versions]
    assert len(steps) > 300
    wrong = [(op, v, registered.get((op, v - 1, v))) for op, v in steps
             if registered.get((op, v - 1, v)) != {"CompatibleAdapter"}]
    assert not wrong, wrong


@pytest.mark.parametrize("name", ["transformer_ln_ts_op13", "bert_ln_eps1e-12_ts_op14"])
def test_an_upgrade_through_no_op_adapters_only_calls_no_converter(name, monkeypatch):
    """TorchScript LayerNorms at opsets 13 and 14, fused at 17: the ops that change in between
    (Add, Div, Mul, Pow, Reshape, Sub) do so only by steps the converter leaves as they are, so
    the opset is raised without a single converter call; the result is exact."""
    from normopt import opset

    assert opset.compatible("Pow", 14, 17) and opset.compatible("Identity", 13, 17)
    assert not opset.compatible("ReduceMean", 17, 18) and not opset.compatible("Softmax", 12, 13)
    assert not opset.compatible("BatchNormalization", 13, 14)   # its own adapter (training outputs)
    assert not opset.compatible("Pow", 17, 17) and not opset.compatible("NoSuchOp", 14, 17)
    real, calls = opset.version_converter.convert_version, []
    monkeypatch.setattr(opset.version_converter, "convert_version", lambda m, target: calls.append(target) or real(m, target))
    model = onnx.load(Path(__file__).parent.parent / "models" / f"{name}.onnx")
    out, result = pipeline.run(model)
    assert op_counts(out)["LayerNormalization"] == op_counts(model)["Sqrt"] > 0
    assert [(u.from_version, u.to_version) for u in result.upgrades] == [(model.opset_import[0].version, 17)]
    assert 17 not in calls   # (shape inference raises an opset 13 model to 14 for its own use)
    assert_equivalent(model, out)


@pytest.mark.parametrize("path", ["in place", "model"])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_opset_upgrade_tells_node_forms_apart_by_attribute_values(op, path, monkeypatch):
    """Nodes of one op and the same attribute names may convert differently: below opset 13
    Softmax(axis=1) of a rank-3 tensor is over axes 1 and 2 (the converter adds a Flatten),
    while Softmax(axis=-1) converts to itself. The first one met must not decide for both."""
    from normopt import opset

    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]), helper.make_node("Sub", ["x", "mean"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
             helper.make_node("Div", ["d", "std"], ["n"]),
             helper.make_node(op, ["n"], ["s1"], axis=-1), helper.make_node(op, ["s1"], ["y"], axis=1)]
    model = make_model(nodes, [("x", FLOAT, [2, 3, 8])], [("y", FLOAT, [2, 3, 8])],
                       {"eps": np.array(1e-5, np.float32)}, opset=12)
    if path == "model":
        monkeypatch.setattr(opset, "NODEWISE_MIN_NODES", 0)
        out = opset.convert(onnx.shape_inference.infer_shapes(model), 17)
        assert op_counts(out)[op] == 2 and op_counts(out)["Flatten"] == 1
    else:
        out, result = pipeline.run(model)
        assert op_counts(out)["LayerNormalization"] == 1 and result.upgrades
        assert op_counts(out)[op] == 2 and op_counts(out)["Flatten"] == 1
    assert_equivalent(model, out)


def test_external_data_without_length_entries_is_read_at_each_tensors_own_size(tmp_path, rng):
    """``length`` is optional in an external data entry: a tensor then takes its own byte size
    from its offset (as onnxruntime reads it), not the rest of the file. The weights fold, the
    output's entries give each tensor's size, and it computes what the input does."""
    from test_fold import conv_bn_chain
    model = conv_bn_chain(rng, c=16)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)   # (onnx.save moves the weights of the model it saves out)
    save_external(model, tmp_path / "m.onnx", "w.bin")
    drop_lengths(tmp_path / "m.onnx")
    before = digests(tmp_path)
    for verify in ([], ["--no-verify"]):
        out = tmp_path / f"f{len(verify)}.onnx"
        res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(out), "--provider", "cpu", *verify])
        assert res.exit_code == 0, res.output
        written = onnx.load(out, load_external_data=False)
        assert op_counts(written) == {"Conv": 3, "Relu": 3}
        lengths = {t.name: int(dict((e.key, e.value) for e in t.external_data)["length"])
                   for t in written.graph.initializer if t.external_data}
        assert lengths and all(n == ir.stored_bytes(t) for t in written.graph.initializer if t.name in lengths
                               for n in [lengths[t.name]])
        assert_equivalent(reference, onnx.load(out))
    assert {k: v for k, v in digests(tmp_path).items() if k in before} == before


@pytest.mark.parametrize("length", [True, False])
def test_external_int4_weight_is_read_at_its_packed_size(tmp_path, rng, length):
    """An INT4 tensor takes half a byte per element: its external range (given, or taken from
    its shape without a length entry) is not refused as too short, and the model folds with
    its bytes streamed through unchanged."""
    vals = rng.integers(-8, 8, 64 * 32)
    nibbles = (vals & 0xF).astype(np.uint8)
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    q = helper.make_tensor("q", onnx.TensorProto.INT4, [64, 32], packed, raw=True)
    assert ir.stored_bytes(q) == 64 * 32 // 2
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=1), helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", FLOAT, [2, 32])],
                              [q, numpy_helper.from_array(np.full(32, 0.1, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    if not length:
        drop_lengths(tmp_path / "m.onnx")
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "f.onnx"), "--provider", "cpu"])
    assert res.exit_code == 0, res.output
    out = onnx.load(tmp_path / "f.onnx")
    assert numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "q")).tobytes() == \
        numpy_helper.to_array(q).tobytes()
    assert_equivalent(reference, out)


@pytest.mark.slow
def test_no_op_steps_agree_with_the_converter_on_every_backend_test_node():
    """Each node of onnx's own backend test cases, at each opset from 7 where its op has the
    same definition, raised to the next opset and to 17, 18, 21 and 23: wherever
    ``opset.compatible`` says the converter leaves it as it is, converting it alone does."""
    import warnings

    from onnx.backend.test.case import node as cases
    from normopt import opset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = [case.model for case in cases.collect_testcases(None)]
    forms = {}
    for model in models:
        version = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), None)
        for node in model.graph.node if version else []:
            if node.domain not in ("", "ai.onnx") or opset._has_subgraphs(node) or \
                    not onnx.defs.has(node.op_type, version, ""):
                continue
            since = onnx.defs.get_schema(node.op_type, version, "").since_version
            for source in range(max(7, since), version + 1):
                forms.setdefault((source, opset._form(node)), node)
    checked, differ = 0, []
    for (source, key), node in forms.items():
        for target in sorted({source + 1, 17, 18, 21, 23}):
            if target <= source or not opset.compatible(key[0], source, target):
                continue
            bare = opset._bare(node)
            probe = opset._convert_one(bare, source, target, {}, require_types=False)
            checked += 1
            if probe is None or [*probe.graph.node] != [bare] or probe.graph.initializer:
                differ.append((key[0], source, target))
    assert checked > 3000 and not differ, differ[:10]

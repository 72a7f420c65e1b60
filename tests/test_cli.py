"""The command line: exit codes, messages, outputs, reports."""
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from helpers import FLOAT, make_model, op_counts
from normopt.cli import cli
from normopt.providers import select_provider
from test_fold import BROKEN, broken_pass, conv_bn_chain  # noqa: F401  (fixture reuse)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def model_path(tmp_path, rng):
    path = tmp_path / "net.onnx"
    onnx.save(conv_bn_chain(rng), path)
    return path


def test_cli_fold_writes_default_output_and_summary(model_path):
    before = model_path.read_bytes()
    res = invoke("fold", model_path)
    assert res.exit_code == 0, res.output
    out = model_path.with_name("net.normopt.onnx")
    assert op_counts(onnx.load(out)) == {"Conv": 3, "Relu": 3}
    assert re.search(r"^fold-batchnorm +3 +0$", res.output, re.M)  # pass, applied, skipped
    assert "nodes: 9 -> 6" in res.output and "verify: passed on" in res.output and f"wrote {out}" in res.output
    assert model_path.read_bytes() == before


def test_cli_fold_output_option_report_and_byte_identical_rerun(model_path, tmp_path):
    a, b, rep = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "r.json"
    assert invoke("fold", model_path, "-o", a, "--report", rep).exit_code == 0
    assert invoke("fold", model_path, "-o", b, "-q").exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    data = json.loads(rep.read_text())
    assert data["status"] == "ok" and data["written"] is True
    bn = next(p for p in data["passes"] if p["name"] == "fold-batchnorm")
    assert [p["name"] for p in data["passes"]][:2] == ["fold-weightnorm", "fold-batchnorm"] and len(bn["applied"]) == 3
    assert data["verification"]["provider"] in ("cpu", "cuda") and data["verification"]["passed"] is True
    assert data["verification"]["inputs"][0] == {"name": "x", "dtype": "float32", "shape": [1, 4, 6, 6],
                                                 "source": "normal(0, 1)", "defaulted": False}
    again = tmp_path / "c.onnx"
    res = invoke("fold", a, "-o", again)
    assert re.search(r"^fold-batchnorm +0 ", res.output, re.M) and again.read_bytes() == a.read_bytes()


def test_cli_fold_dry_run_writes_nothing(model_path):
    res = invoke("fold", model_path, "--dry-run")
    assert res.exit_code == 0 and "dry run" in res.output
    assert not model_path.with_name("net.normopt.onnx").exists()


def test_cli_fold_passes_and_skip(model_path):
    res = invoke("fold", model_path, "--skip", "fold-batchnorm", "--dry-run")
    assert res.exit_code == 0 and "fold-batchnorm" not in res.output


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _truncated(tmp_path, model_path):
    return _write(tmp_path, "cut.onnx", model_path.read_bytes()[:200])


def _rejected(tmp_path, rng):
    model = conv_bn_chain(rng)
    model.graph.node[0].input[0] = "undefined_tensor"
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("make, message", [
    (lambda tmp, m, rng: tmp / "missing.onnx", "no such file"),
    (lambda tmp, m, rng: _write(tmp, "empty.onnx", b""), "file is empty"),
    (lambda tmp, m, rng: _write(tmp, "rand.onnx", np.random.default_rng(0).bytes(256)), "not an ONNX model"),
    (lambda tmp, m, rng: _truncated(tmp, m), "cannot read"),
    (lambda tmp, m, rng: _rejected(tmp, rng), "reads 'undefined_tensor', which no node"),
])
def test_cli_bad_input_exit_2_one_line_no_output(make, message, tmp_path, model_path, rng):
    path = make(tmp_path, model_path, rng)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = invoke("fold", path)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read '{path}'") and message in lines[0]
    assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_verbose_shows_traceback(tmp_path):
    res = invoke("fold", tmp_path / "missing.onnx", "-v")
    assert res.exit_code == 2 and "Traceback" in res.output


def test_cli_unknown_pass_exit_2(model_path):
    res = invoke("fold", model_path, "--passes", "fold-bn")
    assert res.exit_code == 2
    assert "error: unknown pass 'fold-bn'; available: " in res.output and "see 'normopt passes'" in res.output


def test_cli_output_equal_to_input_is_refused(model_path):
    res = invoke("fold", model_path, "-o", model_path)
    assert res.exit_code == 2 and "is the input file" in res.output


def test_cli_output_folder_missing_fails_before_work(model_path, tmp_path):
    res = invoke("fold", model_path, "-o", tmp_path / "nope" / "out.onnx")
    assert res.exit_code == 2 and "does not exist" in res.output and "fold-batchnorm" not in res.output


def test_cli_provider_cuda_unavailable_exit_3(model_path):
    if select_provider("auto").name == "cuda":
        pytest.skip("CUDA is usable here")
    res = invoke("fold", model_path, "--provider", "cuda")
    assert res.exit_code == 3 and "error: CUDA provider requested but not usable" in res.output
    assert not model_path.with_name("net.normopt.onnx").exists()


def _other_interface_model(tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [64])], [("y", FLOAT, [64])], opset=13)
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    return path


def test_cli_verification_failure_exit_1_output_not_written(model_path, tmp_path, broken_pass, monkeypatch):  # noqa: F811
    monkeypatch.setattr("normopt.fold.MAX_ROLLBACK_ROUNDS", 0)  # no rollback: the wrong fold stays
    out = model_path.with_name("net.normopt.onnx")
    res = invoke("fold", model_path, "--passes", BROKEN, "--report", tmp_path / "r.json")
    assert res.exit_code == 1
    assert "error: output 'r3' differs: max |diff|" in res.output and "output NOT written" in res.output
    assert not out.exists()
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "verification_failed"
    forced = invoke("fold", model_path, "--passes", BROKEN, "--force")
    assert forced.exit_code == 1 and "written anyway" in forced.output and out.exists()
    assert invoke("fold", model_path, "--passes", BROKEN, "--no-verify", "-o", tmp_path / "nv.onnx").exit_code == 0


def test_cli_rollback_reported_and_strict(model_path, broken_pass):  # noqa: F811
    res = invoke("fold", model_path, "--passes", BROKEN)
    assert res.exit_code == 0 and f"rolled back {BROKEN} at bn2" in res.output
    rep = model_path.with_name("s.json")
    strict = invoke("fold", model_path, "--passes", BROKEN, "--strict", "-o", model_path.with_name("s.onnx"),
                    "--report", rep)
    assert strict.exit_code == 1 and "--strict" in strict.output
    assert not model_path.with_name("s.onnx").exists()
    data = json.loads(rep.read_text())  # the rollback that failed the run is in the report
    assert data["status"] == "rolled_back_strict" and data["written"] is False and data["output"] is None
    assert [rb["anchor"] for rb in data["rollbacks"]] == ["bn2"] and data["verification"]["passed"] is True


def test_cli_verify_same_and_different(model_path, tmp_path):
    assert invoke("verify", model_path, model_path).exit_code == 0
    res = invoke("verify", model_path, _other_interface_model(tmp_path))
    assert res.exit_code == 2 and "different" in res.output  # different interfaces
    other = tmp_path / "other.onnx"
    model = onnx.load(model_path)
    model.graph.initializer[0].raw_data = (np.frombuffer(model.graph.initializer[0].raw_data, np.float32) * 2).tobytes()
    onnx.save(model, other)
    res = invoke("verify", model_path, other, "--report", tmp_path / "v.json")
    assert res.exit_code == 1 and "error: output 'r3' differs" in res.output
    assert json.loads((tmp_path / "v.json").read_text())["verification"]["passed"] is False


def test_cli_passes_lists_registry():
    res = invoke("passes")
    assert res.exit_code == 0 and res.output.startswith("fold-weightnorm")


def test_python_dash_m_normopt_works():
    res = subprocess.run([sys.executable, "-m", "normopt", "passes"], capture_output=True, text=True)
    assert res.returncode == 0 and "fold-batchnorm" in res.stdout


def test_command_process_writes_everything_before_it_exits(model_path, tmp_path):
    """The command ends its process at once (no teardown of the graph): the output, the report
    and what it prints are complete, and the exit code is the command's."""
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    res = subprocess.run([sys.executable, "-m", "normopt", "fold", str(model_path), "-o", str(out), "--report",
                          str(rep)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and res.stdout.endswith("\n")
    onnx.checker.check_model(onnx.load(out))
    assert json.loads(rep.read_text())["verification"]["passed"] is True
    bad = subprocess.run([sys.executable, "-m", "normopt", "fold", str(tmp_path / "missing.onnx")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: cannot read")
    usage = subprocess.run([sys.executable, "-m", "normopt", "fold", "--no-such-option"], capture_output=True,
                           text=True)
    assert usage.returncode == 2 and usage.stderr.splitlines() == [
        "error: No such option '--no-such-option' (see 'normopt fold --help')"]


def test_command_outlives_a_closed_or_broken_stdout(model_path, tmp_path):
    """What the run does and its exit code do not depend on whether its summary could be
    printed: stdout closed by the caller (``>&-``), or a reader that went away (``| head``)."""
    out = tmp_path / "closed.onnx"
    closed = subprocess.run(f"{sys.executable} -m normopt fold {model_path} -o {out} >&-", shell=True,
                            capture_output=False, stderr=subprocess.PIPE, text=True)
    assert closed.returncode == 0 and closed.stderr == "" and out.exists()
    piped = tmp_path / "piped.onnx"
    broken = subprocess.run(f"{sys.executable} -m normopt fold {model_path} -o {piped} | true; "
                            "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", stderr=subprocess.PIPE,
                            text=True)
    assert broken.returncode == 0 and "Error" not in broken.stderr and piped.exists()


def test_a_failing_run_writes_its_error_report(model_path, tmp_path):
    """A report left from an earlier run must not read "ok" after a run that failed: the error
    is reported (kind "error", the one line and the exit code), valid under the schema."""
    import jsonschema
    from importlib import resources
    rep = tmp_path / "r.json"
    assert invoke("fold", str(model_path), "-o", str(tmp_path / "o.onnx"), "--report", str(rep)).exit_code == 0
    assert json.loads(rep.read_text())["status"] == "ok"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    res = invoke("fold", str(bad), "--report", str(rep))
    assert res.exit_code == 2
    doc = json.loads(rep.read_text())
    assert (doc["kind"], doc["status"], doc["exit_code"]) == ("error", "error", 2)
    assert doc["error"].startswith(f"cannot read '{bad}': file is not an ONNX model")
    schema = json.loads(resources.files("normopt").joinpath("schema/report.schema.json").read_text())
    jsonschema.validate(doc, schema)

def test_onnxruntime_failure_is_one_line_without_its_own_log(tmp_path):
    """onnxruntime logs a failing kernel on stderr itself before raising: the command says it
    once, in one line (the process's stderr, where that log would go, is what is checked)."""
    c = 2
    inits = {"w": np.ones((c, c, 1, 1), np.float32), "g": np.full(c, 2.0, np.float32), "b": np.zeros(c, np.float32),
             "m": np.zeros(c, np.float32), "v": np.ones(c, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
             helper.make_node("Expand", ["n", "shape"], ["y"])]  # random shape values do not broadcast
    model = make_model(nodes, [("x", FLOAT, [1, c, 3, 3]), ("shape", onnx.TensorProto.INT64, [4])],
                       [("y", FLOAT, [None, None, None, None])], inits, opset=13)
    path = tmp_path / "expand.onnx"
    onnx.save(model, path)
    res = subprocess.run([sys.executable, "-m", "normopt", "fold", str(path), "-o", str(tmp_path / "out.onnx")],
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: onnxruntime failed to run the model")
    assert not (tmp_path / "out.onnx").exists()



def test_cli_nondeterministic_input_model_is_named_not_blamed_on_a_rewrite(tmp_path, rng):
    model = conv_bn_chain(rng)
    last = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Dropout", [last, "ratio", "train"], ["dropped"]))
    model.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                                    onnx.numpy_helper.from_array(np.array(True), "train")])
    model.graph.output[0].name = "dropped"
    path = tmp_path / "dropout.onnx"
    onnx.save(model, path)
    res = invoke("fold", path, "--report", tmp_path / "r.json")
    assert res.exit_code == 1 and "the input model is not deterministic: output 'dropped'" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "input_not_deterministic"
    assert "rolled back" not in res.output and not (tmp_path / "dropout.normopt.onnx").exists()
    assert invoke("fold", path, "--no-verify").exit_code == 0


def test_cli_report_folder_missing_fails_before_work(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    res = invoke("fold", model_path, "-o", out, "--report", tmp_path / "nope" / "r.json")
    assert res.exit_code == 2 and "cannot write report" in res.output and "does not exist" in res.output
    assert not out.exists()  # no output next to an error: the run failed before any work
    res = invoke("verify", model_path, model_path, "--report", tmp_path / "nope" / "v.json")
    assert res.exit_code == 2 and "cannot write report" in res.output and "verify:" not in res.output


def test_cli_unwritable_output_folder_is_one_line_exit_2(model_path, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("normopt.model_io.tempfile.mkdtemp", refuse)
    res = invoke("fold", model_path, "-o", tmp_path / "out.onnx")
    assert res.exit_code == 2 and "internal error" not in res.output
    assert f"error: cannot write '{tmp_path / 'out.onnx'}': Permission denied" in res.output


def test_cli_missing_input_in_missing_folder_is_named_as_input(tmp_path):
    res = invoke("fold", tmp_path / "nope" / "net.onnx")
    assert res.exit_code == 2 and f"error: cannot read '{tmp_path / 'nope' / 'net.onnx'}': no such file" in res.output


@pytest.mark.parametrize("flag, value", [("--atol", "-1"), ("--rtol", "-0.5"), ("--atol", "nan")])
def test_cli_negative_or_nan_tolerance_is_usage_error_not_blamed_on_the_model(model_path, flag, value):
    res = invoke("fold", model_path, flag, value, "--dry-run")
    assert res.exit_code == 2 and f"error: {flag} must be a number >= 0" in res.output
    assert "not deterministic" not in res.output


def test_ir3_initializers_left_out_of_the_graph_inputs_are_listed_in_the_output(tmp_path, rng):
    """IR version 3 requires every initializer to be listed as a graph input, and the checker
    refuses a model that leaves one out; onnxruntime runs it (its own sample mul_1.onnx is one).
    The fold lists them in its output, says so, and still folds and verifies."""
    model = conv_bn_chain(rng)
    model.ir_version = 3
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 8))
    path = tmp_path / "ir3.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    with pytest.raises(onnx.checker.ValidationError, match="in initializer but not in graph input"):
        onnx.checker.check_model(onnx.load(path))
    res = invoke("fold", path, "-o", tmp_path / "out.onnx")
    assert res.exit_code == 0, res.output
    assert "note: 15 initializer(s) not listed as graph inputs ('w1', ...) are listed in the output, " \
           "as IR version 3 requires" in res.output
    out = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == 3 and op_counts(out) == {"Conv": 3, "Relu": 3}
    assert [i.name for i in out.graph.input] == ["x"] + [t.name for t in out.graph.initializer]
    assert "verify: passed" in res.output and path.read_bytes() == before


def test_in_place_through_a_link_replaces_its_target_and_keeps_the_files_mode(model_path, tmp_path):
    import os
    import stat
    real = tmp_path / "real"
    real.mkdir()
    target = real / "m.onnx"
    target.write_bytes(model_path.read_bytes())
    target.chmod(0o640)
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    assert invoke("fold", str(link), "--in-place", "-q").exit_code == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert op_counts(onnx.load(target)).get("BatchNormalization", 0) == 0


def test_output_folder_for_one_model(model_path, tmp_path):
    """-o DIR/ (created) or an existing folder: the model is written there under its own name."""
    res = invoke("fold", str(model_path), "-o", f"{tmp_path / 'new'}/", "-q")
    assert res.exit_code == 0 and (tmp_path / "new" / model_path.name).exists()
    res = invoke("fold", str(model_path), "-o", str(tmp_path / "new"), "-q", "--force")
    assert res.exit_code == 0, res.output


def test_inputs_that_make_every_output_nan_verify_nothing(model_path, tmp_path):
    """NaN = NaN everywhere proves nothing: verification fails and says why."""
    x = onnx.load(model_path).graph.input[0]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    np.savez(tmp_path / "nan.npz", **{x.name: np.full(shape, np.nan, np.float32)})
    res = invoke("verify", str(model_path), str(model_path), "--inputs", str(tmp_path / "nan.npz"))
    assert res.exit_code == 1 and "every value of every output is NaN or Inf on every input set" in res.output


def test_numpy_warnings_do_not_reach_stderr(tmp_path):
    """A negative variance in a BatchNormalization is the passes' to judge, not a numpy warning."""
    c = 2
    inits = {"w": np.ones((c, c, 1, 1), np.float32), "g": np.ones(c, np.float32), "b": np.zeros(c, np.float32),
             "m": np.zeros(c, np.float32), "v": np.array([1.0, -2.0], np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])]
    path = tmp_path / "negvar.onnx"
    onnx.save(make_model(nodes, [("x", FLOAT, [1, c, 4, 4])], [("y", FLOAT, [1, c, 4, 4])], inits, opset=17), path)
    res = subprocess.run([sys.executable, "-m", "normopt", "fold", str(path), "-o", str(tmp_path / "o.onnx"), "-q"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "", res.stderr


@pytest.mark.parametrize("jobs", [[], ["-j", "2"]])
def test_quiet_fold_of_a_bfloat16_model_prints_nothing(tmp_path, jobs):
    """graphsurgeon warns about every bfloat16 tensor it imports ("Could not convert: BFLOAT16
    to a corresponding NumPy type"), and first that the ``colored`` module is missing: lines
    besides the command's own, which even -q printed. In the command and its -j workers, they
    are not printed."""
    bf16 = onnx.TensorProto.BFLOAT16   # a LayerNorm computed in bfloat16, its tensors declared
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=bf16), helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1]),
             helper.make_node("Sub", ["h", "mu"], ["d"]), helper.make_node("Mul", ["d", "d"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]), helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["std"]), helper.make_node("Div", ["d", "std"], ["n"]),
             helper.make_node("Mul", ["n", "g"], ["ng"]), helper.make_node("Cast", ["ng"], ["y"], to=FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [2, 4, 8])],
                              [helper.make_tensor_value_info("y", FLOAT, [2, 4, 8])],
                              [helper.make_tensor("eps", bf16, [], [1e-5]), helper.make_tensor("g", bf16, [8], [1.5] * 8)])
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    assert any(vi.type.tensor_type.elem_type == bf16 for vi in model.graph.value_info)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    for name in ("a", "b"):
        onnx.save(model, tmp_path / "in" / f"{name}.onnx")
    models = [str(tmp_path / "in" / "a.onnx")] if not jobs else [str(tmp_path / "in")]
    res = subprocess.run([sys.executable, "-m", "normopt", "fold", *models, "-o", str(tmp_path / "out" / "a.onnx")
                          if not jobs else str(tmp_path / "out"), "--no-verify", "-q", *jobs],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""


def test_the_checkers_warning_about_experimental_ops_stays_off_stdout(tmp_path):
    """onnx's checker prints "Warning: Model contains experimental ops: ATen" on the C++
    standard output (a PyTorch export with ATen fallback): in the command that output is
    inspect's JSON, or nothing at all with -q."""
    model = make_model([helper.make_node("ATen", ["x"], ["y"], operator="abs")], [("x", FLOAT, [2, 3])],
                       [("y", FLOAT, [2, 3])], opset=17)
    onnx.save(model, tmp_path / "m.onnx")
    run = [sys.executable, "-m", "normopt"]
    res = subprocess.run([*run, "inspect", str(tmp_path / "m.onnx"), "--format", "json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["sites"] == [] and "experimental" not in res.stdout + res.stderr
    res = subprocess.run([*run, "fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "f.onnx"), "--no-verify", "-q",
                          "--strict"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stdout + res.stderr

"""Real reports (fold, verify, inspect, batch; passing and failing) validate against the shipped schema."""
import json
from importlib import resources

import jsonschema
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner

from normopt import __version__
from normopt.cli import cli
from test_fold import BROKEN, broken_pass, conv_bn_chain  # noqa: F401  (fixture reuse)

PROVIDERS = {"CPUExecutionProvider", "CUDAExecutionProvider"}


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(resources.files("normopt").joinpath("schema/report.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture
def model_path(tmp_path, rng):
    path = tmp_path / "net.onnx"
    onnx.save(conv_bn_chain(rng), path)
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def valid(validator, path_or_text) -> dict:
    text = path_or_text.read_text() if hasattr(path_or_text, "read_text") else path_or_text
    doc = json.loads(text)
    errors = sorted(validator.iter_errors(doc), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors][:5]
    assert doc["schema_version"] == 1
    assert doc["versions"] == {"normopt": __version__, "onnx": onnx.__version__,
                               "onnxruntime": onnxruntime.__version__, "python": doc["versions"]["python"]}
    assert doc["peak_memory_bytes"] > 10 * 2**20  # a Python process with onnxruntime loaded
    return doc


def sessions_named_as_onnxruntime_names_them(verification):
    assert [s["model"] for s in verification["sessions"]] == ["reference", "candidate"]
    for s in verification["sessions"]:
        assert set(s["providers"]) <= PROVIDERS and s["providers"][-1] == "CPUExecutionProvider"
        assert (s["providers"][0] == "CUDAExecutionProvider") == (verification["provider"] == "cuda")


def test_fold_report_ok_validates(validator, model_path, tmp_path):
    rep = tmp_path / "r.json"
    assert run("fold", model_path, "-o", tmp_path / "o.onnx", "--report", rep).exit_code == 0
    doc = valid(validator, rep)
    assert doc["kind"] == "fold" and doc["status"] == "ok" and doc["written"] is True and doc["target"] == "portable"
    sessions_named_as_onnxruntime_names_them(doc["verification"])


def test_fold_report_failing_and_strict_validate(validator, model_path, tmp_path, broken_pass, monkeypatch):  # noqa: F811
    strict = tmp_path / "s.json"
    assert run("fold", model_path, "--passes", BROKEN, "--strict", "--report", strict).exit_code == 1
    assert valid(validator, strict)["status"] == "rolled_back_strict"
    monkeypatch.setattr("normopt.fold.MAX_ROLLBACK_ROUNDS", 0)
    rep = tmp_path / "r.json"
    assert run("fold", model_path, "--passes", BROKEN, "--report", rep).exit_code == 1
    doc = valid(validator, rep)
    assert doc["status"] == "verification_failed" and doc["verification"]["passed"] is False
    assert doc["written"] is False and doc["output"] is None


def test_verify_reports_validate(validator, model_path, tmp_path):
    other = tmp_path / "other.onnx"
    model = onnx.load(model_path)
    model.graph.initializer[0].float_data[:] = []
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]) * 2
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, model.graph.initializer[0].name))
    onnx.save(model, other)
    same, differs = tmp_path / "same.json", tmp_path / "differs.json"
    assert run("verify", model_path, model_path, "--report", same).exit_code == 0
    assert run("verify", model_path, other, "--report", differs).exit_code == 1
    assert valid(validator, same)["status"] == "ok"
    doc = valid(validator, differs)
    assert doc["kind"] == "verify" and doc["status"] == "verification_failed"
    sessions_named_as_onnxruntime_names_them(doc["verification"])


def test_inspect_json_validates(validator, model_path):
    res = run("inspect", model_path, "--format", "json")
    assert res.exit_code == 0
    assert valid(validator, res.output)["summary"] == {"rewrite": 3, "skip": 0, "keep": 0}


def test_batch_and_check_reports_validate(validator, model_path, tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    rep = tmp_path / "batch.json"
    res = run("fold", model_path, tmp_path / "broken.onnx", "-o", tmp_path / "out", "--report", rep)
    assert res.exit_code == 2
    doc = valid(validator, rep)
    assert doc["summary"] == {"files": 2, "ok": 1, "failed": 1}
    assert [f["status"] for f in doc["files"]] == ["ok", "error"] and doc["files"][1]["exit_code"] == 2
    check = tmp_path / "check.json"
    assert run("fold", model_path, "--check", "--report", check).exit_code == 4
    doc = valid(validator, check)
    assert doc["status"] == "not_folded" and len(doc["pending"]) == 3 and doc["written"] is False


def test_schema_rejects_a_report_without_its_version(validator, model_path, tmp_path):
    rep = tmp_path / "r.json"
    run("fold", model_path, "--dry-run", "--report", rep)
    doc = json.loads(rep.read_text())
    del doc["schema_version"]
    assert not validator.is_valid(doc)
    doc["schema_version"], doc["status"] = 1, "fine"
    assert not validator.is_valid(doc)


def test_verify_report_names_its_input_sets_and_atol_rules(validator, model_path, tmp_path):
    report = tmp_path / "r.json"
    assert run("verify", model_path, model_path, "--report", report).exit_code == 0
    doc = valid(validator, report)
    assert doc["verification"]["input_sets"] == ["normal", "offset", "degenerate"]
    (out,) = doc["verification"]["outputs"]
    assert out["atol_rule"] in ("dtype default", "output magnitude", "input sensitivity")
    assert out["inputs"].endswith("inputs (seed 0)")
    out["atol_rule"] = "guessed"
    assert list(validator.iter_errors(doc))


def test_report_versions_do_not_import_onnxruntime():
    """A run without verification never loads onnxruntime; its report still names its version."""
    import subprocess
    import sys

    code = ("import sys, json; from normopt import report; v = report.versions(); "
            "print(json.dumps([v['onnxruntime'], 'onnxruntime' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    version, imported = json.loads(out)
    assert version == onnxruntime.__version__ and imported is False

"""fold on many models (-j), --check for CI, quiet and summary output."""
import json

import onnx
import pytest
from click.testing import CliRunner

from helpers import op_counts
from normopt.cli import cli
from test_fold import conv_bn_chain


def run(*args):
    return CliRunner(mix_stderr=False).invoke(cli, [str(a) for a in args]) if _mix_stderr_supported() \
        else CliRunner().invoke(cli, [str(a) for a in args])


def _mix_stderr_supported():
    import inspect
    return "mix_stderr" in inspect.signature(CliRunner).parameters


@pytest.fixture
def models(tmp_path, rng):
    folder = tmp_path / "models"
    folder.mkdir()
    for name, layers in (("a", 1), ("b", 2)):
        onnx.save(conv_bn_chain(rng, layers=layers), folder / f"{name}.onnx")
    return folder


def test_fold_folder_and_files_into_output_folder(models, tmp_path, rng):
    extra = tmp_path / "c.onnx"
    onnx.save(conv_bn_chain(rng, layers=3), extra)
    before = {p: p.read_bytes() for p in [*models.iterdir(), extra]}
    out = tmp_path / "out"
    res = run("fold", models, extra, "-o", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "b.onnx", "c.onnx"]
    assert op_counts(onnx.load(out / "c.onnx")) == {"Conv": 3, "Relu": 3}
    lines = res.stdout.strip().splitlines()
    assert [ln.split()[:2] for ln in lines[:3]] == [["ok", str(models / "a.onnx")], ["ok", str(models / "b.onnx")],
                                                    ["ok", str(extra)]]
    assert "1 rewrite(s), nodes 3 -> 2, verified on" in lines[0]
    assert lines[-1].startswith("3 model(s): 3 ok, 0 failed;")
    assert all(p.read_bytes() == data for p, data in before.items())  # inputs untouched


def test_fold_batch_in_parallel_processes_gives_the_same_outputs(models, tmp_path):
    assert run("fold", models, "-o", tmp_path / "serial", "-q").exit_code == 0
    res = run("fold", models, "-o", tmp_path / "parallel", "-j", "2")
    assert res.exit_code == 0, res.output
    for name in ("a.onnx", "b.onnx"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes()


def test_fold_batch_one_bad_file_fails_the_run_but_not_the_others(models, tmp_path):
    (models / "broken.onnx").write_bytes(b"\x00garbage")
    res = run("fold", models, "-o", tmp_path / "out")
    assert res.exit_code == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.onnx", "b.onnx"]
    text = res.output if not hasattr(res, "stderr") else res.stdout + res.stderr
    assert f"FAILED  {models / 'broken.onnx'}: cannot read" in text and "(exit 2)" in text
    assert "3 model(s): 2 ok, 1 failed" in text
    assert "error: 1 of 3 model(s) failed (first: " in text


def test_fold_batch_default_outputs_beside_inputs_and_skips_earlier_outputs(models):
    assert run("fold", models).exit_code == 0
    assert sorted(p.name for p in models.iterdir()) == ["a.normopt.onnx", "a.onnx", "b.normopt.onnx", "b.onnx"]
    res = run("fold", models, "--dry-run")  # the .normopt.onnx outputs are not inputs
    assert res.exit_code == 0 and "2 model(s): 2 ok" in res.output


def test_fold_batch_usage_errors(models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run("fold", empty)
    assert res.exit_code == 2 and f"error: folder '{empty}' has no .onnx models" in res.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.onnx").write_bytes((models / "a.onnx").read_bytes())
    res = run("fold", models, other / "a.onnx", "-o", tmp_path / "out")
    assert res.exit_code == 2 and "would both be written to" in res.output
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file", tmp_path / "new.onnx"):
        res = run("fold", models, "-o", target)
        assert res.exit_code == 2 and "names an output folder" in res.output
    assert not (tmp_path / "new.onnx").exists()
    res = run("fold", models, "-o", models)
    assert res.exit_code == 2 and "is the input file" in res.output


def test_check_exit_4_lists_what_is_left_and_writes_nothing(models, tmp_path):
    path = models / "b.onnx"
    before = sorted(models.iterdir())
    res = run("fold", path, "--check", "-o", tmp_path / "o.onnx")
    assert res.exit_code == 4, res.output
    assert "check: 2 rewrite(s) left to apply:" in res.output
    assert "native BatchNormalization at bn1 -> 'n1': rewrite -> folded into Conv" in res.output
    assert "error: --check: 2 rewrite(s) left to apply" in res.output
    assert sorted(models.iterdir()) == before and not (tmp_path / "o.onnx").exists()
    folded = tmp_path / "folded.onnx"
    assert run("fold", path, "-o", folded, "-q").exit_code == 0
    res = run("fold", folded, "--check")
    assert res.exit_code == 0 and "check: 0 rewrite(s) left to apply; nothing to do" in res.output


def test_check_on_a_folder_names_each_model_left_to_fold(models, tmp_path):
    assert run("fold", models / "a.onnx", "-o", tmp_path / "a.onnx").exit_code == 0
    (models / "a.onnx").write_bytes((tmp_path / "a.onnx").read_bytes())  # a is folded, b is not
    res = run("fold", models, "--check")
    assert res.exit_code == 4
    text = res.output if not hasattr(res, "stderr") else res.stdout + res.stderr
    assert f"ok      {models / 'a.onnx'}: nothing left to rewrite" in text
    assert f"LEFT    {models / 'b.onnx'}: --check: 2 rewrite(s) left to apply" in text


def test_quiet_prints_nothing_on_success_and_only_errors_on_failure(models, tmp_path):
    res = run("fold", models / "a.onnx", "-o", tmp_path / "o.onnx", "-q")
    assert res.exit_code == 0 and res.output == ""
    res = run("fold", models / "a.onnx", "--check", "-q")
    assert res.exit_code == 4 and res.output.strip().splitlines() == [
        "error: --check: 1 rewrite(s) left to apply; run 'normopt fold' on it"]


def test_summary_groups_skip_reasons_and_counts_them(tmp_path, rng):
    model = conv_bn_chain(rng, layers=3)
    for node in model.graph.node:  # every BatchNormalization reads a graph input: nothing to fold into
        if node.op_type == "BatchNormalization":
            node.input[0] = "x" if node.name == "bn1" else node.input[0]
    model.graph.output.extend([onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4, 6, 6])
                               for n in ("c2", "c3")])  # conv outputs also graph outputs
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    res = run("fold", path, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "fold-batchnorm           0        3" in res.output
    assert "  2 x … output also feeds graph output (bn2, bn3)" in res.output
    assert "  1 x input 'x' is a graph input: no producer to fold into (bn1)" in res.output
    data = json.loads(run("fold", path, "--dry-run", "--report", tmp_path / "r.json").output and
                      (tmp_path / "r.json").read_text())
    bn = next(p for p in data["passes"] if p["name"] == "fold-batchnorm")
    assert len(bn["skipped"]) == 3


def test_a_model_named_twice_is_folded_once(models, tmp_path):
    """m.onnx and ./m.onnx (or a folder and one of its files) are one model: folding it twice
    at once would race for its output."""
    res = run("fold", models, models / "a.onnx", "-o", tmp_path / "out", "-j", "2")
    assert res.exit_code == 0, res.output
    assert res.output.count("a.onnx ->") == 1

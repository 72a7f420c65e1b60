"""Output-path problems: a clear error, no partial file, the input untouched; ``--in-place``
replaces the input atomically, only once the result verifies, and never writes over the input's
own data file."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from helpers import assert_equivalent, make_model, op_counts
from normopt import model_io
from normopt.cli import cli

FLOAT = TensorProto.FLOAT


def conv_bn(rng, c=32):
    """Conv + BatchNormalization + Conv, weights of c*c*9 elements: large enough to stay in the
    external data file when the model has one (the second Conv's is never rewritten)."""
    inits = {"w": (rng.standard_normal((c, c, 3, 3)) * 0.1).astype(np.float32),
             "w2": (rng.standard_normal((c, c, 3, 3)) * 0.1).astype(np.float32),
             "g": rng.uniform(0.5, 1.5, c).astype(np.float32), "b": rng.standard_normal(c).astype(np.float32),
             "m": rng.standard_normal(c).astype(np.float32), "v": rng.uniform(0.5, 2, c).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Conv", ["n", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return make_model(nodes, [("x", FLOAT, [1, c, 5, 5])], [("y", FLOAT, [1, c, 5, 5])], inits, opset=15)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(res, code: int, fragment: str) -> None:
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], res.stderr
    assert "Traceback" not in res.output


@pytest.fixture
def src(tmp_path, rng):
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save(conv_bn(rng), folder / "m.onnx")
    return folder


@pytest.fixture
def src_external(tmp_path, rng):
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save(conv_bn(rng), folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=1024)
    return folder


def test_missing_output_folder(src, tmp_path):
    before = digests(src)
    res = invoke("fold", src / "m.onnx", "-o", tmp_path / "nowhere" / "o.onnx", "--provider", "cpu")
    one_error_line(res, 2, "does not exist")
    assert not (tmp_path / "nowhere").exists() and digests(src) == before


@pytest.mark.parametrize("verify", [True, False])
def test_unwritable_output_folder(src, tmp_path, monkeypatch, verify):
    """A folder we may not write to (as root, chmod does not stop writes: the refusal is injected
    where the temporary folder is made)."""
    out = tmp_path / "out"
    out.mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out))

    monkeypatch.setattr("tempfile.mkdtemp", refuse)
    before = digests(src)
    res = invoke("fold", src / "m.onnx", "-o", out / "o.onnx", *(["--provider", "cpu"] if verify else ["--no-verify"]))
    one_error_line(res, 2, "Permission denied")
    assert list(out.iterdir()) == [] and digests(src) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_output_folder(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        res = invoke("fold", src / "m.onnx", "-o", out / "o.onnx", "--provider", "cpu")
        one_error_line(res, 2, "Permission denied")
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_output_equal_to_input_needs_in_place(src):
    before = digests(src)
    res = invoke("fold", src / "m.onnx", "-o", src / "m.onnx", "--provider", "cpu")
    one_error_line(res, 2, "is the input file; choose another -o, or --in-place")
    assert digests(src) == before


@pytest.mark.parametrize("verify", [True, False])
def test_output_data_file_that_another_model_uses_is_refused(src_external, rng, verify):
    """``-o x.onnx`` writes its weights to ``x.onnx.data``: when another model in that folder
    keeps its weights there, writing over it would change what that model computes. Refused
    before any work, nothing written; the output's own earlier data file is written over."""
    out = src_external.parent / "out"
    out.mkdir()
    onnx.save(conv_bn(rng, c=16), out / "other.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="x.onnx.data", size_threshold=1024)
    before = {**digests(src_external), **{f"out/{k}": v for k, v in digests(out).items()}}
    res = invoke("fold", src_external / "m.onnx", "-o", out / "x.onnx", "--provider", "cpu",
                 *([] if verify else ["--no-verify"]))
    one_error_line(res, 2, "(the output's data file): another model in its folder refers to it")
    assert {**digests(src_external), **{f"out/{k}": v for k, v in digests(out).items()}} == before
    (out / "other.onnx").unlink()   # nothing else refers to it now: a plain rewrite of the output
    res = invoke("fold", src_external / "m.onnx", "-o", out / "x.onnx", "--provider", "cpu",
                 *([] if verify else ["--no-verify"]))
    assert res.exit_code == 0, res.output
    assert model_io.external_files_at(out / "x.onnx") == {os.path.realpath(out / "x.onnx.data")}


@pytest.mark.parametrize("flag", ["--no-verify", "--force"])
def test_in_place_only_after_verification(src, flag):
    before = digests(src)
    one_error_line(invoke("fold", src / "m.onnx", "--in-place", flag), 2, f"cannot be combined with {flag}")
    one_error_line(invoke("fold", src / "m.onnx", "--in-place", "-o", src / "x.onnx"), 2, "takes no -o")
    assert digests(src) == before


def test_in_place_replaces_the_model(src, tmp_path):
    original = onnx.load(src / "m.onnx")
    res = invoke("fold", src / "m.onnx", "--in-place", "--provider", "cpu")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in src.iterdir()) == ["m.onnx"]  # nothing beside it, no temporary files
    folded = onnx.load(src / "m.onnx")
    assert op_counts(folded) == {"Conv": 2}
    assert_equivalent(original, folded)


def _locations(path: Path) -> set[str]:
    header = onnx.load(path, load_external_data=False)
    return {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}


def test_in_place_with_external_data_switches_to_new_data_and_removes_the_old(src_external, tmp_path):
    """The new weights go to a data file that did not exist (the input's is never written over),
    the model's rename is the switch, and then the replaced model's data file, which nothing
    refers to any more, is removed: the folder holds one consistent model and its data."""
    original = onnx.load(src_external / "m.onnx")  # with its weights
    report_path = tmp_path / "r.json"
    res = invoke("fold", src_external / "m.onnx", "--in-place", "--provider", "cpu", "--report", report_path)
    assert res.exit_code == 0, res.output
    note = "removed the replaced model's data file 'm.onnx.data' (no model in the folder refers to it)"
    assert f"note: {note}" in res.stdout.splitlines()
    import json
    assert json.loads(report_path.read_text())["notes"] == [note]
    assert _locations(src_external / "m.onnx") == {"m.1.onnx.data"}
    assert sorted(p.name for p in src_external.iterdir()) == ["m.1.onnx.data", "m.onnx"]
    folded = onnx.load(src_external / "m.onnx")
    onnx.checker.check_model(folded, full_check=True)
    assert op_counts(folded) == {"Conv": 2}
    assert_equivalent(original, folded)
    # A second run goes the other way round: never writing over the data file in use.
    res = invoke("fold", src_external / "m.onnx", "--in-place", "--provider", "cpu")
    assert res.exit_code == 0, res.output
    assert "note: removed the replaced model's data file 'm.1.onnx.data'" in res.stdout
    assert sorted(p.name for p in src_external.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert _locations(src_external / "m.onnx") == {"m.onnx.data"}
    assert_equivalent(original, onnx.load(src_external / "m.onnx"))


def test_in_place_keeps_a_data_file_another_model_refers_to(src_external, rng):
    """Two models sharing one data file: folding one in place must not take the other's weights."""
    shared = onnx.load(src_external / "m.onnx", load_external_data=False)
    (src_external / "twin.onnx").write_bytes(shared.SerializeToString())
    twin_before = onnx.load(src_external / "twin.onnx")
    res = invoke("fold", src_external / "m.onnx", "--in-place", "--provider", "cpu")
    assert res.exit_code == 0, res.output
    assert "note: kept the replaced model's data file 'm.onnx.data': another model in the folder refers to it" \
        in res.stdout.splitlines()
    assert sorted(p.name for p in src_external.iterdir()) == ["m.1.onnx.data", "m.onnx", "m.onnx.data", "twin.onnx"]
    assert_equivalent(twin_before, onnx.load(src_external / "twin.onnx"))
    # Folding the twin too: now nothing refers to the shared file, and it goes.
    res = invoke("fold", src_external / "twin.onnx", "--in-place", "--provider", "cpu")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in src_external.iterdir()) == ["m.1.onnx.data", "m.onnx", "twin.onnx",
                                                               "twin.onnx.data"]
    for name in ("m.onnx", "twin.onnx"):
        assert_equivalent(twin_before, onnx.load(src_external / name))


def test_in_place_keeps_the_old_data_when_a_model_beside_it_cannot_be_read(src_external):
    (src_external / "broken.onnx").write_bytes(b"not a model")
    res = invoke("fold", src_external / "m.onnx", "--in-place", "--provider", "cpu")
    assert res.exit_code == 0, res.output
    assert "note: kept the replaced model's data file 'm.onnx.data': 'broken.onnx' in the folder could not be " \
        "read to tell whether it refers to it" in res.stdout.splitlines()
    assert (src_external / "m.onnx.data").exists() and _locations(src_external / "m.onnx") == {"m.1.onnx.data"}


def test_in_place_switch_failing_midway_leaves_the_original_model_and_data(src_external, monkeypatch):
    """The new data file is in place, then the model's rename fails: the new data file is taken
    back, and the original model and its data are untouched (by hash), nothing else is left."""
    before = digests(src_external)
    real = os.replace
    calls = []

    def replace(a, b):
        if Path(b).parent != src_external:  # (staging inside the temporary folder)
            return real(a, b)
        calls.append(Path(b).name)
        if Path(b).name == "m.onnx":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(b))
        return real(a, b)

    monkeypatch.setattr("normopt.cli.os.replace", replace)
    res = invoke("fold", src_external / "m.onnx", "--in-place", "--provider", "cpu")
    one_error_line(res, 2, "Input/output error")
    assert calls == ["m.1.onnx.data", "m.onnx"]  # it failed at the switch itself
    assert digests(src_external) == before
    assert sorted(p.name for p in src_external.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_in_place_old_data_that_cannot_be_removed_is_named(src_external, monkeypatch):
    """The switch is done and the new model is consistent: a data file left behind is a note."""
    original = onnx.load(src_external / "m.onnx")

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr("normopt.cli.os.unlink", refuse)
    res = invoke("fold", src_external / "m.onnx", "--in-place", "--provider", "cpu")
    assert res.exit_code == 0, res.output
    assert "note: could not remove the replaced model's data file 'm.onnx.data': Permission denied" \
        in res.stdout.splitlines()
    assert _locations(src_external / "m.onnx") == {"m.1.onnx.data"}
    assert_equivalent(original, onnx.load(src_external / "m.onnx"))


def _enospc(real):
    def write(*args, **kwargs):
        path = next(a for a in args if isinstance(a, Path))
        path.write_bytes(b"\0" * 100)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("verify", [True, False])
def test_disk_full(tmp_path, rng, monkeypatch, external, verify, request):
    src = request.getfixturevalue("src_external" if external else "src")
    out = tmp_path / "out"
    out.mkdir()
    writer = "_write_external" if external else "_write_single"
    monkeypatch.setattr(model_io, writer, _enospc(getattr(model_io, writer)))
    before = digests(src)
    res = invoke("fold", src / "m.onnx", "-o", out / "o.onnx", *(["--provider", "cpu"] if verify else ["--no-verify"]))
    one_error_line(res, 2, "No space left on device")
    assert ".normopt-" not in res.output and str(out / "o.onnx") in res.output   # the output, not a temporary name
    assert list(out.iterdir()) == [] and digests(src) == before


def test_disk_full_in_place_leaves_the_input(src_external, monkeypatch):
    monkeypatch.setattr(model_io, "_write_external", _enospc(model_io._write_external))
    before = digests(src_external)
    res = invoke("fold", src_external / "m.onnx", "--in-place", "--provider", "cpu")
    one_error_line(res, 2, "No space left on device")
    assert digests(src_external) == before


_INTERRUPTED_WRITE = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from normopt import model_io
    from normopt.cli import main

    real = model_io._write_single

    def write(skel, path, *rest):
        Path(path).write_bytes(b"partial")  # half-written, then the signal arrives
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        time.sleep(30)
        real(skel, path, *rest)

    model_io._write_single = write
    main(sys.argv[2:])
""")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("verify", [True, False])
def test_signal_in_the_middle_of_a_write(src, tmp_path, sig, verify):
    out = tmp_path / "out"
    out.mkdir()
    before = digests(src)
    args = ["fold", str(src / "m.onnx"), "-o", str(out / "o.onnx")] + (["--provider", "cpu"] if verify
                                                                        else ["--no-verify"])
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED_WRITE, sig, *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: interrupted (no partial output is left)"]
    assert list(out.iterdir()) == [] and digests(src) == before


def test_signal_during_in_place_leaves_the_input(src_external):
    before = digests(src_external)
    script = _INTERRUPTED_WRITE.replace("_write_single", "_write_external")
    proc = subprocess.run([sys.executable, "-c", script, "SIGTERM", "fold", str(src_external / "m.onnx"),
                           "--in-place", "--provider", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert digests(src_external) == before


_SLOW_WRITES = textwrap.dedent("""
    import os, time
    from pathlib import Path
    import normopt.model_io as m

    real = m._write_single

    def write(skel, path, *rest):  # each model stalls in its write (in Python): the signal comes then
        Path(os.environ["NORMOPT_TEST_MARK"], str(os.getpid())).touch()
        for _ in range(300):
            time.sleep(0.1)
        real(skel, path, *rest)

    m._write_single = write
""")


@pytest.mark.parametrize("sig, jobs", [("SIGTERM", 2), ("SIGINT", 2), ("SIGINT", 1)])
def test_signal_stops_every_worker_of_a_batch(tmp_path, rng, sig, jobs):
    """-j 2: SIGTERM to the command (a CI timeout) or Ctrl-C (SIGINT to the process group) stops
    the workers too: exit 130 within seconds, no output written after the signal, no model
    still queued started, no temporary folder left. Without -j the batch stops as well."""
    import time
    folder, out, marks, site = tmp_path / "in", tmp_path / "out", tmp_path / "marks", tmp_path / "site"
    for path in (folder, out, marks, site):
        path.mkdir()
    for name in "abcdef":
        onnx.save(conv_bn(rng), folder / f"{name}.onnx")
    (site / "sitecustomize.py").write_text(_SLOW_WRITES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "NORMOPT_TEST_MARK": str(marks)}
    proc = subprocess.Popen([sys.executable, "-m", "normopt", "fold", str(folder), "-o", str(out), "-j", str(jobs),
                             "--no-verify"], env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while len(list(marks.iterdir())) < jobs and time.time() < deadline:
        time.sleep(0.1)
    assert len(list(marks.iterdir())) == jobs, "every worker should be writing by now"
    if sig == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    time.sleep(1)   # a worker left running would write now
    assert list(out.iterdir()) == [] and len(list(marks.iterdir())) == jobs
    assert not [p for p in tmp_path.rglob(".normopt-*")]


assert signal.SIGTERM  # the tests above need POSIX signals


def test_in_place_batch(tmp_path, rng):
    folder = tmp_path / "models"
    folder.mkdir()
    originals = {}
    for name in ("a.onnx", "b.onnx"):
        originals[name] = conv_bn(rng, c=8)
        onnx.save(originals[name], folder / name)
    res = invoke("fold", folder, "--in-place", "--provider", "cpu")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in folder.iterdir()) == ["a.onnx", "b.onnx"]
    for name, original in originals.items():
        folded = onnx.load(folder / name)
        assert op_counts(folded) == {"Conv": 2}
        assert_equivalent(original, folded)


@pytest.mark.parametrize("which", ["output", "data", "report"])
def test_a_fifo_in_place_of_a_file_the_run_writes_is_refused_and_kept(src_external, tmp_path, which):
    """A rename over a device or FIFO would put the model in its place (``-o /dev/null`` run as
    root replaced the device); a report path that is a FIFO would wait forever to be read."""
    out = tmp_path / "o.onnx"
    fifo = {"output": out, "data": tmp_path / "o.onnx.data", "report": tmp_path / "r.json"}[which]
    os.mkfifo(fifo)
    res = invoke("fold", src_external / "m.onnx", "-o", out, "--no-verify", "--report", tmp_path / "r.json"
                 if which == "report" else tmp_path / "report.json")
    one_error_line(res, 2, "not a regular file")
    assert fifo.is_fifo()
    assert not out.is_file()


def test_save_refuses_a_device_in_place_of_the_model(src, tmp_path):
    fifo = tmp_path / "o.onnx"
    os.mkfifo(fifo)
    with pytest.raises(model_io.ModelSaveError, match="not a regular file"):
        model_io.save(onnx.load(src / "m.onnx"), fifo)
    assert fifo.is_fifo()


def test_a_json_file_that_is_not_a_normopt_report_is_not_written_over(src, tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"schema_version": 3, "name": "an application\'s own file"}')
    before = config.read_bytes()
    res = invoke("fold", src / "m.onnx", "-o", tmp_path / "o.onnx", "--no-verify", "--report", config)
    one_error_line(res, 2, "not a normopt report")
    assert config.read_bytes() == before


@pytest.mark.parametrize("args, fragment", [
    (["--passes", "no-such-pass"], "unknown pass"),
    (["--input-shape", "x:2xq"], "input-shape"),
])
def test_a_report_from_an_earlier_run_never_reads_ok_after_a_failed_one(src, tmp_path, args, fragment):
    report = tmp_path / "r.json"
    assert invoke("fold", src / "m.onnx", "-o", tmp_path / "o.onnx", "--no-verify", "--report", report).exit_code == 0
    assert json.loads(report.read_text())["status"] == "ok"
    res = invoke("fold", src / "m.onnx", "-o", tmp_path / "o.onnx", "--no-verify", "--report", report, *args)
    one_error_line(res, 2, fragment)
    doc = json.loads(report.read_text())
    assert doc["status"] == "error" and doc["exit_code"] == 2 and fragment in doc["error"]


@pytest.mark.parametrize("args, fragment", [
    (["--seed", "-1"], "--seed"),
    (["--trials", "1000000000"], "--trials"),
    (["--input-range", "x:nan:1"], "finite"),
    (["--input-range", "x:-inf:inf"], "finite"),
    (["-o", ""], "the path is empty"),
    (["--report", ""], "the path is empty"),
])
def test_bad_option_values_get_one_line(src, tmp_path, args, fragment):
    before = sorted(p.name for p in tmp_path.rglob("*"))
    res = invoke("fold", src / "m.onnx", *(["-o", tmp_path / "o.onnx"] if "-o" not in args else []), *args)
    one_error_line(res, 2, fragment)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_file_name_the_file_system_refuses_gets_one_line(src, tmp_path):
    res = invoke("fold", src / "m.onnx", "-o", tmp_path / ("a" * 300 + ".onnx"), "--no-verify")
    one_error_line(res, 2, "File name too long")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.skipif(sys.platform != "linux", reason="file names as bytes")
def test_a_file_name_onnxruntime_cannot_open_is_named_before_any_work(src, tmp_path):
    model = os.path.join(os.fsencode(src), b"mod\xe9l.onnx")
    os.rename(os.fsencode(src / "m.onnx"), model)
    res = invoke("fold", os.fsdecode(model), "-o", tmp_path / "o.onnx", "--provider", "cpu")
    one_error_line(res, 2, "not valid UTF-8")
    assert not (tmp_path / "o.onnx").exists()
    assert invoke("fold", os.fsdecode(model), "-o", tmp_path / "o.onnx", "--no-verify").exit_code == 0


@pytest.mark.parametrize("fail", ["error", "interrupt"])
def test_a_switch_stopped_before_the_models_rename_keeps_the_old_pair(src_external, tmp_path, monkeypatch, fail):
    """External data out over an earlier output: the old data file is moved aside, not written
    over, and comes back when the model's rename does not happen (an error, an interrupt)."""
    out = tmp_path / "o.onnx"
    assert invoke("fold", src_external / "m.onnx", "-o", out, "--no-verify").exit_code == 0
    before = digests(tmp_path)
    real = os.replace

    def replace(a, b):
        if Path(b) == out:
            if fail == "error":
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(b))
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr("normopt.model_io.os.replace", replace)
    res = invoke("fold", src_external / "m.onnx", "-o", out, "--no-verify", "--skip", "fold-batchnorm")
    assert res.exit_code == (2 if fail == "error" else 130)
    assert digests(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "o.onnx", "o.onnx.data"]


def test_a_signal_during_the_switch_waits_until_both_renames_are_done(src_external, tmp_path, monkeypatch):
    out = tmp_path / "o.onnx"
    real = os.replace
    order = []

    def replace(a, b):
        if Path(b).name == "o.onnx.data":
            os.kill(os.getpid(), signal.SIGINT)   # between the data file's rename and the model's
        order.append(Path(b).name)
        return real(a, b)

    monkeypatch.setattr("normopt.model_io.os.replace", replace)
    res = invoke("fold", src_external / "m.onnx", "-o", out, "--no-verify")
    assert res.exit_code == 130
    assert order[-2:] == ["o.onnx.data", "o.onnx"]   # the switch finished, then the interrupt
    assert_equivalent(src_external / "m.onnx", out)


def test_a_signal_during_the_commands_imports_ends_it_with_one_line():
    """Signals are only noted while the command imports its modules (an exception raised from a
    handler inside a C++ module's initialization aborts the process), then acted on."""
    code = textwrap.dedent("""
        import os, signal, sys
        import normopt.__main__ as command, normopt.signals as signals
        hold = signals.hold
        def hold_and_signal():
            hold()
            os.kill(os.getpid(), signal.SIGTERM)
        signals.hold = hold_and_signal
        sys.argv = ["normopt", "passes"]
        command.main()
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 130, res.stderr
    assert res.stderr.strip() == "error: interrupted (no partial output is left)" and not res.stdout


def test_an_error_an_interrupt_caused_reads_as_the_interrupt(src, tmp_path, monkeypatch):
    from normopt import registry, signals

    def resolve(*args):
        signals.received = True   # as the handler does, before the import it cut short fails
        raise ImportError("initialization failed")

    monkeypatch.setattr(signals, "received", False)   # (and back to it after the test)
    monkeypatch.setattr(registry, "resolve", resolve)
    res = invoke("fold", src / "m.onnx", "-o", tmp_path / "o.onnx")
    one_error_line(res, 130, "interrupted")

"""Output-path problems: a clear error, no partial file, the input untouched; ``--in-place``
replaces the input atomically, only once the result verifies, and never writes over the input's
own data file."""
from __future__ import annotations

import errno
import hashlib
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

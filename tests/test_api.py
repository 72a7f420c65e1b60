"""The Python API: optimize / verify / inspect on models in memory and on disk; the README example runs."""
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

import normopt
from helpers import op_counts
from normopt.errors import ModelLoadError, UsageError
from test_fold import conv_bn_chain

ROOT = Path(__file__).resolve().parent.parent


def test_optimize_model_in_memory_and_path_with_external_data(tmp_path, rng):
    model = conv_bn_chain(rng)
    before = model.SerializeToString()
    result = normopt.optimize(model, provider="cpu")
    assert result.verified and op_counts(result.model) == {"Conv": 3, "Relu": 3}
    names = [r.name for r in result.records]
    assert names[:2] == ["fold-weightnorm", "fold-batchnorm"] and len(result.records[1].applied) == 3
    assert model.SerializeToString() == before
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    on_disk = normopt.optimize(path, provider="cpu", passes=["fold-batchnorm"])
    assert on_disk.verified and op_counts(on_disk.model) == {"Conv": 3, "Relu": 3}
    assert [s.model for s in on_disk.verification.sessions] == ["reference", "candidate"]
    assert normopt.optimize(str(path), verify=False).verification is None


def test_optimize_accepts_fold_options_and_rejects_bad_input(tmp_path, rng):
    result = normopt.optimize(conv_bn_chain(rng), normopt.FoldOptions(provider="cpu", passes=["fuse-layernorm"]))
    assert [r.name for r in result.records] == ["fuse-layernorm"]
    with pytest.raises(ModelLoadError, match="no such file"):
        normopt.optimize(tmp_path / "missing.onnx")
    with pytest.raises(UsageError, match="unknown target"):
        normopt.optimize(conv_bn_chain(rng), target="tensorrt")
    with pytest.raises(UsageError, match="unknown pass"):
        normopt.optimize(conv_bn_chain(rng), passes=["fold-bn"])
    with pytest.raises(TypeError):
        normopt.optimize(b"bytes")


def test_verify_and_inspect(rng):
    model = conv_bn_chain(rng)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w = onnx.numpy_helper.to_array(other.graph.initializer[0]) * 2
    other.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), "w1"))
    assert normopt.verify(model, model, provider="cpu").passed
    assert not normopt.verify(model, other, provider="cpu").passed
    found = normopt.inspect(model)
    assert [s.action for s in found.sites] == ["rewrite"] * 3 and len(found.pending) == 3
    from normopt.verify import compare  # the module stays importable
    assert compare(model, model, provider="cpu").passed


def test_readme_python_example_runs(monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "fold-batchnorm: 5 applied, 0 skipped" in out and "BatchNormalization rewrite folded into Conv" in out


def test_optimize_sorts_an_unsorted_model_in_memory_without_modifying_it(rng):
    """Nodes out of order (onnxruntime sorts them on load): sorted as loading a file does, with
    the same note, on a copy: the caller's model keeps its order and bytes."""
    model = conv_bn_chain(rng)
    model.graph.node.reverse()
    before = model.SerializeToString()
    n = len(model.graph.node)
    result = normopt.optimize(model, provider="cpu")
    assert model.SerializeToString() == before
    assert result.verified and op_counts(result.model) == {"Conv": 3, "Relu": 3}
    moved = n - 1 if n % 2 else n
    assert result.pipeline.notes == [f"nodes of the main graph were not in topological order: sorted on load "
                                     f"({moved} of {n} moved)"]
    onnx.checker.check_model(result.model, full_check=True)
    assert len(normopt.inspect(model).pending) == 3 and model.SerializeToString() == before


def test_optimize_sorted_model_in_memory_has_no_note_and_a_cycle_is_refused(rng):
    model = conv_bn_chain(rng)
    assert normopt.optimize(model, verify=False).pipeline.notes == []
    model.graph.node[0].input[0] = model.graph.node[-1].output[0]  # the first node reads the last: a cycle
    before = model.SerializeToString()
    with pytest.raises(ModelLoadError, match="form a cycle"):
        normopt.optimize(model, verify=False)
    assert model.SerializeToString() == before


def test_package_names_load_on_first_use_and_the_command_limits_blas_threads():
    # ``import normopt`` alone loads neither numpy nor onnx: the command sets OPENBLAS_NUM_THREADS
    # before numpy starts its thread pool, and a library caller's process keeps its own.
    import subprocess
    import sys

    def run(code: str, **env) -> str:
        import os
        environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"} | env
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True)
        return done.stdout.strip()

    assert run("import sys, normopt; print(sorted(m for m in ('numpy', 'onnx') if m in sys.modules))") == "[]"
    assert run("import normopt, os; normopt.FoldOptions; print(os.environ.get('OPENBLAS_NUM_THREADS'))") == "None"
    probe = ("import os, normopt.cli as c, normopt.__main__ as m\n"
             "c.entry = lambda: print(os.environ['OPENBLAS_NUM_THREADS'])\n"
             "m.main()")
    assert run(probe) == "1"
    assert run(probe, OPENBLAS_NUM_THREADS="3") == "3"   # the caller's choice stands
    names = run("import normopt; print(' '.join(n for n in normopt.__all__ if getattr(normopt, n, None) is None))")
    assert names == ""
    assert run("import normopt; print(callable(normopt.verify), normopt.verify.compare is normopt.compare)") == "True True"

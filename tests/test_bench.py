"""bench/run.py's pieces at toy sizes: the model generators and the results tables (no timing asserted)."""
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import suite_models  # noqa: E402
import suite_report as report  # noqa: E402
from suite_report import ModelResult, Run  # noqa: E402

from helpers import op_counts  # noqa: E402


def _run(model_path, feeds):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("make, expected", [
    (lambda p: suite_models.encoder(p, layers=1, hidden=64, seq=4), {"ReduceMean": 6, "MatMul": 8, "Softmax": 1}),
    (lambda p: suite_models.cnn(p, blocks=(1, 1), width=4, size=16), {"Conv": 9, "BatchNormalization": 9}),
    (lambda p: suite_models.decoder(p, layers=1, hidden=128, ffn=64, seq=2), {"Reciprocal": 3, "Sigmoid": 1}),
    (lambda p: suite_models.chain(p, 3), {"Conv": 3, "BatchNormalization": 3, "ReduceMean": 6, "Add": 9}),
])
def test_generators_build_valid_models_that_run(make, expected, tmp_path):
    info = make(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(info.path)
    model = onnx.load(info.path)
    counts = op_counts(model)
    assert {k: counts.get(k, 0) for k in expected} == expected
    assert info.nodes == len(model.graph.node)
    data = [f for f in os.listdir(tmp_path) if f.endswith(".data")]
    assert info.external == bool(data)
    assert info.bytes == sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))
    rng = np.random.default_rng(0)
    out = _run(info.path, {k: rng.standard_normal(v, dtype=np.float32) for k, v in info.inputs.items()})
    assert np.all(np.isfinite(out))


def test_decoder_weights_are_in_the_data_file(tmp_path):
    info = suite_models.decoder(str(tmp_path / "d.onnx"), layers=1, hidden=128, ffn=64, seq=2)
    header = onnx.load(info.path, load_external_data=False)
    external = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == 7  # Q, K, V, O, gate, up, down
    assert os.path.getsize(tmp_path / "d.onnx.data") == sum(int(np.prod(t.dims)) * 4 for t in external)


def _fake(name, nodes, floor_s, ours_s, ours_rss, peer=None, external=False):
    before = {"BatchNormalization": 2, "Conv": 2}
    after = {"Conv": 2}
    runs = [Run("floor", "ok", floor_s, 100 * 2 ** 20),
            Run("normopt", "ok", ours_s, ours_rss, ops=after, standard_only=True, match="yes")]
    if peer:
        runs.append(peer)
    return ModelResult(name, 1000 * 2 ** 20, nodes, external, "", before, runs)


def test_targets_say_met_or_missed_with_the_measured_number():
    peer = Run("onnxsim", "ok", 5.0, 1, ops={"Conv": 2}, standard_only=True, match="yes")
    models = [_fake("decoder", 100, 10.0, 12.0, 400 * 2 ** 20, external=True),
              _fake("encoder", 100, 1.0, 2.0, 100 * 2 ** 20, peer=peer),
              _fake("cnn", 100, 1.0, 1.2, 200 * 2 ** 20),
              _fake("chain-1000", 12000, 1.0, 2.0, 1),
              _fake("chain-10000", 120000, 2.0, 40.0, 1)]
    verdicts = {t.name: (t.measured, t.met) for t in report.targets(models)}
    assert verdicts["decoder (1.05 GB, external data): time"] == ("1.20x", True)
    assert verdicts["decoder (1.05 GB, external data): peak RSS"][1] is True
    assert verdicts["encoder: time"] == ("2.00x", False)
    assert verdicts["cnn: peak RSS"] == ("2.00x", False)
    assert verdicts["chains: time per node, 10,000 vs 1,000 blocks"] == ("2.00x", False)
    assert verdicts["chains: 10,000 blocks"] == ("20.0x", False)
    assert verdicts["peers doing the same rewrites (portable output)"] == ("faster than onnxsim on encoder", True)
    assert verdicts["peers doing those rewrites into non-portable output"] == ("no such peer", True)
    table = "\n".join(report.targets_table(report.targets(models)))
    assert table.count("**MISSED**") == 4


def test_a_faster_peer_doing_the_same_rewrites_is_named():
    peer = Run("ort-all", "ok", 1.1, 1, ops={"Conv": 2}, standard_only=True, match="yes")
    portable, other = report.targets([_fake("cnn", 100, 1.0, 1.2, 1, peer=peer)])[-2:]
    assert portable.met is False and "ort-all on cnn (1.10 s vs 1.20 s;" in portable.measured
    assert other.met is True
    # What the floor alone (importing onnx, loading, saving) takes is set beside the faster run.
    assert "; the floor alone, importing onnx, loading and saving, takes 1.00 s, 0.91x its whole run)" \
        in portable.measured
    peer.seconds = 0.5
    # An output onnx.checker rejects is not portable: the peer moves to the second row, named there.
    peer.checker = "No Op registered for LayerNormalization with domain_version of 14"
    portable, other = report.targets([_fake("cnn", 100, 1.0, 1.2, 1, peer=peer)])[-2:]
    assert portable.met is True and portable.measured == "no such peer"
    assert other.met is False
    assert "ort-all on cnn (0.50 s vs 1.20 s; its output fails onnx.checker; the floor alone" in other.measured
    # A peer that left the BatchNormalizations is not doing the same rewrites.
    partial = Run("ort-all", "ok", 0.5, 1, ops={"Conv": 2, "BatchNormalization": 2}, standard_only=True)
    assert all(t.met for t in report.targets([_fake("cnn", 100, 1.0, 1.2, 1, peer=partial)])[-2:])


def test_rewrote_counts_function_bodies_and_says_when_only_nodes_changed():
    """A LayerNorm fused inside a model-local function counts, and a fold that changes no norm
    op (Keras' Mul + Add folded into the Conv) is not "nothing"."""
    import suite_worker

    models = Path(__file__).resolve().parents[1] / "models"
    counts = suite_worker.op_counts(str(models / "transformer_ln_modfuncs_ts_op15.onnx"))
    assert counts["ops"]["ReduceMean"] == 4 and counts["nodes"] > 30
    assert report.rewrote({"Mul": 2, "Add": 2, "Conv": 1}, {"Conv": 1}) == "nodes 5->1"
    assert report.rewrote({"BatchNormalization": 2, "Conv": 2}, {"Conv": 2}) == "BN 2->0, nodes 4->2"
    assert report.rewrote({"Conv": 2}, {"Conv": 2}) == "nothing"


def test_onnxruntime_runs_alone_when_the_layout_is_given(tmp_path):
    """The worker reads the model's layout with onnx only when run.py does not give it: onnxruntime's
    time is its own, not that of importing onnx too."""
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "bench"
    path = str(tmp_path / "c.onnx")
    suite_models.chain(path, 2)
    out = tmp_path / "out.onnx"
    code = ("import sys, suite_worker; suite_worker.main(sys.argv[1:]); "
            "print('onnx imported' if 'onnx' in sys.modules else 'onnx not imported')")
    run = subprocess.run([sys.executable, "-c", code, "ort-extended", path, str(out), "single"], cwd=bench,
                         capture_output=True, text=True, check=True)
    assert run.stdout.splitlines()[-1] == "onnx not imported" and out.stat().st_size > 0
    floor = subprocess.run([sys.executable, "-c", code, "floor", path, str(tmp_path / "f.onnx")], cwd=bench,
                           capture_output=True, text=True, check=True)
    assert floor.stdout.splitlines()[-1] == "onnx imported"
    assert not (tmp_path / "f.onnx.data").exists()  # single file in, single file out

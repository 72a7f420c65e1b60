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
    assert verdicts["peers doing the same rewrites"] == ("faster than onnxsim on encoder", True)
    table = "\n".join(report.targets_table(report.targets(models)))
    assert table.count("**MISSED**") == 4


def test_a_faster_peer_doing_the_same_rewrites_is_named():
    peer = Run("ort-all", "ok", 0.5, 1, ops={"Conv": 2}, standard_only=True, match="yes")
    target = report.targets([_fake("cnn", 100, 1.0, 1.2, 1, peer=peer)])[-1]
    assert target.met is False and "ort-all on cnn (0.50 s vs 1.20 s)" in target.measured
    peer.checker = "No Op registered for LayerNormalization with domain_version of 14"
    target = report.targets([_fake("cnn", 100, 1.0, 1.2, 1, peer=peer)])[-1]
    assert "ort-all on cnn (0.50 s vs 1.20 s; its output fails onnx.checker)" in target.measured
    # A peer that left the BatchNormalizations is not doing the same rewrites.
    partial = Run("ort-all", "ok", 0.5, 1, ops={"Conv": 2, "BatchNormalization": 2}, standard_only=True)
    assert report.targets([_fake("cnn", 100, 1.0, 1.2, 1, peer=partial)])[-1].met is True


def test_tables_and_plots_from_fake_numbers(tmp_path):
    failed = Run("onnxslim", "timeout", 30.0, 10, note="killed after the 30 s limit")
    models = [_fake("chain-100", 1200, 1.0, 2.0, 1, peer=failed), _fake("chain-1000", 12000, 2.0, 8.0, 1)]
    lines = report.model_table(models[0])
    assert any(ln.startswith("| normopt | ok | 2.00 s | 2.00x |") and "BN 2->0" in ln for ln in lines)
    assert any(ln.startswith("| onnxslim | timeout |") and "30 s limit" in ln for ln in lines)
    models[0].runs.append(Run("onnxoptimizer", "skipped", note="not installed"))
    assert report.model_table(models[0])[-1] == "Not run: onnxoptimizer (not installed)."
    chain = report.chain_table(models)
    assert chain[2] == "| floor | 833.3 (1.00x) | 166.7 (1.00x) |"
    assert chain[4] == "| onnxslim | timeout | - |"
    run = {"create": {"orig": 0.01, "new": 0.01}, "run": {"orig": 0.001, "new": 0.002}}
    rows = [{"model": "m", "rewrote": "BN 1->0", "ORT_DISABLE_ALL": run, "ORT_ENABLE_ALL": run}]
    table, slower = report.latency_table(rows)
    assert "2.00x" in table[2] and len(slower) == 2
    assert "runs 2.00x the original's median latency" in slower[0]


@pytest.mark.slow  # matplotlib's import and rendering take seconds
def test_plots_from_fake_numbers(tmp_path):
    pytest.importorskip("matplotlib")  # in the bench extra
    models = [_fake("chain-100", 1200, 1.0, 2.0, 1), _fake("chain-1000", 12000, 2.0, 8.0, 1)]
    report.plot_chains(models, str(tmp_path / "c.png"), dpi=20)
    report.plot_ratios(models, str(tmp_path / "r.png"), dpi=20)
    assert (tmp_path / "c.png").stat().st_size > 500 and (tmp_path / "r.png").stat().st_size > 500


def test_measure_reports_the_childs_own_peak_rss_and_enforces_limits():
    from suite_measure import measure
    held = np.ones(200 * 2 ** 20 // 8)  # this process holds 200 MB; a forked child must not inherit it
    small = measure([sys.executable, "-S", "-c", "pass"], 60, 2 ** 40)
    big = measure([sys.executable, "-S", "-c", "b = bytearray(120 * 2 ** 20)"], 60, 2 ** 40)
    assert held.sum() > 0
    assert small.status == "ok" and 0 < small.peak_rss < 100 * 2 ** 20
    assert big.status == "ok" and big.peak_rss >= 120 * 2 ** 20
    failed = measure([sys.executable, "-S", "-c", "import sys; sys.exit('bad model')"], 60, 2 ** 40)
    assert failed.status == "failed" and failed.why() == "bad model"
    stuck = measure([sys.executable, "-S", "-c", "import time; time.sleep(30)"], 0.3, 2 ** 40)
    assert stuck.status == "timeout"
    greedy = measure([sys.executable, "-S", "-c", "import time; b = bytearray(200 * 2 ** 20); time.sleep(30)"],
                         60, 100 * 2 ** 20)
    assert greedy.status == "killed"


def test_peers_are_not_run_on_a_chain_they_cannot_finish_in_time():
    import argparse

    import run  # bench/run.py
    bench = run.Bench(argparse.Namespace(timeout=30.0, quick=False), folder="")
    bench.done["chain-1000"] = ModelResult("chain-1000", 1, 12000, False, "", {}, [
        Run("floor", "ok", 1.0), Run("onnxsim", "ok", 3.0), Run("onnxoptimizer", "ok", 5.0),
        Run("onnxslim", "timeout", 30.0), Run("onnxscript", "skipped")])
    bench.done_floor, bench.limit = 2.0, 30.0
    spec = run.Spec("chain-10000", None, after="chain-1000")
    info = suite_models.ModelInfo("chain-10000", "", 1, 120000, False, {})
    assert bench.predicted_past_limit("onnxsim", spec, info) == ""  # (3 - 1) * 10 + 2 = 22 s
    assert bench.predicted_past_limit("onnxoptimizer", spec, info) == \
        "5.0 s on chain-1000: at 10x the nodes about 42 s, past the 30 s limit"
    assert bench.predicted_past_limit("onnxslim", spec, info) == "timeout on chain-1000"
    assert bench.predicted_past_limit("onnxscript", spec, info) == "not run on chain-1000 either"
    assert bench.predicted_past_limit("normopt", spec, info) == ""

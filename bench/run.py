"""normopt against the load+save floor and its peers, on generated models; writes bench/RESULTS.md.

    pip install -e '.[bench]'
    python bench/run.py --quick     # under 2 minutes: a 2-layer encoder, a narrow ResNet-50, a 1 GB decoder,
                                    # chains of 100 and 1,000 blocks; peers on chain-100 only
    python bench/run.py             # under 15 minutes on 2 cores: BERT-base-sized encoder, ResNet-50-sized CNN,
                                    # a small decoder (for the peers) and an 8 GB one, chains up to 10,000 blocks

Models are generated in a temporary folder (suite_models.py) and deleted afterwards. Every tool runs
in its own process (suite_worker.py), one after the other, side by side in the same run; its wall time
and its own peak RSS (``os.wait4``'s ru_maxrss of that process, forked from a small launcher) are given as multiples of the floor:
``onnx.load`` + ``onnx.save`` of the same model in its own process (with external data in and out
for an external-data model). Each output is then checked in another process: op counts, standard
ops only, and outputs against the original's (onnxruntime CPU, ORT_DISABLE_ALL, seeded inputs,
atol 1e-4 / rtol 1e-3). A tool that fails, times out or goes over the memory limit is recorded as
such. Last, the gain of rewriting: onnxruntime CPU latency and session creation of each model in
models/ against normopt's output of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import suite_models  # noqa: E402
from suite_measure import Proc, measure  # noqa: E402
import suite_report as report  # noqa: E402
from suite_report import ModelResult, Run  # noqa: E402

WORKER = str(HERE / "suite_worker.py")
PEERS = ["onnxsim", "onnxslim", "onnxoptimizer", "onnxscript", "ort-extended", "ort-all"]
PEER_PACKAGES = {"onnxsim": "onnxsim", "onnxslim": "onnxslim", "onnxoptimizer": "onnxoptimizer",
                 "onnxscript": "onnxscript", "ort-extended": "onnxruntime-gpu", "ort-all": "onnxruntime-gpu"}
TWO_GB = 2 ** 31
# A run's time limit: --timeout, or this many times the floor's time when longer (normopt gets more
# room, at least 4x --timeout: its own numbers are the point of the benchmark).
FLOOR_TIMES = {"peer": 5, "normopt": 50}
# On a model whose floor takes under REPEAT_UNDER seconds every tool runs REPEATS times and its
# median run is reported: one run of a second-long process on a shared machine varies by tens of
# percent. The runs are interleaved (each round runs every tool once), so that a slow spell of the
# machine falls on every tool alike rather than on the three runs of one.
REPEATS, REPEAT_UNDER = 3, 3.0
LOAD_AT_START = os.getloadavg()[0]


@dataclasses.dataclass
class Spec:
    name: str
    make: object  # (path) -> ModelInfo
    peers: bool = True
    verify_row: bool = False  # also time normopt with verification on
    check: bool = True  # run the original and every output in onnxruntime
    after: str = ""  # a smaller model of the same kind: peers that could not finish it are not run here


def plan(quick: bool) -> list[Spec]:
    m = suite_models
    if quick:
        return [Spec("encoder", lambda p: m.encoder(p, layers=2), peers=False),
                Spec("cnn", lambda p: m.cnn(p, width=32), peers=False),
                Spec("decoder", lambda p: m.decoder(p, layers=5), peers=False),
                Spec("chain-100", lambda p: m.chain(p, 100), verify_row=True),
                Spec("chain-1000", lambda p: m.chain(p, 1000), peers=False)]
    return [Spec("encoder", lambda p: m.encoder(p), verify_row=True),
            Spec("cnn", lambda p: m.cnn(p), verify_row=True),
            Spec("decoder-small", lambda p: m.decoder(p, layers=2, hidden=1024, ffn=2752)),
            Spec("decoder", lambda p: m.decoder(p, layers=40), peers=False, check=False),
            Spec("chain-100", lambda p: m.chain(p, 100), verify_row=True),
            Spec("chain-1000", lambda p: m.chain(p, 1000), after="chain-100"),
            Spec("chain-10000", lambda p: m.chain(p, 10000), after="chain-1000")]


def normopt_cmd() -> list[str]:
    script = Path(sys.executable).parent / "normopt"
    return [str(script)] if script.exists() else [sys.executable, "-m", "normopt"]


def tool_cmd(tool: str, src: str, out: str, external: bool) -> list[str]:
    if tool == "normopt":
        return normopt_cmd() + ["fold", src, "-o", out, "--no-verify", "-q"]
    if tool == "normopt-verify":
        return normopt_cmd() + ["fold", src, "-o", out, "-q", "--provider", "cpu"]
    # The layout is given: the worker would otherwise import onnx to read it, a cost that is not
    # onnxruntime's own.
    return [sys.executable, WORKER, tool, src, out, "external" if external else "single"]


# --- one model, every tool ----------------------------------------------------------------------

class Bench:
    def __init__(self, args, folder: str):
        self.args, self.folder = args, folder
        self.mem_limit = int(_meminfo("MemAvailable") * 0.8)
        self.installed = {t: _version(p) is not None for t, p in PEER_PACKAGES.items()}
        self.limit = self.normopt_limit = args.timeout
        self.done: dict[str, ModelResult] = {}
        self.done_floor = 0.0  # the floor's time on the model being measured
        self.repeats = 1  # runs per tool on the model being measured
        self.external = False  # whether the model being measured has external data

    def worker(self, *args) -> Proc:  # reference outputs, checks, latency: not measured, more room
        return measure([sys.executable, WORKER, *args], max(4 * self.args.timeout, self.limit), self.mem_limit)

    def model(self, spec: Spec) -> ModelResult:
        mdir = os.path.join(self.folder, spec.name)
        os.makedirs(mdir)
        info = spec.make(os.path.join(mdir, "model.onnx"))
        npz = os.path.join(self.folder, f"{spec.name}.ref.npz")
        self.limit = self.args.timeout * (10 if info.bytes > 1e9 else 1)  # until the floor has run
        ref = self.worker("ref", info.path, npz) if spec.check else None
        self.unchecked = ("not checked (over 2 GB: see decoder-small)" if not spec.check else
                          f"not checked: the original does not run ({ref.why()})")
        orig = _op_counts(info.path)
        result = ModelResult(spec.name, info.bytes, info.nodes, info.external, info.note, orig["ops"], [])
        self.external = bool(info.external)
        tools = ["floor", "normopt"] + (["normopt-verify"] if spec.verify_row else []) + PEERS
        self.repeats = 1
        for tool in tools:
            result.runs.append(self.tool(tool, spec, info, npz if ref and ref.status == "ok" else None))
            if tool == "floor" and result.runs[-1].status == "ok":  # a slow machine moves the limit too
                self.done_floor = result.runs[-1].seconds
                self.limit = max(self.args.timeout, FLOOR_TIMES["peer"] * result.runs[-1].seconds)
                self.normopt_limit = max(4 * self.args.timeout, FLOOR_TIMES["normopt"] * result.runs[-1].seconds)
            print(f"  {spec.name}: {tool}: {result.runs[-1].status}", file=sys.stderr, flush=True)
        self.more_rounds(result.runs, info.path, mdir)
        shutil.rmtree(mdir)
        if os.path.exists(npz):
            os.remove(npz)
        self.done[spec.name] = result
        return result

    def tool(self, tool: str, spec: Spec, info, npz: str | None) -> Run:
        if tool in PEER_PACKAGES and not self.installed[tool]:
            return Run(tool, "skipped", note="not installed (pip install -e '.[bench]')")
        if tool in PEER_PACKAGES and not spec.peers:
            return Run(tool, "skipped", note="--quick runs the peers on chain-100 only" if self.args.quick else
                       "model over 2 GB: most peers hold it in one protobuf (limit 2 GB); not run here, "
                       "see decoder-small")
        skip = self.predicted_past_limit(tool, spec, info)
        if skip:
            return Run(tool, "skipped", note=skip)
        tdir = os.path.join(self.folder, spec.name, tool)
        os.makedirs(tdir)
        out = os.path.join(tdir, "out.onnx")
        limit = self.normopt_limit if tool.startswith("normopt") else self.limit
        proc = self.measure_median(tool, info.path, out, limit)
        run = Run(tool, proc.status, proc.seconds, proc.peak_rss or None)
        if proc.status == "timeout":
            run.note = f"killed after the {limit:.0f} s limit"
        elif proc.status == "killed":
            run.note = f"killed: RSS over the {report.fmt_bytes(self.mem_limit)} limit"
        elif proc.status == "failed":
            run.note = proc.why()
        else:
            run.note = proc.json().get("note", "")
        if proc.status == "ok" and tool != "floor" and os.path.exists(out):
            self.check(run, out, npz)
        elif proc.status == "ok" and tool != "floor":
            run.status, run.note = "failed", "wrote no output"
        shutil.rmtree(tdir)
        return run

    def measure_median(self, tool: str, src: str, out: str, limit: float):
        """The tool's first run; the floor's decides how many rounds the model gets (``more_rounds``)."""
        run = measure(tool_cmd(tool, src, out, self.external), limit, self.mem_limit)
        if tool == "floor" and run.status == "ok" and run.seconds < REPEAT_UNDER:
            self.repeats = REPEATS
        return run

    def more_rounds(self, runs: list[Run], src: str, mdir: str) -> None:
        """Rounds 2.. of ``self.repeats``, each running every tool whose first run succeeded once,
        in the table's order; each such tool then reports its median run (time and peak RSS of
        that run). A tool that fails in a later round keeps its median of the runs that did not."""
        samples = {run.tool: [(run.seconds, run.peak_rss)] for run in runs if run.status == "ok"}
        for _ in range(self.repeats - 1):
            for tool in samples:
                tdir = tempfile.mkdtemp(dir=mdir)
                limit = self.normopt_limit if tool.startswith("normopt") else self.limit
                proc = measure(tool_cmd(tool, src, os.path.join(tdir, "out.onnx"), self.external), limit,
                               self.mem_limit)
                if proc.status == "ok":
                    samples[tool].append((proc.seconds, proc.peak_rss or None))
                shutil.rmtree(tdir)
        for run in runs:
            if run.tool in samples:
                run.seconds, run.peak_rss = sorted(samples[run.tool], key=lambda x: x[0])[len(samples[run.tool]) // 2]

    def predicted_past_limit(self, tool: str, spec: Spec, info) -> str:
        """Why a peer is not run on a chain: it failed on the smaller one, or its work there (its time
        less the floor's, which is mostly start-up), times the growth in nodes, would pass the limit."""
        smaller = self.done.get(spec.after)
        before = smaller.run(tool) if smaller and tool in PEER_PACKAGES else None
        if before is None:
            return ""
        if before.status == "skipped":
            return f"not run on {spec.after} either"
        if before.status != "ok":
            return f"{before.status} on {spec.after}"
        floor_before, floor_now = smaller.run("floor"), self.done_floor
        work = before.seconds - (floor_before.seconds if _ok(floor_before) else 0)
        predicted = work * info.nodes / smaller.nodes + floor_now
        if predicted <= self.limit:
            return ""
        return (f"{before.seconds:.1f} s on {spec.after}: at {info.nodes / smaller.nodes:.0f}x the nodes about "
                f"{predicted:.0f} s, past the {self.limit:.0f} s limit")

    def check(self, run: Run, out: str, npz: str | None) -> None:
        if npz is None:
            counts = _op_counts(out)
            run.match = self.unchecked
        else:
            proc = self.worker("check", out, npz)
            counts = proc.json() if proc.status == "ok" else _op_counts(out)
            run.match = counts.get("match", f"check {proc.status}: {proc.why()}")
        run.nodes, run.ops, run.standard_only = counts["nodes"], counts["ops"], counts["standard_only"]
        run.checker = counts.get("checker", "")


def _ok(run: Run | None) -> bool:
    return run is not None and run.status == "ok" and run.seconds is not None


def _op_counts(path: str) -> dict:
    from suite_worker import op_counts
    return op_counts(path)


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- gain of rewriting on models/ ---------------------------------------------------------------

# In --quick, one model per kind of normalization.
QUICK_GAIN = ("cnn_bn_ts_op13", "transformer_ln_ts_op13", "unet_resblock_gn_ts_op14", "style_instnorm_ts_op14",
              "llama_rms_ts_op14")


def family(stem: str) -> str:
    return re.split(r"_(?:ts|dynamo)(?:_|$)", stem)[0]


def gain_models(quick: bool) -> list[Path]:
    models = sorted((HERE.parent / "models").glob("*.onnx"))
    if quick:
        return [p for p in models if p.stem in QUICK_GAIN]
    chosen = {}
    for path in models:  # one per family, a TorchScript export when there is one
        key = family(path.stem)
        if key not in chosen or ("_ts_" in path.stem and "_ts_" not in chosen[key].stem):
            chosen[key] = path
    return sorted(chosen.values())


def gain_row(bench: Bench, path: Path, quick: bool, target: str = "portable") -> dict:
    out = os.path.join(bench.folder, path.stem + ".normopt.onnx")
    fold = measure(normopt_cmd() + ["fold", str(path), "-o", out, "-q", "--provider", "cpu", "--target", target],
                   bench.args.timeout, bench.mem_limit)
    row = {"model": path.stem + ("" if target == "portable" else f" (--target {target})")}
    if fold.status != "ok":
        row["error"] = f"normopt fold {fold.status}: {fold.why()}"
    else:
        row["rewrote"] = report.rewrote(_op_counts(str(path))["ops"], _op_counts(out)["ops"])
        lat = bench.worker("latency", str(path), out, str(0.15 if quick else 0.4))
        result = lat.json() if lat.status == "ok" else {}
        row.update(result if "ORT_ENABLE_ALL" in result or "error" in result else
                   {"error": f"latency {lat.status}: {lat.why()}"})
        os.remove(out)
    print(f"  gain: {row['model']}: {row.get('error', 'ok')}", file=sys.stderr, flush=True)
    return row


def gain(bench: Bench, quick: bool) -> list[dict]:
    rows = []
    for path in gain_models(quick):
        try:
            rows.append(gain_row(bench, path, quick))
        except Exception as err:  # recorded; the other models still run
            rows.append({"model": path.stem, "error": f"benchmark error: {err!r}"})
            continue
        # Slower with the portable rewrite: try the forms onnxruntime runs best.
        if report.latency_table(rows[-1:])[1]:
            rows.append(gain_row(bench, path, quick, "onnxruntime"))
    return rows


# --- RESULTS.md -----------------------------------------------------------------------------------

def machine() -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    versions = ", ".join(f"{p} {_version(p) or 'not installed'}" for p in
                         ("normopt", "onnx", "onnxruntime-gpu", "numpy", "onnx-graphsurgeon", "onnxsim", "onnxslim",
                          "onnxoptimizer", "onnxscript", "onnx-ir"))
    return [f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Machine: {os.cpu_count()} cores ({cpu}), {_meminfo('MemTotal') / 2 ** 30:.0f} GiB RAM, "
            f"shared with other work (load average {LOAD_AT_START:.1f} when the run started; times are noisy, "
            "a few tens of percent between runs)",
            f"- Python {platform.python_version()}, {versions}; normopt at commit {commit}",
            "- Peers left out: " + (", ".join(sorted({PEER_PACKAGES[t] for t in PEERS if _version(PEER_PACKAGES[t])
                                                       is None})) or "none (every peer installs from PyPI here)")]


def render(models: list[ModelResult], gain_rows: list[dict], quick: bool, elapsed: float, timeout: float) -> str:
    chains = [m for m in models if m.name.startswith("chain")]
    lat_lines, slower = report.latency_table(gain_rows)
    mode = "`python bench/run.py --quick`" if quick else "`python bench/run.py` (full run)"
    text = ["# Benchmark results", "",
            f"Written by {mode} in {elapsed / 60:.1f} minutes. Regenerate with `pip install -e '.[bench]'` and "
            "`python bench/run.py` (`--quick` for the small run).", "",
            *(["**This is a --quick run**: a 2-layer encoder, a ResNet-50 of half the width, a 1 GB decoder, no "
               "10,000-block chain, peers on chain-100 only. The targets are meant for the full run's sizes.", ""]
              if quick else []),
            *machine(), "",
            "## Targets", "", *report.targets_table(report.targets(models)), "",
            "`normopt` is `normopt fold MODEL -o OUT --no-verify -q`; the floor is `onnx.load` + `onnx.save` of "
            "the same model in its own process (external data in and out for the decoder). Times are wall "
            "times of whole processes (interpreter start and imports included); peak RSS is each process's own "
            "ru_maxrss. Every tool's modules are byte-compiled before timing, as an install leaves them. On a "
            f"model whose floor takes under {REPEAT_UNDER:.0f} s, every tool runs {REPEATS} times, in interleaved "
            "rounds (each round runs every tool once, in the table's order), and its median run (time and peak "
            "RSS of that run) is reported.", "",
            "## Per model", "",
            f"Tools run one after the other in separate processes, each with a {timeout:.0f} s limit "
            f"({FLOOR_TIMES['peer']}x the floor's time when that is longer; normopt: 4x that limit or "
            f"{FLOOR_TIMES['normopt']}x the floor's). A peer is not run on chain-10000 when its work on "
            "chain-1000 (its time less the floor's), times 10, would pass its limit (likewise chain-1000 after "
            "chain-100). `x model size`: peak RSS over "
            "the model's size on disk, for models of 100 MB or more. "
            "`rewrote`: counts of norm ops and of ops outside the standard ONNX domain, before -> after "
            "(BN BatchNormalization, LN LayerNormalization, RMS RMSNormalization, `com.microsoft:...` contrib "
            "ops), and the node count when it changed, function bodies and subgraphs included. `outputs match`: onnxruntime CPU, ORT_DISABLE_ALL, seeded inputs, atol 1e-4 / rtol 1e-3 "
            "against the original. Peers: onnx-simplifier (`onnxsim.simplify`), onnxslim (`onnxslim.slim`), "
            "onnxoptimizer (its default fuse and eliminate passes, `fuse_bn_into_conv` among them), onnxscript "
            "(`optimizer.optimize`, whose default rewrite rules fold BatchNormalization, plus the rewriter's "
            "LayerNormalization fusion on opset >= 17 and RMSNormalization fusion on opset 23), onnxruntime's "
            "offline optimization (`optimized_model_filepath`) at ORT_ENABLE_EXTENDED and ORT_ENABLE_ALL; its "
            "process imports onnxruntime alone (the benchmark tells each tool whether the model has external "
            "data, so that no tool imports more than its own work needs).", ""]
    for m in models:
        text += report.model_table(m) + [""]
    text += ["## Chains: time per node", "", "![chains](chains.png)", "", *report.chain_table(chains), "",
             "![time and memory as multiples of the floor](ratios.png)", "",
             "## Gain of rewriting: onnxruntime CPU, original against normopt's output", "",
             "Models from models/: " + ("one per kind of normalization (--quick)" if quick else
                                        "one per family (a TorchScript export where there is one)") +
             ", each folded by `normopt fold` (verification on), then both timed in one process, one "
             "thread, runs interleaved after 3 warm-up runs; medians. Session creation: the fastest of 6, "
             "alternating.", "",
             *lat_lines, ""]
    if slower:
        text += ["Where the rewrite makes onnxruntime slower (by more than "
                 f"{(report.SLOWER - 1) * 100:.0f}%; note the shared machine's noise):", ""]
        text += [f"- {s}" for s in slower] + [""]
    else:
        text += [f"No model ran more than {(report.SLOWER - 1) * 100:.0f}% slower after the rewrite.", ""]
    return "\n".join(text)


def compile_sources() -> None:
    """Byte-compile normopt's modules, as ``pip install`` does for an installed package (and as
    the peers' wheels are): an editable checkout run with PYTHONDONTWRITEBYTECODE set would
    otherwise compile every module again in each timed process."""
    import compileall
    import normopt
    root = Path(normopt.__file__).resolve().parent
    for folder in {root, root.parent / "passes"}:
        if folder.is_dir():
            compileall.compile_dir(str(folder), quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and a 1 GB decoder (under 2 minutes)")
    parser.add_argument("--out", default=str(HERE), help="folder for RESULTS.md and the PNGs (default: bench/)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per tool run (default 30; "
                        f"{FLOOR_TIMES['peer']}x the floor's time when longer; normopt gets more)")
    parser.add_argument("--only", default="", help="comma-separated model names to run (for debugging)")
    args = parser.parse_args()
    args.timeout = args.timeout or 30.0
    start = time.perf_counter()
    compile_sources()
    models = []
    with tempfile.TemporaryDirectory(prefix="normopt-bench-") as folder:
        bench = Bench(args, folder)
        for spec in plan(args.quick):
            if args.only and spec.name not in args.only.split(","):
                continue
            print(f"{spec.name} ...", file=sys.stderr, flush=True)
            try:
                models.append(bench.model(spec))
            except Exception as err:  # recorded; the other models still run
                models.append(ModelResult(spec.name, 0, 0, False, f"benchmark error: {err!r}", {}, []))
                shutil.rmtree(os.path.join(folder, spec.name), ignore_errors=True)
            print("\n".join(report.model_table(models[-1])) + "\n", flush=True)
        gain_rows = [] if args.only else gain(bench, args.quick)
    elapsed = time.perf_counter() - start
    text = render(models, gain_rows, args.quick, elapsed, args.timeout)
    os.makedirs(args.out, exist_ok=True)
    files = report.plot_files(args.out)
    report.plot_chains([m for m in models if m.name.startswith("chain")], files["chains"])
    report.plot_ratios(models, files["ratios"])
    Path(args.out, "RESULTS.md").write_text(text + "\n")
    print(text[text.index("## Targets"):])
    print(f"\nwrote {Path(args.out, 'RESULTS.md')}, {files['chains']}, {files['ratios']} "
          f"({elapsed:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()

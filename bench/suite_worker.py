"""One step of bench/run.py, run in its own process so that its time and peak RSS are its own.

    python bench/suite_worker.py TOOL INPUT OUTPUT [external|single]
                                                        floor or a peer tool: rewrite INPUT into OUTPUT,
                                                        keeping INPUT's layout (given, or read from INPUT)
    python bench/suite_worker.py ref MODEL NPZ          seeded inputs and onnxruntime outputs of MODEL
    python bench/suite_worker.py check MODEL NPZ        op counts of MODEL, standard ops only, match to NPZ
    python bench/suite_worker.py latency ORIG NEW       onnxruntime CPU latency and session creation, both

Each prints one JSON object on its last line of stdout.
"""
from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import time

import numpy as np

NORM_OPS = ("BatchNormalization", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
            "RMSNormalization")
STANDARD_DOMAINS = ("", "ai.onnx")
ATOL, RTOL = 1e-4, 1e-3
TWO_GB = 2 ** 31


def has_external_data(path: str) -> bool:
    import onnx
    from onnx.external_data_helper import uses_external_data
    model = onnx.load(path, load_external_data=False)
    return any(uses_external_data(t) for t in model.graph.initializer)


def save(model, out: str, external: bool) -> None:
    import onnx
    if external or model.ByteSize() >= TWO_GB:
        onnx.save(model, out, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(out) + ".data", size_threshold=1024)
    else:
        onnx.save(model, out)


# --- the floor and the peers: each reads INPUT and writes OUTPUT -------------------------------

def floor(src: str, out: str, external: bool) -> dict:
    import onnx
    save(onnx.load(src), out, external)
    return {}


def onnxsim_tool(src: str, out: str, external: bool) -> dict:
    import onnx
    import onnxsim
    model, ok = onnxsim.simplify(onnx.load(src))
    save(model, out, external)
    return {"note": "" if ok else "its own check failed"}


def onnxslim_tool(src: str, out: str, external: bool) -> dict:
    import onnxslim
    onnxslim.slim(src, out)
    return {}


def onnxoptimizer_tool(src: str, out: str, external: bool) -> dict:
    import onnx
    import onnxoptimizer
    # The default list: the fuse_* (fuse_bn_into_conv, ...) and eliminate_* passes.
    save(onnxoptimizer.optimize(onnx.load(src)), out, external)
    return {}


def onnxscript_tool(src: str, out: str, external: bool) -> dict:
    import onnx_ir as ir
    import onnxscript.optimizer
    import onnxscript.rewriter
    model = ir.load(src)
    # optimize(): constant folding and the default rewrite rules (BatchNormalization into Conv among them).
    onnxscript.optimizer.optimize(model)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    rules, used = [], []
    try:  # the norm fusions are not in the default rules; they emit ops of opset 17 and 23
        from onnxscript.rewriter.rules.fusion import _layer_norm, _rms_normalization
        if opset >= 17:
            rules += _layer_norm.layer_normalization_rules
            used.append("LayerNormalization fusion")
        if opset >= 23:
            rules += _rms_normalization.rms_normalization_rules
            used.append("RMSNormalization fusion")
    except ImportError:
        pass
    if rules:
        model = onnxscript.rewriter.rewrite(model, rules)
    ir.save(model, out, external_data=os.path.basename(out) + ".data" if external else None)
    return {"note": "optimize()" + "".join(" + " + u for u in used)}


def ort_tool(level_name: str):
    def run(src: str, out: str, external: bool) -> dict:
        # onnxruntime alone, as a user runs it: importing onnx here (to read the layout) would
        # cost it about as much as its whole run on a small model.
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level_name)
        options.optimized_model_filepath = out
        if external:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             os.path.basename(out) + ".data")
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
        return {}
    return run


TOOLS = {
    "floor": floor,
    "onnxsim": onnxsim_tool,
    "onnxslim": onnxslim_tool,
    "onnxoptimizer": onnxoptimizer_tool,
    "onnxscript": onnxscript_tool,
    "ort-extended": ort_tool("ORT_ENABLE_EXTENDED"),
    "ort-all": ort_tool("ORT_ENABLE_ALL"),
}


# --- reference outputs, checks and latency ------------------------------------------------------

def _session(path: str, level_name: str = "ORT_DISABLE_ALL", threads: int = 0):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level_name)
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def feeds_for(path: str, seed: int = 0, dynamic_dim: int = 8) -> dict:
    import onnx
    from normopt.inputs import make_feeds
    model = onnx.load(path, load_external_data=False)
    return make_feeds(model, seed, dynamic_dim=dynamic_dim)[0]


def ref(model: str, npz: str) -> dict:
    feeds = feeds_for(model)
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, feeds)
    np.savez(npz, **{f"in:{k}": v for k, v in feeds.items()}, **{f"out:{k}": v for k, v in zip(names, outputs)})
    return {"outputs": names}


def op_counts(path: str) -> dict:
    """Ops of every graph of the model: the main graph, its subgraphs and its local functions'
    bodies (a fusion inside a function counts)."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    counts = collections.Counter()
    graphs = [model.graph, *model.functions]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            key = node.op_type if node.domain in STANDARD_DOMAINS else f"{node.domain}:{node.op_type}"
            counts[key] += 1
            for a in node.attribute:
                graphs.extend([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)
    return {"nodes": sum(counts.values()), "ops": dict(counts),
            "standard_only": all(":" not in k for k in counts),
            "opset": next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)}


def check(model: str, npz: str) -> dict:
    import onnx
    result = op_counts(model)
    try:
        onnx.checker.check_model(model)
        result["checker"] = "ok"
    except Exception as err:  # kept as a fact about the output, not a failure of the run
        result["checker"] = str(err).strip().splitlines()[0][:120]
    stored = np.load(npz)
    feeds = {k[3:]: stored[k] for k in stored.files if k.startswith("in:")}
    try:
        session = _session(model)
        names = [k[4:] for k in stored.files if k.startswith("out:")]
        outputs = session.run(names, feeds)
    except Exception as err:  # a peer's output that onnxruntime cannot load or run
        result["match"] = f"does not run: {str(err).splitlines()[0][:160]}"
        return result
    worst = 0.0
    for name, got in zip(names, outputs):
        want = stored["out:" + name]
        if got.shape != want.shape:
            result["match"] = f"output '{name}' shape {list(got.shape)} != {list(want.shape)}"
            return result
        excess = np.abs(got.astype(np.float64) - want) - (ATOL + RTOL * np.abs(want.astype(np.float64)))
        if not np.all(np.isfinite(got) == np.isfinite(want)) or np.nanmax(excess) > 0:
            err = float(np.nanmax(np.abs(got.astype(np.float64) - want)))
            result["match"] = f"differs: max |diff| {err:.2e}"
            return result
        worst = max(worst, float(np.nanmax(np.abs(got.astype(np.float64) - want), initial=0.0)))
    result["match"] = "yes"
    result["max_abs"] = worst
    return result


def latency(orig: str, new: str, budget_s: float = 1.0) -> dict:
    """Median latency and session creation at ORT_DISABLE_ALL and ORT_ENABLE_ALL, one thread,
    original and rewritten interleaved so that load on the machine hits both alike."""
    feeds = None
    for dim in (8, 32, 224, 1):  # as normopt's verification: a size the model runs at
        try:
            feeds = feeds_for(orig, dynamic_dim=dim)
            _session(orig).run(None, feeds)
            break
        except Exception:
            feeds = None
    if feeds is None:
        return {"error": "no input size the model runs at"}
    result = {}
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        create = {"orig": [], "new": []}
        sessions = {}
        for order in ((("orig", orig), ("new", new)), (("new", new), ("orig", orig))) * 3:
            for key, path in order:
                start = time.perf_counter()
                sessions[key] = _session(path, level, threads=1)
                create[key].append(time.perf_counter() - start)
        runs = {"orig": [], "new": []}
        for _ in range(3):
            for key in runs:
                sessions[key].run(None, feeds)
        deadline = time.perf_counter() + budget_s
        while (len(runs["orig"]) < 7 or time.perf_counter() < deadline) and len(runs["orig"]) < 500:
            for key in runs:
                start = time.perf_counter()
                sessions[key].run(None, feeds)
                runs[key].append(time.perf_counter() - start)
        # Session creation: the fastest of 6 (a few ms, easily disturbed by other work on the machine).
        result[level] = {"create": {k: min(v) for k, v in create.items()},
                         "run": {k: statistics.median(v) for k, v in runs.items()}, "runs": len(runs["orig"])}
    return result


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "ref":
        result = ref(*args)
    elif mode == "check":
        result = check(*args)
    elif mode == "latency":
        result = latency(args[0], args[1], float(args[2]) if len(args) > 2 else 1.0)
    else:
        src, out, *layout = args
        external = layout[0] == "external" if layout else has_external_data(src)
        start = time.perf_counter()
        result = TOOLS[mode](src, out, external)
        result["inner_s"] = time.perf_counter() - start
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Tables, targets and plots of bench/run.py: pure functions from measured runs to Markdown and PNGs."""
from __future__ import annotations

import dataclasses
import os

SHORT = {"BatchNormalization": "BN", "LayerNormalization": "LN", "GroupNormalization": "GN",
         "InstanceNormalization": "IN", "RMSNormalization": "RMS"}
SLOWER = 1.05  # a rewritten model this much slower (median) is called slower
TOOL_ORDER = ("floor", "normopt", "normopt-verify", "onnxsim", "onnxslim", "onnxoptimizer", "onnxscript",
              "ort-extended", "ort-all")


def _color(tool: str) -> str:
    return f"C{TOOL_ORDER.index(tool) if tool in TOOL_ORDER else len(TOOL_ORDER)}"


@dataclasses.dataclass
class Run:
    """One tool on one model, in its own process."""
    tool: str
    status: str  # ok, failed, timeout, killed, skipped
    seconds: float | None = None
    peak_rss: int | None = None  # bytes, the child's own ru_maxrss
    note: str = ""
    nodes: int | None = None
    ops: dict | None = None  # op type (domain:op outside the standard domain) -> count
    standard_only: bool | None = None
    match: str = ""
    checker: str = ""  # onnx.checker's verdict on the output: ok or its first line


@dataclasses.dataclass
class ModelResult:
    name: str
    bytes: int
    nodes: int
    external: bool
    note: str
    ops: dict
    runs: list

    def run(self, tool: str) -> Run | None:
        return next((r for r in self.runs if r.tool == tool), None)


@dataclasses.dataclass
class Target:
    name: str
    wanted: str
    measured: str
    met: bool | None  # None: not measured in this run


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def norm_ops(ops: dict) -> dict:
    """The counts that tell what a tool rewrote: the norm ops and every op outside the standard domain."""
    return {k: v for k, v in ops.items() if k in SHORT or ":" in k}


def fused(ops: dict) -> int:
    """Normalizations as single ops (standard or contrib), BatchNormalization aside."""
    return sum(v for k, v in ops.items() if "Norm" in k and k != "BatchNormalization")


def rewrote(before: dict, after: dict | None) -> str:
    if after is None:
        return "-"
    a, b = norm_ops(before), norm_ops(after)
    changes = [f"{SHORT.get(k, k)} {a.get(k, 0)}->{b.get(k, 0)}" for k in sorted(set(a) | set(b))
               if a.get(k, 0) != b.get(k, 0)]
    nodes = sum(before.values()), sum(after.values())
    if nodes[0] != nodes[1]:   # (a fold of Keras' Mul + Add into the Conv changes no norm op)
        changes.append(f"nodes {nodes[0]}->{nodes[1]}")
    return ", ".join(changes) or "nothing"


def model_table(m: ModelResult) -> list[str]:
    floor = m.run("floor")
    lines = [f"### {m.name}: {fmt_bytes(m.bytes)}, {m.nodes} nodes{', external data' if m.external else ''}",
             "", m.note, "",
             "| tool | status | time | x floor | peak RSS | x floor's | x model size | rewrote | standard ops only "
             "| outputs match | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    skipped = {}
    for r in m.runs:
        if r.status == "skipped":
            skipped.setdefault(r.note, []).append(r.tool)
            continue
        t = "-" if r.seconds is None else f"{r.seconds:.2f} s"
        std = "-" if r.standard_only is None else ("yes" if r.standard_only else "no")
        if r.checker and r.checker != "ok":
            std += f"; onnx.checker rejects it: {r.checker}"
        lines.append(
            f"| {r.tool} | {r.status} | {t} | {fmt_ratio(ratio(r.seconds, floor and floor.seconds))} "
            f"| {fmt_bytes(r.peak_rss)} | {fmt_ratio(ratio(r.peak_rss, floor and floor.peak_rss))} "
            f"| {fmt_ratio(ratio(r.peak_rss, m.bytes)) if m.bytes >= 100e6 else '-'} | {rewrote(m.ops, r.ops) if r.tool != 'floor' else ''} "
            f"| {std} | {r.match or '-'} | {r.note.replace('|', '/')} |")
    if skipped:
        lines.append("")
        lines += [f"Not run: {', '.join(tools)} ({note})." for note, tools in skipped.items()]
    return lines


def chain_table(chains: list[ModelResult]) -> list[str]:
    tools = []
    for m in chains:
        tools += [r.tool for r in m.runs if r.tool not in tools]
    head = " | ".join(f"{m.nodes} nodes: us/node (x floor)" for m in chains)
    lines = [f"| tool | {head} |", "|---|" + "---|" * len(chains)]
    for tool in tools:
        cells = []
        for m in chains:
            r, floor = m.run(tool), m.run("floor")
            if r is None or r.status != "ok":
                cells.append(r.status if r else "-")
            else:
                cells.append(f"{r.seconds / m.nodes * 1e6:.1f} ({fmt_ratio(ratio(r.seconds, floor.seconds))})")
        lines.append(f"| {tool} | " + " | ".join(cells) + " |")
    return lines


def _ok(r: Run | None) -> bool:
    return r is not None and r.status == "ok" and r.seconds is not None


def targets(models: list[ModelResult], tool: str = "normopt") -> list[Target]:
    by_name = {m.name: m for m in models}
    out = []
    decoder = by_name.get("decoder")
    if decoder:
        r, floor = decoder.run(tool), decoder.run("floor")
        size = fmt_bytes(decoder.bytes)
        if _ok(r) and _ok(floor):
            t, mem = r.seconds / floor.seconds, r.peak_rss / decoder.bytes
            out.append(Target(f"decoder ({size}, external data): time", "<= 1.5x floor", f"{t:.2f}x", t <= 1.5))
            out.append(Target(f"decoder ({size}, external data): peak RSS", "<= 0.5x model size",
                              f"{mem:.2f}x ({fmt_bytes(r.peak_rss)})", mem <= 0.5))
        else:
            out.append(Target(f"decoder ({size})", "fold runs", r.status if r else "not run", False))
    for name in ("encoder", "cnn"):
        m = by_name.get(name)
        if not m:
            continue
        r, floor = m.run(tool), m.run("floor")
        if _ok(r) and _ok(floor):
            t, mem = r.seconds / floor.seconds, r.peak_rss / floor.peak_rss
            out.append(Target(f"{name}: time", "<= 1.5x floor", f"{t:.2f}x", t <= 1.5))
            out.append(Target(f"{name}: peak RSS", "<= 1.25x floor's", f"{mem:.2f}x", mem <= 1.25))
        else:
            out.append(Target(name, "fold runs", r.status if r else "not run", False))
    out += _chain_targets(by_name, tool)
    out.extend(_peer_targets(models, tool))
    return out


def _chain_targets(by_name: dict, tool: str) -> list[Target]:
    small, big = by_name.get("chain-1000"), by_name.get("chain-10000")
    if not big:
        return [Target("chains: 10,000 blocks", "per node within 1.15x of 1,000; <= 15x floor",
                       "not measured (--quick)", None)]
    r_big, f_big = big.run(tool), big.run("floor")
    r_small = small.run(tool) if small else None
    out = []
    if _ok(r_big) and _ok(r_small):
        growth = (r_big.seconds / big.nodes) / (r_small.seconds / small.nodes)
        out.append(Target("chains: time per node, 10,000 vs 1,000 blocks", "<= 1.15x", f"{growth:.2f}x",
                          growth <= 1.15))
    else:
        out.append(Target("chains: time per node, 10,000 vs 1,000 blocks", "<= 1.15x", "fold did not run", False))
    if _ok(r_big) and _ok(f_big):
        t = r_big.seconds / f_big.seconds
        out.append(Target("chains: 10,000 blocks", "<= 15x floor", f"{t:.1f}x", t <= 15))
    return out


def same_rewrites(m: ModelResult, peer: Run, ours: Run) -> bool:
    """The peer did at least what normopt did: as few BatchNormalizations left, as many fused norms."""
    if not (_ok(peer) and _ok(ours) and peer.ops is not None and ours.ops is not None):
        return False
    bn = "BatchNormalization"
    return peer.ops.get(bn, 0) <= ours.ops.get(bn, 0) and fused(peer.ops) >= fused(ours.ops) \
        and (ours.ops != m.ops)


def _portable(peer: Run) -> bool:
    """Standard ops only, and onnx.checker accepts the output."""
    return bool(peer.standard_only) and (not peer.checker or peer.checker == "ok")


def _peer_targets(models: list[ModelResult], tool: str) -> list[Target]:
    """Two rows: peers whose outputs are portable ONNX (standard ops, checker-valid), which make
    the same rewrites normopt makes; and peers that made those rewrites into outputs that are not
    (contrib ops, or a model onnx.checker rejects), reported apart and just as plainly."""
    rows = []
    for portable, what in ((True, "peers doing the same rewrites (portable output)"),
                           (False, "peers doing those rewrites into non-portable output")):
        compared, slower = [], []
        for m in models:
            ours = m.run(tool)
            for peer in m.runs:
                if peer.tool in ("floor", tool) or peer.tool.startswith("normopt"):
                    continue
                if not same_rewrites(m, peer, ours) or _portable(peer) != portable:
                    continue
                compared.append(f"{peer.tool} on {m.name}")
                if peer.seconds <= ours.seconds:
                    caveat = "" if peer.standard_only else "; its output has contrib ops"
                    if peer.checker and peer.checker != "ok":
                        caveat += "; its output fails onnx.checker"
                    floor = m.run("floor")
                    if _ok(floor) and peer.seconds > 0:  # what a tool built on the onnx package spends first
                        caveat += (f"; the floor alone, importing onnx, loading and saving, takes {floor.seconds:.2f} s, "
                                   f"{floor.seconds / peer.seconds:.2f}x its whole run")
                    slower.append(f"{peer.tool} on {m.name} ({peer.seconds:.2f} s vs {ours.seconds:.2f} s{caveat})")
        if not compared:
            rows.append(Target(what, "normopt faster", "no such peer", True))
            continue
        measured = ("faster than " + ", ".join(compared)) if not slower else "slower than " + ", ".join(slower)
        rows.append(Target(what, "normopt faster", measured, not slower))
    return rows


def targets_table(items: list[Target]) -> list[str]:
    lines = ["| target | wanted | measured | verdict |", "|---|---|---|---|"]
    for t in items:
        verdict = "not measured" if t.met is None else ("met" if t.met else "**MISSED**")
        lines.append(f"| {t.name} | {t.wanted} | {t.measured} | {verdict} |")
    return lines


def latency_table(rows: list[dict]) -> tuple[list[str], list[str]]:
    """rows: {model, DISABLE/ENABLE results from the latency worker} -> table, plain sentences on slowdowns."""
    lines = ["| model | rewrote | DISABLE_ALL run orig -> new | ratio | ENABLE_ALL run orig -> new | ratio "
             "| session creation ENABLE_ALL orig -> new | ratio |", "|---|---|---|---|---|---|---|---|"]
    slower = []
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row.get('rewrote', '-')} | {row['error']} | | | | | |")
            continue
        cells = []
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            run = row[level]["run"]
            r = run["new"] / run["orig"]
            cells += [f"{run['orig'] * 1e3:.3f} -> {run['new'] * 1e3:.3f} ms", f"{r:.2f}x"]
            if r > SLOWER:
                slower.append(f"{row['model']}: the rewritten model runs {r:.2f}x the original's median latency "
                              f"at {level} ({run['orig'] * 1e3:.3f} -> {run['new'] * 1e3:.3f} ms).")
        create = row["ORT_ENABLE_ALL"]["create"]
        r = create["new"] / create["orig"]
        cells += [f"{create['orig'] * 1e3:.1f} -> {create['new'] * 1e3:.1f} ms", f"{r:.2f}x"]
        if r > SLOWER:
            slower.append(f"{row['model']}: session creation (ORT_ENABLE_ALL) takes {r:.2f}x as long.")
        lines.append(f"| {row['model']} | {row.get('rewrote', '-')} | " + " | ".join(cells) + " |")
    return lines, slower


def plot_chains(chains: list[ModelResult], path: str, dpi: int = 100) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tools = []
    for m in chains:
        tools += [r.tool for r in m.runs if r.tool not in tools]
    for tool in tools:
        xs, ys = [], []
        for m in chains:
            r = m.run(tool)
            if _ok(r):
                xs.append(m.nodes)
                ys.append(r.seconds / m.nodes * 1e6)
        if xs:
            ax.plot(xs, ys, marker="o", label=tool, color=_color(tool),
                    linewidth=2.5 if tool in ("normopt", "floor") else 1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes in the model (12 per Conv+BN+LayerNorm+Add block)")
    ax.set_ylabel("process time per node (us), start-up included")
    ax.set_title("Chains: time per node (flat = linear in node count)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_ratios(models: list[ModelResult], path: str, dpi: int = 100) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tools = []
    for m in models:
        tools += [r.tool for r in m.runs if r.tool not in tools and r.tool != "floor"]
    tools.sort(key=lambda t: TOOL_ORDER.index(t) if t in TOOL_ORDER else len(TOOL_ORDER))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(tools), 1)
    for panel, (ax, attr, title) in enumerate(zip(axes, ("seconds", "peak_rss"), ("time", "peak RSS"))):
        for i, tool in enumerate(tools):
            values = []
            for m in models:
                r, floor = m.run(tool), m.run("floor")
                values.append(ratio(getattr(r, attr), getattr(floor, attr)) if _ok(r) and _ok(floor) else 0)
            ax.bar([j + i * width for j in range(len(models))], values, width, label=tool, color=_color(tool))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], [m.name for m in models], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{title} / floor's (load + save)")
        ax.set_title(f"{title} / floor's (no bar: not run, failed or timed out)", fontsize=10)
        if panel == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_files(folder: str) -> dict:
    return {"chains": os.path.join(folder, "chains.png"), "ratios": os.path.join(folder, "ratios.png")}

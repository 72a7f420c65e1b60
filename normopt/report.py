"""Render result records as short text for people and JSON for machines. Pure functions."""
from __future__ import annotations

import dataclasses
import json
import math

from normopt import __version__
from normopt.records import PipelineResult
from normopt.verify import VerifyReport

MAX_SKIPS_INLINE = 3


def pipeline_lines(result: PipelineResult, verbose: bool = False) -> list[str]:
    lines = []
    for up in result.upgrades:
        lines.append(f"opset upgraded {up.from_version} -> {up.to_version} (for {up.for_pass})")
    for rec in result.passes:
        line = f"{rec.name}: {len(rec.applied)} applied, {len(rec.skipped)} skipped"
        shown = rec.skipped if verbose else rec.skipped[:MAX_SKIPS_INLINE]
        if shown:
            line += " (" + "; ".join(f"{s.node}: {s.reason}" for s in shown)
            line += f"; ... {len(rec.skipped) - len(shown)} more, see -v or --report)" if len(shown) < len(rec.skipped) else ")"
        lines.append(line)
        if verbose:
            lines.extend(f"  applied at {r.anchor}{' in ' + r.graph if r.graph else ''}: -> '{r.output}' "
                         f"({', '.join(r.removed)} => {', '.join(r.added)})" for r in rec.applied)
    lines.append(f"nodes: {result.nodes_before} -> {result.nodes_after}; rewrite time {result.seconds:.2f} s")
    return lines


def verify_lines(report: VerifyReport | None, verbose: bool = False) -> list[str]:
    if report is None:
        return ["verify: skipped (--no-verify)"]
    where = "CUDA (TF32 off)" if report.provider == "cuda" else "CPU"
    if report.provider != "cuda" and report.provider_note:
        where += f"; {report.provider_note}"
    status = "passed" if report.passed else "FAILED"
    lines = [f"verify: {status} on {where}; seed {report.seed}, {report.trials} trial(s); inputs "
             + ", ".join(f"{i.name}:{'x'.join(map(str, i.shape)) or 'scalar'} {i.dtype}" for i in report.inputs)]
    if verbose or not report.outputs:
        shown = report.outputs
    else:
        shown = report.failures or [max(report.outputs, key=lambda o: o.max_abs)]
    for o in shown:
        lines.append(f"  output '{o.name}': max |diff| {o.max_abs:.2e}, max rel {o.max_rel:.2e}, "
                     f"{o.mismatched:.2%} out of tolerance (atol {o.atol:g}, rtol {o.rtol:g})"
                     + (f"; {o.problem}" if o.problem else ""))
    return lines


def failure_message(report: VerifyReport) -> str:
    o = report.failures[0]
    if o.problem:
        return f"output '{o.name}' differs: {o.problem}"
    return (f"output '{o.name}' differs: max |diff| {o.max_abs:.1e} > atol {o.atol:g} (rtol {o.rtol:g}), "
            f"{o.mismatched:.2%} of elements")


def to_json(**parts) -> str:
    """JSON of dataclasses and plain values; inf/nan become strings so any parser reads it."""
    return json.dumps({"normopt_version": __version__, **{k: _plain(v) for k, v in parts.items()}}, indent=2)


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name in ("passed", "modified"):
            if hasattr(type(value), name) and isinstance(getattr(type(value), name), property):
                out[name] = getattr(value, name)
        return out
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value

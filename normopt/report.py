"""Render result records as short text for people and JSON for machines. Pure functions.

The JSON documents follow ``normopt/schema/report.schema.json`` (``schema_version`` below): one
document per command (``kind``: fold, verify, inspect, batch). Keys are only ever added within a
schema version; a renamed or removed key raises it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import sys
from collections import Counter
from typing import TYPE_CHECKING

import click

from normopt import __version__
from normopt.records import PipelineResult

if TYPE_CHECKING:  # pragma: no cover - verification's module loads only when it runs
    from normopt.verify import VerifyReport

SCHEMA_VERSION = 1
MAX_SKIPS_INLINE = 3
MAX_NODES_SHOWN = 4


# ----------------------------------------------------------------------------- text: fold

def pipeline_lines(result: PipelineResult, verbose: bool = False) -> list[str]:
    """A table per pass: applied and skipped counts, then the skip reasons grouped and counted
    (names in quotes stand for any name: 'intermediate '…' is a graph output' counts all of them)."""
    lines = [f"note: {note}" for note in result.notes]
    for up in result.upgrades:
        lines.append(f"opset upgraded {up.from_version} -> {up.to_version} (for {up.for_pass})")
    width = max([len(rec.name) for rec in result.passes] + [4])
    if result.passes:
        lines.append(click.style(f"{'pass':<{width}}  applied  skipped", bold=True))
    for rec in result.passes:
        skipped = f"{len(rec.skipped):>7}"
        if rec.skipped:
            skipped = click.style(skipped, fg="yellow")
        lines.append(f"{rec.name:<{width}}  {len(rec.applied):>7}  {skipped}")
        if verbose:
            lines.extend(f"    applied at {r.anchor}{' in ' + r.graph if r.graph else ''}: -> '{r.output}' "
                         f"({', '.join(r.removed)} => {', '.join(r.added)})" for r in rec.applied)
            lines.extend(f"    skipped {s.node}{' in ' + s.graph if s.graph else ''}: {s.reason}" for s in rec.skipped)
            continue
        groups = group_reasons([(s.node, s.reason) for s in rec.skipped])
        for count, reason, nodes in groups[:MAX_SKIPS_INLINE]:
            shown = ", ".join(nodes[:MAX_NODES_SHOWN]) + (", ..." if len(nodes) > MAX_NODES_SHOWN else "")
            lines.append(f"    {count:>3} x {reason} ({shown})")
        if len(groups) > MAX_SKIPS_INLINE:
            lines.append(f"    ... {len(groups) - MAX_SKIPS_INLINE} more reasons, see -v or --report")
    lines.append(f"nodes: {result.nodes_before} -> {result.nodes_after}; rewrite time {result.seconds:.2f} s")
    return lines


def group_reasons(items: list[tuple[str, str]]) -> list[tuple[int, str, list[str]]]:
    """(count, reason, nodes) per kind of reason, most frequent first. Reasons that differ only in
    quoted names, node names or numbers are one kind, shown with '…' in their place; a reason
    that occurs with one wording only is shown word for word."""
    templates: dict[str, list[tuple[str, str]]] = {}
    for node, reason in items:
        templates.setdefault(_template(reason), []).append((node, reason))
    out = []
    for template, members in templates.items():
        reasons = {r for _, r in members}
        out.append((len(members), members[0][1] if len(reasons) == 1 else template, [n for n, _ in members]))
    return sorted(out, key=lambda g: -g[0])


def _template(reason: str) -> str:
    reason = re.sub(r"'[^']*'", "'…'", reason)
    return re.sub(r"[\w./:\[\]-]*\d[\w./:\[\]-]*", "…", reason)


def verify_lines(report: VerifyReport | None, verbose: bool = False) -> list[str]:
    """The verification in one line, then one line per output."""
    if report is None:
        return ["verify: skipped (--no-verify)"]
    where = "CUDA (TF32 off)" if report.provider == "cuda" else "CPU"
    if report.provider != "cuda" and report.provider_note:
        where += f"; {report.provider_note}"
    status = click.style("passed", fg="green") if report.passed else click.style("FAILED", fg="red", bold=True)
    lines = [f"verify: {status} on {where}; seed {report.seed}, {input_sets(report)}; inputs "
             + ", ".join(f"{i.name}:{'x'.join(map(str, i.shape)) or 'scalar'} {i.dtype}" for i in report.inputs)]
    for o in report.outputs:
        verdict = click.style("ok", fg="green") if o.passed else click.style("DIFFERS", fg="red", bold=True)
        lines.append(f"  output '{o.name}': {verdict}; max |diff| {o.max_abs:.2e}, max rel {o.max_rel:.2e}, "
                     f"{o.mismatched:.2%} out of tolerance (atol {o.atol:g} from {o.atol_rule}, rtol {o.rtol:g})"
                     + (f" on {o.inputs}" if o.inputs else "") + (f"; {o.problem}" if o.problem else "")
                     + (f"; {o.note}" if o.note else ""))
    return lines


def input_sets(report: VerifyReport) -> str:
    """``"2 normal input set(s) + offset + degenerate"``: the distributions that ran."""
    if "file" in report.input_sets:
        return "inputs from file"
    extra = [k for k in report.input_sets if k != "normal"]
    return " + ".join([f"{report.input_sets.count('normal') or report.trials} normal input set(s)"] + extra)


def failure_message(report: VerifyReport) -> str:
    o = report.failures[0]
    where = f" on {o.inputs}" if o.inputs else ""
    if o.problem:
        return f"output '{o.name}' differs: {o.problem}{where}"
    return (f"output '{o.name}' differs: max |diff| {o.max_abs:.1e} > atol {o.atol:g} (rtol {o.rtol:g}), "
            f"{o.mismatched:.2%} of elements{where}")


# ----------------------------------------------------------------------------- text: inspect

def site_lines(sites, verbose: bool = False) -> list[str]:
    """One line per site: kind, where, what it produces, and what fold does with it."""
    lines = []
    for s in sites:
        nodes = s.nodes if verbose or len(s.nodes) <= 3 else [s.nodes[0], "...", s.nodes[-1]]
        where = f" in {s.graph}" if s.graph else ""
        what = {"rewrite": click.style(f"rewrite -> {s.becomes}", fg="green"),
                "skip": click.style("skip", fg="yellow") + f": {s.reason}",
                "keep": f"keep: {s.reason}"}[s.action]
        via = f" [{s.pass_name}]" if s.pass_name else ""
        lines.append(f"{s.form} {s.kind} at {', '.join(nodes)}{where} -> '{s.output}': {what}{via}")
    return lines


def inspect_summary(model: str, inspection) -> str:
    return (f"{model}: {len(inspection.sites)} normalization site(s): {inspection.count('rewrite')} to rewrite, "
            f"{inspection.count('skip')} skipped, {inspection.count('keep')} already single ops")


# ----------------------------------------------------------------------------- JSON

def versions() -> dict:
    import onnx

    return {"normopt": __version__, "onnx": onnx.__version__, "onnxruntime": _onnxruntime_version(),
            "python": ".".join(map(str, sys.version_info[:3]))}


def _onnxruntime_version() -> str:
    """onnxruntime's version, read from its installed metadata when nothing imported it yet (a
    run without verification does not need the package: importing it would take longer than
    folding a small model)."""
    loaded = sys.modules.get("onnxruntime")
    if loaded is None:
        from importlib import metadata

        for dist in ("onnxruntime-gpu", "onnxruntime"):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        import onnxruntime as loaded
    return loaded.__version__


def peak_memory_bytes() -> int:
    """Peak resident memory of this process and of its finished child processes (batch -j)."""
    try:
        import resource
    except ImportError:  # Windows: not measured
        return 0
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * scale


def _header(kind: str) -> dict:
    return {"schema_version": SCHEMA_VERSION, "kind": kind, "normopt_version": __version__, "versions": versions()}


def fold_document(*, input: str, output: str | None, status: str, result, target: str = "portable",
                  seconds: float = 0.0, pending: list | None = None) -> dict:
    """The report of ``normopt fold`` on one model (``result``: a FoldResult)."""
    pipe = result.pipeline
    doc = _header("fold")
    doc.update(input=str(input), output=output, written=output is not None, status=status, target=target,
               passes=_plain(pipe.passes), opset_upgrades=_plain(pipe.upgrades), nodes_before=pipe.nodes_before,
               nodes_after=pipe.nodes_after, seconds=pipe.seconds, verification=_plain(result.verification),
               rollbacks=_plain(result.rollbacks), pending=_plain(pending or []), notes=list(pipe.notes),
               wall_seconds=seconds,
               peak_memory_bytes=peak_memory_bytes())
    return doc


def verify_document(*, reference: str, candidate: str, status: str, verification: VerifyReport,
                    seconds: float = 0.0) -> dict:
    doc = _header("verify")
    doc.update(reference=str(reference), candidate=str(candidate), status=status,
               verification=_plain(verification), wall_seconds=seconds, peak_memory_bytes=peak_memory_bytes())
    return doc


def inspect_document(*, model: str, inspection, target: str = "portable", seconds: float = 0.0) -> dict:
    doc = _header("inspect")
    doc.update(model=str(model), opset=inspection.opset, target=target,
               summary={a: inspection.count(a) for a in ("rewrite", "skip", "keep")},
               sites=_plain(inspection.sites), opset_upgrades=_plain(inspection.pipeline.upgrades),
               wall_seconds=seconds, peak_memory_bytes=peak_memory_bytes())
    return doc


def file_error(input: str, status: str, exit_code: int, message: str) -> dict:
    """A batch entry for a file that failed before there was a result to report."""
    return {"input": str(input), "status": status, "exit_code": exit_code, "error": message}


def error_document(input: str, exit_code: int, message: str, seconds: float) -> dict:
    """The report of ``normopt fold`` on one model that ended in an error (bad input, a write
    that failed): what a batch report lists for such a file, as a document of its own."""
    doc = _header("error")
    doc.update(file_error(input, "error", exit_code, message), wall_seconds=seconds,
               peak_memory_bytes=peak_memory_bytes())
    return doc


def batch_document(files: list[dict], seconds: float) -> dict:
    doc = _header("batch")
    counts = Counter("ok" if f.get("exit_code", 0) == 0 else "failed" for f in files)
    doc.update(files=files, summary={"files": len(files), "ok": counts["ok"], "failed": counts["failed"]},
               wall_seconds=seconds, peak_memory_bytes=peak_memory_bytes())
    return doc


def to_json(doc: dict) -> str:
    """JSON of a report document; inf/nan become strings so any parser reads it."""
    return json.dumps(_plain(doc), indent=2)


def _plain(value):
    cls = type(value)
    if cls in _SCALARS:
        return str(value) if cls is float and not math.isfinite(value) else value
    if cls in (list, tuple):
        return [_plain(v) for v in value]
    if cls is dict:
        return {str(k): _plain(v) for k, v in value.items()}
    shape = _dataclass_shape(cls)
    if shape is not None:
        fields, props = shape
        out = {name: _plain(getattr(value, name)) for name in fields}
        for name in props:
            out[name] = getattr(value, name)
        return out
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):  # numpy scalars
        return _plain(value.item())
    return value


_SCALARS = frozenset({str, int, bool, float, type(None)})


@functools.lru_cache(maxsize=None)
def _dataclass_shape(cls) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(field names, the ``passed`` / ``modified`` properties it has) of a dataclass type; None
    for any other type. Looked up once per type: a report holds thousands of records."""
    if not dataclasses.is_dataclass(cls):
        return None
    props = tuple(name for name in ("passed", "modified") if isinstance(getattr(cls, name, None), property))
    return tuple(f.name for f in dataclasses.fields(cls)), props

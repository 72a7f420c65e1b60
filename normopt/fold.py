"""Rewrite, verify, and take back what does not verify: the job behind ``normopt fold``.

When the rewritten model's outputs differ, the output tensor of every rewrite (each pass keeps
that name) is exposed as an extra graph output in both models and compared in one more run.
The most upstream rewrites that differ are excluded, the passes re-run without them, and the
result is verified again.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from normopt import graph as G, ir, model_io, pipeline
from normopt.errors import UsageError, VerificationError
from normopt.records import PassRecord, PipelineResult, Rewrite
from normopt.targets import veto_for

if TYPE_CHECKING:  # pragma: no cover - verification's modules load only when it runs
    from normopt.providers import ProviderChoice
    from normopt.verify import Reference, VerifyReport

MAX_ROLLBACK_ROUNDS = 6


@dataclass
class FoldOptions:
    passes: list[str] | None = None
    allow_opset_upgrade: bool = True
    verify: bool = True
    provider: str = "auto"
    seed: int = 0
    trials: int = 1
    input_shapes: dict = field(default_factory=dict)
    input_ranges: dict = field(default_factory=dict)
    inputs_file: str | None = None
    atol: float | None = None
    rtol: float | None = None
    strict: bool = False
    target: str = "portable"  # or "onnxruntime": see normopt.targets
    # Layout of the verified candidate written for onnxruntime (None: the input's; see model_io.save).
    external_data: bool | None = None


@dataclass
class Rollback:
    pass_name: str
    anchor: str
    output: str
    reason: str
    graph: str = ""  # where the rewrite was: "" main graph, a subgraph path, or "function domain:name"


@dataclass
class FoldResult:
    rewritten: model_io.Skeleton
    pipeline: PipelineResult
    verification: VerifyReport | None = None
    rollbacks: list[Rollback] = field(default_factory=list)
    # The verified candidate as written for onnxruntime (model file; its data file beside it).
    staged: Path | None = None
    input_external: bool = False  # the input kept weights in external data: so does save() by default

    @property
    def model(self) -> onnx.ModelProto:
        """The rewritten model, complete (every weight's bytes in memory)."""
        if "_model" not in self.__dict__:
            self.__dict__["_model"] = self.rewritten.materialize()
        return self.__dict__["_model"]

    @property
    def verified(self) -> bool:
        return self.verification is None or self.verification.passed

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> list[Path]:
        """Write the rewritten model (weights streamed from where they are; see model_io.save).
        By default a data file beside it when the input had external data."""
        if external_data is None and self.input_external:
            external_data = True
        return model_io.save(self.rewritten, path, external_data=external_data)

    @property
    def records(self) -> list[PassRecord]:
        """One PassRecord per pass run: what it rewrote and what it skipped, with reasons."""
        return self.pipeline.passes


def optimize(model: onnx.ModelProto, options: FoldOptions | None = None,
             source: str | os.PathLike | None = None, stage: str | os.PathLike | None = None) -> FoldResult:
    """Run the passes on ``model``; verify against ``source`` (the file it came from) or itself.

    ``model`` may hold external-data headers (``model_io.load``): they are read from ``source``'s
    folder only where a pass needs the values, and streamed when the candidate is written. Each
    candidate is written to ``stage`` (a model path in a folder of the caller's; else a temporary
    folder) and onnxruntime loads it from there; ``FoldResult.staged`` is the verified one.

    Raises VerificationError (carrying ``.result`` and ``.status`` for the report) with
    ``options.strict`` and a rollback, or when the input model disagrees with itself on the same
    inputs; otherwise a result whose ``verified`` is False tells the caller not to trust it.
    """
    options = options or FoldOptions()
    choice = reference = None
    base_dir = str(Path(source).resolve().parent) if source is not None else None
    external_in = model_io.has_external_data(model)
    if options.verify:   # verification's modules load only when it runs
        from normopt.providers import select_provider
        from normopt.verify import Loaded, uncompared

        choice = select_provider(options.provider)
        # onnxruntime loads the source file (faster than serializing the model, external data
        # included); everything else reads the model already in memory.
        reference = Loaded(source, model, ir.Weights(base_dir)) if source is not None else model
        # The original runs once per set of compared tensors; every round compares against that.
        reference = _References(reference, options, choice)
    exclude: dict[str, str] = {}
    rollbacks: list[Rollback] = []

    def roll_back(rewrite: Rewrite, reason: str) -> None:   # left out of the next round, and reported
        exclude[pipeline.exclusion_key(rewrite.graph, rewrite.output)] = reason
        rollbacks.append(Rollback(rewrite.pass_name, rewrite.anchor, rewrite.output, reason, rewrite.graph))

    allow_upgrade = options.allow_opset_upgrade
    veto = veto_for(options.target)
    own_stage = None
    if choice is not None and stage is None:
        own_stage = Path(tempfile.mkdtemp(prefix="normopt-verify-"))
        stage = own_stage / "model.onnx"
    try:
        for round_ in range(MAX_ROLLBACK_ROUNDS + 1):
            out, result = pipeline.run(model, options.passes, pipeline.Options(allow_upgrade, dict(exclude), options.strict, veto),
                                       base_dir=base_dir, lazy=True)
            if choice is None:
                return FoldResult(out, result, None, rollbacks, input_external=external_in)
            pipeline.release_kept()  # onnxruntime needs the memory more than the end of the process needs the time
            model_io.save(out, stage, external_data=options.external_data or external_in or None)
            candidate = Loaded(stage, out.model, out.weights)
            reference.outputs()   # the original's failures are the input's, raised as they are
            try:
                report = _verify(reference, candidate, options, choice)
            except UsageError as err:
                # onnxruntime cannot load or run the rewritten model (the original it can): a
                # rewrite made it invalid. Every rewrite and upgrade is rolled back, not the run.
                if round_ == MAX_ROLLBACK_ROUNDS or not (result.applied or (result.upgrades and allow_upgrade)):
                    raise
                reason = f"the rewritten model failed in onnxruntime: {str(err).removeprefix('onnxruntime ')}"
                for rewrite in result.applied:
                    roll_back(rewrite, reason)
                if not result.applied:
                    allow_upgrade = False
                    for up in result.upgrades:
                        rollbacks.append(Rollback(up.for_pass, "opset", f"opset {up.to_version}", reason))
                continue
            blank = uncompared(report) if round_ < MAX_ROLLBACK_ROUNDS else []
            if blank and not (result.applied or result.upgrades):
                for diff in blank:   # the model as it came: nothing to prove
                    diff.problem, diff.note = "", "NaN or Inf everywhere on every input set; nothing was rewritten"
            elif blank:
                # An output NaN or Inf everywhere proves nothing of what computes it: every rewrite
                # is compared at its own output instead, and one that differs is rolled back.
                culprits = _proven_locally(reference, candidate, result, options, choice, {d.name for d in blank})
                if culprits:
                    for rewrite, reason in culprits:
                        roll_back(rewrite, reason)
                    continue
                for diff in blank:
                    diff.problem, diff.note = "", ("NaN or Inf everywhere on every input set; the rewrites were "
                                                   "compared at their own outputs instead")
            idle = _unexercised(reference, model, result) if report.passed and round_ < MAX_ROLLBACK_ROUNDS else []
            if idle:
                for rewrite, reason in idle:
                    roll_back(rewrite, reason)
                continue
            if report.passed:
                done = FoldResult(out, result, report, rollbacks, None if own_stage else Path(stage), external_in)
                _strict_check(options, done)
                return done
            if round_ == MAX_ROLLBACK_ROUNDS:
                break
            if round_ == 0:
                _require_deterministic(reference, options, choice, FoldResult(out, result, report, rollbacks))
            culprits = _localize(reference, candidate, result, options, choice)
            if culprits:
                for rewrite, reason in culprits:
                    roll_back(rewrite, reason)
            elif result.applied:
                for rewrite in result.applied:
                    roll_back(rewrite, "outputs differed and could not be traced to one rewrite")
            elif result.upgrades and allow_upgrade:
                allow_upgrade = False
                for up in result.upgrades:
                    rollbacks.append(Rollback(up.for_pass, "opset", f"opset {up.to_version}",
                                              f"opset upgrade {up.from_version} -> {up.to_version} changed the outputs"))
            else:
                break
        return FoldResult(out, result, report, rollbacks, input_external=external_in)
    finally:
        model_io.forget_census()  # a caller's models are not kept alive by the cache
        if own_stage is not None:
            shutil.rmtree(own_stage, ignore_errors=True)


class _References:
    """The original model and its outputs, computed on first use and kept for every round."""

    def __init__(self, model, options: FoldOptions, choice: ProviderChoice | None):
        self.model, self.options, self.choice = model, options, choice
        self._runs: dict[tuple[str, ...], Reference] = {}

    def outputs(self, extra=None) -> Reference:
        key = tuple(extra or ())
        if key not in self._runs:
            from normopt.verify import reference_outputs

            o = self.options
            self._runs[key] = reference_outputs(self.model, choice=self.choice, seed=o.seed, trials=o.trials,
                                                input_shapes=o.input_shapes, input_ranges=o.input_ranges,
                                                inputs_file=o.inputs_file, extra_outputs=list(extra or ()))
        return self._runs[key]


def _require_deterministic(reference: _References, options: FoldOptions, choice: ProviderChoice,
                           found: FoldResult) -> None:
    """A model whose outputs differ between two runs on the same inputs (Dropout left in
    training mode, random ops) cannot be verified: no rewrite is to blame."""
    from normopt.verify import compare

    selfcheck = compare(reference.model, reference.model, seed=options.seed, trials=options.trials,
                        input_shapes=options.input_shapes, input_ranges=options.input_ranges,
                        inputs_file=options.inputs_file, atol=options.atol, rtol=options.rtol, choice=choice,
                        repeat=True, reference=reference.outputs())
    if not selfcheck.passed:
        bad = selfcheck.failures[0]
        err = VerificationError(
            f"the input model is not deterministic: output '{bad.name}' differs between two runs on the same "
            f"inputs (max |diff| {bad.max_abs:.1e}; random ops or Dropout in training mode?); it cannot be "
            "verified: use --no-verify to fold without verification")
        err.result, err.status = found, "input_not_deterministic"  # what was found, for the report
        raise err


def _verify(reference: _References, out, options: FoldOptions, choice: ProviderChoice, extra=None) -> VerifyReport:
    from normopt.verify import compare

    return compare(reference.model, out, seed=options.seed, trials=options.trials, input_shapes=options.input_shapes,
                   input_ranges=options.input_ranges, inputs_file=options.inputs_file, atol=options.atol,
                   rtol=options.rtol, extra_outputs=extra, choice=choice, reference=reference.outputs(extra))


def _proven_locally(reference, out, result: PipelineResult, options, choice,
                    blank: set[str]) -> list[tuple[Rewrite, str]]:
    """With outputs ``blank`` NaN or Inf everywhere: the rewrites to roll back. Top-level ones
    (and those in model-local functions, through their calls) are compared at their own outputs
    (``_localize``); one inside an If or Loop body, whose tensors cannot be exposed, is rolled
    back when its holder's outputs reach a blank output (nothing else could prove it there)."""
    culprits = []
    hidden = _in_subgraphs(result)
    if hidden:
        holders = _holders(out)
        feeding = _upstream(out, blank)   # one walk back from the blank outputs, for every holder
        for rewrite in hidden:
            holder = _holder(rewrite, holders)
            if holder is None or any(o in feeding for o in holder[1].output if o):
                culprits.append((rewrite, "inside an If or Loop body whose results reach output(s) NaN or Inf "
                                          f"everywhere on every input set ({', '.join(sorted(blank))}): it could not "
                                          "be compared"))
    if len(hidden) < len(result.applied):
        culprits += _localize(reference, out, result, options, choice)
    return culprits


def _localize(reference, out, result: PipelineResult, options, choice) -> list[tuple[Rewrite, str]]:
    """The most upstream top-level rewrites whose kept output differs from the original's.

    A rewrite inside a model-local function changes what the function computes at every call:
    the outputs of its calls in the main graph are compared too, and when one differs (and no
    differing tensor upstream explains it), every rewrite in that function is rolled back."""
    top = [r for r in result.applied if not r.graph]
    in_functions: dict[str, list[Rewrite]] = {}
    for r in result.applied:
        if ir.is_function_path(r.graph):
            in_functions.setdefault(r.graph.split("/")[0], []).append(r)
    calls = _call_outputs(out, set(in_functions))  # call output name -> function label
    if not top and not calls:
        return []
    report = _verify(reference, out, options, choice, extra=[r.output for r in top] + list(calls))
    diffs = {d.name: d for d in report.outputs}
    bad: dict[str, list[Rewrite]] = {r.output: [r] for r in top if r.output in diffs and not diffs[r.output].passed}
    for name, label in calls.items():
        if name in diffs and not diffs[name].passed and name not in bad:
            bad[name] = in_functions[label]
    downstream = _downstream(out, set(bad))
    culprits = []
    done: set[int] = set()
    for name, rewrites in bad.items():
        if name in downstream:  # explained by a differing rewrite upstream of it
            continue
        d = diffs[name]
        what = f"by {d.problem}" if d.problem else f"by max |diff| {d.max_abs:.2e} > atol {d.atol:g} (rtol {d.rtol:g})"
        where = f"changed '{name}' {what} on {d.inputs}"
        if name in calls:
            where = f"{calls[name]} (its rewrites rolled back together) {where}"
        for rewrite in rewrites:
            if id(rewrite) not in done:
                done.add(id(rewrite))
                culprits.append((rewrite, where))
    return culprits


def _unexercised(reference: _References, model: onnx.ModelProto, result: PipelineResult) -> list[tuple[Rewrite, str]]:
    """The rewrites inside an If branch or a Loop body of the main graph that never ran on the
    verification inputs: the outputs matching says nothing of them, so they are not proven. Read
    from the If's condition and the Loop's trip count and condition, exposed in the original.
    (Deeper levels run only where their main-graph holder does; a holder inside a subgraph is
    not checked itself.)"""
    inside = _in_subgraphs(result)
    if not inside:
        return []
    holders = _holders(model)
    found = [(rewrite, holder) for rewrite in inside if (holder := _holder(rewrite, holders)) is not None]
    watched = sorted({name for _r, (_p, node, _l, _a) in found for name in node.input[:2] if name})
    if not watched:
        return []
    try:
        run = reference.outputs(watched)
    except Exception:  # the original cannot expose them (an initializer as output, say): not checked
        return []
    # per watched tensor, its one value on each input set (None for an empty one)
    seen = {name: [v.reshape(-1)[0] if v.size else None for v in (np.asarray(out[name]) for out in run.outputs)]
            for name in watched}
    idle = []
    for rewrite, (_path, node, label, attr) in found:
        if node.op_type == "If":
            conds = [bool(c) for c in seen[node.input[0]] if c is not None]
            ran = any(conds) if attr == "then_branch" else not all(conds)
        else:   # Loop: the body runs when the trip count (if given) is above 0 and the condition (if given) holds
            trips = seen[node.input[0]] if node.input[0] else [None] * len(run.outputs)
            conds = seen[node.input[1]] if len(node.input) > 1 and node.input[1] else [None] * len(run.outputs)
            ran = any((m is None or int(m) > 0) and (c is None or bool(c)) for m, c in zip(trips, conds))
        if not ran:
            idle.append((rewrite, f"{attr} of {label} never ran on the verification inputs, so the rewrite there "
                                  "could not be proven (give inputs that take it with --inputs)"))
    return idle


def _proto(model) -> onnx.ModelProto:
    """The ModelProto of a model or of a ``verify.Loaded``."""
    from normopt.verify import Loaded

    return model.model if isinstance(model, Loaded) else model


def _in_subgraphs(result: PipelineResult) -> list[Rewrite]:
    """The rewrites inside an If branch or Loop body (not a model-local function)."""
    return [r for r in result.applied if r.graph and not ir.is_function_path(r.graph)]


def _holders(model) -> list[tuple[str, onnx.NodeProto, str, str]]:
    """(path prefix as the passes name subgraphs (ir.iter_graphs), node, its label, attribute)
    for each graph attribute of the main graph's If and Loop nodes."""
    model = _proto(model)
    holders = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("If", "Loop"):
            continue
        label = G.label(node.name, node.op_type, node.output[0] if node.output else None)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                holders.append((f"/{label}.{attr.name}", node, label, attr.name))
    return holders


def _holder(rewrite: Rewrite, holders):
    """The main-graph holder a subgraph rewrite sits in (the longest matching path), or None."""
    hits = [h for h in holders if rewrite.graph == h[0] or rewrite.graph.startswith(h[0] + "/")]
    return max(hits, key=lambda h: len(h[0])) if hits else None


def _call_outputs(model, labels: set[str]) -> dict[str, str]:
    """Output name -> function label for each main-graph call of the functions named."""
    if not labels:
        return {}
    model = _proto(model)
    found = {}
    for node in model.graph.node:
        label = ir.function_label(node.domain, node.op_type, node.overload)
        if label in labels:
            found.update((o, label) for o in node.output if o)
    return found


def _downstream(model: onnx.ModelProto, starts: set[str]) -> set[str]:
    """Tensors computed (transitively) from any of ``starts``, excluding the starts themselves."""
    users: dict[str, list[onnx.NodeProto]] = {}
    model = _proto(model)
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        name = stack.pop()
        for node in users.get(name, ()):
            for out in node.output:
                if out not in seen:
                    seen.add(out)
                    stack.append(out)
    return seen


def _upstream(model, ends: set[str]) -> set[str]:
    """``ends`` and the main-graph tensors they are computed from (transitively)."""
    model = _proto(model)
    producer = {o: node for node in model.graph.node for o in node.output if o}
    seen: set[str] = set()
    stack = list(ends)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return seen


def _strict_check(options: FoldOptions, done: FoldResult) -> None:
    if options.strict and done.rollbacks:
        first = done.rollbacks[0]
        err = VerificationError(f"{len(done.rollbacks)} rewrite(s) rolled back (first: {first.pass_name} at "
                                f"{first.anchor}: {first.reason}); --strict makes this an error")
        err.result, err.status = done, "rolled_back_strict"  # what was found, for the report
        raise err

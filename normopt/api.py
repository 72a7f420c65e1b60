"""The Python API: ``optimize``, ``verify`` and ``inspect`` on models in memory or on disk."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence, Union

import onnx

from normopt import model_io
from normopt.errors import ModelLoadError
from normopt.fold import FoldOptions, FoldResult, optimize as _optimize
from normopt.sites import Inspection, inspect_model
from normopt.targets import veto_for
from normopt.verify import Loaded, VerifyReport, compare

ModelLike = Union[onnx.ModelProto, str, os.PathLike]
Result = FoldResult  # .model, .records (one PassRecord per pass), .verification, .rollbacks, .verified


def _source(model: ModelLike, notes: list[str] | None = None) -> tuple[onnx.ModelProto, str | None]:
    """(model, its path or None). A path's external data stays on disk until a pass needs it;
    nodes out of order are sorted, with a line in ``notes``; a bad file raises ModelLoadError."""
    if isinstance(model, onnx.ModelProto):
        try:  # as loading a file does; a copy, so that the caller's model stays as it was
            return model_io.sorted_model(model, notes), None
        except ValueError as err:
            raise ModelLoadError(f"cannot read the model: {err}") from err
    if isinstance(model, (str, os.PathLike)):
        return model_io.load(model, notes), os.fspath(model)
    raise TypeError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")


def optimize(model: ModelLike, options: FoldOptions | None = None, *, passes: Sequence[str] | None = None,
             verify: bool = True, provider: str = "auto", target: str = "portable", allow_opset_upgrade: bool = True,
             seed: int = 0, trials: int = 1, input_shapes: Mapping[str, Sequence[int]] | None = None,
             input_ranges: Mapping[str, tuple[float, float]] | None = None, inputs: str | None = None,
             atol: float | None = None, rtol: float | None = None, strict: bool = False) -> Result:
    """Fold and fuse the normalizations of ``model`` (a ModelProto or a path, external data
    included), verify the result with onnxruntime and roll back what does not verify.

    Nothing is written and the given model is not modified. ``result.verified`` says whether
    the rewritten ``result.model`` may be trusted (always True with ``verify=False``). A
    ``FoldOptions`` passed as ``options`` replaces the keyword arguments. Raises
    ``normopt.errors.NormoptError`` subclasses for bad input (``ModelLoadError``, ``UsageError``),
    an unusable ``provider="cuda"`` (``ProviderUnavailableError``) and, with ``strict=True`` or a
    model that is not deterministic, ``VerificationError``.
    """
    notes: list[str] = []
    source, path = _source(model, notes)
    if options is None:
        veto_for(target)  # an unknown target is a UsageError before any work
        options = FoldOptions(passes=list(passes) if passes is not None else None,
                              allow_opset_upgrade=allow_opset_upgrade, verify=verify, provider=provider, seed=seed,
                              trials=trials, input_shapes={k: list(v) for k, v in (input_shapes or {}).items()},
                              input_ranges=dict(input_ranges or {}), inputs_file=inputs, atol=atol, rtol=rtol,
                              strict=strict, target=target)
    if options.passes is not None:
        from normopt.registry import resolve
        options.passes = resolve(list(options.passes))
    result = _optimize(source, options, source=path)
    result.pipeline.notes[:0] = notes
    return result


def verify(reference: ModelLike, candidate: ModelLike, *, provider: str = "auto", seed: int = 0, trials: int = 1,
           input_shapes: Mapping[str, Sequence[int]] | None = None,
           input_ranges: Mapping[str, tuple[float, float]] | None = None, inputs: str | None = None,
           atol: float | None = None, rtol: float | None = None) -> VerifyReport:
    """Run both models in onnxruntime (optimizations off) on the same seeded inputs and compare
    every output; ``report.passed`` is the verdict."""
    models = []
    for m in (reference, candidate):
        loaded, path = _source(m)
        models.append(Loaded(path, loaded) if path is not None else loaded)
    return compare(*models, provider=provider, seed=seed, trials=trials,
                   input_shapes={k: list(v) for k, v in (input_shapes or {}).items()},
                   input_ranges=dict(input_ranges or {}), inputs_file=inputs, atol=atol, rtol=rtol)


def inspect(model: ModelLike, *, passes: Sequence[str] | None = None, target: str = "portable",
            allow_opset_upgrade: bool = True) -> Inspection:
    """Every normalization site of ``model`` and what ``optimize`` would do with it (``.sites``,
    ``.pending``); runs the passes' matching only, no verification."""
    from normopt.registry import resolve

    veto_for(target)
    source, path = _source(model)
    names = resolve(list(passes)) if passes is not None else None
    return inspect_model(source, names, allow_opset_upgrade, target,
                         base_dir=str(Path(path).resolve().parent) if path else None)

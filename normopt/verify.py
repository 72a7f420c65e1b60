"""Prove two models equivalent: run both in onnxruntime on the same inputs and compare outputs.

Both sessions run with graph optimizations disabled (ORT_DISABLE_ALL), so onnxruntime's own
Conv+BatchNormalization and LayerNorm fusions cannot make a wrong rewrite look right. Only one
session is alive at a time.

Which provider runs them: normopt/providers.py. Which inputs: normopt/inputs.py.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from normopt import progress
from normopt.errors import ProviderUnavailableError, UsageError
from normopt.inputs import DEFAULT_DYNAMIC_DIM, FALLBACK_DYNAMIC_DIMS, InputSpec, make_feeds
from normopt.ir import Weights
from normopt.model_io import PROTOBUF_LIMIT, Skeleton, byte_size, save, without_weights
from normopt.providers import CUDA, ProviderChoice, providers, select_provider, session_options

# Default tolerances per output dtype: |got - ref| <= atol + rtol * |ref|, element by element.
# fp32 bounds cover what correct folds and fusions produce on models/ (worst seen there:
# about 2e-6 absolute) with room for deeper models; half precision rounds at about 1e-3.
TOLERANCES = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-5, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (6e-2, 6e-2),
}


class ModelRunError(UsageError):
    """onnxruntime loaded the model but could not run it on the inputs given."""


@dataclass
class OutputDiff:
    name: str
    dtype: str
    shape: list[int]
    max_abs: float
    max_rel: float
    mismatched: float  # share of elements out of tolerance (NaN/Inf position mismatches included)
    atol: float
    rtol: float
    needed_atol: float  # smallest atol that would have passed at this rtol
    problem: str = ""

    @property
    def passed(self) -> bool:
        return not self.problem and self.mismatched == 0.0


@dataclass
class Session:
    """One onnxruntime session: which model it ran and the providers ``get_providers()`` gave."""

    model: str  # "reference" or "candidate"
    providers: list[str]


@dataclass
class VerifyReport:
    provider: str
    provider_note: str
    tf32: bool | None
    seed: int
    trials: int
    inputs: list[InputSpec] = field(default_factory=list)
    outputs: list[OutputDiff] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def failures(self) -> list[OutputDiff]:
        return [o for o in self.outputs if not o.passed]


# ----------------------------------------------------------------------------- running

def run_model(model: onnx.ModelProto | str | os.PathLike, feeds_list: list[dict], provider: str,
              outputs: list[str] | None = None, sessions: list[list[str]] | None = None,
              ) -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` for each feed dict, in one session that is closed afterwards.
    ``sessions`` receives the session's ``get_providers()``."""
    import onnxruntime as ort

    with _session_source(model) as source:
        try:
            session = ort.InferenceSession(source, session_options(), providers=providers(provider))
        except Exception as err:
            raise UsageError(_ort_failure("cannot load the model", err)) from err
        if sessions is not None:
            sessions.append(list(session.get_providers()))
        if provider == "cuda" and session.get_providers()[0] != CUDA:
            # The probe ran on CUDA but this session fell back: never report CPU results as CUDA.
            raise ProviderUnavailableError("CUDA provider did not start for this model; rerun with --provider cpu")
        names = outputs or [o.name for o in session.get_outputs()]
        try:
            results = [dict(zip(names, session.run(names, feeds))) for feeds in feeds_list]
        except Exception as err:
            raise ModelRunError(_ort_failure("failed to run the model", err,
                                             "set dynamic dims with --input-shape or pass real inputs with --inputs")) from err
        del session
    return results


def _ort_failure(what: str, err: Exception, hint: str = "") -> str:
    text = " ".join(str(err).split())
    if "Could not find an implementation" in text:
        hint = "this provider has no kernel for one of its ops (bfloat16 on CPU?): try --provider cuda, or --no-verify"
    return f"onnxruntime {what}: {text[:240]}" + (f"; {hint}" if hint else "")


@contextlib.contextmanager
def _session_source(model):
    if isinstance(model, Loaded):
        model = model.path
    if isinstance(model, Skeleton):  # weights elsewhere: written (streamed) for onnxruntime to load
        with tempfile.TemporaryDirectory(prefix="normopt-verify-") as tmp:
            path = Path(tmp) / "model.onnx"
            save(model, path)
            yield str(path)
        return
    if not isinstance(model, onnx.ModelProto):
        yield str(model)
        return
    if byte_size(model) < PROTOBUF_LIMIT:
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="normopt-verify-") as tmp:
        path = Path(tmp) / "model.onnx"
        save(model, path, external_data=True)
        yield str(path)


@dataclass(frozen=True)
class Loaded:
    """A model file already read into ``model``: onnxruntime loads ``path`` (fast, external data
    included), everything else reads ``model`` instead of the file again. ``model`` may hold
    headers of weights that ``weights`` resolves (by default: the file's external data)."""

    path: str | os.PathLike
    model: onnx.ModelProto
    weights: Weights | None = None

    def skeleton(self) -> Skeleton:
        return Skeleton(self.model, self.weights or Weights(str(Path(self.path).resolve().parent)))


def load_header(model) -> onnx.ModelProto:
    """The model (a path: without its weights' bytes, enough for inputs and outputs)."""
    if isinstance(model, Loaded):
        return model.model
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)


def _exposed(model, names: list[str]):
    """``model`` with ``names`` added as graph outputs; weights stay where they are."""
    if not isinstance(model, (Loaded, onnx.ModelProto)):
        model = Loaded(model, onnx.load(str(model), load_external_data=False))
    if isinstance(model, Loaded):
        skel = model.skeleton()
        return Skeleton(expose(skel.model, names), skel.weights)
    return expose(model, names)


# ----------------------------------------------------------------------------- comparing

def tolerance(dtype, atol: float | None = None, rtol: float | None = None, compute: str | None = None,
              ) -> tuple[float, float]:
    """Explicit values win; else the defaults of the output's float dtype, or of ``compute`` (the
    narrowest float type the model computes in) when that one is looser: an fp16 model whose
    output is Cast to fp32 cannot be held to fp32 precision."""
    name = "bfloat16" if str(dtype) == "bfloat16" else str(np.dtype(dtype))
    default = TOLERANCES.get(name, (0.0, 0.0))
    if name in TOLERANCES and compute in TOLERANCES:
        default = max(default, TOLERANCES[compute])
    return (default[0] if atol is None else atol, default[1] if rtol is None else rtol)


_FLOAT_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
                onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64"}


def compute_dtype(model: onnx.ModelProto) -> str | None:
    """The float type with the loosest default tolerance among the model's weights, inputs and
    Cast targets (main graph): the precision its results are only as good as."""
    found = [t.data_type for t in model.graph.initializer]
    found += [vi.type.tensor_type.elem_type for vi in model.graph.input]
    for node in model.graph.node:
        if node.op_type == "Cast":
            found += [a.i for a in node.attribute if a.name == "to"]
        elif node.op_type == "Constant":
            found += [a.t.data_type for a in node.attribute if a.name == "value"]
    names = {_FLOAT_TYPES[t] for t in found if t in _FLOAT_TYPES}
    return max(names, key=lambda n: TOLERANCES[n], default=None)


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray, atol: float | None = None,
                   rtol: float | None = None, compute: str | None = None) -> OutputDiff:
    ref, got = np.asarray(ref), np.asarray(got)
    a, r = tolerance(ref.dtype, atol, rtol, compute)
    base = dict(name=name, dtype=str(ref.dtype), shape=list(ref.shape), atol=a, rtol=r)
    if ref.shape != got.shape:
        return OutputDiff(**base, max_abs=float("inf"), max_rel=float("inf"), mismatched=1.0, needed_atol=float("inf"),
                          problem=f"shape {list(got.shape)} != {list(ref.shape)}")
    if ref.dtype != got.dtype:
        return OutputDiff(**base, max_abs=float("inf"), max_rel=float("inf"), mismatched=1.0, needed_atol=float("inf"),
                          problem=f"dtype {got.dtype} != {ref.dtype}")
    if ref.size == 0:
        return OutputDiff(**base, max_abs=0.0, max_rel=0.0, mismatched=0.0, needed_atol=0.0)
    if ref.dtype.kind not in "fc" and str(ref.dtype) != "bfloat16":
        bad = ref != got
        err = np.abs(ref.astype(np.float64) - got.astype(np.float64)) if ref.dtype.kind in "iub" else bad * 1.0
        return OutputDiff(**base, max_abs=float(err.max()), max_rel=float(err.max()), mismatched=float(bad.mean()),
                          needed_atol=float(err.max()))
    r64, g64 = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(r64) & np.isfinite(g64)
    # NaN and Inf must sit at the same positions with the same values (Inf sign included).
    nonfinite_bad = ~finite & ~((np.isnan(r64) & np.isnan(g64)) | (r64 == g64))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(finite, np.abs(r64 - g64), 0.0)
    scale = np.abs(np.where(finite, r64, 0.0))
    bad = (diff > a + r * scale) | nonfinite_bad
    with np.errstate(over="ignore"):
        rel = diff / np.maximum(scale, np.finfo(np.float64).tiny)
    rel = np.where(diff == 0.0, 0.0, rel)
    needed = np.max(np.maximum(diff - r * scale, 0.0)) if finite.any() else 0.0
    return OutputDiff(**base, max_abs=float(diff.max()), max_rel=float(rel.max()), mismatched=float(bad.mean()),
                      needed_atol=float("inf") if nonfinite_bad.any() else float(needed))


def compare(original, rewritten, *, provider: str = "auto", seed: int = 0, trials: int = 1,
            input_shapes=None, input_ranges=None, inputs_file: str | None = None,
            atol: float | None = None, rtol: float | None = None, extra_outputs: list[str] | None = None,
            choice: ProviderChoice | None = None, repeat: bool = False) -> VerifyReport:
    """Run ``original`` and ``rewritten`` (ModelProto, path or Loaded) on the same inputs and compare.

    ``extra_outputs`` are intermediate tensors exposed in both models and compared too
    (used to find which rewrite broke equivalence). ``repeat`` compares ``original`` with a
    second run of itself in the same session instead: random ops draw new numbers there.
    """
    if trials < 1:
        raise UsageError("--trials must be at least 1")
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not value >= 0:  # NaN too: nothing would compare equal, not even a model to itself
            raise UsageError(f"{flag} must be a number >= 0, got {value}")
    choice = choice or select_provider(provider)
    ref_header, new_header = load_header(original), load_header(rewritten)
    _same_interface(ref_header, new_header)
    names = [o.name for o in ref_header.graph.output]
    ref_model, new_model = original, rewritten
    if extra_outputs:
        ref_model, new_model = _exposed(original, extra_outputs), _exposed(rewritten, extra_outputs)
        names = names + list(extra_outputs)
    sizes = (DEFAULT_DYNAMIC_DIM,) + FALLBACK_DYNAMIC_DIMS
    ref_sessions: list[list[str]] = []
    new_sessions: list[list[str]] = []
    for size in sizes:
        trial_feeds = [make_feeds(ref_header, seed + t, input_shapes, input_ranges, inputs_file, size)
                       for t in range(trials)]
        feeds_list, specs = [f for f, _ in trial_feeds], trial_feeds[0][1]
        try:
            with progress.step("onnxruntime: running the reference model"):
                ref_out = run_model(ref_model, feeds_list * (2 if repeat else 1), choice.name, names, ref_sessions)
            break
        except ModelRunError:
            # Only sizes we chose may be wrong for the model; try a larger one.
            if not any(spec.defaulted for spec in specs) or size == sizes[-1]:
                raise
    if repeat:
        ref_out, new_out = ref_out[:trials], ref_out[trials:]
    else:
        with progress.step("onnxruntime: running the rewritten model"):
            new_out = run_model(new_model, feeds_list, choice.name, names, new_sessions)
    report = VerifyReport(choice.name, choice.note, choice.tf32, seed, trials, specs,
                          sessions=[Session("reference", ref_sessions[-1])]
                          + [Session("candidate", p) for p in new_sessions[-1:]])
    compute = compute_dtype(ref_header)
    for name in names:
        diffs = [compare_arrays(name, r[name], n[name], atol, rtol, compute) for r, n in zip(ref_out, new_out)]
        report.outputs.append(max(diffs, key=lambda d: (not d.passed, d.needed_atol)))
    return report


def _same_interface(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    # Initializers that are also graph inputs count: a caller may feed them.
    ins_a = [i.name for i in a.graph.input]
    ins_b = [i.name for i in b.graph.input]
    outs_a = [o.name for o in a.graph.output]
    outs_b = [o.name for o in b.graph.output]
    if sorted(ins_a) != sorted(ins_b):
        raise UsageError(f"the models have different inputs: {ins_a} vs {ins_b}")
    if outs_a != outs_b:
        raise UsageError(f"the models have different outputs: {outs_a} vs {outs_b}")


def expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the given intermediate tensors added as graph outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    types = _tensor_types(out)
    for name in names:
        if name in have:
            continue
        vi = onnx.ValueInfoProto()
        vi.name = name
        if name in types:
            vi.type.CopyFrom(types[name])
            vi.type.tensor_type.ClearField("shape")
        out.graph.output.append(vi)
    return out


def _tensor_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model))
    except Exception:  # best effort: an output without a type is still accepted by onnxruntime
        inferred = model
    g = inferred.graph
    return {vi.name: vi.type for vi in list(g.value_info) + list(g.output) + list(g.input)}

"""Prove two models equivalent: run both in onnxruntime on the same inputs and compare outputs.

Both sessions run with graph optimizations disabled (ORT_DISABLE_ALL), so onnxruntime's own
Conv+BatchNormalization and LayerNorm fusions cannot make a wrong rewrite look right. Only one
session is alive at a time.

Provider: ``auto`` uses CUDA when it is really in use (``session.get_providers()``; the CUDA
provider is listed even where its libraries cannot load, and then onnxruntime silently runs on
CPU), else CPU, and says why. TF32 is turned off on CUDA so fp32 Conv/MatMul stay fp32.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from normopt.errors import ProviderUnavailableError, UsageError
from normopt.model_io import PROTOBUF_LIMIT, save, without_weights

# Default tolerances per output dtype: |got - ref| <= atol + rtol * |ref|, element by element.
# fp32 bounds cover what correct folds and fusions produce on models/ (worst seen there:
# about 2e-6 absolute) with room for deeper models; half precision rounds at about 1e-3.
TOLERANCES = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-5, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (6e-2, 6e-2),
}
# Unset dynamic dims: the first (batch) axis gets 1, every other axis this many.
DEFAULT_DYNAMIC_DIM = 8
DEFAULT_INT_RANGE = (0, 2)

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


@dataclass
class InputSpec:
    name: str
    dtype: str
    shape: list[int]
    source: str


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
class ProviderChoice:
    name: str  # "cuda" or "cpu"
    note: str = ""  # why CUDA was not used, when it was not
    tf32: bool | None = None  # False on CUDA (turned off); None on CPU (not applicable)


@dataclass
class VerifyReport:
    provider: str
    provider_note: str
    tf32: bool | None
    seed: int
    trials: int
    inputs: list[InputSpec] = field(default_factory=list)
    outputs: list[OutputDiff] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def failures(self) -> list[OutputDiff]:
        return [o for o in self.outputs if not o.passed]


# ----------------------------------------------------------------------------- providers

_probe_cache: dict[str, ProviderChoice] = {}


def select_provider(requested: str = "auto") -> ProviderChoice:
    """Resolve auto/cuda/cpu to the provider really usable here; raise for unusable cuda."""
    if requested not in ("auto", "cuda", "cpu"):
        raise UsageError(f"unknown provider '{requested}'; use auto, cuda or cpu")
    if requested == "cpu":
        return ProviderChoice("cpu", "CPU requested")
    if "probe" not in _probe_cache:
        _probe_cache["probe"] = _probe_cuda()
    choice = _probe_cache["probe"]
    if choice.name != "cuda" and requested == "cuda":
        raise ProviderUnavailableError(f"CUDA provider requested but not usable: {choice.note}")
    return choice


def _probe_cuda() -> ProviderChoice:
    import onnxruntime as ort

    if _CUDA not in ort.get_available_providers():
        return ProviderChoice("cpu", "this onnxruntime build has no CUDA provider")
    probe = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])]),
        opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    with _captured_output() as log:
        try:
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            session = ort.InferenceSession(probe.SerializeToString(), _session_options(), providers=_providers("cuda"))
            used = session.get_providers()
            session.run(None, {"x": np.ones(4, np.float32)})
        except Exception as err:  # a broken CUDA install surfaces as many error types
            used, failure = [], " ".join(str(err).split())
        else:
            failure = ""
    if used and used[0] == _CUDA:
        return ProviderChoice("cuda", "", tf32=False)
    return ProviderChoice("cpu", _why_not_cuda(log.text + "\n" + failure))


def _why_not_cuda(text: str) -> str:
    missing = re.search(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file", text)
    if missing:
        return f"CUDA libraries not found ({missing.group(1)} not found)"
    for pattern in (r"CUDA failure \d+: ([^;\n]+)", r"(no CUDA-capable device[^\n;]*)", r"(CUDA driver version[^\n;]*)"):
        found = re.search(pattern, text)
        if found:
            return f"CUDA not usable ({found.group(1).strip()})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"CUDA not usable ({lines[-1][:160]})" if lines else "CUDA provider did not start"


class _Captured:
    text = ""


@contextlib.contextmanager
def _captured_output():
    """Capture what native code writes to stdout/stderr (onnxruntime's CUDA loader does)."""
    cap = _Captured()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield cap
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            cap.text = tmp.read().decode("utf-8", "replace")


def _session_options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return so


def _providers(name: str) -> list:
    if name == "cuda":
        return [(_CUDA, {"use_tf32": "0"}), _CPU]
    return [_CPU]


# ----------------------------------------------------------------------------- inputs

def parse_shapes(items: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """``["ids:1x128"]`` -> ``{"ids": [1, 128]}``."""
    shapes = {}
    for item in items or ():
        name, sep, dims = item.rpartition(":")
        try:
            shape = [int(d) for d in dims.lower().split("x")] if dims else None
        except ValueError:
            shape = None
        if not sep or not name or shape is None or any(d < 0 for d in shape):
            raise UsageError(f"bad --input-shape '{item}'; expected NAME:DxDxD, e.g. images:1x3x224x224")
        shapes[name] = shape
    return shapes


def parse_ranges(items: list[str] | tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """``["ids:0:30522"]`` -> ``{"ids": (0, 30522)}`` (low inclusive, high exclusive)."""
    ranges = {}
    for item in items or ():
        parts = item.rsplit(":", 2)
        try:
            name, low, high = parts[0], float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            name, low, high = "", 0.0, 0.0
        if not name or high <= low:
            raise UsageError(f"bad --input-range '{item}'; expected NAME:LOW:HIGH with LOW < HIGH, e.g. input_ids:0:30522")
        ranges[name] = (low, high)
    return ranges


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def make_feeds(model: onnx.ModelProto, seed: int, shapes=None, ranges=None, npz: str | None = None,
               ) -> tuple[dict[str, np.ndarray], list[InputSpec]]:
    """Seeded random inputs for every graph input (or those read from ``npz``)."""
    shapes, ranges = shapes or {}, ranges or {}
    rng = np.random.default_rng(seed)
    loaded = _load_npz(npz) if npz else {}
    index_bounds = _gather_bounds(model)
    known = {vi.name for vi in graph_inputs(model)}
    for name in list(shapes) + list(ranges):
        if name not in known:
            raise UsageError(f"model has no input '{name}'; inputs: {', '.join(sorted(known))}")
    feeds, specs, dims = {}, [], {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UsageError(f"input '{vi.name}' is not a tensor; pass its value with --inputs FILE.npz")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if vi.name in loaded:
            value = np.asarray(loaded[vi.name]).astype(dtype, copy=False)
            feeds[vi.name] = value
            specs.append(InputSpec(vi.name, str(dtype), list(value.shape), f"file {npz}"))
            continue
        shape = shapes.get(vi.name) or _resolve_dims(vi, dims)
        if vi.name in ranges:
            low, high = ranges[vi.name]
            source = f"--input-range [{low:g}, {high:g})"
        elif np.issubdtype(dtype, np.integer):
            low, high = index_bounds.get(vi.name, DEFAULT_INT_RANGE)
            source = "embedding index" if vi.name in index_bounds else "default integer"
        else:
            low = high = None
            source = ""
        feeds[vi.name] = _random(rng, dtype, shape, low, high)
        kind = "uniform" if low is not None else "normal(0, 1)" if dtype.kind == "f" else "random"
        specs.append(InputSpec(vi.name, str(dtype), list(shape),
                               f"{kind} [{low:g}, {high:g}) {source}".strip() if low is not None else kind))
    return feeds, specs


def _resolve_dims(vi: onnx.ValueInfoProto, dims: dict) -> list[int]:
    shape = []
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        raise UsageError(f"input '{vi.name}' has no shape; pass --input-shape {vi.name}:DxD...")
    for axis, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value)
            continue
        key = d.dim_param or f"{vi.name}:{axis}"
        if key not in dims:
            dims[key] = 1 if axis == 0 else DEFAULT_DYNAMIC_DIM
        shape.append(dims[key])
    return shape


def _random(rng, dtype, shape, low, high) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(int(low), int(high), size=shape).astype(dtype)
    if low is not None:
        return rng.uniform(low, high, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def _gather_bounds(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Integer inputs used as Gather indices into a constant table: their safe [0, rows)."""
    sizes = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            sizes[node.output[0]] = list(node.attribute[0].t.dims)
    alias = {vi.name: vi.name for vi in graph_inputs(model)}
    bounds: dict[str, tuple[int, int]] = {}
    for node in model.graph.node:  # topological: Casts are seen before their users
        if node.op_type in ("Cast", "Identity", "Unsqueeze", "Reshape", "Flatten", "Squeeze") and node.input \
                and node.input[0] in alias:
            alias[node.output[0]] = alias[node.input[0]]
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in alias and node.input[0] in sizes:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            rows = sizes[node.input[0]][axis] if sizes[node.input[0]] else 0
            name = alias[node.input[1]]
            if rows > 0:
                bounds[name] = (0, min(rows, bounds.get(name, (0, rows))[1]))
    return bounds


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read inputs '{path}': {' '.join(str(err).split())[:160]}") from err


# ----------------------------------------------------------------------------- running

def run_model(model: onnx.ModelProto | str | os.PathLike, feeds_list: list[dict], provider: str,
              outputs: list[str] | None = None) -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` for each feed dict, in one session that is closed afterwards."""
    import onnxruntime as ort

    with _session_source(model) as source:
        try:
            session = ort.InferenceSession(source, _session_options(), providers=_providers(provider))
        except Exception as err:
            raise UsageError(f"onnxruntime cannot load the model: {' '.join(str(err).split())[:240]}") from err
        names = outputs or [o.name for o in session.get_outputs()]
        try:
            results = [dict(zip(names, session.run(names, feeds))) for feeds in feeds_list]
        except Exception as err:
            raise UsageError(f"onnxruntime failed to run the model: {' '.join(str(err).split())[:240]}") from err
        del session
    return results


@contextlib.contextmanager
def _session_source(model):
    if not isinstance(model, onnx.ModelProto):
        yield str(model)
        return
    if model.ByteSize() < PROTOBUF_LIMIT:
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="normopt-verify-") as tmp:
        path = Path(tmp) / "model.onnx"
        save(model, path, external_data=True)
        yield str(path)


def load_header(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """The model without its weights' bytes loaded (enough for inputs and outputs)."""
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)


# ----------------------------------------------------------------------------- comparing

def tolerance(dtype, atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    default = TOLERANCES.get(str(np.dtype(dtype)) if str(dtype) != "bfloat16" else "bfloat16", (0.0, 0.0))
    return (default[0] if atol is None else atol, default[1] if rtol is None else rtol)


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray, atol: float | None = None,
                   rtol: float | None = None) -> OutputDiff:
    ref, got = np.asarray(ref), np.asarray(got)
    a, r = tolerance(ref.dtype, atol, rtol)
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
    rel = diff / np.maximum(scale, np.finfo(np.float64).tiny)
    rel = np.where(diff == 0.0, 0.0, rel)
    needed = np.max(np.maximum(diff - r * scale, 0.0)) if finite.any() else 0.0
    return OutputDiff(**base, max_abs=float(diff.max()), max_rel=float(rel.max()), mismatched=float(bad.mean()),
                      needed_atol=float("inf") if nonfinite_bad.any() else float(needed))


def compare(original, rewritten, *, provider: str = "auto", seed: int = 0, trials: int = 1,
            input_shapes=None, input_ranges=None, inputs_file: str | None = None,
            atol: float | None = None, rtol: float | None = None, extra_outputs: list[str] | None = None,
            choice: ProviderChoice | None = None) -> VerifyReport:
    """Run ``original`` and ``rewritten`` (ModelProto or path) on the same inputs and compare.

    ``extra_outputs`` are intermediate tensors exposed in both models and compared too
    (used to find which rewrite broke equivalence).
    """
    if trials < 1:
        raise UsageError("--trials must be at least 1")
    choice = choice or select_provider(provider)
    ref_header, new_header = load_header(original), load_header(rewritten)
    _same_interface(ref_header, new_header)
    feeds_list, specs = [], []
    for trial in range(trials):
        feeds, trial_specs = make_feeds(ref_header, seed + trial, input_shapes, input_ranges, inputs_file)
        feeds_list.append(feeds)
        specs = specs or trial_specs
    names = [o.name for o in ref_header.graph.output]
    ref_model, new_model = original, rewritten
    if extra_outputs:
        ref_model = expose(ref_header if isinstance(original, onnx.ModelProto) else onnx.load(str(original)), extra_outputs)
        new_model = expose(new_header if isinstance(rewritten, onnx.ModelProto) else onnx.load(str(rewritten)), extra_outputs)
        names = names + list(extra_outputs)
    ref_out = run_model(ref_model, feeds_list, choice.name, names)
    new_out = run_model(new_model, feeds_list, choice.name, names)
    report = VerifyReport(choice.name, choice.note, choice.tf32, seed, trials, specs)
    for name in names:
        diffs = [compare_arrays(name, r[name], n[name], atol, rtol) for r, n in zip(ref_out, new_out)]
        report.outputs.append(max(diffs, key=lambda d: (not d.passed, d.needed_atol)))
    return report


def _same_interface(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    ins_a = [i.name for i in graph_inputs(a)]
    ins_b = [i.name for i in graph_inputs(b)]
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

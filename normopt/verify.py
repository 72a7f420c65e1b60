"""Prove two models equivalent: run both in onnxruntime on the same inputs and compare outputs.

Both sessions run with graph optimizations disabled (ORT_DISABLE_ALL), so onnxruntime's own
Conv+BatchNormalization and LayerNorm fusions cannot make a wrong rewrite look right. Only one
session is alive at a time.

Which provider runs them: normopt/providers.py. Which inputs: normopt/inputs.py.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx

from normopt import progress
from normopt.errors import ProviderUnavailableError, UsageError
from normopt.inputs import (DEFAULT_BATCH, DEFAULT_DYNAMIC_DIM, DEGENERATE, FALLBACK_DYNAMIC_DIMS, FILE, NORMAL, OFFSET, InputSet,
                            InputSpec, make_feeds, stress_kinds)
from normopt.ir import Weights
from normopt.model_io import PROTOBUF_LIMIT, Skeleton, byte_size, census, save, unopenable_name, weightless
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
    atol_rule: str = "dtype default"  # what set atol: dtype default, --atol, output magnitude, input sensitivity
    inputs: str = ""  # the input set of the worst result, e.g. "offset inputs (seed 0)"
    note: str = ""  # how an output that could not be compared was proven another way

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
    inputs: list[InputSpec] = field(default_factory=list)  # of the first normal set
    outputs: list[OutputDiff] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    input_sets: list[str] = field(default_factory=list)  # kinds that ran: normal per trial, offset, degenerate

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def failures(self) -> list[OutputDiff]:
        return [o for o in self.outputs if not o.passed]


# ----------------------------------------------------------------------------- running

def run_model(model: onnx.ModelProto | str | os.PathLike, feeds_list: list[dict], provider: str,
              outputs: list[str] | None = None, sessions: list[list[str]] | None = None, more=None,
              ) -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` for each feed dict, in one session that is closed afterwards.
    ``sessions`` receives the session's ``get_providers()``; ``more(results)`` may return further
    feed dicts to run in the same session (appended)."""
    import onnxruntime as ort

    with _session_source(model) as source:
        unopenable = unopenable_name(source) if isinstance(source, str) else None
        if unopenable:
            raise UsageError(f"{unopenable}; rename the file (or fold with --no-verify)")
        try:
            session = ort.InferenceSession(source, session_options(prepack_pays(model)), providers=providers(provider))
        except Exception as err:
            raise UsageError(_ort_failure("cannot load the model", err)) from err
        if sessions is not None:
            sessions.append(list(session.get_providers()))
        if provider == "cuda" and session.get_providers()[0] != CUDA:
            # The probe ran on CUDA but this session fell back: never report CPU results as CUDA.
            raise ProviderUnavailableError("CUDA provider did not start for this model; rerun with --provider cpu")
        names = outputs or [o.name for o in session.get_outputs()]
        bf16 = any(o.type == "tensor(bfloat16)" for o in session.get_outputs() if o.name in names) or any(
            _is_bf16(v) for feeds in feeds_list for v in feeds.values())
        def run(feeds):
            return dict(zip(names, _run_bf16(session, names, feeds) if bf16 else session.run(names, feeds)))

        try:
            results = [run(feeds) for feeds in feeds_list]
            results += [run(feeds) for feeds in (more(results) if more else [])]
        except Exception as err:
            raise ModelRunError(_ort_failure("failed to run the model", err,
                                             "set dynamic dims with --input-shape or pass real inputs with --inputs")) from err
        del session
    return results


# Each verification session runs a few times, so what its creation costs is what counts. With
# prepacking onnxruntime repacks and copies every MatMul / Conv weight: about 1.3 s and the
# weights' size once more per GB (a 1 GB decoder: 1.3 s against 0.02 s without). Without it,
# creation grows with the square of the node count (36,000 nodes: 24 s against 4 s with it;
# 120,000: minutes). Estimated seconds per weight byte and per squared node:
PREPACK_SECONDS_PER_BYTE, UNPACKED_SECONDS_PER_NODE2 = 1.3e-9, 1e-8


def prepack_pays(model) -> bool:
    """Whether the session of ``model`` should prepack its weights: when that costs less than
    going without, from its nodes and the bytes of its large weights. A model given as a path
    only (its nodes unknown without reading it) goes without, as a large one should."""
    header = model.model if isinstance(model, (Loaded, Skeleton)) else model
    if not isinstance(header, onnx.ModelProto):
        return False
    found = census(header)
    return found.large_bytes * PREPACK_SECONDS_PER_BYTE < found.nodes ** 2 * UNPACKED_SECONDS_PER_NODE2


_BF16 = onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16)


def _is_bf16(value) -> bool:
    return getattr(value, "dtype", None) == _BF16


def _run_bf16(session, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime's Python API has no numpy type for bfloat16: feed and fetch such tensors as
    OrtValues holding their 16-bit patterns."""
    import ctypes

    import onnxruntime as ort

    ort_feeds = {k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
        np.ascontiguousarray(v).view(np.uint16), onnx.TensorProto.BFLOAT16) if _is_bf16(v) else ort.OrtValue.ortvalue_from_numpy(v)
        for k, v in feeds.items()}
    binding = session.io_binding()
    for name, value in ort_feeds.items():
        binding.bind_ortvalue_input(name, value)
    for name in names:
        binding.bind_output(name, "cpu")  # host memory: the bits are read from there
    session.run_with_iobinding(binding)
    results = []
    for value in binding.get_outputs():
        if value.data_type() != "tensor(bfloat16)":
            results.append(value.numpy())
            continue
        shape = value.shape()
        count = int(np.prod(shape))
        bits = np.ctypeslib.as_array((ctypes.c_uint16 * count).from_address(value.data_ptr())) if count else \
            np.zeros(0, np.uint16)
        results.append(bits.copy().view(_BF16).reshape(shape))
    return results


def _ort_failure(what: str, err: Exception, hint: str = "") -> str:
    text = " ".join(str(err).split())
    # The C++ source location and signature say nothing to a user: keep the message after them.
    text = re.sub(r"/onnxruntime_src/\S+:\d+ .*?\) (?=[A-Z])", "", text)
    if "can't be converted to MLDataType" in text:
        hint = "onnxruntime's Python binding takes no arrays of one of its float8 or 4-bit types: use --no-verify"
    newest = re.search(r"Opset (\d+) is under development.*?official support for domain (\S+) is till opset (\d+)", text)
    if newest:  # the reason comes after a long disclaimer, past what the message keeps
        text = f"opset {newest.group(1)} of {newest.group(2)} is newer than it supports ({newest.group(3)})"
        hint = f"use --no-verify, or export at opset {newest.group(3)} or lower"
    if "Unsupported model IR version" in text:
        hint = "this onnxruntime cannot read the model's IR version: use --no-verify, or export with an older one"
    if "Could not find an implementation" in text:
        # onnxruntime names the op with its opset version: BatchNormalization(6), Add(1)
        old = re.search(r"implementation for (\w+)\((\d+)\)", text)
        if old and int(old.group(2)) < 7:
            hint = (f"onnxruntime has no kernel for {old.group(1)} at opset {old.group(2)}: use --no-verify, "
                    "or re-export at a newer opset")
        else:
            hint = "this provider has no kernel for one of its ops at its type (bfloat16 on CPU?): try --provider cuda, or --no-verify"
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


def _read(model):
    """``model`` as a ModelProto or a Loaded: a path is read once (without its weights' bytes),
    for every later look at it."""
    if isinstance(model, (Loaded, Skeleton, onnx.ModelProto)):
        return model
    return Loaded(model, onnx.load(str(model), load_external_data=False))


def _exposed(model, names: list[str]):
    """``model`` with ``names`` added as graph outputs; weights stay where they are."""
    model = _read(model)
    if isinstance(model, (Loaded, Skeleton)):
        skel = model.skeleton() if isinstance(model, Loaded) else model
        return Skeleton(expose(skel.model, names), skel.weights)
    return expose(model, names)


# ----------------------------------------------------------------------------- comparing

# The absolute bound of an output grows with the computation (see the README, "Verification"):
# MAGNITUDE_EPS machine epsilons of the largest |value| around each element (rounding noise grows
# with the sums behind it, not with each element), and SENSITIVITY_FACTOR times how far the
# original's output moves when its float inputs move by one or two ulps (cancellation:
# a mean of 1000 against a spread of 1 leaves the original itself only that precise). A model
# whose outputs change between two runs on the same inputs gets no sensitivity term: its moves
# are not rounding. "Around each element" is ``local_max``: an output that joins values near 1
# with values near 1e7 holds the small ones to their own scale. The sensitivity is the largest
# move of the whole output on offset inputs, and of each element's part of it on degenerate inputs
# (``_pooled``).
MAGNITUDE_EPS = 8.0
LOCAL_MIN_ELEMENTS = 8
SENSITIVITY_FACTOR = 4.0


def tolerance(dtype, atol: float | None = None, rtol: float | None = None, compute: str | None = None,
              ) -> tuple[float, float]:
    """Explicit values win; else the defaults of the output's float dtype, or of ``compute`` (the
    narrowest float type on the path that computes the output) when that one is looser: an fp16
    computation whose result is Cast to fp32 cannot be held to fp32 precision."""
    name = _dtype_name(dtype)
    default = TOLERANCES.get(name, (0.0, 0.0))
    if name in TOLERANCES and compute in TOLERANCES:
        default = max(default, TOLERANCES[compute])
    return (default[0] if atol is None else atol, default[1] if rtol is None else rtol)


def _dtype_name(dtype) -> str:
    return "bfloat16" if str(dtype) == "bfloat16" else str(np.dtype(dtype))


def _eps(name: str | None) -> float:
    if name == "bfloat16":
        return 2.0 ** -7
    return float(np.finfo(name).eps) if name in TOLERANCES else 0.0


_FLOAT_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
                onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64"}


def compute_dtypes(model: onnx.ModelProto, names: list[str]) -> dict[str, str | None]:
    """Per tensor name: the float type with the loosest default tolerance on the path that
    computes it (main graph, walked backwards): Cast targets, Constant values, initializers and
    graph inputs reached; a node with subgraphs brings everything inside them and the outer
    tensors they read. An fp16 round trip on another branch does not count, nor a tensor read
    only through an op whose output is no float (``_node_types``)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output if o}
    leaves = {t.name: {t.data_type} for t in g.initializer}
    for vi in g.input:
        leaves.setdefault(vi.name, set()).add(vi.type.tensor_type.elem_type)
    node_info: dict[int, tuple[set[int], list[str]]] = {}
    result = {}
    for name in names:
        found: set[int] = set()
        seen: set[str] = set()
        stack = [name]
        while stack:
            t = stack.pop()
            if not t or t in seen:
                continue
            seen.add(t)
            found |= leaves.get(t, set())
            node = producer.get(t)
            if node is None:
                continue
            if id(node) not in node_info:
                node_info[id(node)] = _node_types(node)
            types, reads = node_info[id(node)]
            found |= types
            stack.extend(reads)
        kinds = {_FLOAT_TYPES[t] for t in found if t in _FLOAT_TYPES}
        result[name] = max(kinds, key=lambda n: TOLERANCES[n], default=None)
    return result


def compute_dtype(model: onnx.ModelProto, name: str | None = None) -> str | None:
    """The narrowest float type on the path to ``name`` (default: to any graph output)."""
    names = [name] if name else [o.name for o in model.graph.output]
    kinds = [k for k in compute_dtypes(model, names).values() if k]
    return max(kinds, key=lambda n: TOLERANCES[n], default=None)


# Default-domain ops whose outputs are never floats: the precision of what they read does not
# carry over (a float16 tensor read only for its Shape, a mask compared or cast to bool).
_NOT_FLOAT_OUT = frozenset({"Shape", "Size", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not",
                            "And", "Or", "Xor", "IsNaN", "IsInf", "ArgMax", "ArgMin", "NonZero"})


def _node_types(node: onnx.NodeProto) -> tuple[set[int], list[str]]:
    """Element types a node brings in (Cast targets, tensor attributes, subgraph contents) and
    the tensors it reads (inputs, outer-scope names its subgraphs use). A node whose output is
    no float (Shape, a comparison, a Cast to an integer or bool) brings in and reads nothing."""
    if node.domain in ("", "ai.onnx") and (node.op_type in _NOT_FLOAT_OUT or (node.op_type == "Cast" and any(
            a.name == "to" and a.type == onnx.AttributeProto.INT and a.i not in _FLOAT_TYPES for a in node.attribute))):
        return set(), []
    types: set[int] = set()
    reads = list(node.input)
    for a in node.attribute:
        if a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT:
            types.add(a.i)
        elif a.type == onnx.AttributeProto.TENSOR:
            types.add(a.t.data_type)
        elif a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                inner_types, inner_reads = _graph_types(sub)
                types |= inner_types
                reads += inner_reads
    return types, reads


def _graph_types(graph: onnx.GraphProto) -> tuple[set[int], list[str]]:
    types = {t.data_type for t in graph.initializer}
    types |= {vi.type.tensor_type.elem_type for vi in graph.input}
    local = {t.name for t in graph.initializer} | {vi.name for vi in graph.input}
    local |= {o for n in graph.node for o in n.output}
    reads = []
    for node in graph.node:
        node_types, node_reads = _node_types(node)
        types |= node_types
        reads += [r for r in node_reads if r not in local]
    reads += [o.name for o in graph.output if o.name not in local]
    return types, reads


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray, atol: float | None = None,
                   rtol: float | None = None, compute: str | None = None, sensitivity=0.0,
                   ) -> OutputDiff:
    """``|got - ref| <= atol + rtol * |ref|`` element by element. Without an explicit ``atol``
    the absolute bound grows with the computation: at least MAGNITUDE_EPS epsilons (of the
    output's compute type) of the largest |ref| around the element (``local_max``), and
    SENSITIVITY_FACTOR times ``sensitivity`` (how far the reference moved when its inputs moved
    by an ulp; a number, or an array that broadcasts)."""
    ref, got = np.asarray(ref), np.asarray(got)
    a, r = tolerance(ref.dtype, atol, rtol, compute)
    is_float = _holds_floats(ref)
    base = dict(name=name, dtype=str(ref.dtype), shape=list(ref.shape), rtol=r,
                atol_rule="--atol" if atol is not None else "dtype default")
    if ref.shape != got.shape:
        return OutputDiff(**base, atol=a, max_abs=float("inf"), max_rel=float("inf"), mismatched=1.0,
                          needed_atol=float("inf"), problem=f"shape {list(got.shape)} != {list(ref.shape)}")
    if ref.dtype != got.dtype:
        return OutputDiff(**base, atol=a, max_abs=float("inf"), max_rel=float("inf"), mismatched=1.0,
                          needed_atol=float("inf"), problem=f"dtype {got.dtype} != {ref.dtype}")
    if ref.size == 0:
        return OutputDiff(**base, atol=a, max_abs=0.0, max_rel=0.0, mismatched=0.0, needed_atol=0.0)
    if not is_float:
        bad = ref != got
        err = np.abs(ref.astype(np.float64) - got.astype(np.float64)) if ref.dtype.kind in "iub" else bad * 1.0
        return OutputDiff(**base, atol=a, max_abs=float(err.max()), max_rel=float(err.max()),
                          mismatched=float(bad.mean()), needed_atol=float(err.max()))
    r64, g64 = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(r64) & np.isfinite(g64)
    # NaN and Inf must sit at the same positions with the same values (Inf sign included).
    nonfinite_bad = ~finite & ~((np.isnan(r64) & np.isnan(g64)) | (r64 == g64))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(finite, np.abs(r64 - g64), 0.0)
    scale = np.abs(np.where(finite, r64, 0.0))
    bound = np.full(ref.shape, float(a))
    rules = np.zeros(ref.shape, np.int8)  # 0 dtype default or --atol, 1 output magnitude, 2 input sensitivity
    if atol is None:
        magnitude = np.broadcast_to(_magnitude_term(ref, compute), ref.shape)
        spread = SENSITIVITY_FACTOR * np.broadcast_to(np.nan_to_num(np.asarray(sensitivity, np.float64),
                                                                    nan=0.0, posinf=0.0), ref.shape)
        rules = np.where(spread > np.maximum(a, magnitude), 2, np.where(magnitude > a, 1, 0)).astype(np.int8)
        bound = np.maximum(np.maximum(bound, magnitude), spread)
    excess = np.where(finite, diff - (bound + r * scale), -np.inf)
    bad = (excess > 0) | nonfinite_bad
    worst = np.unravel_index(int(np.argmax(excess if bad.any() or not diff.any() else diff)), ref.shape)
    with np.errstate(over="ignore"):
        rel = diff / np.maximum(scale, np.finfo(np.float64).tiny)
    rel = np.where(diff == 0.0, 0.0, rel)
    needed = np.max(np.maximum(diff - r * scale, 0.0)) if finite.any() else 0.0
    problem = f"NaN/Inf at {int(nonfinite_bad.sum())} position(s) where the reference differs" \
        if nonfinite_bad.any() else ""
    base["atol_rule"] = ("--atol" if atol is not None else "dtype default", "output magnitude",
                         "input sensitivity")[int(rules[worst])]
    return OutputDiff(**base, atol=float(bound[worst]), max_abs=float(diff.max()), max_rel=float(rel.max()),
                      mismatched=float(bad.mean()), needed_atol=float("inf") if nonfinite_bad.any() else float(needed),
                      problem=problem)


@dataclass
class Reference:
    """The original model's outputs on every input set, computed once and reused for every
    comparison against it (trials, rollback rounds, the determinism check)."""

    names: list[str]
    seed: int
    trials: int
    sets: list[InputSet]
    feeds: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]
    sensitivity: list[dict[str, np.ndarray | float]]  # per set, per output: |ref - ref on ulp-moved inputs|, pooled
    compute: dict[str, str | None]
    provider: str
    sessions: list[list[str]]  # get_providers() of the session(s) that ran it


def reference_outputs(original, *, choice: ProviderChoice, seed: int = 0, trials: int = 1, input_shapes=None,
                      input_ranges=None, inputs_file: str | None = None,
                      extra_outputs: list[str] | None = None, input_sets=None) -> Reference:
    """Run ``original`` once on every input set: ``trials`` normal sets (seeds seed..), then one
    offset and one degenerate set where the model has float inputs left to random values; those
    two also on a copy whose float inputs moved by an ulp or two (the sensitivity). ``input_sets``:
    only the kinds named there."""
    header = load_header(original)
    names = [o.name for o in header.graph.output]
    if not names:
        raise UsageError("the model has no outputs: there is nothing to compare")
    extra = list(extra_outputs or [])
    extra += [w for w in witnesses(header) if w not in extra and w not in names]
    model = original
    if extra:
        model = _exposed(original, extra)
        names = names + [n for n in extra if n not in names]
    kinds = [FILE if inputs_file else NORMAL] * trials + stress_kinds(header, input_ranges, inputs_file)
    if input_sets is not None:
        kinds = [k for k in kinds if k in input_sets or k == FILE]  # real inputs always run
    seeds = [seed + t for t in range(trials)] + [seed] * (len(kinds) - trials)
    # Outputs whose input moves differ (an fp16 Cast on the way to some of them) are probed apart.
    groups: dict[tuple, list[str]] = {}
    for name, widths in input_widths(header, names).items():
        groups.setdefault(tuple(sorted(widths.items())), []).append(name)
    compute = compute_dtypes(header, names)
    # Sensitivity is measured on the offset and degenerate sets (where inputs are ill-conditioned
    # on purpose); on normal inputs the magnitude term covers rounding.
    stressed = [i for i, kind in enumerate(kinds) if kind in (OFFSET, DEGENERATE)]
    # Each size of the unset dynamic dims at a batch of DEFAULT_BATCH, then of 1 (a model that
    # holds only for one sample); an attempt whose shapes an earlier one already tried is skipped.
    attempts = [(batch, size) for size in (DEFAULT_DYNAMIC_DIM,) + FALLBACK_DYNAMIC_DIMS for batch in (DEFAULT_BATCH, 1)]
    tried: set[tuple] = set()
    sessions: list[list[str]] = []
    for batch, size in attempts:
        made = [make_feeds(header, s, input_shapes, input_ranges, inputs_file, size, kind, batch)
                for kind, s in zip(kinds, seeds)]
        shapes = tuple(tuple(spec.shape) for spec in made[0][1])
        if shapes in tried:
            continue
        tried.add(shapes)
        feeds = [f for f, _ in made]
        moved = [_move_by_ulps(feeds[i], seeds[i], dict(key)) for i in stressed for key in groups]
        n = len(feeds)

        def probe(results):
            # Sensitivity above rounding level is trusted only from a deterministic model: then
            # the first set runs once more, and must give the same outputs.
            moves = [{name: _changes(results[i][name], results[n + j * len(groups) + g][name])
                      for g, members in enumerate(groups.values()) for name in members}
                     for j, i in enumerate(stressed)]
            probe.changes = [{name: _pooled(c[name], kinds[i]) for name in names} for c, i in zip(moves, stressed)]
            big = any(np.any(SENSITIVITY_FACTOR * c[name] > _magnitude_term(results[i][name], compute.get(name)))
                      for c, i in zip(moves, stressed) for name in names)
            return feeds[:1] if big else []

        try:
            with progress.step("onnxruntime: running the reference model"):
                out = run_model(model, feeds + moved, choice.name, names, sessions, more=probe)
            break
        except ModelRunError as err:
            # Only sizes we chose may be wrong for the model; try the next ones.
            if not any(spec.defaulted for spec in made[0][1]):
                raise
            failed = err
    else:
        raise failed
    # Rounding-level differences between two runs (GPU kernels that sum in varying order) still
    # count as deterministic; Dropout or random ops move outputs far more.
    stable = len(out) == n + len(stressed) * len(groups) or all(
        np.all(_changes(out[0][name], out[-1][name]) <= _magnitude_term(out[0][name], compute.get(name)))
        and _same_nonfinite(out[0][name], out[-1][name]) for name in names)
    sensitivity = [{name: 0.0 for name in names} for _ in kinds]
    for j, i in enumerate(stressed):
        if stable:
            sensitivity[i] = probe.changes[j]
    sets = [InputSet(kind, s, specs) for kind, s, (_, specs) in zip(kinds, seeds, made)]
    return Reference(names, seed, trials, sets, feeds, out[:n], sensitivity, compute, choice.name, sessions)


def _magnitude_term(ref: np.ndarray, compute: str | None) -> np.ndarray | float:
    """MAGNITUDE_EPS epsilons (of the wider of the output's dtype and ``compute``) of the
    largest finite |ref| around each element (``local_max``)."""
    ref = np.asarray(ref)
    if not _real_floats(ref) or not ref.size:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        r64 = np.abs(ref.astype(np.float64))
    width = max(_eps(_dtype_name(ref.dtype)), _eps(compute))
    return MAGNITUDE_EPS * width * local_max(np.where(np.isfinite(r64), r64, 0.0))


def local_max(a: np.ndarray) -> np.ndarray:
    """Per element, the scale of its part of the array: for each axis, the max over the slice
    at the element's index along it (everything else free); of those, the smallest. One max over
    the whole array would let a part near 1e7 set the scale of a part near 1 joined to it (a
    Concat, a Conv channel behind a large BatchNorm scale, a row of a constant input); the
    slice at the element's index along the joining axis holds only its own part. Axes whose
    slices hold fewer than LOCAL_MIN_ELEMENTS elements are not used (a max of a few rounding
    errors says little); with none left, the max of the whole array."""
    a = np.asarray(a, np.float64)
    if a.size == 0:
        return a
    out = None
    for k in range(a.ndim):
        if a.shape[k] < 2 or a.size // a.shape[k] < LOCAL_MIN_ELEMENTS:
            continue
        part = np.max(a, axis=tuple(j for j in range(a.ndim) if j != k), keepdims=True)
        out = part if out is None else np.minimum(out, part)
    return np.full(a.shape, a.max()) if out is None else np.broadcast_to(out, a.shape)


def _move_by_ulps(feeds: dict[str, np.ndarray], seed: int, widths: dict[str, str]) -> dict[str, np.ndarray]:
    """Float inputs times (1 +- 1.5 eps), element by element: each moves by one or two ulps of
    the narrowest float type it is computed in (``widths``, else its own type)."""
    rng = np.random.default_rng([seed, 0x5EED])
    moved = {}
    for name, value in feeds.items():
        kind = _dtype_name(value.dtype) if value.dtype.kind in "fV" else ""
        if kind not in TOLERANCES:
            moved[name] = value
            continue
        width = max(_eps(kind), _eps(widths.get(name)))
        sign = rng.choice([-1.0, 1.0], size=value.shape)
        # (np.asarray: numpy's arithmetic on a 0-d array gives a scalar, which onnxruntime refuses)
        moved[name] = np.asarray(value.astype(np.float64) * (1.0 + 1.5 * width * sign)).astype(value.dtype)
    return moved


# Ops through which a value reaches a Cast still itself: moved, reshaped, selected, or combined
# with a constant only. Behind any other op (a reduction, a product with another input, x - mean(x))
# a Cast rounds a computed value, not the input: its width is the output's compute type's concern
# (``compute_dtypes``), and moving the input by its ulps would measure a sensitivity the model
# does not have (an fp32 LayerNorm whose normalized output is Cast to fp16 would get fp16 moves on
# inputs of mean 1000: a bound of tens on outputs near 1).
_CARRIES = frozenset({"Identity", "Cast", "CastLike", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                      "Expand", "Slice", "Gather", "GatherElements", "GatherND", "Concat", "Split", "Tile", "Pad",
                      "DepthToSpace", "SpaceToDepth", "Neg", "Abs", "Relu", "Dropout"})
_WITH_CONSTANT = frozenset({"Add", "Sub", "Mul", "Div"})


def input_widths(model: onnx.ModelProto, outputs: list[str]) -> dict[str, dict[str, str | None]]:
    """Per output, per graph input: the narrowest float type among the Cast targets the input
    reaches still itself (``_CARRIES``, or Add/Sub/Mul/Div with a constant; main graph) and from
    which the output is computed: an fp32 input rounded to fp16 on its way in is only as precise
    as fp16, for what is computed from the rounded value; an fp32 output computed from the input
    beside that Cast keeps fp32 moves."""
    if not any(node.op_type == "Cast" for node in model.graph.node):   # (a whole-graph map costs a second at 100k nodes)
        return {out: {vi.name: None for vi in model.graph.input} for out in outputs}
    users: dict[str, list[onnx.NodeProto]] = {}
    constants = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            constants.update(o for o in node.output if o)
        for name in _node_types(node)[1]:   # (its inputs, and the outer names its subgraphs read)
            users.setdefault(name, []).append(node)
    if model.ir_version >= 4:  # an initializer a caller may override is an input (below IR 4 each is listed)
        constants -= {vi.name for vi in model.graph.input}

    def carries(node: onnx.NodeProto, via: str) -> bool:
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type in _CARRIES:
            return True
        return node.op_type in _WITH_CONSTANT and len(node.input) == 2 and \
            all(name == via or name in constants for name in node.input)

    def downstream(start: str) -> set[str]:
        seen, stack = {start}, [start]
        while stack:
            for node in users.get(stack.pop(), ()):
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        stack.append(out)
        return seen

    casts: dict[str, list[tuple[str, set[str]]]] = {}  # input -> (Cast target, what its output feeds)
    for vi in model.graph.input:
        seen, stack, found = set(), [vi.name], []
        while stack:
            name = stack.pop()
            for node in users.get(name, ()):
                if id(node) in seen or name not in node.input or not carries(node, name):
                    continue
                seen.add(id(node))
                if node.op_type == "Cast":
                    to = next((_FLOAT_TYPES.get(a.i) for a in node.attribute if a.name == "to"), None)
                    if to is not None and node.output and node.output[0]:
                        found.append((to, downstream(node.output[0])))
                stack.extend(o for o in node.output if o)
        casts[vi.name] = found
    return {out: {name: max((to for to, fed in found if out in fed), key=lambda n: TOLERANCES[n], default=None)
                  for name, found in casts.items()} for out in outputs}


def _same_nonfinite(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or not _real_floats(a):
        return bool(np.array_equal(a, b))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return bool(np.array_equal(np.isfinite(a64), np.isfinite(b64)))


def _pooled(changes, kind: str) -> np.ndarray | float:
    """The sensitivity the bound takes from the moves of one input set.

    Offset inputs: the largest change anywhere in the output. There the original's own error is
    a random draw per row (x - mean at 1000, a one-pass variance), and the probe's change another:
    row against row, the two do not bound each other; their largest do.

    Degenerate inputs: the largest change in each element's own part of the output
    (``local_max``). There the rows differ by kind, not by draw: a constant row's variance is 0
    in both models, and an ulp move makes it rounding noise, blown up to order 1 by a LayerNorm
    (in float16 and bfloat16 above all); that bound stays with the constant rows, and the
    low-variance rows beside them, where a changed epsilon shows, are held to their own."""
    changes = np.asarray(changes, np.float64)
    if changes.ndim == 0:
        return float(changes)
    if kind == DEGENERATE:
        return local_max(changes)
    return float(np.max(changes, initial=0.0))


def _changes(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """|a - b| element by element where both are finite (0 elsewhere): held against the
    magnitude term element by element (each part of the output to its own scale), and pooled
    as the sensitivity (``_pooled``)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or not a.size or not _real_floats(a):
        return 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(np.isfinite(a64) & np.isfinite(b64), np.abs(a64 - b64), 0.0)


def compare(original, rewritten, *, provider: str = "auto", seed: int = 0, trials: int = 1,
            input_shapes=None, input_ranges=None, inputs_file: str | None = None,
            atol: float | None = None, rtol: float | None = None, extra_outputs: list[str] | None = None,
            choice: ProviderChoice | None = None, repeat: bool = False,
            reference: Reference | None = None, input_sets=None) -> VerifyReport:
    """Run ``rewritten`` (ModelProto, path or Loaded) on the input sets of ``original`` and
    compare with the original's outputs on them. ``input_sets``: only these kinds (default:
    normal per trial, then offset and degenerate where they apply).

    ``reference``: the original's outputs from ``reference_outputs`` (same options), reused
    instead of running the original again. ``extra_outputs`` are intermediate tensors exposed in
    both models and compared too (used to find which rewrite broke equivalence). ``repeat``
    compares the original with a second run of itself: random ops draw new numbers there.
    """
    if trials < 1:
        raise UsageError("--trials must be at least 1")
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not value >= 0:  # NaN too: nothing would compare equal, not even a model to itself
            raise UsageError(f"{flag} must be a number >= 0, got {value}")
    choice = choice or select_provider(provider)
    original, rewritten = _read(original), _read(rewritten)
    _same_interface(load_header(original), load_header(rewritten))
    if reference is None:
        reference = reference_outputs(original, choice=choice, seed=seed, trials=trials, input_shapes=input_shapes,
                                      input_ranges=input_ranges, inputs_file=inputs_file, extra_outputs=extra_outputs,
                                      input_sets=input_sets)
    names = reference.names
    candidate = original if repeat else rewritten
    header = load_header(candidate)
    outputs = {o.name for o in header.graph.output}
    made = {name for node in header.graph.node for name in node.output}
    # A witness is compared only where the candidate computes it as one too (the same name
    # behind its ArgMax or TopK): a tensor it renamed, or reused for something else, is not; the
    # outputs and the tensors asked for always are.
    behind = {name: what for name, what in witnesses(load_header(original), labels=True).items()
              if name not in (extra_outputs or ()) and name not in outputs}
    seen = set(witnesses(header))
    names = [n for n in names if n in outputs or (n in made and (n not in behind or n in seen))]
    exposed = [n for n in names if n not in outputs]
    if exposed:
        candidate = _exposed(candidate, exposed)
    new_sessions: list[list[str]] = []
    with progress.step("onnxruntime: running the rewritten model"):
        new_out = run_model(candidate, reference.feeds, choice.name, names, new_sessions)
    report = VerifyReport(choice.name, choice.note, choice.tf32, reference.seed, reference.trials,
                          reference.sets[0].specs, sessions=[Session("reference", reference.sessions[-1])]
                          + [Session("candidate", p) for p in new_sessions[-1:]],
                          input_sets=[s.kind for s in reference.sets])
    for name in names:
        if name in behind and any(np.asarray(got[name]).dtype != np.asarray(ref[name]).dtype
                                  for ref, got in zip(reference.outputs, new_out)):
            continue  # the scores in another type (a model converted to float16 inside): the labels decide
        diffs = []
        for input_set, ref_out, got, sens in zip(reference.sets, reference.outputs, new_out, reference.sensitivity):
            diff = compare_arrays(name, ref_out[name], got[name], atol, rtol, reference.compute.get(name), sens[name])
            diff.inputs = input_set.label
            diffs.append(diff)
        worst = max(diffs, key=lambda d: (not d.passed, d.needed_atol))
        if name in behind:
            worst.note = behind[name]
        report.outputs.append(worst)
    if not repeat:
        # NaN = NaN everywhere proves nothing: an output that inputs (given, or the model's own)
        # make NaN or Inf everywhere says nothing of what computes it, even beside other outputs
        everywhere = all(_nothing_finite(out[name]) for out in reference.outputs for name in names)
        for diff in report.outputs:
            if diff.name not in behind and all(_nothing_finite(out[diff.name]) for out in reference.outputs):
                diff.problem = diff.problem or (NOTHING_FINITE_ANYWHERE if everywhere else NOTHING_FINITE)
    return report


# The problems of an output whose every value is NaN or Inf on every input set (``fold`` then
# compares the rewrites' own outputs instead: ``uncompared``).
NOTHING_FINITE = ("every value is NaN or Inf on every input set: nothing could be compared (give other "
                  "inputs with --inputs)")
NOTHING_FINITE_ANYWHERE = ("every value of every output is NaN or Inf on every input set: nothing could be "
                           "compared (give other inputs with --inputs)")


def uncompared(report: VerifyReport) -> list[OutputDiff]:
    """The failures of ``report`` when every one is an output NaN or Inf everywhere; else []."""
    failures = report.failures
    if failures and all(d.problem in (NOTHING_FINITE, NOTHING_FINITE_ANYWHERE) for d in failures):
        return failures
    return []


def _nothing_finite(value) -> bool:
    value = np.asarray(value)
    return _holds_floats(value) and value.size > 0 and not np.isfinite(value.astype(np.float64)).any()


def _real_floats(value: np.ndarray) -> bool:
    """Real floats, bfloat16 (ml_dtypes, numpy kind 'V') included."""
    return value.dtype.kind == "f" or str(value.dtype) == "bfloat16"


def _holds_floats(value: np.ndarray) -> bool:
    """Real or complex floats, bfloat16 (ml_dtypes, numpy kind 'V') included."""
    return value.dtype.kind in "fc" or str(value.dtype) == "bfloat16"


def _interface_inputs(m: onnx.ModelProto) -> list[str]:
    if m.ir_version >= 4:
        return [i.name for i in m.graph.input]
    inits = {t.name for t in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


_INDEX_OPS = frozenset({"ArgMax", "ArgMin", "TopK"})


def witnesses(model: onnx.ModelProto, labels: bool = False):
    """The tensors compared beside integer outputs: the data input of an ArgMax, ArgMin or TopK
    whose indices are a graph output (a classifier's labels, alone, are a few integers that a
    slightly wrong fold flips for few inputs; the scores behind them show it). With ``labels``:
    name -> what it is, for the report."""
    outputs = {o.name for o in model.graph.output}
    sources = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    found: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in _INDEX_OPS or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        indices = node.output[1] if node.op_type == "TopK" and len(node.output) > 1 else node.output[0]
        data = node.input[0]
        if indices in outputs and data and data not in outputs and data not in sources and data not in found:
            found[data] = f"the {node.op_type} input behind output '{indices}', compared too"
    return found if labels else list(found)


def _same_interface(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    # Initializers that are also graph inputs count from IR version 4 on: a caller may feed them
    # (below it, every initializer is listed and is a constant).
    ins_a, ins_b = _interface_inputs(a), _interface_inputs(b)
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
        inferred = onnx.shape_inference.infer_shapes(weightless(model))
    except Exception:  # best effort: an output without a type is still accepted by onnxruntime
        inferred = model
    g = inferred.graph
    return {vi.name: vi.type for vi in list(g.value_info) + list(g.output) + list(g.input)}


class _CallableModule(ModuleType):
    """This module, callable: ``normopt.verify(a, b)`` is ``normopt.api.verify(a, b)``."""

    def __call__(self, reference, candidate, **kwargs) -> VerifyReport:
        from normopt import api
        return api.verify(reference, candidate, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

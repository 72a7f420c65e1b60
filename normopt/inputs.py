"""Inputs for verification: seeded random per dtype, user shapes and ranges, or an .npz file."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx

from normopt.errors import UsageError

# Unset dynamic dims: the first (batch) axis gets DEFAULT_BATCH (2: a rewrite that mixes the
# samples of a batch, or holds only for one, shows; 1 is tried when the model cannot run with
# 2), every other axis DEFAULT_DYNAMIC_DIM.
DEFAULT_BATCH = 2
DEFAULT_DYNAMIC_DIM = 8
# Tried in turn when the model cannot run with the previous size (a CNN that downsamples 32x, a
# ViT whose position embeddings fix 224x224, a decoder with past whose attention mask is
# "past_sequence_length + 1" long, which holds only for one new token).
FALLBACK_DYNAMIC_DIMS = (32, 224, 1)
DEFAULT_INT_RANGE = (0, 2)

# The input sets verification runs: ``normal`` once per trial, then one of each other kind.
# ``offset``: float inputs with a large mean against a spread of 1, where rewrites that are exact
# in math but not in floating point show (E[x^2] - E[x]^2 variance, cancellation). Only where
# the input type resolves a spread of 1 at that mean: float16 at 100, float32/64 at 1000, none
# for bfloat16. ``degenerate``: blocks of all-zero and of constant values, where 0/0 and the
# epsilon decide the result, and of low variance, where a changed epsilon shows.
NORMAL, OFFSET, DEGENERATE = "normal", "offset", "degenerate"
FILE = "file"  # the arrays of --inputs, run alone
OFFSET_MEAN = {"float16": 100.0, "float32": 1000.0, "float64": 1000.0}
LOW_SPREAD = 1e-3  # the degenerate set's low-variance blocks


@dataclass
class InputSpec:
    name: str
    dtype: str
    shape: list[int]
    source: str
    defaulted: bool = False  # some dynamic dim took the default size


@dataclass
class InputSet:
    """One set of feeds: its kind (normal, offset, degenerate), seed, and what each input got."""

    kind: str
    seed: int
    specs: list[InputSpec]

    @property
    def label(self) -> str:
        return "inputs from file" if self.kind == FILE else f"{self.kind} inputs (seed {self.seed})"


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
        if not name or not math.isfinite(low) or not math.isfinite(high) or high <= low:
            raise UsageError(f"bad --input-range '{item}'; expected NAME:LOW:HIGH with finite LOW < HIGH, e.g. input_ids:0:30522")
        ranges[name] = (low, high)
    return ranges


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def make_feeds(model: onnx.ModelProto, seed: int, shapes=None, ranges=None, npz: str | None = None,
               dynamic_dim: int = DEFAULT_DYNAMIC_DIM, kind: str = NORMAL, batch: int = DEFAULT_BATCH,
               ) -> tuple[dict[str, np.ndarray], list[InputSpec]]:
    """Seeded random inputs for every graph input (or those read from ``npz``). Dynamic dims the
    user did not set are ``batch`` on the first axis and ``dynamic_dim`` elsewhere. ``kind`` changes the
    float inputs without a user range (see OFFSET, DEGENERATE); integer inputs keep their ranges."""
    shapes, ranges = shapes or {}, ranges or {}
    rng = np.random.default_rng(seed)
    loaded = _load_npz(npz) if npz else {}
    index_bounds = _gather_bounds(model)
    known = {vi.name for vi in graph_inputs(model)}
    for name in list(shapes) + list(ranges):
        if name not in known:
            raise UsageError(f"model has no input '{name}'; inputs: {', '.join(sorted(known))}")
    # From IR version 4 an initializer listed as a graph input is a default a caller may replace
    # (below it, a constant): an array given for one is fed in its place.
    overridable = [vi for vi in model.graph.input if vi.name not in known] if model.ir_version >= 4 else []
    if npz:
        _check_npz_names(npz, loaded, known, known | {vi.name for vi in overridable})
    feeds, specs, dims = {}, [], {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UsageError(f"input '{vi.name}' is not a tensor; pass its value with --inputs FILE.npz")
        if tt.elem_type in _UNFEEDABLE:
            raise UsageError(f"input '{vi.name}' is {onnx.TensorProto.DataType.Name(tt.elem_type)}: onnxruntime's "
                             "Python binding takes no arrays of that type, so the model cannot be verified here; "
                             "fold with --no-verify")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if vi.name in loaded:
            value = feeds[vi.name] = _loaded_value(npz, vi, loaded[vi.name])
            specs.append(InputSpec(vi.name, str(dtype), list(value.shape), f"file {npz}"))
            continue
        shape = shapes.get(vi.name) or _resolve_dims(vi, dims, dynamic_dim, batch)
        _check_size(vi.name, shape)
        defaulted = vi.name not in shapes and len(dims) > 0
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
        what = "uniform" if low is not None else "normal(0, 1)" if dtype.kind == "f" else "random"
        if low is None and kind != NORMAL and _is_float(dtype):
            feeds[vi.name], what = _stress(feeds[vi.name], kind, str(dtype))
        elif kind == DEGENERATE and dtype == np.bool_:
            # the normal set's flags negated: an If on a flag input runs its other branch here
            feeds[vi.name], what = np.array(np.logical_not(feeds[vi.name])), "random, negated from the normal set's"
        specs.append(InputSpec(vi.name, str(dtype), list(shape),
                               f"{what} [{low:g}, {high:g}) {source}".strip() if low is not None else what,
                               defaulted))
    for vi in overridable:
        if vi.name in loaded:
            feeds[vi.name] = _loaded_value(npz, vi, loaded[vi.name])
            specs.append(InputSpec(vi.name, str(feeds[vi.name].dtype), list(feeds[vi.name].shape),
                                   f"file {npz}, in place of its initializer"))
    return feeds, specs


def _loaded_value(npz: str, vi: onnx.ValueInfoProto, value) -> np.ndarray:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    value = np.asarray(value)
    # Only same-kind casts (float64 -> float32): strings or floats fed to an integer input would
    # be silently mangled, or fail deep inside numpy.
    if not np.can_cast(value.dtype, dtype, casting="same_kind"):
        raise UsageError(f"inputs '{npz}': array '{vi.name}' is {value.dtype}, the model expects {dtype}")
    return value.astype(dtype, copy=False)


# Element types numpy has only through ml_dtypes, which onnxruntime's binding does not convert
# ("Numpy_type 263 can't be converted to MLDataType"); bfloat16 is fed as its bits (normopt.verify).
_UNFEEDABLE = frozenset(getattr(onnx.TensorProto, name) for name in (
    "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "UINT4", "INT4", "FLOAT4E2M1", "FLOAT8E8M0",
    "UINT2", "INT2") if hasattr(onnx.TensorProto, name))


# Random inputs above this many elements are refused: a declared dim of 2**31 would otherwise
# exhaust the machine's memory before onnxruntime could say anything (float64 draws: 1 GiB here).
MAX_RANDOM_ELEMENTS = 2**27


def _check_size(name: str, shape) -> None:
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims) or math.prod(dims) > MAX_RANDOM_ELEMENTS:
        raise UsageError(f"input '{name}' has shape {dims}: {'a negative dim' if min(dims, default=0) < 0 else 'too large'}"
                         " for random verification inputs; set its dims with --input-shape, pass real inputs with "
                         "--inputs, or use --no-verify")


def stress_kinds(model: onnx.ModelProto, ranges=None, npz: str | None = None) -> list[str]:
    """The extra input sets that change something for this model: none with real inputs, none
    when no float input is left to random values."""
    if npz:
        return []
    ranges = ranges or {}
    types = [str(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
             for vi in graph_inputs(model) if vi.name not in ranges and vi.type.HasField("tensor_type")
             and vi.type.tensor_type.elem_type in _FLOAT_ELEM]
    kinds = []
    if any(t in OFFSET_MEAN for t in types):
        kinds.append(OFFSET)
    if types:
        kinds.append(DEGENERATE)
    return kinds


_FLOAT_ELEM = {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _is_float(dtype) -> bool:
    return np.dtype(dtype).kind == "f" or str(dtype) == "bfloat16"


def _stress(value: np.ndarray, kind: str, dtype: str) -> tuple[np.ndarray, str]:
    """``value`` (normal(0, 1) draws) turned into an offset or degenerate input."""
    if kind == OFFSET:
        if dtype not in OFFSET_MEAN:
            return value, "normal(0, 1) (no offset: too few mantissa bits)"
        mean = OFFSET_MEAN[dtype]
        # (np.asarray: numpy's arithmetic on a 0-d array gives a scalar, which onnxruntime refuses)
        return np.asarray(value.astype(np.float64) + mean).astype(value.dtype), f"normal({mean:g}, 1)"
    # Degenerate: along the first axis after the batch axis with 2+ entries that is not the last
    # one (sequence positions of [B, S, D], channels of [N, C, H, W]), blocks in turns of four:
    # low-variance (normal(0, 1e-3): a variance of 1e-6, between the epsilons models use, so a
    # changed epsilon shows), constant, all zeros, normal(0, 1); low-variance first, so that two
    # blocks (the batch axis of a [B, F] input) still hold one. With no such axis the whole tensor
    # is constant.
    out = np.array(value, copy=True)
    shape = out.shape
    axes = [a for a in range(1, len(shape) - 1) if shape[a] >= 2]
    if not axes and len(shape) >= 2 and shape[0] >= 2:
        axes = [0]
    if not axes:
        out[...] = 0.75
        return out, "constant 0.75"
    axis = axes[0]
    view = np.moveaxis(out, axis, 0)
    for i in range(view.shape[0]):
        if i % 4 == 0:
            view[i] = (view[i].astype(np.float64) * LOW_SPREAD).astype(out.dtype)
        elif i % 4 == 1:
            view[i] = 0.25 * (i + 1)
        elif i % 4 == 2:
            view[i] = 0
    return out, (f"degenerate: along axis {axis} blocks in turn normal(0, {LOW_SPREAD:g}), constant, all zero, "
                 "normal(0, 1)")


def _resolve_dims(vi: onnx.ValueInfoProto, dims: dict, dynamic_dim: int, batch: int = DEFAULT_BATCH) -> list[int]:
    shape = []
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        raise UsageError(f"input '{vi.name}' has no shape; pass --input-shape {vi.name}:DxD...")
    for axis, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value >= 0:   # 0 too: an empty axis, as onnxruntime checks it
            shape.append(d.dim_value)
            continue
        key = d.dim_param or f"{vi.name}:{axis}"
        if key not in dims:
            dims[key] = _dim_sum(key, dims, dynamic_dim) or (batch if axis == 0 else dynamic_dim)
        shape.append(dims[key])
    return shape


_TERM = re.compile(r"\s*([+-])?\s*(?:(\d+)|([A-Za-z_][A-Za-z_0-9.]*))\s*")


def _dim_sum(param: str, dims: dict, dynamic_dim: int) -> int | None:
    """A dim named as a sum of other dims, as HF exports name the attention mask of a decoder
    with past ("past_sequence_length + sequence_length"): the sum of their sizes, each name
    sized like a dim of its own. None for a plain name or another expression."""
    if "+" not in param and "-" not in param:
        return None
    total, pos = 0, 0
    while pos < len(param):
        m = _TERM.match(param, pos)
        if m is None or m.end() == pos or (pos > 0 and not m.group(1)):
            return None
        if m.group(2):
            value = int(m.group(2))
        else:
            value = dims.setdefault(m.group(3), dynamic_dim)
        total += -value if m.group(1) == "-" else value
        pos = m.end()
    return total if total > 0 else None


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


def _check_npz_names(path: str, loaded: dict, needed: set[str], accepted: set[str]) -> None:
    """Real inputs are all or nothing: a missing array would silently become random data, and
    an array no input takes is a misspelt name."""
    missing, unknown = sorted(needed - set(loaded)), sorted(set(loaded) - accepted)
    if missing:
        raise UsageError(f"inputs '{path}' has no array for input(s) {', '.join(missing)}")
    if unknown:
        raise UsageError(f"inputs '{path}': model has no input(s) {', '.join(unknown)}; "
                         f"inputs: {', '.join(sorted(needed))}")


def _load_npz(path: str) -> dict[str, np.ndarray]:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        why = ' '.join(str(err).split())[:160]
        if isinstance(err, zipfile.BadZipFile) or "pickled" in why:   # numpy read it as a pickle
            why = "not an .npz file (numpy.savez writes one)"
        raise UsageError(f"cannot read inputs '{path}': {why}") from err

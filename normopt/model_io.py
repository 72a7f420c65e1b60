"""Load and save ONNX models: clear errors, external data, atomic writes, metadata kept.

The input file is only ever opened for reading. The output is written to a temporary
file in the destination folder and renamed into place, so a failure leaves nothing behind.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
from google.protobuf.message import DecodeError, EncodeError

from normopt.errors import ModelLoadError, ModelSaveError

# Protobuf cannot serialize a message of 2 GiB or more; stay well under it.
PROTOBUF_LIMIT = 2**31 - 2**26
# Smaller tensors stay in the model file (onnx's own default): onnxruntime's shape inference
# reads Reshape shapes, Unsqueeze axes or Resize scales from initializers and cannot read them
# from external data ("Cannot parse data from external tensors").
EXTERNAL_MIN_BYTES = 1024

def min_ir_version(opset: int) -> int:
    """Lowest IR version able to carry a default-domain opset (from onnx.helper.VERSION_TABLE)."""
    irs = [row[1] for row in onnx.helper.VERSION_TABLE if row[2] >= opset]
    return min(irs) if irs else onnx.IR_VERSION


def default_output(path: str | os.PathLike) -> Path:
    """``net.onnx`` -> ``net.normopt.onnx`` beside it."""
    p = Path(path)
    return p.with_name(f"{p.stem}.normopt{p.suffix or '.onnx'}")


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model (external data beside it included) or raise ModelLoadError."""
    p = Path(path)
    where = f"cannot read '{p}'"
    if not p.exists():
        raise ModelLoadError(f"{where}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{where}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{where}: file is empty")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{where}: file is not an ONNX model (protobuf parse failed: {_short(err)})") from err
    except OSError as err:
        raise ModelLoadError(f"{where}: {err.strerror or err}") from err
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError(f"{where}: file is not an ONNX model (no graph)")
    if not model.opset_import:
        raise ModelLoadError(f"{where}: model declares no opset_import")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as err:
        raise ModelLoadError(f"{where}: external data could not be loaded ({_short(err)})") from err
    try:
        check(model)
    except onnx.checker.ValidationError as err:
        raise ModelLoadError(f"{where}: the ONNX checker rejects it: {_short(err)}") from err
    return model


def check(model: onnx.ModelProto, full: bool = False) -> None:
    """onnx.checker on a model of any size. Large weights are checked as graph inputs of their
    type and shape: the checker then never copies their bytes (a BERT-base model checks in
    milliseconds instead of seconds, a model over 2 GB at all)."""
    onnx.checker.check_model(without_weights(model, as_inputs=True), full_check=full)


def passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        check(model, full=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, RuntimeError):
        return False
    return True


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def byte_size(model: onnx.ModelProto) -> int:
    """About ``model.ByteSize()``, without asking protobuf (which takes seconds on a large model
    and refuses a message of 2 GiB or more): a weight-free copy's size plus the weights' bytes."""
    try:
        light = without_weights(model).ByteSize()
    except EncodeError:  # 2 GiB even without the top-level weights (huge Constant nodes)
        return PROTOBUF_LIMIT
    return light + sum(_nbytes(init) for init in model.graph.initializer if _large(init))


def needs_external_data(model: onnx.ModelProto) -> bool:
    return byte_size(model) >= PROTOBUF_LIMIT


def save(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` atomically to ``path``; returns the files written.

    ``external_data=None`` stores weights beside the model only when protobuf's 2 GB limit
    demands it; True forces ``<name>.data`` beside the model. Either way tensors under
    EXTERNAL_MIN_BYTES stay in the model file.
    """
    dest = Path(path)
    if dest.is_dir():
        raise ModelSaveError(f"cannot write '{dest}': is a directory")
    if not dest.parent.exists():
        raise ModelSaveError(f"cannot write '{dest}': folder '{dest.parent}' does not exist")
    if external_data is None:
        external_data = needs_external_data(model)
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".normopt-", dir=dest.parent))
    except OSError as err:  # a folder we may not write to (permissions, read-only file system)
        raise ModelSaveError(f"cannot write '{dest}': {err.strerror or err}") from err
    written: list[Path] = []
    try:
        tmp_model = tmpdir / dest.name
        if external_data:
            data_name = dest.name + ".data"
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            # Marked here rather than by onnx's converter, which refuses a location that exists
            # relative to the current directory (a second run in the output's folder).
            for tensor in _initializers(copy.graph):
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                    onnx.external_data_helper.set_external_data(tensor, data_name)
            onnx.save_model(copy, str(tmp_model))  # writes the marked tensors to tmpdir/data_name
            if (tmpdir / data_name).exists():
                os.chmod(tmpdir / data_name, tmp_model.stat().st_mode & 0o777)  # onnx creates it 0600
                os.replace(tmpdir / data_name, dest.parent / data_name)
                written.append(dest.parent / data_name)
        else:
            tmp_model.write_bytes(serialize(model))
        os.replace(tmp_model, dest)
        written.insert(0, dest)
    except OSError as err:
        raise ModelSaveError(f"cannot write '{dest}': {err.strerror or err}") from err
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return written


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                yield from all_graphs(sub)


def _initializers(graph: onnx.GraphProto):
    for g in all_graphs(graph):
        yield from g.initializer


# Initializers up to this many elements count as small (counted from dims: asking protobuf for
# a tensor's size or bytes would copy it).
KEEP_ELEMENTS = 1024


def without_weights(model: onnx.ModelProto, keep_elements: int = KEEP_ELEMENTS, as_inputs: bool = False,
                    ) -> onnx.ModelProto:
    """A light copy for inference and checking: large top-level initializers lose their bytes.

    They become tensors of the same name, type and dims marked as external data (shape
    inference reads those), or with ``as_inputs`` graph inputs of that type and shape (the
    checker reads those). Small ones (Reshape shapes, axes) stay whole so that inference can
    read their values.
    """
    light = onnx.ModelProto()
    for key in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        if model.HasField(key):
            setattr(light, key, getattr(model, key))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g, src = light.graph, model.graph
    g.name = src.name
    for part in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(g, part).extend(getattr(src, part))
    inputs = {vi.name for vi in src.input}
    for init in src.initializer:
        if not _large(init, keep_elements):
            g.initializer.append(init)
        elif not as_inputs:
            g.initializer.append(_header(init))
        elif init.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def _large(init: onnx.TensorProto, keep_elements: int = KEEP_ELEMENTS) -> bool:
    return math.prod(init.dims) > keep_elements and init.data_type != onnx.TensorProto.STRING


def _nbytes(init: onnx.TensorProto) -> int:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 8
    return math.prod(init.dims) * itemsize


def _header(init: onnx.TensorProto) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name, t.data_type = init.name, init.data_type
    t.dims.extend(init.dims)
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    return t


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."

"""Which onnxruntime execution provider verification really runs on.

onnxruntime-gpu lists CUDAExecutionProvider even where its libraries cannot load, and then
silently runs on CPU: only ``session.get_providers()`` tells the truth. ``auto`` uses CUDA when
a probe session really runs on it, else CPU with one line saying why. TF32 is turned off on CUDA
so fp32 Conv/MatMul stay fp32 (it changes results at about 1e-3 relative).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from normopt.errors import ProviderUnavailableError, UsageError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass
class ProviderChoice:
    name: str  # "cuda" or "cpu"
    note: str = ""  # why CUDA was not used, when it was not
    tf32: bool | None = None  # False on CUDA (turned off); None on CPU (not applicable)


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

    if CUDA not in ort.get_available_providers():
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
            session = ort.InferenceSession(probe.SerializeToString(), session_options(), providers=providers("cuda"))
            used = session.get_providers()
            session.run(None, {"x": np.ones(4, np.float32)})
        except Exception as err:  # a broken CUDA install surfaces as many error types
            used, failure = [], " ".join(str(err).split())
        else:
            failure = ""
    if used and used[0] == CUDA:
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
    flush_streams()
    saved = []
    try:
        for fd in (1, 2):
            saved.append(os.dup(fd))
    except OSError:   # no stdout or stderr at all (closed by the caller): nothing to capture
        for fd in saved:
            os.close(fd)
        yield cap
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield cap
        finally:
            flush_streams()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            cap.text = tmp.read().decode("utf-8", "replace")


def flush_streams() -> None:
    """Flush stdout and stderr as far as they can be: closed or broken ones are let be."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):   # a broken pipe or a closed stream: nothing to keep there
            pass


def session_options(prepack: bool = False):
    """``prepack``: let onnxruntime repack the MatMul / Conv weights (see ``verify.prepack_pays``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # errors come back as exceptions, said once in our own words
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def providers(name: str) -> list:
    if name == "cuda":
        return [(CUDA, {"use_tf32": "0"}), CPU]
    return [CPU]

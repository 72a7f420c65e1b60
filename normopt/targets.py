"""What ``--target`` keeps: the forms a runtime runs best.

``portable`` (default) emits the single standard op for every site. ``onnxruntime`` skips the
rewrites that onnxruntime runs slower or less precisely than the exported form:

* GroupNormalization (opset 21): onnxruntime has no kernel and runs its function body, which
  is slower on CPU than the exported InstanceNormalization form (bench/bench_groupnorm.py) and
  computes the variance as E[x^2] - E[x]^2 (less precise when a group's mean is large);
* RMSNormalization and LayerNormalization in bfloat16: onnxruntime's CPU provider has no
  bfloat16 kernel for them, so the fused model would not run there.

BatchNormalization folding, InstanceNormalization and LayerNormalization / RMSNormalization in
float16, float32 and float64 are kept: onnxruntime has kernels for them.
"""
from __future__ import annotations

from typing import Callable

from normopt.errors import UsageError
from normopt.pattern import Match

TARGETS = ("portable", "onnxruntime")

GROUP_NORM_REASON = ("--target onnxruntime: onnxruntime has no GroupNormalization kernel and runs its function "
                     "body, slower and less precise than the exported InstanceNormalization form "
                     "(--target portable fuses it)")


def _onnxruntime(pass_name: str, m: Match) -> str | None:
    op = m.info.get("op")
    if pass_name == "fuse-groupnorm" and op == "GroupNormalization":
        return GROUP_NORM_REASON
    emitted = {"fuse-layernorm": "LayerNormalization", "fuse-rmsnorm": "RMSNormalization"}.get(pass_name)
    if emitted and m.info.get("dtype") == "bfloat16":
        return (f"--target onnxruntime: onnxruntime's CPU provider has no bfloat16 {emitted} kernel "
                "(--target portable fuses it)")
    return None


def veto_for(target: str) -> Callable[[str, Match], str | None] | None:
    """The pipeline's veto for ``target`` (None: nothing vetoed)."""
    if target not in TARGETS:
        raise UsageError(f"unknown target '{target}'; use {' or '.join(TARGETS)}")
    return _onnxruntime if target == "onnxruntime" else None

"""What fusing GroupNorm costs or gains in onnxruntime on CPU.

onnxruntime has no GroupNormalization kernel: it runs GroupNormalization-21 by expanding the
ONNX function body (Reshape, ReduceMean, Mul, Sub, Sqrt, Div, Reshape, Mul, Add). The original
TorchScript export runs onnxruntime's InstanceNormalization kernel on the grouped tensor. This
script exports a diffusers-style UNet block (GroupNorm -> SiLU -> Conv3x3, twice, plus a 1x1
shortcut) with the TorchScript exporter at opset 17, fuses it with ``fuse-groupnorm`` (which
upgrades the model to opset 21), and times both models in one run, alternating them so that
machine drift hits both alike. It prints per size the median latency of each and their ratio,
for the block and for a lone GroupNorm.

    python bench/bench_groupnorm.py [--sizes 64x32,128x32,320x64] [--runs 30] [--level all|none]
"""
from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from normopt import pipeline

GROUPS = 32


class UNetBlock(nn.Module):
    """diffusers ResnetBlock2D without the time embedding."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(GROUPS, channels, eps=1e-6), nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.shortcut = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.shortcut(x) + h


def export(module: nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.randn(*shape), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


def session(model: onnx.ModelProto, level: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all"
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_pair(a: ort.InferenceSession, b: ort.InferenceSession, feed: dict, runs: int):
    """Median seconds of a and b, run alternately after a warm-up; and their max output difference."""
    for _ in range(3):
        ya, yb = a.run(None, feed)[0], b.run(None, feed)[0]
    ta, tb = [], []
    for _ in range(runs):
        for sess, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb), float(np.abs(ya - yb).max())


def measure(name: str, module: nn.Module, shape: tuple[int, ...], runs: int, level: str) -> None:
    original = export(module, shape)
    fused, result = pipeline.run(original, ["fuse-groupnorm"])
    ops = sorted({n.op_type for n in fused.graph.node} & {"GroupNormalization", "InstanceNormalization"})
    assert len(result.applied) >= 1 and ops == ["GroupNormalization"], (result.skipped, ops)
    feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    t_orig, t_fused, diff = time_pair(session(original, level), session(fused, level), feed, runs)
    print(f"{name:<10} {'x'.join(map(str, shape)):<16} {t_orig * 1e3:>10.3f} {t_fused * 1e3:>10.3f} "
          f"{t_fused / t_orig:>8.2f} {diff:>10.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x32,128x32,320x64", help="CxHW list (H = W), batch 1")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--level", choices=("all", "none"), default="all",
                        help="onnxruntime graph optimizations for both models (all: what users run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"onnxruntime {ort.__version__} CPU, {torch.get_num_threads()} threads, optimizations: {args.level}, "
          f"median of {args.runs} alternating runs, G={GROUPS}")
    print(f"{'model':<10} {'input':<16} {'orig ms':>10} {'fused ms':>10} {'ratio':>8} {'max|diff|':>10}")
    for size in args.sizes.split(","):
        channels, hw = (int(v) for v in size.split("x"))
        shape = (1, channels, hw, hw)
        measure("GroupNorm", nn.GroupNorm(GROUPS, channels), shape, args.runs, args.level)
        measure("UNetBlock", UNetBlock(channels), shape, args.runs, args.level)
    print("ratio = fused / original latency (< 1: the fused model is faster)")


if __name__ == "__main__":
    main()

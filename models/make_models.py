#!/usr/bin/env python
"""Regenerate the small ONNX test models in this folder.

Usage:
    python models/make_models.py            # (re)write every model, verify, print summary
    python models/make_models.py --only cnn # only models whose file name contains "cnn"
    python models/make_models.py --markdown # also print the op-histogram table as markdown

Requires torch==2.13.0 (CPU build is enough), onnx, onnxscript, onnxruntime, numpy.

Every model is built from random weights under a fixed seed, in eval mode, with
non-trivial BatchNorm running statistics and random norm gamma/beta, so that
folding/fusing passes are actually exercised.  After export each model is
re-saved as a single file (no external data) with ir_version <= 10, checked with
onnx.checker, run in onnxruntime (CPU) and compared with the PyTorch output.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import logging
import math
import os
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
MAX_IR_VERSION = 10
TS = "torchscript"  # torch.onnx.export(..., dynamo=False)
DYNAMO = "dynamo"  # torch.onnx.export(..., dynamo=True)

warnings.filterwarnings("ignore")
for _name in ("torch", "torch.onnx", "torch.export", "onnxscript", "onnx_ir", "torch._dynamo"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


# --------------------------------------------------------------------------------------
# Initialisation helpers
# --------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_norms_(model: nn.Module) -> nn.Module:
    """Give every normalization layer non-trivial parameters / running stats."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.5)
                m.running_var.copy_(torch.rand_like(m.running_var) * 1.5 + 0.5)
        if isinstance(
            m,
            (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm),
        ):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn_like(m.bias) * 0.2)
    return model


def rand_gamma(n: int) -> nn.Parameter:
    return nn.Parameter(torch.rand(n) + 0.5)


def rand_beta(n: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(n) * 0.2)


# --------------------------------------------------------------------------------------
# 1. CNNs with BatchNorm (1-D, 2-D, 3-D)
# --------------------------------------------------------------------------------------
def conv_bn_relu(conv: nn.Module, bn: nn.Module) -> nn.Sequential:
    return nn.Sequential(conv, bn, nn.ReLU())


class SmallCNN(nn.Module):
    """Conv+BN+ReLU blocks: plain (bias=False), plain (bias=True), grouped, depthwise."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)),
            conv_bn_relu(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=True), nn.BatchNorm2d(32)),
            conv_bn_relu(nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32)),
            # depthwise; BN with TF-style eps and momentum
            conv_bn_relu(
                nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),
                nn.BatchNorm2d(32, eps=1e-3, momentum=0.01),
            ),
            conv_bn_relu(nn.Conv2d(32, 48, 1, bias=True), nn.BatchNorm2d(48)),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = self.features(x)
        x = self.pool(x).flatten(1)
        return self.fc(x)


class SmallCNN1d(nn.Module):
    """Conv1d+BatchNorm1d (bias False/True, grouped, depthwise, BN affine=False)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(nn.Conv1d(8, 16, 5, padding=2, bias=False), nn.BatchNorm1d(16)),
            conv_bn_relu(nn.Conv1d(16, 32, 3, stride=2, padding=1, groups=2), nn.BatchNorm1d(32)),
            conv_bn_relu(nn.Conv1d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm1d(32)),
            conv_bn_relu(nn.Conv1d(32, 32, 1), nn.BatchNorm1d(32, affine=False)),
        )
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = self.features(x)
        return self.fc(x.mean(-1))


class SmallCNN3d(nn.Module):
    """Conv3d+BatchNorm3d (bias False/True, grouped)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(nn.Conv3d(2, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8)),
            conv_bn_relu(nn.Conv3d(8, 16, 3, stride=2, padding=1, groups=2), nn.BatchNorm3d(16)),
        )
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.features(x)
        return self.fc(x.mean((2, 3, 4)))


# --------------------------------------------------------------------------------------
# 2. MLP: Linear -> BatchNorm1d on [N, F]
# --------------------------------------------------------------------------------------
class MLPBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 32, bias=False)
        self.bn2 = nn.BatchNorm1d(32, eps=1e-3)
        self.fc3 = nn.Linear(32, 8)

    def forward(self, x):
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


# --------------------------------------------------------------------------------------
# 3. ConvTranspose2d + BatchNorm2d decoder
# --------------------------------------------------------------------------------------
class DeconvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.up1 = conv_bn_relu(nn.ConvTranspose2d(4, 8, 4, stride=2, padding=1, groups=1), nn.BatchNorm2d(8))
        self.up2 = conv_bn_relu(
            nn.ConvTranspose2d(8, 12, 4, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(12)
        )
        self.up3 = conv_bn_relu(nn.ConvTranspose2d(12, 4, 3, stride=1, padding=1, groups=2), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.up3(self.up2(self.up1(x)))


# --------------------------------------------------------------------------------------
# Attention building blocks (shared by the transformer models)
# --------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, d, heads, causal=False, bias=True, max_len=64, scale=True, rope=False):
        super().__init__()
        self.h = heads
        self.hd = d // heads
        self.causal = causal
        self.scale = scale
        self.rope = rope
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias)
        self.v = nn.Linear(d, d, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)
        if causal:
            self.register_buffer("tril", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)
        if rope:
            inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
            freqs = torch.outer(torch.arange(max_len).float(), inv)
            emb = torch.cat([freqs, freqs], -1)
            self.register_buffer("cos", emb.cos(), persistent=False)
            self.register_buffer("sin", emb.sin(), persistent=False)

    @staticmethod
    def _rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def forward(self, x, add_mask=None):
        b, t, d = x.shape
        q = self.q(x).reshape(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(x).reshape(b, t, self.h, self.hd).transpose(1, 2)
        v = self.v(x).reshape(b, t, self.h, self.hd).transpose(1, 2)
        if self.rope:
            cos = self.cos[:t].to(x.dtype)
            sin = self.sin[:t].to(x.dtype)
            q = q * cos + self._rotate_half(q) * sin
            k = k * cos + self._rotate_half(k) * sin
        att = q @ k.transpose(-2, -1)
        if self.scale:
            att = att * (1.0 / math.sqrt(self.hd))
        if self.causal:
            att = att.masked_fill(~self.tril[:t, :t], float("-inf"))
        if add_mask is not None:
            att = att + add_mask
        att = att.softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.o(y)


# --------------------------------------------------------------------------------------
# 4/6. Transformer encoder (pre-LN) with nn.LayerNorm (or a drop-in replacement)
# --------------------------------------------------------------------------------------
class HandLayerNorm(nn.Module):
    """LayerNorm over the last dim written out by hand (old BertLayerNorm style)."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = rand_gamma(d)
        self.bias = rand_beta(d)
        self.eps = eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight * x + self.bias


class ModuleFunctionsBlock(nn.Module):
    """Conv1d + BN1d + ReLU on [N, C, T], then a hand-written LayerNorm, a Linear and two
    nn.LayerNorm over T: exported with these modules as model-local functions, each function
    takes its module's parameters as inputs (nn.LayerNorm's function is called twice)."""

    def __init__(self, c=8, d=32):
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm1d(c)
        self.ln1 = HandLayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ln3 = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.ln2(self.fc(self.ln1(x)))
        return self.ln3(x + 1.0)


class VarLayerNorm(nn.Module):
    """LayerNorm over the last dim through torch's variance functions:
    "var_mean" torch.var_mean(keepdim=True, correction=0); "var_nokeep" torch.var(unbiased=False)
    and mean with keepdim=False, unsqueezed back; "bessel" torch.var with its default correction=1
    (the unbiased variance: not a LayerNorm)."""

    def __init__(self, d, form="var_mean", eps=1e-5):
        super().__init__()
        self.weight = rand_gamma(d)
        self.bias = rand_beta(d)
        self.form, self.eps = form, eps

    def forward(self, x):
        if self.form == "var_mean":
            var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        elif self.form == "var_nokeep":
            var = torch.var(x, dim=-1, unbiased=False).unsqueeze(-1)
            mean = x.mean(-1).unsqueeze(-1)
        else:
            var, mean = torch.var(x, dim=-1, keepdim=True), x.mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class FP32LayerNorm(nn.LayerNorm):
    """fairseq-style: compute LayerNorm in fp32 inside an fp16 model."""

    def forward(self, x):
        out = F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        )
        return out.half()


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, ff, norm_cls):
        super().__init__()
        self.ln1 = norm_cls(d)
        self.attn = SelfAttention(d, heads)
        self.ln2 = norm_cls(d)
        self.fc1 = nn.Linear(d, ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ff, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TransformerEncoder(nn.Module):
    """Pre-LN encoder, 2 layers + final LayerNorm.  Float [B, T, d] input, or int64 token ids."""

    def __init__(self, d=32, heads=4, ff=64, layers=2, vocab=None, max_len=64, norm_cls=nn.LayerNorm):
        super().__init__()
        self.vocab = vocab
        if vocab is not None:
            self.embed = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.randn(1, max_len, d) * 0.02)
        self.layers = nn.ModuleList([EncoderLayer(d, heads, ff, norm_cls) for _ in range(layers)])
        self.ln_f = norm_cls(d)

    def forward(self, x):
        if self.vocab is not None:
            x = self.embed(x) + self.pos[:, : x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x)


# --------------------------------------------------------------------------------------
# 5. HF-style BERT block (post-LN, eps=1e-12) and GPT-2-style causal decoder
# --------------------------------------------------------------------------------------
class BertLayer(nn.Module):
    def __init__(self, d, heads, ff, eps):
        super().__init__()
        self.attn = SelfAttention(d, heads)
        self.attn_ln = nn.LayerNorm(d, eps=eps)
        self.inter = nn.Linear(d, ff)
        self.out = nn.Linear(ff, d)
        self.out_ln = nn.LayerNorm(d, eps=eps)

    def forward(self, x, add_mask):
        x = self.attn_ln(self.attn(x, add_mask) + x)
        return self.out_ln(self.out(F.gelu(self.inter(x))) + x)


class TinyBert(nn.Module):
    def __init__(self, vocab=100, d=32, heads=4, ff=64, layers=2, max_len=64, eps=1e-12):
        super().__init__()
        self.word = nn.Embedding(vocab, d)
        self.position = nn.Embedding(max_len, d)
        self.token_type = nn.Embedding(2, d)
        self.emb_ln = nn.LayerNorm(d, eps=eps)
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0), persistent=False)
        self.layers = nn.ModuleList([BertLayer(d, heads, ff, eps) for _ in range(layers)])
        self.pooler = nn.Linear(d, d)

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        x = self.word(input_ids) + self.position(self.position_ids[:, :t]) + self.token_type(
            torch.zeros_like(input_ids)
        )
        x = self.emb_ln(x)
        add_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, add_mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return x, pooled


class GPTBlock(nn.Module):
    def __init__(self, d, heads, eps):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.attn = SelfAttention(d, heads, causal=True)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class TinyGPT(nn.Module):
    def __init__(self, vocab=100, d=32, heads=4, layers=2, max_len=64, eps=1e-5):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_len, d)
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0), persistent=False)
        self.h = nn.ModuleList([GPTBlock(d, heads, eps) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d, eps=eps)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        t = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(self.position_ids[:, :t])
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------------------
# 7. ConvNeXt-style: channels-first LayerNorm (hand-written) + channels-last nn.LayerNorm
# --------------------------------------------------------------------------------------
class ChannelsFirstLayerNorm(nn.Module):
    """Exactly the ConvNeXt reference implementation (data_format="channels_first")."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight = rand_gamma(c)
        self.bias = rand_beta(c)
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) * 0.5 + 0.1)

    def forward(self, x):
        inp = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return inp + x


class TinyConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), ChannelsFirstLayerNorm(32))
        self.stage1 = ConvNeXtBlock(32)
        self.down = nn.Sequential(ChannelsFirstLayerNorm(32), nn.Conv2d(32, 64, 2, stride=2))
        self.stage2 = ConvNeXtBlock(64)
        self.head_norm = nn.LayerNorm(64, eps=1e-6)  # on [N, C] after global pooling
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.head_norm(x.mean([-2, -1])))


# --------------------------------------------------------------------------------------
# 8. GroupNorm: audio (rank 3), UNet resnet block (rank 4), video (rank 5)
# --------------------------------------------------------------------------------------
class AudioGNEncoder(nn.Module):
    """wav2vec2-like feature encoder on [N, C, T]."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv1d(1, 32, 10, stride=5, bias=False)
        self.gn0 = nn.GroupNorm(32, 32)  # wav2vec2 style: groups == channels
        self.conv1 = nn.Conv1d(32, 32, 3, stride=2, bias=False)
        self.gn1 = nn.GroupNorm(8, 32)
        self.conv2 = nn.Conv1d(32, 32, 3, stride=2)
        self.gn2 = nn.GroupNorm(1, 32)  # "LayerNorm over (C, T)"

    def forward(self, x):
        x = F.gelu(self.gn0(self.conv0(x)))
        x = F.gelu(self.gn1(self.conv1(x)))
        return F.gelu(self.gn2(self.conv2(x)))


class UNetResnetBlock(nn.Module):
    """diffusers ResnetBlock2D-like: GN(8)+SiLU+conv, time-embedding add, GN(32)+SiLU+conv, 1x1 shortcut."""

    def __init__(self, cin=32, cout=64, temb=64):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, sample, temb):
        h = self.conv1(F.silu(self.norm1(sample)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(sample) + h


class VideoGNBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv3d(16, 16, 3, padding=1)
        self.gn2 = nn.GroupNorm(8, 16)

    def forward(self, x):
        x = F.silu(self.gn1(self.conv1(x)))
        return F.silu(self.gn2(self.conv2(x)))


class WeightNormConvNet(nn.Module):
    """wav2vec2-like weight normalization: a Conv1d with nn.utils.weight_norm (dim=0) then BN1d,
    the positional convolution with parametrizations.weight_norm(dim=2) (grouped, padded, last
    frame dropped, GELU, residual) and a weight-normed Linear projection."""

    def __init__(self):
        super().__init__()
        self.conv = nn.utils.weight_norm(nn.Conv1d(4, 16, 3, padding=1), dim=0)
        self.bn = nn.BatchNorm1d(16)
        self.pos_conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 16, 8, padding=4, groups=4),
                                                              name="weight", dim=2)
        self.proj = nn.utils.parametrizations.weight_norm(nn.Linear(16, 8))

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = h + F.gelu(self.pos_conv(h)[:, :, :-1])
        return self.proj(h.transpose(1, 2))


class WeightNormPosConv(nn.Module):
    """wav2vec2's positional convolution at a size the dynamo optimizer does not constant-fold
    (weights above 8192 elements): parametrizations.weight_norm(dim=2), plus a weight_norm conv."""

    def __init__(self):
        super().__init__()
        self.pos_conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(64, 64, 16, padding=8, groups=4),
                                                              name="weight", dim=2)
        self.conv = nn.utils.weight_norm(nn.Conv1d(64, 64, 3, padding=1))

    def forward(self, x):
        return self.conv(x + F.gelu(self.pos_conv(x)[:, :, :-1]))


# --------------------------------------------------------------------------------------
# 9. InstanceNorm style-transfer network (nn.InstanceNorm2d and hand-decomposed)
# --------------------------------------------------------------------------------------
class ManualInstanceNorm2d(nn.Module):
    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.weight = rand_gamma(c)
        self.bias = rand_beta(c)
        self.eps = eps

    def forward(self, x):
        mean = x.mean((2, 3), keepdim=True)
        var = (x - mean).pow(2).mean((2, 3), keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class StyleNet(nn.Module):
    def __init__(self, manual: bool):
        super().__init__()

        def inorm(c, affine=True):
            if manual:
                return ManualInstanceNorm2d(c)
            return nn.InstanceNorm2d(c, affine=affine)

        self.enc = nn.Sequential(
            nn.ReflectionPad2d(2), nn.Conv2d(3, 16, 5), inorm(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), inorm(32), nn.ReLU(),
        )
        self.res_conv1 = nn.Conv2d(32, 32, 3, padding=1)
        self.res_in1 = inorm(32)
        self.res_conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.res_in2 = inorm(32, affine=False)  # no affine (only for nn.InstanceNorm2d)
        self.dec = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(32, 16, 3, padding=1), inorm(16), nn.ReLU(),
            nn.Conv2d(16, 3, 3, padding=1),
        )

    def forward(self, x):
        x = self.enc(x)
        x = x + self.res_in2(self.res_conv2(F.relu(self.res_in1(self.res_conv1(x)))))
        return self.dec(x)


# --------------------------------------------------------------------------------------
# 10. RMSNorm decoders: LLaMA, T5, Gemma (all hand-written, HF-style)
# --------------------------------------------------------------------------------------
class LlamaRMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = rand_gamma(d)
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class T5LayerNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = rand_gamma(d)
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class GemmaRMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.randn(d) * 0.3)  # Gemma stores (scale - 1)

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class GatedMLP(nn.Module):
    def __init__(self, d, ff, act):
        super().__init__()
        self.gate_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class ReluMLP(nn.Module):  # T5 DenseReluDense
    def __init__(self, d, ff):
        super().__init__()
        self.wi = nn.Linear(d, ff, bias=False)
        self.wo = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        return self.wo(F.relu(self.wi(x)))


class RMSDecoderLayer(nn.Module):
    def __init__(self, d, heads, ff, norm_cls, mlp, causal, rope, attn_scale):
        super().__init__()
        self.input_layernorm = norm_cls(d)
        self.self_attn = SelfAttention(d, heads, causal=causal, bias=False, rope=rope, scale=attn_scale)
        self.post_attention_layernorm = norm_cls(d)
        self.mlp = mlp

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyRMSLM(nn.Module):
    def __init__(self, kind: str, vocab=100, d=64, heads=4, ff=96, layers=2):
        super().__init__()
        self.embed_scale = None
        if kind == "llama":
            norm_cls, causal, rope, attn_scale = LlamaRMSNorm, True, True, True
            make_mlp = lambda: GatedMLP(d, ff, nn.SiLU())  # SwiGLU
        elif kind == "t5":
            norm_cls, causal, rope, attn_scale = T5LayerNorm, False, False, False
            make_mlp = lambda: ReluMLP(d, ff)
        elif kind == "gemma":
            norm_cls, causal, rope, attn_scale = GemmaRMSNorm, True, True, True
            make_mlp = lambda: GatedMLP(d, ff, nn.GELU(approximate="tanh"))  # GeGLU
            self.embed_scale = math.sqrt(d)
        else:
            raise ValueError(kind)
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            [RMSDecoderLayer(d, heads, ff, norm_cls, make_mlp(), causal, rope, attn_scale) for _ in range(layers)]
        )
        self.norm = norm_cls(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


# --------------------------------------------------------------------------------------
# Export / verification machinery
# --------------------------------------------------------------------------------------
class Spec:
    def __init__(self, name, build, inputs, exporter, opset, desc, *, input_names=("input",),
                 output_names=("output",), dynamic_axes=None, alt_inputs=None, keep_bn=False,
                 optimize=True, expect=None, half=False, functions=None):
        self.name = name
        self.build = build
        self.inputs = inputs  # callable -> tuple of example tensors
        self.exporter = exporter
        self.opset = opset
        self.desc = desc
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.dynamic_axes = dynamic_axes
        self.alt_inputs = alt_inputs  # extra inputs with other shapes, for dynamic models
        self.keep_bn = keep_bn
        self.optimize = optimize
        self.expect = expect or {}  # op_type -> exact count (sanity checks on the export)
        self.half = half
        self.functions = functions  # module classes exported as model-local functions (TS only)


@contextlib.contextmanager
def quiet():
    """Silence the exporters' progress prints and warnings."""
    buf = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf


def _dynamo_optimize_keep_bn(ir_model):
    """Same as the default dynamo post-export optimisation, minus the BatchNorm fusion rules."""
    import onnxscript.optimizer
    import onnxscript.rewriter as rewriter
    from onnxscript.rewriter import onnx_fusions

    saved = rewriter._DEFAULT_REWRITE_RULES
    rewriter._DEFAULT_REWRITE_RULES = tuple(
        r for r in saved if not (getattr(r, "name", None) or "").startswith("FuseBatchNorm")
    )
    try:
        onnxscript.optimizer.optimize_ir(ir_model)
        onnx_fusions.fuse(ir_model)
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


def export(spec: Spec, model: nn.Module, args: tuple) -> onnx.ModelProto:
    if spec.exporter == TS:
        f = io.BytesIO()
        kw = {}
        if spec.keep_bn:
            # TorchScript folds Conv/Gemm+BN in eval mode (eval peephole pass).  PRESERVE keeps the
            # module in eval mode (so BN is exported with training_mode=0 and one output) but skips
            # the eval-only peephole that fuses BN.
            kw = dict(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
        if spec.functions:
            kw["export_modules_as_functions"] = set(spec.functions)
        with quiet():
            torch.onnx.export(
                model, args, f, dynamo=False, opset_version=spec.opset,
                input_names=spec.input_names, output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes, **kw,
            )
        return onnx.load_from_string(f.getvalue())
    assert spec.exporter == DYNAMO
    with quiet():
        prog = torch.onnx.export(
            model, args, dynamo=True, opset_version=spec.opset, verbose=False,
            input_names=spec.input_names, output_names=spec.output_names,
            optimize=spec.optimize and not spec.keep_bn, external_data=False,
        )
        if spec.keep_bn:
            _dynamo_optimize_keep_bn(prog.model)
    return prog.model_proto  # in-memory proto: initializers are embedded (no external data)


def iter_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_nodes(g)


def histogram(model: onnx.ModelProto) -> collections.Counter:
    c = collections.Counter(n.op_type for n in iter_nodes(model.graph))
    for fn in model.functions:
        for n in fn.node:
            c[f"{fn.name}/{n.op_type}"] += 1
    return c


def strip_stack_traces_(model: onnx.ModelProto) -> None:
    """Drop the dynamo exporter's per-node Python stack traces: they embed absolute file paths of
    this checkout and of the virtualenv, which would make the bytes depend on where the script runs.
    The other node metadata (namespace, class hierarchy, fx node, name scopes) is kept."""
    for node in iter_nodes(model.graph):
        keep = [p for p in node.metadata_props if not p.key.endswith("stack_trace")]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def has_external_data(model: onnx.ModelProto) -> bool:
    def tensors():
        yield from model.graph.initializer
        for n in iter_nodes(model.graph):
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors())


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def run_ort(path: str, names, args) -> list:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {n: to_numpy(a) for n, a in zip(names, args)}
    return sess.run(None, feed)


def max_err(ref, got) -> float:
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    err = 0.0
    for r, g in zip(ref, got):
        r = to_numpy(r).astype(np.float64)
        g = np.asarray(g).astype(np.float64)
        assert r.shape == g.shape, (r.shape, g.shape)
        err = max(err, float(np.max(np.abs(r - g)) / (1.0 + np.max(np.abs(r)))))
    return err


def make(spec: Spec) -> dict:
    torch.manual_seed(SEED)
    model = spec.build()
    randomize_norms_(model)
    model.eval()
    if spec.half:
        model.half()
    args = spec.inputs()
    t0 = time.time()
    proto = export(spec, model, args)
    # normalise: IR version <= 10 (onnxruntime 1.31 accepts <= 13), single file, no external data
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    strip_stack_traces_(proto)
    assert not has_external_data(proto), spec.name
    path = os.path.join(HERE, spec.name)
    onnx.save(proto, path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    hist = histogram(proto)
    for op, n in spec.expect.items():
        assert hist.get(op, 0) == n, f"{spec.name}: expected {n} x {op}, got {hist.get(op, 0)}\n{hist}"
    if "BatchNormalization" in hist:
        for node in iter_nodes(proto.graph):
            if node.op_type == "BatchNormalization":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                assert attrs.get("training_mode", 0) == 0 and len(node.output) == 1, (spec.name, attrs)
    # run in onnxruntime and compare with torch
    tol = 2e-2 if spec.half else 1e-3
    with torch.no_grad():
        ref = model(*args)
    err = max_err(ref, run_ort(path, spec.input_names, args))
    assert err < tol, f"{spec.name}: onnxruntime mismatch {err}"
    for alt in spec.alt_inputs or []:
        a = alt()
        with torch.no_grad():
            r = model(*a)
        e = max_err(r, run_ort(path, spec.input_names, a))
        assert e < tol, f"{spec.name}: onnxruntime mismatch on alt shape {e}"
        err = max(err, e)
    opset = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:12]
    return dict(
        name=spec.name, size=os.path.getsize(path), opset=opset.get("ai.onnx"), ir=proto.ir_version,
        hist=hist, err=err, secs=time.time() - t0, sha=digest, desc=spec.desc, exporter=spec.exporter,
        dtype="float16" if spec.half else "float32",
        inputs=[
            f"{i.name}:{onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name}"
            f"[{','.join(d.dim_param or str(d.dim_value) for d in i.type.tensor_type.shape.dim)}]"
            for i in proto.graph.input
        ],
    )


# --------------------------------------------------------------------------------------
# Model list
# --------------------------------------------------------------------------------------
def randn(*shape, half=False):
    t = torch.randn(*shape)
    return t.half() if half else t


def ids(b, t, vocab=100):
    return torch.randint(0, vocab, (b, t), dtype=torch.int64)


def bert_inputs(b=2, t=16):
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[1, t - 4:] = 0
    return ids(b, t), mask


def specs() -> list[Spec]:
    S = []
    # 1. CNN + BN -------------------------------------------------------------------
    img = lambda: (randn(1, 3, 16, 16),)
    S += [
        Spec("cnn_bn_ts_op13.onnx", SmallCNN, img, TS, 13,
             "Conv2d+BN2d+ReLU x5 (bias=False, bias=True, grouped g=4, depthwise g=32 w/ BN eps=1e-3 momentum=0.01, 1x1), GAP, Linear",
             keep_bn=True, expect={"BatchNormalization": 5}),
        Spec("cnn_bn_dynamo_op18.onnx", SmallCNN, img, DYNAMO, 18,
             "same CNN; dynamo export, default optimizer minus its FuseBatchNorm* rules (BN kept)",
             keep_bn=True, expect={"BatchNormalization": 5}),
        Spec("cnn_bn_dynamo_default_op18.onnx", SmallCNN, img, DYNAMO, 18,
             "same CNN; plain dynamo export (default optimize=True folds every BN into Conv) - negative case",
             expect={"BatchNormalization": 0}),
        Spec("cnn_bn_dynamo_noopt_op18.onnx", SmallCNN, img, DYNAMO, 18,
             "same CNN; dynamo export with optimize=False (no constant folding: a bias-free Conv's bias is "
             "Expand(CastLike(0, x), Expand(Shape(W), [1])))", optimize=False, expect={"BatchNormalization": 5}),
        Spec("conv1d_bn_ts_op13.onnx", SmallCNN1d, lambda: (randn(2, 8, 32),), TS, 13,
             "Conv1d+BN1d x4 (bias=False, grouped g=2, depthwise, BN affine=False), mean over T, Linear",
             keep_bn=True, expect={"BatchNormalization": 4}),
        Spec("conv1d_bn_dynamo_op18.onnx", SmallCNN1d, lambda: (randn(2, 8, 32),), DYNAMO, 18,
             "same Conv1d model, dynamo (BN kept)", keep_bn=True, expect={"BatchNormalization": 4}),
        Spec("conv3d_bn_ts_op14.onnx", SmallCNN3d, lambda: (randn(1, 2, 4, 8, 8),), TS, 14,
             "Conv3d+BN3d x2 (bias=False; grouped g=2 stride 2), mean, Linear",
             keep_bn=True, expect={"BatchNormalization": 2}),
        Spec("conv3d_bn_dynamo_op18.onnx", SmallCNN3d, lambda: (randn(1, 2, 4, 8, 8),), DYNAMO, 18,
             "same Conv3d model, dynamo (BN kept)", keep_bn=True, expect={"BatchNormalization": 2}),
    ]
    # 2. MLP Linear + BN1d ------------------------------------------------------------
    S += [
        Spec("mlp_linear_bn1d_ts_op13.onnx", MLPBN, lambda: (randn(4, 16),), TS, 13,
             "Linear(16,32)+BN1d, Linear(32,32,bias=False)+BN1d(eps=1e-3), Linear on [N,F]",
             keep_bn=True, expect={"BatchNormalization": 2}),
        Spec("mlp_linear_bn1d_dynamo_op18.onnx", MLPBN, lambda: (randn(4, 16),), DYNAMO, 18,
             "same MLP, dynamo (BN kept)", keep_bn=True, expect={"BatchNormalization": 2}),
    ]
    # 3. ConvTranspose + BN -------------------------------------------------------------
    S += [
        Spec("deconv_bn_ts_op15.onnx", DeconvBN, lambda: (randn(1, 4, 8, 8),), TS, 15,
             "ConvTranspose2d+BN2d: 4->8 g=1; 8->12 g=2 bias=False; 12->4 g=2",
             keep_bn=True, expect={"BatchNormalization": 3, "ConvTranspose": 3}),
        Spec("deconv_bn_dynamo_op18.onnx", DeconvBN, lambda: (randn(1, 4, 8, 8),), DYNAMO, 18,
             "same deconv model, dynamo (BN kept)", keep_bn=True, expect={"BatchNormalization": 3}),
    ]
    # 4. Transformer encoder with nn.LayerNorm ------------------------------------------------
    seq = lambda b=2, t=16: (randn(b, t, 32),)
    S += [
        Spec("transformer_ln_ts_op13.onnx", TransformerEncoder, seq, TS, 13,
             "pre-LN encoder d=32 h=4 2 layers + final LN; float input", expect={"LayerNormalization": 0}),
        Spec("transformer_ln_ts_op14_dynamic.onnx", TransformerEncoder, seq, TS, 14,
             "same encoder, dynamic batch & seq axes",
             dynamic_axes={"input": {0: "batch", 1: "seq"}, "output": {0: "batch", 1: "seq"}},
             alt_inputs=[lambda: seq(3, 7)], expect={"LayerNormalization": 0}),
        Spec("transformer_ln_tokens_ts_op16.onnx", lambda: TransformerEncoder(vocab=100), lambda: (ids(2, 16),),
             TS, 16, "same encoder with nn.Embedding(100, 32) + learned positions; int64 token ids",
             input_names=("input_ids",), expect={"LayerNormalization": 0}),
        Spec("transformer_ln_ts_op17.onnx", TransformerEncoder, seq, TS, 17,
             "same encoder at opset 17 (LayerNormalization op)", expect={"LayerNormalization": 5}),
        Spec("transformer_ln_dynamo_op18.onnx", TransformerEncoder, seq, DYNAMO, 18,
             "same encoder, dynamo", expect={"LayerNormalization": 5}),
        Spec("transformer_handln_dynamo_op18.onnx", lambda: TransformerEncoder(norm_cls=HandLayerNorm), seq,
             DYNAMO, 18, "same encoder, LayerNorm written by hand (mean/sub/pow/mean/add/sqrt/div/mul/add), dynamo",
             expect={"LayerNormalization": 0}),
        Spec("transformer_varmean_dynamo_op18.onnx", lambda: TransformerEncoder(norm_cls=VarLayerNorm), seq,
             DYNAMO, 18, "same encoder, LayerNorm via torch.var_mean(correction=0), dynamo",
             expect={"LayerNormalization": 0}),
        Spec("transformer_varmean_dynamo_noopt_op18.onnx", lambda: TransformerEncoder(norm_cls=VarLayerNorm), seq,
             DYNAMO, 18, "same, dynamo `optimize=False`", optimize=False, expect={"LayerNormalization": 0}),
        Spec("transformer_var_nokeep_dynamo_op18.onnx",
             lambda: TransformerEncoder(norm_cls=lambda d: VarLayerNorm(d, "var_nokeep")), seq, DYNAMO, 18,
             "same encoder, LayerNorm via torch.var(unbiased=False) and mean without keepdim, unsqueezed; dynamo",
             expect={"LayerNormalization": 0}),
        Spec("transformer_var_bessel_dynamo_op18.onnx",
             lambda: TransformerEncoder(norm_cls=lambda d: VarLayerNorm(d, "bessel")), seq, DYNAMO, 18,
             "same encoder, normalized by torch.var's unbiased (Bessel, correction=1) variance: not a LayerNorm; "
             "dynamo", expect={"LayerNormalization": 0}),
    ]
    S += [
        Spec("transformer_ln_modfuncs_ts_op15.onnx", ModuleFunctionsBlock, lambda: (randn(2, 8, 32),), TS, 15,
             "Conv1d+BN1d, hand-written LN, Linear, 2 x nn.LayerNorm; TS export_modules_as_functions "
             "(HandLayerNorm, nn.LayerNorm, nn.BatchNorm1d): each module a model-local function whose body "
             "takes the parameters as inputs", keep_bn=True,
             functions=(HandLayerNorm, nn.LayerNorm, nn.BatchNorm1d),
             expect={"HandLayerNorm/ReduceMean": 2, "LayerNorm/ReduceMean": 2,
                     "BatchNorm1d/BatchNormalization": 1}),
    ]
    # 5. BERT-like and GPT-like ------------------------------------------------------------
    S += [
        Spec("bert_ln_eps1e-12_ts_op14.onnx", TinyBert, bert_inputs, TS, 14,
             "BERT-like: word+pos+type embeddings + LN, 2 post-LN layers (GELU erf), pooler; LN eps=1e-12",
             input_names=("input_ids", "attention_mask"), output_names=("last_hidden_state", "pooler_output"),
             expect={"LayerNormalization": 0}),
        Spec("gpt_decoder_causal_ts_op14.onnx", TinyGPT, lambda: (ids(2, 16),), TS, 14,
             "GPT-2-like causal decoder, pre-LN, GELU tanh, ln_f, lm_head (vocab 100)",
             input_names=("input_ids",), output_names=("logits",), expect={"LayerNormalization": 0}),
    ]
    # 6. fp16 ---------------------------------------------------------------------------------
    S += [
        Spec("transformer_ln_fp16_ts_op14.onnx", TransformerEncoder, lambda: (randn(2, 16, 32, half=True),), TS, 14,
             "encoder from 4 in half precision", half=True),
        Spec("transformer_ln_fp32cast_fp16_ts_op14.onnx", lambda: TransformerEncoder(norm_cls=FP32LayerNorm),
             lambda: (randn(2, 16, 32, half=True),), TS, 14,
             "fp16 encoder whose LayerNorms run in fp32: F.layer_norm(x.float(), w.float(), b.float()).half()",
             half=True),
    ]
    # 7. ConvNeXt ------------------------------------------------------------------------------
    S += [
        Spec("convnext_ln_ts_op14.onnx", TinyConvNeXt, lambda: (randn(1, 3, 32, 32),), TS, 14,
             "ConvNeXt: stem conv+channels-first LN (hand-written), block (dw7x7, permute, nn.LayerNorm, MLP, "
             "layer-scale), down (cf-LN + conv), block, GAP + nn.LayerNorm on [N,C] + Linear"),
        Spec("convnext_ln_dynamo_op18.onnx", TinyConvNeXt, lambda: (randn(1, 3, 32, 32),), DYNAMO, 18,
             "same ConvNeXt, dynamo", expect={"LayerNormalization": 3}),
    ]
    # 8. GroupNorm -----------------------------------------------------------------------------
    unet_in = lambda half=False: (randn(1, 32, 16, 16, half=half), randn(1, 64, half=half))
    unet_names = dict(input_names=("sample", "temb"))
    S += [
        Spec("audio_gn_ts_op13.onnx", AudioGNEncoder, lambda: (randn(2, 1, 400),), TS, 13,
             "Conv1d encoder on [N,C,T]: GN(32,32), GN(8,32), GN(1,32), GELU", expect={"InstanceNormalization": 3}),
        Spec("audio_gn_dynamo_op18.onnx", AudioGNEncoder, lambda: (randn(2, 1, 400),), DYNAMO, 18,
             "same encoder, dynamo opset 18 (the optimizer drops GN(32,32)'s reshape back: Reshape -> "
             "InstanceNormalization -> Mul -> Add)", expect={"InstanceNormalization": 3}),
        Spec("unet_resblock_gn_ts_op14.onnx", UNetResnetBlock, unet_in, TS, 14,
             "UNet ResnetBlock2D: GN(8,32,eps=1e-6)+SiLU+conv, +temb proj, GN(32,64,eps=1e-6)+SiLU+conv, 1x1 skip",
             **unet_names, expect={"InstanceNormalization": 2}),
        Spec("unet_resblock_gn_ts_op17.onnx", UNetResnetBlock, unet_in, TS, 17,
             "same UNet block at opset 17", **unet_names, expect={"InstanceNormalization": 2}),
        Spec("video_gn_ts_op17.onnx", VideoGNBlock, lambda: (randn(1, 3, 4, 8, 8),), TS, 17,
             "rank-5: Conv3d+GN(4,16)+SiLU, Conv3d+GN(8,16)+SiLU", expect={"InstanceNormalization": 2}),
        Spec("unet_resblock_gn_dynamo_op18.onnx", UNetResnetBlock, unet_in, DYNAMO, 18,
             "same UNet block, dynamo opset 18", **unet_names),
        Spec("unet_resblock_gn_dynamo_op21.onnx", UNetResnetBlock, unet_in, DYNAMO, 21,
             "same UNet block, dynamo opset 21", **unet_names, expect={"GroupNormalization": 2}),
        Spec("unet_resblock_gn_fp16_ts_op14.onnx", UNetResnetBlock, lambda: unet_in(True), TS, 14,
             "same UNet block in fp16", **unet_names, half=True),
    ]
    # 8b. Weight normalization (left in the graph without constant folding) -------------------------
    wn_in = lambda: (randn(2, 4, 32),)
    S += [
        Spec("wav2vec_weightnorm_ts_op14.onnx", WeightNormConvNet, wn_in, TS, 14,
             "weight_norm Conv1d(dim=0)+BN1d, positional conv parametrizations.weight_norm(dim=2), weight-normed "
             "Linear; TS (PRESERVE, no const-fold)", keep_bn=True, expect={"ReduceL2": 3, "BatchNormalization": 1}),
        Spec("wav2vec_weightnorm_dynamo_noopt_op18.onnx", WeightNormConvNet, wn_in, DYNAMO, 18,
             "same net, dynamo optimize=False (ReduceL2 axes as Reshape(Constant, Constant); BN(affine) kept)",
             optimize=False, expect={"ReduceL2": 3, "BatchNormalization": 1}),
        Spec("wav2vec_posconv_weightnorm_dynamo_op18.onnx", WeightNormPosConv, lambda: (randn(2, 64, 20),), DYNAMO, 18,
             "wav2vec2 positional conv (64->64, k16, groups 4, weight_norm dim=2) and a weight_norm Conv1d 64->64; "
             "dynamo default optimize: weights above 8192 elements are not constant-folded", expect={"ReduceL2": 2}),
        Spec("conv1d_bn_dynamo_noopt_op18.onnx", SmallCNN1d, lambda: (randn(2, 8, 32),), DYNAMO, 18,
             "Conv1d+BN1d model, dynamo optimize=False (BN(affine=False) scale/bias as "
             "Expand(CastLike(1, y), Shape(y)[1:2]))", optimize=False, expect={"BatchNormalization": 4}),
    ]
    # 9. InstanceNorm ------------------------------------------------------------------------------
    style_in = lambda: (randn(1, 3, 32, 32),)
    S += [
        Spec("style_instnorm_ts_op14.onnx", lambda: StyleNet(manual=False), style_in, TS, 14,
             "style-transfer net: nn.InstanceNorm2d(affine=True) x4 + one affine=False",
             expect={"InstanceNormalization": 5}),
        Spec("style_instnorm_dynamo_op18.onnx", lambda: StyleNet(manual=False), style_in, DYNAMO, 18,
             "same nn.InstanceNorm2d net, dynamo", expect={"InstanceNormalization": 5}),
        Spec("style_instnorm_manual_ts_op14.onnx", lambda: StyleNet(manual=True), style_in, TS, 14,
             "same net, instance norm hand-written (mean/var over (2,3), per-channel affine) x5",
             expect={"InstanceNormalization": 0}),
        Spec("style_instnorm_manual_dynamo_op18.onnx", lambda: StyleNet(manual=True), style_in, DYNAMO, 18,
             "hand-written instance norm net, dynamo", expect={"InstanceNormalization": 0}),
    ]
    # 10. RMSNorm -----------------------------------------------------------------------------------
    tok = lambda: (ids(2, 16),)
    lm = dict(input_names=("input_ids",), output_names=("logits",))
    S += [
        Spec("llama_rms_ts_op14.onnx", lambda: TinyRMSLM("llama"), tok, TS, 14,
             "LLaMA-like: HF LlamaRMSNorm (fp32 cast), RoPE, causal attn, SwiGLU; d=64, 2 layers, vocab 100", **lm),
        Spec("llama_rms_ts_op17.onnx", lambda: TinyRMSLM("llama"), tok, TS, 17, "same LLaMA at opset 17", **lm),
        Spec("llama_rms_dynamo_op18.onnx", lambda: TinyRMSLM("llama"), tok, DYNAMO, 18, "same LLaMA, dynamo", **lm),
        Spec("llama_rms_dynamo_op23.onnx", lambda: TinyRMSLM("llama"), tok, DYNAMO, 23,
             "same LLaMA, dynamo opset 23 (onnxscript fuses RMSNormalization)", **lm),
        Spec("llama_rms_fp16_ts_op14.onnx", lambda: TinyRMSLM("llama"), tok, TS, 14, "same LLaMA in fp16", half=True,
             **lm),
        Spec("llama_rms_fp16_dynamo_op18.onnx", lambda: TinyRMSLM("llama"), tok, DYNAMO, 18,
             "same LLaMA in fp16, dynamo", half=True, **lm),
        Spec("t5_rms_ts_op14.onnx", lambda: TinyRMSLM("t5"), tok, TS, 14,
             "T5-like encoder: T5LayerNorm, unscaled non-causal attention, ReLU FF; d=64, 2 layers", **lm),
        Spec("t5_rms_fp16_ts_op14.onnx", lambda: TinyRMSLM("t5"), tok, TS, 14,
             "same T5 in fp16 (T5LayerNorm casts x to fp32 twice: for the variance and for x * rsqrt)",
             half=True, **lm),
        Spec("gemma_rms_ts_op14.onnx", lambda: TinyRMSLM("gemma"), tok, TS, 14,
             "Gemma-like: GemmaRMSNorm (x.float(), *(1+w), type_as), sqrt(d) embed scale, RoPE, GeGLU", **lm),
        Spec("gemma_rms_dynamo_op18.onnx", lambda: TinyRMSLM("gemma"), tok, DYNAMO, 18, "same Gemma, dynamo", **lm),
    ]
    return S


def main(argv=None):
    if os.environ.get("PYTHONHASHSEED") != "0" and argv is None:
        # TorchScript's export_modules_as_functions keeps the module type names in a set of
        # strings: with Python's per-process string hashing, the order of the functions and the
        # numbers in their node names would change from run to run.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="substring filter on file names")
    ap.add_argument("--markdown", action="store_true", help="print the op-histogram table as markdown")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    t0 = time.time()
    rows = []
    for spec in specs():
        if a.only and a.only not in spec.name:
            continue
        r = make(spec)
        rows.append(r)
        print(f"{r['name']:48s} {r['size'] / 1024:7.1f} KiB  opset {r['opset']:>2}  ir {r['ir']}  "
              f"{r['exporter']:11s} {r['dtype']:7s} err {r['err']:.1e}  {r['secs']:4.1f}s  sha {r['sha']}")
        print("    " + ", ".join(f"{k}:{v}" for k, v in sorted(r["hist"].items())))
    print(f"{len(rows)} models in {time.time() - t0:.1f}s")
    if a.markdown:
        print()
        print("| file | inputs | op histogram |")
        print("|---|---|---|")
        for r in rows:
            h = ", ".join(f"{k} {v}" for k, v in sorted(r["hist"].items(), key=lambda kv: (-kv[1], kv[0])))
            print(f"| `{r['name']}` | {'; '.join(r['inputs'])} | {h} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End to end over the committed real exports in models/: fold, verify, count, re-run."""
from pathlib import Path

import pytest

from helpers import op_counts
from normopt import model_io
from normopt.fold import FoldOptions, optimize

MODELS = Path(__file__).resolve().parent.parent / "models"
NORM_OPS = ("BatchNormalization", "GroupNormalization", "InstanceNormalization", "LayerNormalization",
            "RMSNormalization", "ReduceL2")

# Normalization ops expected after `normopt fold` (ops not listed: 0).
EXPECTED = {
    "cnn_bn_ts_op13.onnx": {},
    "cnn_bn_dynamo_op18.onnx": {},
    "cnn_bn_dynamo_default_op18.onnx": {},
    "cnn_bn_dynamo_noopt_op18.onnx": {},
    "conv1d_bn_ts_op13.onnx": {},
    "conv1d_bn_dynamo_op18.onnx": {},
    "conv3d_bn_ts_op14.onnx": {},
    "conv3d_bn_dynamo_op18.onnx": {},
    "mlp_linear_bn1d_ts_op13.onnx": {},
    "mlp_linear_bn1d_dynamo_op18.onnx": {},
    "deconv_bn_ts_op15.onnx": {},
    "deconv_bn_dynamo_op18.onnx": {},
    "transformer_ln_ts_op13.onnx": {"LayerNormalization": 5},
    "transformer_ln_ts_op14_dynamic.onnx": {"LayerNormalization": 5},
    "transformer_ln_tokens_ts_op16.onnx": {"LayerNormalization": 5},
    "transformer_ln_ts_op17.onnx": {"LayerNormalization": 5},
    "transformer_ln_dynamo_op18.onnx": {"LayerNormalization": 5},
    "transformer_handln_dynamo_op18.onnx": {"LayerNormalization": 5},
    "transformer_varmean_dynamo_op18.onnx": {"LayerNormalization": 5},
    "transformer_varmean_dynamo_noopt_op18.onnx": {"LayerNormalization": 5},
    "transformer_var_nokeep_dynamo_op18.onnx": {"LayerNormalization": 5},
    # torch.var's default unbiased variance (correction=1) is not a LayerNorm: left decomposed.
    "transformer_var_bessel_dynamo_op18.onnx": {},
    # Keras through tf2onnx: the moments' means as GlobalAveragePool (make_keras_models.py).
    "keras_ln_tf2onnx_op13.onnx": {"LayerNormalization": 2},
    # NHWC: tf2onnx moves the Conv's NCHW transposes through both LayerNorms; the one over C is
    # then over axis 1 of NCHW (fused between Transposes that move it last and back) and the one
    # over (H, W, C) scales Transpose(x) (fused on that tensor, the Transpose kept).
    "keras_ln_nhwc_tf2onnx_op18.onnx": {"LayerNormalization": 2},
    # Keras GroupNormalization on tf2onnx's Transpose(conv) to NHWC; the G == C one (8 groups of
    # 8 channels) is an InstanceNormalization.
    "keras_gn_nhwc_tf2onnx_op18.onnx": {"GroupNormalization": 1, "InstanceNormalization": 1},
    "keras_gn_conv1d_tf2onnx_op13.onnx": {"GroupNormalization": 1},
    # Keras BatchNormalization constant-folded by tf2onnx to x * a + b: folded into the producer,
    # except after a ReLU (no BatchNormalization node either way).
    "keras_bn_tf2onnx_op13.onnx": {},
    "keras_bn_seq_tf2onnx_op13.onnx": {},
    # The norms are inside model-local functions (main-graph counts stay 0): their bodies are
    # checked in test_functions.py.
    "transformer_ln_modfuncs_ts_op15.onnx": {},
    "bert_ln_eps1e-12_ts_op14.onnx": {"LayerNormalization": 5},
    "gpt_decoder_causal_ts_op14.onnx": {"LayerNormalization": 5},
    "transformer_ln_fp16_ts_op14.onnx": {"LayerNormalization": 5},
    "transformer_ln_fp32cast_fp16_ts_op14.onnx": {"LayerNormalization": 5},
    # The two channels-first layer norms (over axis 1 of NCHW) stay decomposed.
    "convnext_ln_ts_op14.onnx": {"LayerNormalization": 3},
    "convnext_ln_dynamo_op18.onnx": {"LayerNormalization": 3},
    # GroupNorm(32, 32) has one channel per group: it is an InstanceNormalization.
    "audio_gn_ts_op13.onnx": {"GroupNormalization": 2, "InstanceNormalization": 1},
    # dynamo's optimizer dropped GN(32, 32)'s reshape back: still an InstanceNormalization.
    "audio_gn_dynamo_op18.onnx": {"GroupNormalization": 2, "InstanceNormalization": 1},
    # Weight norm folded to constant weights (no ReduceL2 left), then the BN folded into them.
    "wav2vec_weightnorm_ts_op14.onnx": {},
    "wav2vec_weightnorm_dynamo_noopt_op18.onnx": {},
    "wav2vec_posconv_weightnorm_dynamo_op18.onnx": {},
    # Affine-free BN whose ones/zeros are computed from the Conv output's shape.
    "conv1d_bn_dynamo_noopt_op18.onnx": {},
    "unet_resblock_gn_ts_op14.onnx": {"GroupNormalization": 2},
    "unet_resblock_gn_ts_op17.onnx": {"GroupNormalization": 2},
    "video_gn_ts_op17.onnx": {"GroupNormalization": 2},
    "unet_resblock_gn_dynamo_op18.onnx": {"GroupNormalization": 2},
    "unet_resblock_gn_dynamo_op21.onnx": {"GroupNormalization": 2},
    "unet_resblock_gn_fp16_ts_op14.onnx": {"GroupNormalization": 2},
    "style_instnorm_ts_op14.onnx": {"InstanceNormalization": 5},
    "style_instnorm_dynamo_op18.onnx": {"InstanceNormalization": 5},
    "style_instnorm_manual_ts_op14.onnx": {"InstanceNormalization": 5},
    "style_instnorm_manual_dynamo_op18.onnx": {"InstanceNormalization": 5},
    "llama_rms_ts_op14.onnx": {"RMSNormalization": 5},
    "llama_rms_ts_op17.onnx": {"RMSNormalization": 5},
    "llama_rms_dynamo_op18.onnx": {"RMSNormalization": 5},
    "llama_rms_dynamo_op23.onnx": {"RMSNormalization": 5},
    "llama_rms_fp16_ts_op14.onnx": {"RMSNormalization": 5},
    "llama_rms_fp16_dynamo_op18.onnx": {"RMSNormalization": 5},
    "t5_rms_ts_op14.onnx": {"RMSNormalization": 5},
    "t5_rms_fp16_ts_op14.onnx": {"RMSNormalization": 5},
    "gemma_rms_ts_op14.onnx": {"RMSNormalization": 5},
    "gemma_rms_dynamo_op18.onnx": {"RMSNormalization": 5},
}


def test_models_every_committed_export_has_an_expectation():
    assert sorted(p.name for p in MODELS.glob("*.onnx")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_models_fold_verifies_and_reaches_expected_ops(name):
    path = MODELS / name
    source = model_io.load(path)
    result = optimize(source, FoldOptions(provider="cpu"), source=path)
    assert result.verified, result.verification.failures
    assert not result.rollbacks
    counts = op_counts(result.model)
    assert {op: counts.get(op, 0) for op in NORM_OPS} == {op: EXPECTED[name].get(op, 0) for op in NORM_OPS}
    assert not [s for s in result.pipeline.skipped if s.reason.startswith("not analysed")]
    assert [i.name for i in result.model.graph.input] == [i.name for i in source.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in source.graph.output]
    model_io.check(result.model, full=model_io.passes_full_check(source))
    recorded = {label for rw in result.pipeline.applied for label in rw.removed}
    recorded |= {s.node for s in result.pipeline.skipped}
    assert [label for label in _must_have_records(source) if label not in recorded] == []
    # Each mean still subtracted from its own input after the fold has a skip record of the
    # norm passes (an LN/GN/IN/RMS-shaped site is never silently left).
    norm_skips = [s for s in result.pipeline.skipped if s.pass_name.startswith("fuse-")]
    assert len(_centring_means(result.model.graph)) <= len(norm_skips)
    # A second run changes nothing, byte for byte.
    again = optimize(result.model, FoldOptions(verify=False))
    assert not again.pipeline.applied and not again.pipeline.upgrades
    assert model_io.serialize(again.model) == model_io.serialize(result.model)


def _centring_means(graph) -> set[str]:
    """Inputs of the mean nodes (ReduceMean, GlobalAveragePool) whose result, directly or through
    a Reshape / Unsqueeze / Expand / Identity, is subtracted from that input: one per
    normalization (torch.var_mean's second mean of the same input is the same site)."""
    consumers = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    found = set()
    for n in graph.node:
        if n.op_type not in ("ReduceMean", "GlobalAveragePool"):
            continue
        frontier = [n.output[0]]
        for _ in range(4):
            users = [u for t in frontier for u in consumers.get(t, [])]
            if any(u.op_type == "Sub" and u.input[0] == n.input[0] and u.input[1] in frontier for u in users):
                found.add(n.input[0])
                break
            frontier = [u.output[0] for u in users if u.op_type in ("Reshape", "Unsqueeze", "Expand", "Identity")]
    return found


def _must_have_records(model) -> list[str]:
    """Sites that must end applied or skipped with a reason: each BatchNormalization, each
    InstanceNormalization between Reshapes, each ReduceL2 of a constant (main graph)."""
    graph = model.graph
    producers = {out: n for n in graph.node for out in n.output}
    consumers = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    constants = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}

    def label(n):
        return n.name or f"{n.op_type}({n.output[0]})"

    def skip_cast(name, down):
        node = None
        if down:
            users = consumers.get(name, [])
            node = users[0] if len(users) == 1 else None
        else:
            node = producers.get(name)
        if node is not None and node.op_type == "Cast":
            return skip_cast(node.output[0] if down else node.input[0], down)
        return node

    sites = []
    for n in graph.node:
        if n.op_type == "BatchNormalization":
            sites.append(label(n))
        elif n.op_type == "ReduceL2" and n.input[0] in constants:
            sites.append(label(n))
        elif n.op_type == "InstanceNormalization":
            up, down = skip_cast(n.input[0], False), skip_cast(n.output[0], True)
            if up is not None and down is not None and up.op_type == down.op_type == "Reshape":
                sites.append(label(n))
    return sites

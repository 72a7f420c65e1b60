"""Property proof of rewrites in context: norms inside If / Loop / Scan bodies nested up to three
deep (a rewrite at every level), and several norms of different kinds in one graph (chained,
or reading the same tensor), all passes run together."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from helpers import assert_equivalent, make_model, op_counts, run_pipeline
from propgen import over_two, F32, INPUT_SETS, PROFILE, SLOW, SLOW_NEAR_MISS, NEAR_MISS, Net, core, seeds, spellings

LN, RMS, GN = "LayerNormalization", "RMSNormalization", "GroupNormalization"
FUSED = {"mean": LN, "rms": RMS}
PASS_OF = {LN: "fuse-layernorm", RMS: "fuse-rmsnorm", GN: "fuse-groupnorm", "bn": "fold-batchnorm"}
FORMS = settings(PROFILE, max_examples=12)


def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def prove_pipeline(model, expected_ops, applied: dict, seed: int, spec, names=None):
    """Every norm rewritten (``applied``: pass -> count, no skip), exact op counts (subgraphs
    included), equivalent to the original in onnxruntime, valid under the full checker, a fixed
    point of a second run, the same bytes twice."""
    out, res = run_pipeline(model, names)
    assert [(r.name, s.reason) for r in res.passes for s in r.skipped] == [], spec
    assert {r.name: len(r.applied) for r in res.passes if r.applied} == applied, spec
    assert op_counts(out) == expected_ops, (spec, op_counts(out))
    onnx.checker.check_model(out, full_check=True)
    assert_equivalent(model, out, seed=seed, input_sets=INPUT_SETS)
    again, res2 = run_pipeline(out, names)
    assert not res2.applied and not [s for r in res2.passes for s in r.skipped], spec
    assert again.graph == out.graph, spec
    twin, _ = run_pipeline(model, names)
    assert _bytes(twin) == _bytes(out), spec
    return out, res


def _after_upgrade(expected: Counter, opset: int, fused) -> None:
    """A fused RMSNormalization or GroupNormalization raises the model to opset 23 or 21: a
    ReduceMean left in the graph (a near miss) then takes its axes as an input, a Constant node
    each (ReduceMean-18)."""
    if opset < 18 and (fused.get(RMS) or fused.get(GN)):
        expected["Constant"] += expected.get("ReduceMean", 0)


def _count(counts: Counter, nodes) -> None:
    for n in nodes:
        counts[n.op_type] += 1


# ------------------------------------------------------------------------------ subgraph bodies

@st.composite
def nested_cases(draw, miss: bool = False):
    """A norm (LayerNorm or RMSNorm, any spelling) at every level: main graph, then 1-3 levels of
    If (then branch) / Loop body / Scan body, each reading the level above's normalized tensor.
    ``miss``: the deepest norm takes Pow 4 instead (epsilon 0.1: a well-conditioned near miss,
    so that rounding differences above it stay small below it) (left alone there, with its reason)."""
    seed = draw(seeds())
    rng = np.random.default_rng(seed)
    depth = draw(st.integers(1, 3))
    opset = draw(st.sampled_from([17, 18, 23]))
    d = draw(st.integers(2, 6))
    shape = [2, 3, d]
    holders = []
    for _ in range(depth):
        kinds = ["If", "Loop"] + (["Scan"] if len(shape) - sum(h == "Scan" for h in holders) > 1 else [])
        holders.append(draw(st.sampled_from(kinds)))
    norms = [draw(st.sampled_from(["mean", "rms"])) for _ in range(depth + 1)]
    spellings_drawn = [draw(spellings(k)) for k in norms]
    constants = draw(st.sampled_from(["initializer", "node"]))
    removed = Counter()   # op counts of what the rewrites take away
    fused = Counter()

    def level(k: int, x: str, x_shape: list) -> tuple[list, dict, str]:
        net = Net(opset, F32, constants)
        net.count = 1000 * (k + 1)
        start = len(net.nodes)
        last = k == depth and miss
        kind = "mean" if last else norms[k]
        sp = spellings_drawn[k]
        if last:
            sp = replace(sp, square="pow", fn_body=False, eps=0.1)
        t = core(net, x, [-1], sp, kind, F32, miss="exponent" if last else None, miss_value=4.0)
        if draw(st.booleans()):
            t = net.op("Mul", t, net.const(rng.uniform(0.5, 1.5, x_shape[-1])))
        if not last:
            _count(removed, net.nodes[start:])
            fused[FUSED[kind]] += 1
        if k == depth:
            return net.nodes, net.inits, t
        holder, p = holders[k], f"L{k}_"
        vi = helper.make_tensor_value_info
        if holder == "If":
            nodes, inits, out = level(k + 1, t, x_shape)
            nodes.append(helper.make_node("Identity", [out], [f"{p}then_out"]))
            then = helper.make_graph(nodes, f"{p}then", [], [vi(f"{p}then_out", F32, x_shape)], list(
                onnx.numpy_helper.from_array(v, n) for n, v in inits.items()))
            other = helper.make_graph([helper.make_node("Identity", [t], [f"{p}else_out"])], f"{p}else", [],
                                      [vi(f"{p}else_out", F32, x_shape)])
            net.nodes.append(helper.make_node("If", ["cond"], [f"{p}out"], then_branch=then, else_branch=other))
        elif holder == "Loop":
            nodes, inits, out = level(k + 1, f"{p}h", x_shape)
            nodes += [helper.make_node("Identity", [f"{p}c"], [f"{p}c_out"]),
                      helper.make_node("Identity", [out], [f"{p}h_out"])]
            body = helper.make_graph(nodes, f"{p}body", [vi(f"{p}i", TensorProto.INT64, []),
                                                          vi(f"{p}c", TensorProto.BOOL, []), vi(f"{p}h", F32, x_shape)],
                                     [vi(f"{p}c_out", TensorProto.BOOL, []), vi(f"{p}h_out", F32, x_shape)],
                                     list(onnx.numpy_helper.from_array(v, n) for n, v in inits.items()))
            net.nodes.append(helper.make_node("Loop", ["trips", "", t], [f"{p}out"], body=body))
        else:
            row = x_shape[1:]
            nodes, inits, out = level(k + 1, f"{p}row", row)
            nodes.append(helper.make_node("Identity", [out], [f"{p}row_out"]))
            body = helper.make_graph(nodes, f"{p}body", [vi(f"{p}row", F32, row)], [vi(f"{p}row_out", F32, row)],
                                     list(onnx.numpy_helper.from_array(v, n) for n, v in inits.items()))
            net.nodes.append(helper.make_node("Scan", [t], [f"{p}out"], body=body, num_scan_inputs=1))
        return net.nodes, net.inits, f"{p}out"

    nodes, inits, out = level(0, "x", shape)
    nodes.append(helper.make_node("Identity", [out], ["y"]))
    inits.update(cond=np.array(True), trips=np.array(2, np.int64))
    model = make_model(nodes, [("x", F32, shape)], [("y", F32, shape)], inits, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    expected = Counter(op_counts(model))
    expected.update(fused)
    expected.subtract(removed)
    _after_upgrade(expected, opset, fused)
    spec = dict(seed=seed, depth=depth, holders=holders, norms=norms, opset=opset, d=d, constants=constants,
                spellings=spellings_drawn, miss=miss)
    return model, {k: v for k, v in expected.items() if v}, dict(fused), seed, spec


@FORMS
@given(nested_cases())
def test_norms_in_nested_subgraphs_fuse_at_every_level_and_match_onnxruntime(case):
    model, expected, fused, seed, spec = case
    applied = {PASS_OF[op]: n for op, n in fused.items()}
    _, res = prove_pipeline(model, expected, applied, seed, spec, names=["fuse-layernorm", "fuse-rmsnorm"])
    graphs = sorted(r.graph for r in res.applied)
    assert len(graphs) == spec["depth"] + 1 and graphs[0] == "" and len(set(graphs)) == len(graphs), graphs


def prove_near_miss_left(model, expected, applied: dict, seed: int, spec, names=None):
    """One norm is a near miss (Pow 4): it stays, with its reason; every other norm is rewritten
    (exact counts), and the model is checker-valid, equal in onnxruntime, a fixed point, and
    the same bytes twice."""
    out, res = run_pipeline(model, names)
    skipped = [s.reason for r in res.passes for s in r.skipped]
    assert any("Pow exponent is 4, not 2" in r for r in skipped), (spec, skipped)
    assert {r.name: len(r.applied) for r in res.passes if r.applied} == applied, spec
    assert op_counts(out) == expected, (spec, op_counts(out))
    onnx.checker.check_model(out, full_check=True)
    assert_equivalent(model, out, seed=seed, input_sets=INPUT_SETS)
    again, res2 = run_pipeline(out, names)
    assert not res2.applied and again.graph == out.graph, spec
    twin, _ = run_pipeline(model, names)
    assert _bytes(twin) == _bytes(out), spec


def _prove_deepest_left_alone(case):
    model, expected, fused, seed, spec = case
    prove_near_miss_left(model, expected, {PASS_OF[op]: n for op, n in fused.items()}, seed, spec,
                         names=["fuse-layernorm", "fuse-rmsnorm"])


@NEAR_MISS
@given(nested_cases(miss=True))
def test_near_miss_in_the_deepest_subgraph_is_left_alone_and_the_rest_fuse(case):
    _prove_deepest_left_alone(case)


# ------------------------------------------------------------------------------ several norms in one graph

@st.composite
def multi_norm_cases(draw, miss: bool = False):
    """2-4 blocks on x [N, C, H, W], each a LayerNorm or RMSNorm over W, a group norm
    (Reshape [0, G, -1], statistics, Reshape(Shape), per-channel affine) or a Conv +
    BatchNormalization; a block reads the previous block's output, or (shared) the same tensor
    as the previous block, the two outputs then added. All passes run together."""
    seed = draw(seeds())
    rng = np.random.default_rng(seed)
    c, h, w = 4, draw(st.integers(2, 3)), draw(st.integers(2, 5))
    shape = [draw(st.sampled_from([1, 2])), c, h, w]
    opset = draw(st.sampled_from([17, 18, 21, 23]))
    net = Net(opset, F32, draw(st.sampled_from(["initializer", "node"])))
    blocks = draw(st.lists(st.sampled_from(["ln", "rms", "gn", "bn"]), min_size=2, max_size=4))
    # ``miss``: one LayerNorm / RMSNorm block takes Pow 4, epsilon 0.1 (left alone, the others fuse)
    missed = draw(st.sampled_from([i for i, b in enumerate(blocks) if b in ("ln", "rms")] or [0])) if miss else None
    if miss and blocks[missed] not in ("ln", "rms"):
        blocks[missed] = "ln"
    removed, fused, applied = Counter(), Counter(), Counter()
    t, previous_in = "x", None
    links = []
    for i, block in enumerate(blocks):
        shared = i > 0 and draw(st.integers(0, 2)) == 0
        src = previous_in if shared else t
        links.append("shared" if shared else "chained")
        start = len(net.nodes)
        if block in ("ln", "rms"):
            kind = "mean" if block == "ln" else "rms"
            sp = over_two(draw(spellings(kind)), w)
            if i == missed:
                sp = replace(sp, square="pow", fn_body=False, eps=0.1)
            out = core(net, src, [-1], sp, kind, F32, miss="exponent" if i == missed else None, miss_value=4.0)
            if draw(st.booleans()):
                out = net.op("Mul", out, net.const(rng.uniform(0.5, 1.5, w)))
            if kind == "mean" and draw(st.booleans()):
                out = net.op("Add", out, net.const(rng.standard_normal(w)))
            if i != missed:
                _count(removed, net.nodes[start:])
                fused[FUSED[kind]] += 1
                applied[PASS_OF[FUSED[kind]]] += 1
        elif block == "gn":
            groups = draw(st.sampled_from([1, 2]))
            grouped = net.op("Reshape", src, net.const([0, groups, -1], "int"))
            normed = core(net, grouped, [2], draw(spellings("mean")), "mean", F32)
            out = net.op("Reshape", normed, net.op("Shape", src))
            out = net.op("Mul", out, net.const(rng.uniform(0.5, 1.5, (c, 1, 1))))
            out = net.op("Add", out, net.const(rng.standard_normal((c, 1, 1))))
            _count(removed, net.nodes[start:])
            fused[GN] += 1
            applied["fuse-groupnorm"] += 1
        else:
            conv = net.op("Conv", src, net.const(rng.standard_normal((c, c, 1, 1)) * 0.5))
            params = [net.const(rng.uniform(0.5, 1.5, c)), net.const(rng.standard_normal(c)),
                      net.const(rng.standard_normal(c)), net.const(rng.uniform(0.5, 2.0, c))]
            out = net.op("BatchNormalization", conv, *params)
            # the Conv stays, with new weights and a bias: the BatchNormalization and the
            # Constant nodes of the old weight and of the parameters go
            _count(removed, [n for n in net.nodes[start:] if n.op_type != "Conv"])
            applied["fold-batchnorm"] += 1
        if shared:
            out = net.op("Add", t, out)
        previous_in, t = src, out
    model = net.finish(t, shape, F32, shape, F32)
    expected = Counter(op_counts(model))
    expected.update(fused)
    expected.subtract(removed)
    _after_upgrade(expected, opset, fused)
    spec = dict(seed=seed, blocks=blocks, links=links, opset=opset, shape=shape, missed=missed)
    return model, {k: v for k, v in expected.items() if v}, dict(applied), seed, spec


@FORMS
@given(multi_norm_cases())
def test_several_norms_in_one_graph_all_fuse_and_the_model_matches(case):
    model, expected, applied, seed, spec = case
    prove_pipeline(model, expected, applied, seed, spec)


@NEAR_MISS
@given(multi_norm_cases(miss=True))
def test_a_near_miss_among_several_norms_is_left_alone_and_the_others_fuse(case):
    prove_near_miss_left(*case)


# ------------------------------------------------------------------------------ campaigns

@pytest.mark.slow
@SLOW
@given(nested_cases())
def test_nested_subgraphs_campaign(case):
    test_norms_in_nested_subgraphs_fuse_at_every_level_and_match_onnxruntime.hypothesis.inner_test(case)


@pytest.mark.slow
@SLOW_NEAR_MISS
@given(nested_cases(miss=True))
def test_nested_subgraphs_near_miss_campaign(case):
    _prove_deepest_left_alone(case)


@pytest.mark.slow
@SLOW
@given(multi_norm_cases())
def test_several_norms_campaign(case):
    model, expected, applied, seed, spec = case
    prove_pipeline(model, expected, applied, seed, spec)


@pytest.mark.slow
@SLOW_NEAR_MISS
@given(multi_norm_cases(miss=True))
def test_several_norms_near_miss_campaign(case):
    prove_near_miss_left(*case)

"""The matcher's shortcuts never hide a match.

``pattern.plausible`` is the cheap test passes run before shape lookups, and the matcher itself
skips alternatives and operand orders by their producers' op types. Over every tensor of every
committed model and every pattern the passes share, a tensor ``match`` explains must be
``plausible``, and the matcher must find what a plain backtracking walk (no shortcuts) finds.
"""
from pathlib import Path

import onnx_graphsurgeon as gs
import pytest

from normopt import ir, pattern
from normopt.model_io import load
from normopt.passes import _norm as N
from normopt.pattern import AnyOf, Const, Op, Var

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted((ROOT / "models").glob("*.onnx"))
PATTERNS = {"mean core": N.MEAN_CORE, "rms core": N.RMS_CORE, "tf core": N.TF_CORE}


def _plain(p, t, bound):
    """Every way ``p`` explains ``t`` as sets of bound node ids, by an unpruned walk."""
    if isinstance(p, AnyOf):
        for alt in p.alternatives:
            yield from _plain(alt, t, bound)
    elif isinstance(p, Var):
        prev = bound.get(("t", p.name))
        if prev is None or prev is t:
            yield {**bound, ("t", p.name): t}
    elif isinstance(p, Const):
        if not p.name:
            yield bound  # values are not compared here: only the structure
        elif bound.get(("t", p.name)) is None or bound.get(("t", p.name)) is t:
            yield {**bound, ("t", p.name): t}
    elif isinstance(p, Op):
        node = t.inputs[0] if t.inputs else None
        if node is None or not p.accepts(node) or node.outputs[0] is not t or len(node.inputs) < len(p.inputs):
            return
        prev = bound.get(("n", p.name)) if p.name else None
        if prev is not None and prev is not node:
            return
        start = {**bound, ("n", p.name): node} if p.name else bound
        orders = [p.inputs] + ([p.inputs[::-1]] if node.op in pattern.COMMUTATIVE and len(p.inputs) == 2 else [])
        for pats in orders:
            states = [start]
            for q, u in zip(pats, node.inputs):
                states = [s2 for s in states for s2 in _plain(q, u, s)]
            yield from states


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_prechecks_never_hide_a_match(path):
    g = ir.import_model(load(str(path)), ir.Weights(str(path.parent)))
    tensors = [o for n in g.nodes for o in n.outputs if isinstance(o, gs.Variable)]
    for name, p in PATTERNS.items():
        for t in tensors:
            structural = next(_plain(p, t, {}), None) is not None
            found = pattern.match(p, t, g, const=lambda _t: 0) is not None  # every tensor "constant"
            assert found == structural, f"{name} at '{t.name}': matcher {found}, plain walk {structural}"
            if found:
                assert pattern.plausible(p, t), f"{name} matches '{t.name}' but plausible() says no"

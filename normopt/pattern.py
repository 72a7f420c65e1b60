"""A small declarative matcher that every pass uses.

A pattern describes how a tensor was computed, walking from a tensor up to its producers:

    x = Var("x")
    mean = Op("ReduceMean", [x], name="mean")
    d = Op("Sub", [x, mean])                        # unnamed: matched by structure only
    sq = AnyOf(Op("Pow", [d, Const("two")]), Op("Mul", [d, d]))

* ``Var(name)`` binds any tensor; a second use of the same name must be the same tensor.
* ``Const(name)`` binds a tensor whose value is fixed at export time; the value lands in
  ``Match.values[name]``.
* ``Op(types, inputs, name=...)`` matches the producer of a tensor. Its inputs match a prefix
  of the node's inputs (ReduceMean's ``axes`` input may follow). Add and Mul are tried in both
  operand orders. A named Op must be the same node wherever the name appears; an unnamed
  one is matched by structure, so a duplicated ``Sub`` (old PyTorch exports) still matches.
* ``AnyOf(*alternatives)``; ``Opt(op, inner)`` is ``inner`` optionally wrapped by ``op``.

Matching is a backtracking walk over the producers of one tensor: cost is bounded by the
pattern's size, so a pass that tries every node stays linear in graph size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from normopt import graph as G, ir, tensors as T

COMMUTATIVE = frozenset({"Add", "Mul"})


class Pattern:
    """Base class of pattern elements."""

    # The producer op types a tensor must have for this element to match it; None: any tensor
    # (a Var, a Const), even one without a producer.
    _first = None


@dataclass(frozen=True, eq=False)
class Var(Pattern):
    name: str


@dataclass(frozen=True, eq=False)
class Const(Pattern):
    name: str | None = None


@dataclass(frozen=True, eq=False)
class Op(Pattern):
    types: str | tuple[str, ...]
    inputs: Sequence[Pattern] = ()
    name: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "_types", frozenset((self.types,) if isinstance(self.types, str) else self.types))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "_swapped", self.inputs[::-1])
        object.__setattr__(self, "_first", self._types)

    def accepts(self, node: gs.Node) -> bool:
        return node.op in self._types and G.in_default_domain(node)


# graph.in_default_domain, inline in ``_match_op``
_DEFAULT_DOMAINS, _LEGACY_AXIS = G.NODE_DEFAULT_DOMAINS, ir.LEGACY_AXIS


@dataclass(frozen=True, eq=False)
class AnyOf(Pattern):
    alternatives: tuple[Pattern, ...]

    def __init__(self, *alternatives: Pattern):
        # A nested AnyOf is spliced in, in order (the same alternatives, one level fewer to walk).
        flat = [a for alt in alternatives for a in (alt.alternatives if isinstance(alt, AnyOf) else (alt,))]
        object.__setattr__(self, "alternatives", tuple(flat))
        # The producer op types any alternative can start with; None when one can match
        # without a producer (a Var, a Const): then every tensor must be tried.
        roots: set[str] | None = set()
        for alt in self.alternatives:
            first = _root_types(alt)
            roots = None if roots is None or first is None else roots | first
        object.__setattr__(self, "_roots", None if roots is None else frozenset(roots))
        object.__setattr__(self, "_first", self._roots)


def _root_types(p: Pattern) -> frozenset[str] | None:
    if isinstance(p, Op):
        return p._types
    if isinstance(p, AnyOf):
        return p._roots
    return None


def Opt(types: str | tuple[str, ...], inner: Pattern, name: str | None = None) -> Pattern:
    """``inner``, optionally wrapped in a one-input ``types`` op (a Cast, say)."""
    return AnyOf(Op(types, [inner], name=name), inner)


@dataclass
class Match:
    """What a pattern bound. ``output`` is the tensor the pattern was matched at."""

    output: gs.Tensor
    nodes: dict[str, gs.Node] = field(default_factory=dict)
    tensors: dict[str, gs.Tensor] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    matched: list[gs.Node] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> gs.Node:
        return self.nodes[name]

    def has(self, name: str) -> bool:
        return name in self.nodes or name in self.tensors or name in self.values

    def add(self, node: gs.Node) -> None:
        for n in self.matched:
            if n is node:
                return
        self.matched.append(node)

    def evolve(self, **changes) -> Match:
        """A new Match with this one's bindings (copied) and ``changes`` applied; this one is
        left as it is. Checks that narrow or extend a match build the result this way."""
        fields = dict(output=self.output, nodes=dict(self.nodes), tensors=dict(self.tensors),
                      values=dict(self.values), matched=list(self.matched), info=dict(self.info))
        fields.update(changes)
        return Match(**fields)

    def escapes(self, graph: gs.Graph) -> list[str]:
        """Tensors made inside the match that something outside it uses (or a graph output).

        Fusing them away would break that other user, so a pass must skip such a match.
        """
        inside = {id(n) for n in self.matched}
        found = []
        for node in self.matched:
            for out in node.outputs:
                if out is self.output:
                    continue
                uses = G.other_uses(out, graph, inside)
                if uses:
                    found.append(f"'{out.name}' is also used by {', '.join(sorted(set(uses)))}")
        return found


def match(pattern: Pattern, tensor: gs.Tensor, graph: gs.Graph, const=None) -> Match | None:
    """The first way ``pattern`` explains ``tensor``, or None.

    ``const``: tensor -> value fixed at export time, or None (default ``tensors.const_value``); a
    pass's ``Context.const`` also evaluates what statically known shapes and ranks determine."""
    const = const or (lambda t: T.const_value(t, graph))
    state = _match(pattern, tensor, _State({}, {}, {}, (), const), _accept)
    if state is None:
        return None
    seen: set[int] = set()
    matched = []
    for node in state.order:  # in match order, each node once (a named Op may recur)
        if id(node) not in seen:
            seen.add(id(node))
            matched.append(node)
    return Match(output=tensor, nodes=dict(state.nodes), tensors=dict(state.tensors),
                 values=dict(state.values), matched=matched)


def plausible(pattern: Pattern, tensor: gs.Tensor, depth: int = 2) -> bool:
    """Whether the producers of ``tensor`` down to ``depth`` levels have the op types
    ``pattern`` needs there (constants, bindings and deeper levels unchecked): a cheap test a
    pass can run before work that costs more than matching (shape lookups, say). False means
    ``match`` would find nothing; True promises nothing."""
    if depth <= 0:
        return True
    cls = pattern.__class__
    if cls is AnyOf:
        op = tensor.inputs[0].op if tensor.inputs else None
        for alt in pattern.alternatives:
            first = alt._first
            if (first is None or op in first) and plausible(alt, tensor, depth):
                return True
        return False
    if cls is not Op:
        return True
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or not pattern.accepts(node) or len(node.inputs) < len(pattern.inputs):
        return False
    if _inputs_plausible(pattern.inputs, node.inputs, depth - 1):
        return True
    return node.op in COMMUTATIVE and len(pattern.inputs) == 2 and \
        _inputs_plausible(pattern._swapped, node.inputs, depth - 1)


def _inputs_plausible(pats, tensors, depth: int) -> bool:
    if depth <= 0:
        return True
    for p, t in zip(pats, tensors):
        if not plausible(p, t, depth):
            return False
    return True


class _State:
    """Bindings so far. Never changed in place: a binding makes a new state (the dicts of the
    old one are shared until then), so backtracking costs no copies. A plain class with slots:
    a matcher makes about twenty per site."""

    __slots__ = ("nodes", "tensors", "values", "order", "const")

    def __init__(self, nodes: dict, tensors: dict, values: dict, order: tuple, const):
        self.nodes, self.tensors, self.values, self.order, self.const = nodes, tensors, values, order, const


# The walk is written with continuations: ``_match(p, t, st, k)`` tries each way ``p`` explains
# ``t`` given the bindings ``st``, in order, and calls ``k`` with the bindings each one makes;
# the first result of ``k`` that is not None is the answer (None: try the next way). The first
# complete match is found without a generator per pattern element.

def _accept(st: _State) -> _State:
    return st


def _match(p: Pattern, t: gs.Tensor, st: _State, k) -> _State | None:
    cls = p.__class__
    if cls is Op:
        return _match_op(p, t, st, k)
    if cls is AnyOf:
        op = t.inputs[0].op if t.inputs else None
        roots = p._roots
        if roots is not None and op not in roots:
            return None
        for alt in p.alternatives:
            first = alt._first
            if first is None or op in first:  # an alternative that cannot start here is skipped
                found = _match_op(alt, t, st, k) if alt.__class__ is Op else _match(alt, t, st, k)
                if found is not None:
                    return found
        return None
    if cls is Var:
        bound = st.tensors.get(p.name)
        if bound is None:
            return k(_State(st.nodes, {**st.tensors, p.name: t}, st.values, st.order, st.const))
        return k(st) if bound is t else None
    if cls is Const:
        if p.name and p.name in st.tensors and st.tensors[p.name] is not t:
            return None
        value = st.const(t)
        if value is None:
            return None
        if not p.name:
            # A Constant node is not part of the match: other users may share it, and cleanup
            # drops it once nothing uses it.
            return k(st)
        return k(_State(st.nodes, {**st.tensors, p.name: t}, {**st.values, p.name: value}, st.order, st.const))
    raise TypeError(f"not a pattern element: {p!r}")  # pragma: no cover - a programming error in a pass


def _match_op(p: Op, t: gs.Tensor, st: _State, k) -> _State | None:
    made = t.inputs
    if not made:
        return None
    node = made[0]   # (``Op.accepts`` and ``graph.producer``, inline: this runs for every element tried)
    if node.op not in p._types or node.domain not in _DEFAULT_DOMAINS or _LEGACY_AXIS in node.__dict__:
        return None
    outputs, inputs = node.outputs, node.inputs
    if not outputs or outputs[0] is not t or len(inputs) < len(p.inputs):
        return None
    if p.name:
        bound = st.nodes.get(p.name)
        if bound is not None and bound is not node:
            return None
    straight = _producers_fit(p.inputs, inputs)
    swapped = node.op in COMMUTATIVE and len(p.inputs) == 2 and _producers_fit(p._swapped, inputs)
    if not straight and not swapped:
        return None
    nodes = {**st.nodes, p.name: node} if p.name else st.nodes
    st = _State(nodes, st.tensors, st.values, st.order + (node,), st.const)
    if straight:
        found = _match_inputs(p.inputs, inputs, 0, st, k)
        if found is not None:
            return found
    if swapped:
        return _match_inputs(p._swapped, inputs, 0, st, k)
    return None


def _producers_fit(pats, tensors) -> bool:
    """Each input's producer has an op type its pattern can start with (one level, no bindings):
    most operand orders and alternatives fail here, before any state is made."""
    for p, t in zip(pats, tensors):
        first = p._first
        if first is not None:
            made = t.inputs[0] if t.inputs else None
            if made is None or made.op not in first:
                return False
    return True


def _match_inputs(pats, tensors, i: int, st: _State, k) -> _State | None:
    left = len(pats) - i
    if left == 0:
        return k(st)
    if left == 1:
        return _match(pats[i], tensors[i], st, k)
    return _match(pats[i], tensors[i], st, lambda st2: _match_inputs(pats, tensors, i + 1, st2, k))

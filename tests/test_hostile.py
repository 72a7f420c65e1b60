"""Hostile and broken input: every case ends with exit 2 and one clear line, or exit 0 and a
checker-valid output; never a traceback, never an output that fails the checker where the
input passed, never a changed input file (external data included) or a leftover temporary file.

The fuzz runs the CLI in-process over random bytes, truncations, bit flips and protobuf
mutations of the committed models. The default suite runs a seeded, bounded number of
examples and the named regression cases below; ``-m slow`` runs the long campaign.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings, strategies as st

from normopt.cli import cli

MODELS = Path(__file__).resolve().parent.parent / "models"
# Small real exports (fast to fold), one per family of pass.
SEEDS = ["mlp_linear_bn1d_ts_op13.onnx", "deconv_bn_ts_op15.onnx", "conv3d_bn_ts_op14.onnx",
         "transformer_ln_dynamo_op18.onnx", "unet_resblock_gn_ts_op17.onnx"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _full_ok(path: Path) -> bool | None:
    """True/False: the full checker's verdict on the file; None: the plain checker rejects it."""
    try:
        onnx.checker.check_model(str(path))
    except Exception:  # noqa: BLE001 - any rejection
        return None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception:  # noqa: BLE001
        return False
    return True


@dataclass
class Outcome:
    exit_code: int
    stderr: str
    output: Path


def fold_hostile(folder: Path, files: dict[str, bytes], *args: str, verify: bool = False) -> Outcome:
    """Write ``files`` (the model is ``m.onnx``) to ``folder/in``, fold it into ``folder/out``
    and check every promise that holds whatever the input."""
    src, dst = folder / "in", folder / "out"
    src.mkdir()
    dst.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    before = _digest(src)
    out = dst / "m.onnx"
    cmd = ["fold", str(src / "m.onnx"), "-o", str(out), "-q", *args] + ([] if verify else ["--no-verify"])
    res = CliRunner().invoke(cli, cmd)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert _digest(src) == before, "the input folder changed"
    assert not [p for p in dst.iterdir() if p.name.startswith(".normopt-")], "temporary files left"
    stderr = res.stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    if res.exit_code == 0:
        verdict_in = _full_ok(src / "m.onnx")
        verdict_out = _full_ok(out)
        assert verdict_out is not None, "an output the checker rejects"
        if verdict_in:
            assert verdict_out, "an output that fails the full checker where the input passed"
    else:
        assert res.exit_code in ((1, 2) if verify else (2,)), (res.exit_code, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert not out.exists()
    return Outcome(res.exit_code, stderr.strip(), out)


def _seed_model(name: str) -> onnx.ModelProto:
    return onnx.load(str(MODELS / name))


# ----------------------------------------------------------------------------- named regression cases

def _mutant(name: str, change) -> bytes:
    m = _seed_model(name)
    change(m)
    return m.SerializeToString()


def _external(location: str, offset: str = "0", length: str | None = None):
    def change(m: onnx.ModelProto):
        t = next(t for t in m.graph.initializer if len(t.dims) >= 2)
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            if value is not None:
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    return change


def _set(field: str, value):
    return lambda m: setattr(m, field, value)


def _node_input(i: int, k: int, name: str):
    def change(m):
        m.graph.node[i].input[k] = name
    return change


def _cycle(m):
    m.graph.node[0].input[0] = m.graph.node[-1].output[0]


def _dup_output(m):
    m.graph.node[1].output[0] = m.graph.node[0].output[0]


def _initializer(change):
    def apply(m):
        change(next(t for t in m.graph.initializer if len(t.dims) >= 2))
    return apply


def _first_dim(value):
    def change(m):
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = value
    return change


def _output_type(m):
    m.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.INT64


def _elem_type(kind, value):
    def change(m):
        getattr(m.graph, kind)[0].type.tensor_type.elem_type = value
    return change


def _bad_text(m):
    m.graph.node[0].attribute.add().CopyFrom(onnx.helper.make_attribute("auto_pad", b"\xafNOTSET"))


def _opset(version):
    def change(m):
        m.opset_import[0].version = version
    return change


def _domain(declared: bool):
    def change(m):
        m.graph.node[0].domain = "com.example"
        if declared:
            m.opset_import.add(domain="com.example", version=1)
    return change


def _op(m):
    m.graph.node[0].op_type = "Frobnicate"


def _reverse(m):
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))


def _no_names(m):
    for n in m.graph.node:
        n.ClearField("name")


BASE = "deconv_bn_ts_op15.onnx"
# (id, files (m.onnx and any data file), exit code, a fragment of the error line)
CASES = [
    ("empty", lambda: {"m.onnx": b""}, 2, "file is empty"),
    ("zeros", lambda: {"m.onnx": bytes(100)}, 2, "not an ONNX model"),
    ("random", lambda: {"m.onnx": random.Random(0).randbytes(300)}, 2, "not an ONNX model"),
    ("truncated", lambda: {"m.onnx": (MODELS / BASE).read_bytes()[:4000]}, 2, "not an ONNX model"),
    ("dangling input", lambda: {"m.onnx": _mutant(BASE, _node_input(1, 0, "nowhere"))}, 2,
     "reads 'nowhere', which no node, graph input or initializer provides"),
    ("cycle", lambda: {"m.onnx": _mutant(BASE, _cycle)}, 2, "form a cycle"),
    ("duplicate output", lambda: {"m.onnx": _mutant(BASE, _dup_output)}, 2, "single static assignment"),
    ("missing initializer", lambda: {"m.onnx": _mutant(BASE, lambda m: m.graph.initializer.pop(0))}, 2,
     "which no node, graph input or initializer provides"),
    ("duplicate initializer", lambda: {"m.onnx": _mutant(BASE, lambda m: m.graph.initializer.append(
        m.graph.initializer[0]))}, 2, "initializer name is not unique"),
    ("unknown op", lambda: {"m.onnx": _mutant(BASE, _op)}, 2, "No Op registered for Frobnicate"),
    ("undeclared domain", lambda: {"m.onnx": _mutant(BASE, _domain(False))}, 2, "No opset import for domain"),
    ("unknown domain", lambda: {"m.onnx": _mutant(BASE, _domain(True))}, 0, ""),
    ("ir version 99", lambda: {"m.onnx": _mutant(BASE, _set("ir_version", 99))}, 2, "ir_version 99 is higher"),
    ("opset 99", lambda: {"m.onnx": _mutant(BASE, _opset(99))}, 2, "uses opset 99 of the default domain"),
    ("opset 0", lambda: {"m.onnx": _mutant(BASE, _opset(0))}, 2, "declares opset 0"),
    ("no opset", lambda: {"m.onnx": _mutant(BASE, lambda m: m.ClearField("opset_import"))}, 2, "no opset_import"),
    ("negative input dim", lambda: {"m.onnx": _mutant(BASE, _first_dim(-3))}, 0, ""),
    ("huge input dim", lambda: {"m.onnx": _mutant(BASE, _first_dim(2**62))}, 0, ""),
    ("fails strict shape inference", lambda: {"m.onnx": _mutant(BASE, _output_type)}, 0, ""),
    ("negative initializer dim", lambda: {"m.onnx": _mutant(BASE, _initializer(lambda t: t.dims.__setitem__(0, -1)))},
     2, "negative dimension"),
    ("huge initializer dim", lambda: {"m.onnx": _mutant(BASE, _initializer(lambda t: t.dims.__setitem__(0, 2**40)))},
     2, "holds fewer bytes than its shape"),
    ("unknown element type", lambda: {"m.onnx": _mutant(BASE, _initializer(lambda t: setattr(t, "data_type", 999)))},
     2, "unknown element type 999"),
    ("short raw data", lambda: {"m.onnx": _mutant(BASE, _initializer(lambda t: setattr(t, "raw_data", b"\0\1")))},
     2, "holds fewer bytes than its shape"),
    ("external data missing", lambda: {"m.onnx": _mutant(BASE, _external("nowhere.bin"))}, 2,
     "external data file 'nowhere.bin' not found"),
    ("external data absolute", lambda: {"m.onnx": _mutant(BASE, _external("/etc/hostname"))}, 2,
     "external data location '/etc/hostname'"),
    ("external data outside", lambda: {"m.onnx": _mutant(BASE, _external("../out/w.bin"))}, 2,
     "outside the model's folder"),
    ("external data too short", lambda: {"m.onnx": _mutant(BASE, _external("w.bin")), "w.bin": bytes(16)}, 2,
     "is too short"),
    ("external data out of range", lambda: {"m.onnx": _mutant(BASE, _external("w.bin", "4096", "64")),
                                            "w.bin": bytes(1024)}, 2, "is too short"),
    ("external data negative offset", lambda: {"m.onnx": _mutant(BASE, _external("w.bin", "-64")),
                                               "w.bin": bytes(1 << 16)}, 2, "has a negative offset or length"),
    ("external offset not a number", lambda: {"m.onnx": _mutant(BASE, _external("w.bin", "abc")),
                                              "w.bin": bytes(1 << 16)}, 2, "is not a number"),
    ("undefined input type", lambda: {"m.onnx": _mutant(BASE, _elem_type("input", 0))}, 2,
     "graph input 'input' has an undefined or unknown element type 0"),
    ("undefined output type", lambda: {"m.onnx": _mutant(BASE, _elem_type("output", 0))}, 2,
     "has an undefined or unknown element type 0"),
    ("string attribute not UTF-8", lambda: {"m.onnx": _mutant(BASE, _bad_text)}, 2, "is not UTF-8"),
    ("node name not UTF-8", lambda: {"m.onnx": (MODELS / BASE).read_bytes().replace(
        b"\x1a\x18/up1/up1.0/ConvTranspose", b"\x1a\x18\xafup1/up1.0/ConvTranspose", 1)}, 2, "is not UTF-8"),
    ("unsorted nodes", lambda: {"m.onnx": _mutant(BASE, _reverse)}, 0, ""),
    ("nodes without names", lambda: {"m.onnx": _mutant(BASE, _no_names)}, 0, ""),
]


@pytest.mark.parametrize("make, code, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_case(make, code, fragment, tmp_path):
    got = fold_hostile(tmp_path, make())
    assert got.exit_code == code, got.stderr
    assert fragment in got.stderr


def test_ir_version_newer_than_onnxruntime_reads(tmp_path):
    """IR 14 passes onnx's checker; onnxruntime 1.31 reads <= 13: verification says so in one
    line, --no-verify folds it."""
    data = _mutant(BASE, _set("ir_version", 14))
    (tmp_path / "a").mkdir()
    got = fold_hostile(tmp_path / "a", {"m.onnx": data}, "--provider", "cpu", verify=True)
    assert got.exit_code == 2 and "max supported IR version: 13" in got.stderr and "onnxruntime_src" not in got.stderr
    (tmp_path / "b").mkdir()
    assert fold_hostile(tmp_path / "b", {"m.onnx": data}).exit_code == 0


# ----------------------------------------------------------------------------- the fuzz

BENIGN = ["shuffle", "names", "symbolic", "listed"]


def _mutate(m: onnx.ModelProto, draw, kinds=None) -> None:
    """One structural mutation, chosen and placed by ``draw`` (hypothesis data); ``kinds``
    limits the choice (BENIGN: models that stay valid)."""
    g = m.graph
    nodes = g.node
    names = sorted({n for node in nodes for n in list(node.input) + list(node.output) if n}
                   | {t.name for t in g.initializer} | {v.name for v in g.input})
    kind = draw(st.sampled_from(kinds or [
        "input", "output", "drop_node", "drop_init", "op", "domain", "ir", "opset", "dim", "init_dim",
        "shuffle", "names", "attr", "elem_type", "external", "dup_node", "raw", "graph_output", "symbolic",
        "listed"]))
    pick = lambda seq: draw(st.integers(0, len(seq) - 1))  # noqa: E731
    if not nodes:
        return
    node = nodes[pick(nodes)]
    if kind == "input" and node.input:
        node.input[pick(node.input)] = draw(st.sampled_from(names + ["", "nowhere"]))
    elif kind == "output" and node.output:
        node.output[pick(node.output)] = draw(st.sampled_from(names + ["fresh"]))
    elif kind == "drop_node":
        del nodes[pick(nodes)]
    elif kind == "drop_init" and g.initializer:
        del g.initializer[pick(g.initializer)]
    elif kind == "op":
        node.op_type = draw(st.sampled_from(["Frobnicate", "Relu", "Add", "Conv", "BatchNormalization",
                                             "ReduceMean", "LayerNormalization", "If", ""]))
    elif kind == "domain":
        node.domain = draw(st.sampled_from(["com.example", "com.microsoft", "ai.onnx.ml", "ai.onnx"]))
        if draw(st.booleans()):
            m.opset_import.add(domain=node.domain, version=draw(st.integers(-1, 5)))
    elif kind == "ir":
        m.ir_version = draw(st.integers(-1, 20))
    elif kind == "opset":
        m.opset_import[0].version = draw(st.integers(-1, 40))
    elif kind == "dim":
        vis = list(g.input) + list(g.output) + list(g.value_info)
        vi = vis[pick(vis)]
        dims = vi.type.tensor_type.shape.dim
        if dims:
            d = dims[pick(dims)]
            if draw(st.booleans()):
                d.dim_value = draw(st.sampled_from([-1, 0, 1, 7, 2**31, 2**62]))
            else:
                d.dim_param = draw(st.sampled_from(["N", "", "a b", "ü"]))
    elif kind == "init_dim" and g.initializer:
        t = g.initializer[pick(g.initializer)]
        if t.dims:
            t.dims[pick(t.dims)] = draw(st.sampled_from([-1, 0, 1, 3, 2**33]))
    elif kind == "shuffle":
        order = draw(st.permutations(list(range(len(nodes)))))
        copies = [onnx.NodeProto() for _ in order]
        for c, i in zip(copies, order):
            c.CopyFrom(nodes[i])
        del nodes[:]
        nodes.extend(copies)
    elif kind == "names":
        node.name = draw(st.sampled_from(["", "a/b:c", "名前", "x" * 300, nodes[0].name, " "]))
    elif kind == "attr":
        if node.attribute and draw(st.booleans()):
            del node.attribute[pick(node.attribute)]
        else:
            a = node.attribute.add()
            a.name = draw(st.sampled_from(["epsilon", "axis", "axes", "group", "bogus", "keepdims"]))
            if draw(st.booleans()):
                a.type, a.i = onnx.AttributeProto.INT, draw(st.integers(-5, 5))
            else:
                a.type, a.f = onnx.AttributeProto.FLOAT, draw(st.sampled_from([0.0, -1.0, 1e-5, float("nan")]))
    elif kind == "elem_type":
        vis = list(g.input) + list(g.output)
        vis[pick(vis)].type.tensor_type.elem_type = draw(st.integers(0, 30))
    elif kind == "external" and g.initializer:
        _external(draw(st.sampled_from(["w.bin", "nowhere.bin", "../w.bin", "/dev/zero", ""])),
                  str(draw(st.sampled_from([0, 3, 1 << 20]))))(m)
    elif kind == "dup_node":
        nodes.add().CopyFrom(node)
    elif kind == "raw" and g.initializer:
        t = g.initializer[pick(g.initializer)]
        t.raw_data = draw(st.binary(max_size=64))
    elif kind == "symbolic":  # every dim of an input symbolic
        for d in g.input[pick(g.input)].type.tensor_type.shape.dim:
            d.dim_param = draw(st.sampled_from(["N", "batch", "ü x"]))
    elif kind == "listed" and g.initializer:  # an initializer listed as a graph input (overridable)
        t = g.initializer[pick(g.initializer)]
        if t.name not in {vi.name for vi in g.input}:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    elif kind == "graph_output" and g.output:
        g.output[pick(g.output)].name = draw(st.sampled_from(names + ["nowhere"]))


@st.composite
def hostile_files(draw, seeds=tuple(SEEDS), hows=("bytes", "truncate", "flip", "mutate", "mutate", "benign")):
    """(files, how they were made): a model file, maybe a data file beside it."""
    name = draw(st.sampled_from(seeds))
    data = (MODELS / name).read_bytes()
    how = draw(st.sampled_from(hows))
    files = {}
    if how == "bytes":
        blob = draw(st.binary(max_size=600))
    elif how == "truncate":
        blob = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "flip":
        blob = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, len(blob) - 1))
            blob[pos] ^= 1 << draw(st.integers(0, 7))
        blob = bytes(blob)
    elif how == "benign":
        m = onnx.load_from_string(data)
        for _ in range(draw(st.integers(1, 3))):
            _mutate(m, draw, BENIGN)
        blob = m.SerializeToString()
    else:
        m = onnx.load_from_string(data)
        for _ in range(draw(st.integers(1, 3))):
            _mutate(m, draw)
        blob = m.SerializeToString()
        if draw(st.booleans()):
            files["w.bin"] = np.random.default_rng(0).bytes(draw(st.sampled_from([0, 100, 1 << 16])))
    files["m.onnx"] = blob
    return files, f"{name}:{how}"


_counter = iter(range(10**9))


def _fuzz_once(tmp_path: Path, files: dict[str, bytes], verify: bool) -> Outcome:
    folder = tmp_path / f"case{next(_counter)}"
    folder.mkdir()
    got = fold_hostile(folder, files, *(["--provider", "cpu"] if verify else []), verify=verify)
    event(f"exit {got.exit_code}" + (" verified" if verify else ""))
    return got


@settings(max_examples=150, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=hostile_files(seeds=("mlp_linear_bn1d_ts_op13.onnx", "deconv_bn_ts_op15.onnx",
                                 "transformer_ln_dynamo_op18.onnx")))
def test_fuzz_bounded(case, tmp_path):
    files, how = case
    event(how.split(":")[1])
    _fuzz_once(tmp_path, files, verify=False)


@settings(max_examples=15, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=hostile_files(seeds=("mlp_linear_bn1d_ts_op13.onnx", "transformer_ln_dynamo_op18.onnx"),
                          hows=("mutate", "benign", "benign")))
def test_fuzz_bounded_verified(case, tmp_path):
    """A sample with verification: exit 0 then means onnxruntime agrees with the original."""
    files, how = case
    event(how.split(":")[1])
    _fuzz_once(tmp_path, files, verify=True)


@pytest.mark.slow
@settings(max_examples=3000, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=hostile_files(), verify=st.integers(0, 9))
def test_fuzz_campaign(case, verify, tmp_path):
    """The long campaign: every seed model, a sample (hypothesis favours 0: about a quarter)
    verified with onnxruntime."""
    files, how = case
    event(how.split(":")[1])
    _fuzz_once(tmp_path, files, verify=verify == 0)


def test_unsorted_nodes_are_sorted_on_load_with_a_note(tmp_path):
    """onnxruntime runs a model whose nodes are out of order (it sorts them): so does normopt,
    and it says so in the summary and the report."""
    import json

    data = _mutant(BASE, _reverse)
    (tmp_path / "m.onnx").write_bytes(data)
    res = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--provider",
                                   "cpu", "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    n = len(_seed_model(BASE).graph.node)
    note = f"nodes of the main graph were not in topological order: sorted on load ({n - 1 if n % 2 else n} of {n} moved)"
    assert f"note: {note}" in res.stdout.splitlines()
    assert json.loads((tmp_path / "r.json").read_text())["notes"] == [note]
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)
    assert (tmp_path / "m.onnx").read_bytes() == data


def test_unsorted_subgraph_is_sorted_on_load(tmp_path):
    from normopt import model_io

    vi = onnx.helper.make_tensor_value_info
    body = onnx.helper.make_graph([onnx.helper.make_node("Neg", ["a"], ["b"], name="second"),
                                   onnx.helper.make_node("Relu", ["x"], ["a"], name="first")], "then", [],
                                  [vi("b", onnx.TensorProto.FLOAT, [2])])
    other = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["c"], name="id")], "else", [],
                                   [vi("c", onnx.TensorProto.FLOAT, [2])])
    graph = onnx.helper.make_graph([onnx.helper.make_node("If", ["cond"], ["y"], name="if", then_branch=body,
                                                          else_branch=other)], "g",
                                   [vi("x", onnx.TensorProto.FLOAT, [2]), vi("cond", onnx.TensorProto.BOOL, [])],
                                   [vi("y", onnx.TensorProto.FLOAT, [2])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "m.onnx")
    notes: list[str] = []
    loaded = model_io.load(tmp_path / "m.onnx", notes)
    then = next(a.g for a in loaded.graph.node[0].attribute if a.name == "then_branch")
    assert [n.name for n in then.node] == ["first", "second"]
    assert notes == ["nodes of /if.then_branch were not in topological order: sorted on load (2 of 2 moved)"]


def test_huge_input_dim_is_refused_before_verification_allocates_it(tmp_path):
    """A declared dim of 2**31 would make the random inputs hundreds of GiB (the fuzz campaign
    ran the machine out of memory on it): one line instead, and --no-verify still folds it."""
    data = _mutant("mlp_linear_bn1d_ts_op13.onnx", _first_dim(2**31))
    (tmp_path / "a").mkdir()
    got = fold_hostile(tmp_path / "a", {"m.onnx": data}, "--provider", "cpu", verify=True)
    assert got.exit_code == 2 and "has shape [2147483648, 16]: too large for random verification inputs" in got.stderr
    (tmp_path / "b").mkdir()
    assert fold_hostile(tmp_path / "b", {"m.onnx": data}).exit_code == 0


def test_error_with_a_line_break_in_a_name_stays_one_line(tmp_path):
    """A bit flip can turn a byte of a name into a line break (found by the campaign)."""
    got = fold_hostile(tmp_path, {"m.onnx": _mutant(BASE, _node_input(1, 0, "a\nb\tc"))})
    assert got.exit_code == 2 and "reads 'a\\nb\\tc', which no node" in got.stderr

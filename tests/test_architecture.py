"""The two rules of the passes' architecture (README, "Architecture").

1. Passes never import each other: a pass module (passes/<name>.py) imports only the tensor
   layer, the pipeline and its family cores (passes/_*.py), and a family core imports no pass.
2. ``match`` only reads: running every pass's ``match`` over every committed model leaves the
   exported model byte for byte as it was.
"""
import ast
from pathlib import Path

import onnx
import pytest

from normopt import graph as G, ir, pipeline
from normopt.pattern import Match
from normopt.registry import available

ROOT = Path(__file__).resolve().parents[1]
PASSES = ROOT / "passes"
MODELS = sorted((ROOT / "models").glob("*.onnx"))


def _imported_modules(path: Path) -> set[str]:
    """Every ``normopt.passes`` submodule ``path`` imports (absolute or relative, any form)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("normopt.passes."):
                    found.add(alias.name.split(".")[2])
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from . import x / from ._norm import y
                found.update([module.split(".")[0]] if module else [a.name for a in node.names])
            elif module == "normopt.passes":
                found.update(alias.name for alias in node.names)
            elif module.startswith("normopt.passes."):
                found.add(module.split(".")[2])
    return found


def test_imported_modules_sees_every_import_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import normopt.passes.fuse_a\nfrom normopt.passes import fuse_b, _core\n"
                   "from normopt.passes.fuse_c import x\nfrom . import fuse_d\nfrom .fuse_e import y\n"
                   "from normopt import graph\n")
    assert _imported_modules(src) == {"fuse_a", "fuse_b", "_core", "fuse_c", "fuse_d", "fuse_e"}


def test_passes_never_import_each_other():
    modules = sorted(p for p in PASSES.glob("*.py") if p.name != "__init__.py")
    assert any(not p.name.startswith("_") for p in modules) and any(p.name.startswith("_") for p in modules)
    wrong = []
    for path in modules:
        for name in sorted(_imported_modules(path)):
            if not name.startswith("_"):
                wrong.append(f"{path.name} imports the pass module {name}")
    assert not wrong, "; ".join(wrong)


def _decoded(graph) -> None:
    """Decode every node's attributes and every tensor's type (the importer decodes them on
    first use, and re-encodes what was decoded on export): both exports then come from the
    same decoded state, so that only a change made by ``match`` can tell them apart."""
    for _path, g, _fn in pipeline._graphs(graph):
        for node in g.nodes:
            node.attrs  # noqa: B018 - decoded on access
            for t in node.inputs + node.outputs:
                t.shape, t.dtype  # noqa: B018


def _snapshot(graph, model, weights) -> tuple:
    """The exported model's bytes, and the declared shape and dtype of every tensor (the
    export leaves the intermediates' out, and the passes that follow read them)."""
    ir.finish(graph)
    facts = sorted((path, name, str(t.shape), str(t.dtype))
                   for path, g, _fn in pipeline._graphs(graph) for name, t in g.tensors().items())
    return ir.export_model(graph, model, weights).SerializeToString(), facts


def _match_everywhere(path: Path, passes, *, on_match=None) -> tuple[int, list[str]]:
    """Run ``match`` of each pass in ``passes`` at every anchor of every graph (subgraphs and
    model-local function bodies included) of the model at ``path``, as the pipeline does; (matches
    found, names of the passes after whose matching the export differs)."""
    model = onnx.load(str(path))
    weights = ir.Weights(str(path.parent))
    graph = ir.import_model(model, weights)
    _decoded(graph)
    before = _snapshot(graph, model, weights)
    shapes, names, opset = pipeline.Shapes(model), G.NameScope(graph), pipeline.model_opset(model)
    found, changed = 0, []
    for pass_ in passes:
        for graph_path, g, fn in pipeline._graphs(graph):
            ctx = pipeline.Context(graph=g, root=graph, opset=opset if fn is None else fn.opset, names=names,
                                   shapes=shapes if fn is None else shapes.function(fn), path=graph_path)
            for node in [n for n in g.nodes if n.op in pass_.anchor_ops]:
                answer = pipeline._safe_match(pass_, node, ctx) if node.outputs else None
                if isinstance(answer, Match):
                    found += 1
                    if on_match:
                        on_match(answer)
        if _snapshot(graph, model, weights) != before:
            changed.append(pass_.name)
    return found, changed


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_match_only_reads(path):
    """Every pass's ``match``, at every anchor of every graph, changes nothing in the model."""
    _found, changed = _match_everywhere(path, [cls() for cls in available().values()])
    assert not changed, f"match of {', '.join(changed)} changed {path.name}"


def test_match_only_reads_notices_a_change():
    """The comparison above sees what a match that wrote to the graph would leave behind."""
    path = ROOT / "models" / "transformer_ln_ts_op13.onnx"
    layernorm = available()["fuse-layernorm"]()

    def declare(m: Match) -> None:   # a tensor's declared shape
        m.output.shape = ["changed"] * len(m.output.shape or [1])

    def attribute(m: Match) -> None:   # a node's attribute
        m["sqrt"].attrs["changed"] = 1

    found, changed = _match_everywhere(path, [layernorm])
    assert found > 0 and not changed
    assert _match_everywhere(path, [layernorm], on_match=declare) == (found, ["fuse-layernorm"])
    assert _match_everywhere(path, [layernorm], on_match=attribute) == (found, ["fuse-layernorm"])

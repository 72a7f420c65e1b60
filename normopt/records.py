"""Result records. Plain dataclasses: the CLI and the JSON report only format them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class Rewrite:
    """One rewrite a pass applied. ``output`` is the tensor name the rewrite kept."""

    pass_name: str
    anchor: str
    output: str
    removed: tuple[str, ...]
    added: tuple[str, ...]
    graph: str = ""
    info: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Skip:
    """A candidate a pass left untouched, with a reason the user can act on."""

    pass_name: str
    node: str
    reason: str
    graph: str = ""


@dataclass(frozen=True)
class OpsetUpgrade:
    """The model's default-domain opset was raised so that a pass could emit its op."""

    from_version: int
    to_version: int
    for_pass: str


@dataclass
class PassRecord:
    name: str
    applied: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def modified(self) -> bool:
        return bool(self.applied)


@dataclass
class PipelineResult:
    passes: list[PassRecord] = field(default_factory=list)
    upgrades: list[OpsetUpgrade] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    # What was done to the input before the passes ran (e.g. nodes sorted on load).
    notes: list[str] = field(default_factory=list)

    @property
    def applied(self) -> list[Rewrite]:
        return [r for p in self.passes for r in p.applied]

    @property
    def skipped(self) -> list[Skip]:
        return [s for p in self.passes for s in p.skipped]

    @property
    def modified(self) -> bool:
        return bool(self.applied) or bool(self.upgrades)


@dataclass(frozen=True)
class Reject:
    """A candidate a pass must leave untouched. ``reason`` is a fact about the model."""

    reason: str
    node: gs.Node | None = None   # the node the reason concerns, when not the anchor

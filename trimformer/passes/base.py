"""The pass contract.

A pass is one module in `passes/` that declares:
- `Config`: a frozen pydantic model validated from a recipe entry (unknown keys are errors);
- `exactness`: "exact" (output unchanged up to float error), "lossy" (training-free), or
  "needs-training";
- `knobs`: what the search may turn, in words;
- `score(ctx)`: importance numbers from calibration batches (cheap; the caller caches);
- `apply(gm, structure, config, ctx) -> PassRecord`: rewrite gm in place and report what changed.

Some passes also take a *request* (e.g. "drop the 2 most redundant attention sub-layers") and
turn it into a fully resolved Config with `plan(...)`; only resolved configs go into recipes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import fx

from trimformer.graph.structure import Structure

Exactness = Literal["exact", "lossy", "needs-training"]


class PassConfig(BaseModel):
    """Base of every `<Pass>Config`: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass
class Context:
    """What a pass may read besides the graph: calibration batches and the model kind.

    Passes that train (exactness "needs-training") also read:
    - `teacher`: the original model (before any pass), called like the graph and returning one
      tensor; `recover` distills towards it. None when the caller has not set it.
    - `train_batches`: calibration batches for training; None means `batches`.
    - `progress`: a callback for progress lines (training loss), or None.
    """

    kind: str
    batches: list[dict[str, torch.Tensor]]
    cache: dict[str, Any] = field(default_factory=dict)
    teacher: Callable[..., torch.Tensor] | None = None
    train_batches: list[dict[str, torch.Tensor]] | None = None
    progress: Callable[[str], None] | None = None


@dataclass(frozen=True)
class PassRecord:
    """What one pass did, computed from the graph before and after. JSON-ready via to_dict()."""

    name: str
    exactness: Exactness
    config: dict[str, Any]
    changes: dict[str, Any]
    importance: dict[str, Any] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "exactness": self.exactness,
            "config": self.config,
            "changes": self.changes,
            "importance": self.importance,
            "params": {"before": self.params_before, "after": self.params_after},
            "flops": {"before": self.flops_before, "after": self.flops_after},
            "nodes": {"before": self.nodes_before, "after": self.nodes_after},
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class PassSpec:
    """One row of the pass table."""

    name: str
    summary: str
    exactness: Exactness
    config: type[PassConfig]
    knobs: dict[str, str]
    apply: Callable[[fx.GraphModule, Structure, Any, Context], dict[str, Any]]
    score: Callable[[fx.GraphModule, Structure, Context], dict[str, Any]] | None = None
    paper: str = ""

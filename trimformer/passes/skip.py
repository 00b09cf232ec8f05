"""skip — keep an input-independent, evenly spaced subset of blocks (lossy; the paper fine-tunes).

Paper: "Accelerating Inference in LLMs with a Unified Layer Skipping Strategy" (Liu, Meng, Zhou,
2024, arXiv 2404.06954; code `Adaxry/Unified_Layer_Skipping`, `run_clm_llms.py`).

Schedule, for L blocks and a target speedup r (the paper's formula, kept exactly):

    n_keep   = int(L / r)                      (or `keep` given directly; at least 2, at most L)
    kept     = [0, L - 1]                      the first and last blocks always stay
    interval = int(L / (n_keep - 1))
    for i in 1 .. L - 2: if i % interval == 0 and len(kept) < n_keep: keep i

so L = 32, r = 5 keeps [0, 6, 12, 18, 24, 31]. The choice does not look at data or inputs.

Differences from the paper, which the record states:
- the paper skips blocks only while decoding (the prompt runs at full depth) and fine-tunes the
  model with the schedule in place (full-parameter, 2 epochs); here the skipped blocks are removed
  for every token and nothing is trained, so expect a large quality loss without `recover`;
- removal reuses `drop.drop_layers` (whole blocks):

    x ─ block 0 ─ block 1 ─ block 2 ─ block 3 ─▶ y      keep [0, 3]      x ─ block 0 ─ block 3 ─▶ y
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from torch import fx

from trimformer.errors import PassError
from trimformer.graph.structure import Structure
from trimformer.passes.base import Context, PassConfig, PassSpec
from trimformer.passes.drop import DropConfig, drop_layers


class SkipConfig(PassConfig):
    speedup: float | None = Field(
        None, gt=1.0, description="target ratio r: keep int(L / r) blocks"
    )
    keep: int | None = Field(None, ge=1, description="number of blocks kept (instead of speedup)")

    @model_validator(mode="after")
    def _one_of(self) -> SkipConfig:
        if (self.speedup is None) == (self.keep is None):
            raise ValueError("give exactly one of `speedup` (e.g. 2.0) or `keep` (a block count)")
        return self


def kept_blocks(
    num_blocks: int, *, speedup: float | None = None, keep: int | None = None
) -> list[int]:
    """Indices of the blocks the unified schedule keeps (first, last, evenly spaced between)."""
    if num_blocks < 1:
        return []
    if keep is None:
        if speedup is None or speedup <= 1.0:
            raise PassError(f"skip: speedup must be above 1, got {speedup}")
        keep = int(num_blocks / speedup)
    if keep > num_blocks:
        raise PassError(f"skip: cannot keep {keep} blocks of {num_blocks}")
    if num_blocks <= 2:
        return list(range(num_blocks))
    keep = max(2, keep)
    kept = {0, num_blocks - 1}
    interval = max(1, int(num_blocks / (keep - 1)))
    for i in range(1, num_blocks - 1):
        if (i % interval == 0) and (len(kept) < keep):
            kept.add(i)
    return sorted(kept)


def skip_layers(
    gm: fx.GraphModule, structure: Structure, config: SkipConfig, ctx: Context
) -> dict[str, Any]:
    """Remove every block the schedule does not keep; records kept and removed indices."""
    # Positions in the present blocks map to block indices (stable, possibly with gaps).
    index = [b.index for b in structure.blocks]
    n = len(index)
    kept = [index[p] for p in kept_blocks(n, speedup=config.speedup, keep=config.keep)]
    removed = [i for i in index if i not in kept]
    dropped = drop_layers(gm, structure, DropConfig(blocks=removed), ctx) if removed else {}
    return {
        "num_blocks": n,
        "kept": kept,
        "removed": removed,
        "sublayers_removed": dropped.get("removed", []),
        "note": "the paper fine-tunes with this schedule and skips only while decoding",
    }


SPEC = PassSpec(
    name="skip",
    summary=(
        "keep the first, last and evenly spaced blocks, int(L / speedup) in all (unified layer "
        "skipping; the paper fine-tunes with the schedule in place, this pass does not)"
    ),
    exactness="lossy",
    config=SkipConfig,
    knobs={
        "speedup": "target ratio r > 1: int(L / r) blocks are kept",
        "keep": "number of blocks kept, instead of speedup",
    },
    apply=skip_layers,
    paper="Accelerating Inference in LLMs with a Unified Layer Skipping Strategy (2024)",
)

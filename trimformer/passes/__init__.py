"""The pass table: the one list the CLI, the optimizer and the recipe loader all read."""

from __future__ import annotations

from trimformer.passes import cleanup, drop, int8, prune, skip
from trimformer.passes.base import PassSpec

PASSES: dict[str, PassSpec] = {
    spec.name: spec
    for spec in (
        cleanup.SPEC,  # always first: later rules need dropout-free residual paths
        drop.SPEC,
        prune.SPEC,
        skip.SPEC,
        int8.SPEC,  # an export stage: last in any recipe
    )
}

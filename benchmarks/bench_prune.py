"""Structured pruning and layer skipping: measured speedup against the FLOP-ideal one.

For each model (MiniLM at 8x128, the sample at 4x512) and each variant (AMP head pruning 25/50%,
neuron pruning 25/50%, both, unified layer skipping r = 1.5 and 2), build the graph, then measure
original and pruned side by side (interleaved, one process) on torch and onnxruntime, and print
params, FLOPs, the measured speedup, the FLOP-ideal speedup (FLOPs before / after), their ratio,
and the quality change on held-out Python docs (no fine-tuning).

    python benchmarks/bench_prune.py                      # both models, both runtimes
    python benchmarks/bench_prune.py --models minilm --shape 1x128 --runtimes torch
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import checkpoint  # noqa: E402

from trimformer.graph.capture import dynamic_shapes, load_checkpoint  # noqa: E402
from trimformer.graph.flops import count_flops  # noqa: E402
from trimformer.graph.rewrite import count_parameters  # noqa: E402
from trimformer.optimizer import quality  # noqa: E402
from trimformer.optimizer.pipeline import Step, run_steps  # noqa: E402
from trimformer.optimizer.run import RunOptions, measure_programs, prepare, shape_inputs  # noqa: E402
from trimformer.passes import PASSES  # noqa: E402

VARIANTS = {
    "heads 25%": {"prune": {"heads": 0.25}},
    "heads 50%": {"prune": {"heads": 0.5}},
    "neurons 25%": {"prune": {"neurons": 0.25}},
    "neurons 50%": {"prune": {"neurons": 0.5}},
    "heads+neurons 25%": {"prune": {"heads": 0.25, "neurons": 0.25}},
    "heads+neurons 50%": {"prune": {"heads": 0.5, "neurons": 0.5}},
    "skip r=1.5": {"skip": {"speedup": 1.5}},
    "skip r=2": {"skip": {"speedup": 2.0}},
}
MODELS = {"minilm": "8x128", "sample": "4x512"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,sample")
    ap.add_argument("--runtimes", default="torch,onnxruntime")
    ap.add_argument("--shape", default=None, help="override every model's shape (e.g. 1x128)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    runtimes = tuple(args.runtimes.split(","))
    rows = []
    t0 = time.time()
    for name in args.models.split(","):
        shape = args.shape or MODELS[name]
        loaded = load_checkpoint(checkpoint(name))
        opts = RunOptions(
            out=Path("."), shape=shape, threads=args.threads, runtimes=runtimes, repeats=8, rounds=3
        )
        prep = prepare(loaded, opts, lambda m: None)
        at = shape_inputs(loaded, shape)
        sample = prep.calib[0].inputs
        dyn = dynamic_shapes(loaded, sample)
        ref = quality.reference_outputs(prep.gm, prep.evaluation)
        base_q = quality.evaluate(loaded.kind, prep.gm, prep.evaluation, ref)
        metric, _ = quality.primary_metric(loaded.kind)
        base_flops = count_flops(prep.gm, at)
        for label in args.variants.split(","):
            spec = VARIANTS[label]
            gm = copy.deepcopy(prep.gm)
            steps = [Step(PASSES["cleanup"], PASSES["cleanup"].config())]
            for pass_name, cfg in spec.items():
                steps.append(Step(PASSES[pass_name], PASSES[pass_name].config(**cfg)))
            run_steps(gm, steps, prep.ctx, sample, at)
            q = quality.evaluate(loaded.kind, gm, prep.evaluation, ref)
            work = Path(tempfile.mkdtemp(prefix="bench-prune-"))
            try:
                onnx_path = None
                if "onnxruntime" in runtimes:
                    from trimformer.export.onnx import export_onnx

                    onnx_path = work / "model.onnx"
                    export_onnx(gm, sample, dyn, onnx_path)
                lat = measure_programs(
                    prep.gm, gm, onnx_path, sample, dyn, at, runtimes, opts, lambda m: None
                )
            finally:
                shutil.rmtree(work, ignore_errors=True)
            flops = count_flops(gm, at)
            ideal = base_flops / flops
            for rt in runtimes:
                s = lat["speedup"][rt]
                rows.append(
                    (
                        name,
                        shape,
                        rt,
                        label,
                        count_parameters(gm),
                        flops,
                        s,
                        ideal,
                        base_q.metrics[metric],
                        q.metrics[metric],
                        metric,
                    )
                )
                print(
                    f"  {name} {shape} {rt:11s} {label:18s} speedup {s:.3f} ideal {ideal:.3f} "
                    f"{metric} {base_q.metrics[metric]:.4f} -> {q.metrics[metric]:.4f}",
                    flush=True,
                )
    print()
    print(
        f"pruning / skipping, no fine-tuning (torch {torch.__version__}, {args.threads} threads, "
        f"CPU, {time.time() - t0:.0f} s)"
    )
    print(
        "| model | shape | runtime | variant | params | GFLOPs | measured | FLOP-ideal | "
        "measured/ideal | quality |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape, rt, label, params, flops, s, ideal, qb, qa, metric in rows:
        print(
            f"| {name} | {shape} | {rt} | {label} | {params / 1e6:.2f}M | {flops / 1e9:.2f} | "
            f"{s:.2f}x | {ideal:.2f}x | {s / ideal:.2f} | {metric} {qb:.3f} -> {qa:.3f} |"
        )


if __name__ == "__main__":
    main()

"""int8 on both runtimes (issue 7): int8 alone, and the search to targets with and without int8.

Part `alone`: per model and shape, one interleaved measurement of torch fp32 eager (= 1.00),
torch fp32 under torch.compile, the torchao int8 program eager and compiled, onnxruntime fp32 and
onnxruntime QInt8 — with the held-out embedding cosine (or KL) of each int8 program.

Part `search`: the search `trimformer optimize --target-speedup T --runtime R` runs, with int8
allowed (drop, prune, int8) and forbidden (drop, prune), per model, shape, runtime and target:
the verified plan's measured speedup, its held-out quality and the search time.

Each search is minutes; run it in parts:

    python benchmarks/bench_int8.py --parts alone --models minilm --shapes 8x128,1x128
    python benchmarks/bench_int8.py --parts search --models minilm --shapes 8x128 \
        --runtimes torch --targets 2.5 --int8 with,without
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import checkpoint, timed_search  # noqa: E402

from trimformer.graph.capture import dynamic_shapes, load_checkpoint  # noqa: E402
from trimformer.optimizer import quality  # noqa: E402
from trimformer.optimizer.run import RunOptions, prepare, shape_inputs  # noqa: E402

SHAPES = {"minilm": "8x128,1x128", "sample": "4x512"}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def alone(name: str, shape: str, threads: int, repeats: int, rounds: int) -> list[str]:
    """One interleaved measurement of every fp32/int8 program of the model at `shape`."""
    from trimformer.cost_model.measure import measure_interleaved, ort_runner, torch_runner
    from trimformer.export.int8 import OrtModule, export_int8
    from trimformer.export.int8_torch import compile_for_shape, export_int8_program
    from trimformer.export.onnx import export_onnx, ort_session

    loaded = load_checkpoint(checkpoint(name))
    prep = prepare(loaded, RunOptions(out=Path("."), shape=shape), lambda m: None)
    gm, sample = prep.gm, prep.calib[0].inputs
    dyn = dynamic_shapes(loaded, sample)
    at = shape_inputs(loaded, shape)
    metric, _ = quality.primary_metric(loaded.kind)
    ref = quality.reference_outputs(gm, prep.evaluation)
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    try:
        int8_torch = export_int8_program(gm, sample, dyn).program.module()
        q_torch = quality.evaluate(loaded.kind, int8_torch, prep.evaluation, ref).metrics[metric]
        t0 = time.perf_counter()
        int8_compiled = compile_for_shape(int8_torch, at)
        fp32_compiled = compile_for_shape(gm, at)
        compile_s = time.perf_counter() - t0
        export_onnx(gm, sample, dyn, work / "fp32.onnx")
        export_int8(gm, sample, dyn, work / "int8.onnx")
        q_ort = quality.evaluate(
            loaded.kind, OrtModule(work / "int8.onnx", threads), prep.evaluation, ref
        ).metrics[metric]
        runners = {
            "torch fp32 eager": torch_runner(gm, at),
            "torch fp32 torch.compile": torch_runner(fp32_compiled.module, at),
            "torch int8 (torchao) eager": torch_runner(int8_torch, at),
            "torch int8 (torchao) torch.compile": torch_runner(int8_compiled.module, at),
            "onnxruntime fp32": ort_runner(ort_session(work / "fp32.onnx", threads), at),
            "onnxruntime int8 QInt8 per-channel": ort_runner(
                ort_session(work / "int8.onnx", threads), at
            ),
        }
        runtime = {k: k.split()[0] for k in runners}
        stats = measure_interleaved(
            runners, repeats=repeats, rounds=rounds, threads=threads, shape=shape, runtime=runtime
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = stats["torch fp32 eager"].median_ms
    quals = {
        "torch int8 (torchao) eager": q_torch,
        "torch int8 (torchao) torch.compile": q_torch,
        "onnxruntime int8 QInt8 per-channel": q_ort,
    }
    rows = []
    for k, lat in stats.items():
        q = quals.get(k)
        qtext = f"{metric} {q:.4f}" if q is not None else "fp32"
        rows.append(
            f"| {name} | {shape} | {k} | {lat.median_ms:.1f} | {base / lat.median_ms:.2f}x | "
            f"{qtext} |"
        )
    print(f"  ({name} {shape}: compiling both torch programs took {compile_s:.0f} s)", flush=True)
    return rows


def searches(
    name: str,
    shape: str,
    runtimes: list[str],
    targets: list[float],
    int8_modes: list[str],
    threads: int,
) -> list[str]:
    loaded = load_checkpoint(checkpoint(name))
    rows = []
    for runtime in runtimes:
        opts = RunOptions(out=Path("."), shape=shape, threads=threads, runtimes=(runtime,))
        prep = prepare(loaded, opts, lambda m: None)
        metric, _ = quality.primary_metric(loaded.kind)
        ref = quality.reference_outputs(prep.gm, prep.evaluation)
        base_q = quality.evaluate(loaded.kind, prep.gm, prep.evaluation, ref).metrics[metric]
        for target in targets:
            for mode in int8_modes:
                allow = {"drop", "prune", "int8"} if mode == "with" else {"drop", "prune"}
                got = timed_search(loaded, prep, opts, target, allow, metric)
                if isinstance(got, str):
                    print(f"  {name} {shape} {runtime} {target} int8 {mode}: {got}", flush=True)
                    rows.append(
                        f"| {name} | {shape} | {runtime} | {target} | {mode} | - | no | - | - | "
                        f"{got} |"
                    )
                    continue
                res = got.result
                i8 = res.int8
                i8_text = f"{1 / i8['factor']:.2f}x" if i8 else "-"
                row = (
                    f"| {name} | {shape} | {runtime} | {target} | {mode} | {got.measured:.2f}x | "
                    f"{got.band} | {metric} {base_q:.3f} -> {got.quality:.3f} | "
                    f"{i8_text} | {got.seconds:.0f} | {res.chosen.label} |"
                )
                print(row, flush=True)
                rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="alone,search", help="alone, search, or both")
    ap.add_argument("--models", default="minilm,sample")
    ap.add_argument(
        "--shapes", default=None, help="comma list; default minilm 8x128,1x128; sample 4x512"
    )
    ap.add_argument("--runtimes", default="torch,onnxruntime")
    ap.add_argument("--targets", default="1.5,2,2.5")
    ap.add_argument("--int8", default="with,without", help="search with and/or without int8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    parts = args.parts.split(",")
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"torch {torch.__version__}, {args.threads} thread(s), CPU, {os.cpu_count()} cores, "
        f"{when}, load average at start {_load()}"
    )
    alone_rows: list[str] = []
    search_rows: list[str] = []
    for name in args.models.split(","):
        for shape in (args.shapes or SHAPES[name]).split(","):
            if "alone" in parts:
                alone_rows += alone(name, shape, args.threads, args.repeats, args.rounds)
            if "search" in parts:
                search_rows += searches(
                    name,
                    shape,
                    args.runtimes.split(","),
                    [float(t) for t in args.targets.split(",")],
                    args.int8.split(","),
                    args.threads,
                )
    print()
    if alone_rows:
        print(f"int8 alone, one interleaved measurement per shape ({header}; quality on held-out")
        print("Python docs; torch fp32 eager = 1.00x)")
        print("| model | shape | program | median ms | vs torch fp32 eager | quality |")
        print("|---|---|---|---|---|---|")
        print("\n".join(alone_rows))
        print()
    if search_rows:
        print(f"search to a target speedup with and without int8 ({header}; load at end {_load()})")
        print(
            "| model | shape | runtime | target | int8 | measured | in band | quality | "
            "int8 alone | search s | plan |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(search_rows))


if __name__ == "__main__":
    main()

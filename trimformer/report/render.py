"""Terminal rendering of structures and run reports (rich tables)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from trimformer.errors import TrimformerError

SCHEMA_VERSIONS = {1}


def load_report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrimformerError(f"{path}: not a readable report ({type(e).__name__})") from None
    if report.get("schema_version") not in SCHEMA_VERSIONS:
        raise TrimformerError(
            f"{path}: report schema {report.get('schema_version')!r} is not one this trimformer "
            f"reads ({sorted(SCHEMA_VERSIONS)}); re-run `trimformer apply {run_dir}/recipe.yaml`"
        )
    return report


def _num(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def structure_table(summary: dict[str, Any], title: str = "blocks") -> Table:
    t = Table(title=title)
    for c in ("#", "block", "attention", "heads (kv) x dim", "mlp", "width", "norms"):
        t.add_column(c, justify="right" if c in ("#", "width") else "left")
    for b in summary["blocks"]:
        a, m = b.get("attention"), b.get("mlp")
        att = f"{a['form']}{' causal' if a['causal'] else ''} {a['qkv']} qkv" if a else "dropped"
        heads = f"{a['heads']} ({a['kv_heads']}) x {a['head_dim']}" if a else "-"
        mlp = f"{m['activation']}{' gated' if m['gate'] else ''}" if m else "dropped"
        width = str(m["width"]) if m else "-"
        norms = " / ".join(x["norm"] for x in (a, m) if x)
        t.add_row(str(b["index"]), b["name"], att, heads, mlp, width, norms)
    return t


def print_structure(console: Console, info: dict[str, Any]) -> None:
    s = info["structure"]
    console.print(
        f"[bold]{info['source']}[/bold]  kind={info['kind']}  params={_num(info['params'])}  "
        f"FLOPs@{info['flops_shape']}={_num(info['flops'])}  blocks={s['num_blocks']}  "
        f"{s['norm_style']}  hidden={s['hidden_size']}"
    )
    console.print(structure_table(s))
    if s["unmatched"]:
        console.print("[yellow]not matched (left untouched):[/yellow]")
        for u in s["unmatched"]:
            console.print(f"  - {u}")


def latency_table(lat: dict[str, Any]) -> Table:
    """Original vs optimized medians per runtime, with the shape and threads they were taken at."""
    t = Table(title=f"latency at {lat['shape']}, {lat['threads']} threads (median ms, p10-p90)")
    for c in ("runtime", "original", "optimized", "speedup"):
        t.add_column(c)
    for rt in ("torch", "onnxruntime"):
        o = lat.get("runs", {}).get(f"{rt}/original")
        n = lat.get("runs", {}).get(f"{rt}/optimized")
        if o and n:
            t.add_row(
                rt,
                f"{o['median_ms']:.2f} ({o['p10_ms']:.1f}-{o['p90_ms']:.1f})",
                f"{n['median_ms']:.2f} ({n['p10_ms']:.1f}-{n['p90_ms']:.1f})",
                f"{lat['speedup'][rt]:.3f}x",
            )
    return t


def _latency_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    lat = report.get("latency") or {}
    rows = []
    for rt in ("torch", "onnxruntime"):
        o = lat.get("runs", {}).get(f"{rt}/original")
        n = lat.get("runs", {}).get(f"{rt}/optimized")
        if o and n:
            rows.append(
                (rt, f"{o['median_ms']:.2f}", f"{n['median_ms']:.2f}", f"{lat['speedup'][rt]:.3f}x")
            )
    return rows


def print_report(console: Console, report: dict[str, Any]) -> None:
    m = report["model"]
    console.print(
        f"[bold]run of {m['source']}[/bold] ({m['kind']})  made {report['created']}  "
        f"trimformer {report['trimformer']}"
    )
    t = Table(title="passes")
    for c in ("pass", "exactness", "changes", "params", "FLOPs", "s"):
        t.add_column(c)
    for p in report["passes"]:
        ch = p["changes"]
        text = ", ".join(f"{k}={v}" for k, v in ch.items() if not isinstance(v, (list, dict)))
        if ch.get("removed"):
            text += "\nremoved: " + ", ".join(f"{r['kind']}@{r['block']}" for r in ch["removed"])
        t.add_row(
            p["name"],
            p["exactness"],
            text,
            f"{_num(p['params']['before'])} -> {_num(p['params']['after'])}",
            f"{_num(p['flops']['before'])} -> {_num(p['flops']['after'])}",
            f"{p['seconds']:.2f}",
        )
    console.print(t)
    for p in report["passes"]:
        imp = p.get("importance") or {}
        if imp.get("plans"):
            console.print(windows_table(imp))
            continue
        units = [u for u in ("attention", "mlp", "blocks") if imp.get(u)]
        if not units:
            continue
        it = Table(title=f"{p['name']}: importance by block (1 - cos, higher = more important)")
        it.add_column("block", justify="right")
        for u in units:
            it.add_column(u, justify="right")
        idx = sorted({int(k) for u in units for k in imp[u]})
        for i in idx:
            it.add_row(
                str(i), *[f"{imp[u].get(str(i), imp[u].get(i, float('nan'))):.4f}" for u in units]
            )
        console.print(it)
    q = report["quality"]
    qt = Table(title=f"quality on held-out data ({report['data']['text']})")
    for c in ("metric", "original", "optimized"):
        qt.add_column(c)
    for k, v in q["before"]["metrics"].items():
        qt.add_row(k, f"{v:.4f}", f"{q['after']['metrics'].get(k, float('nan')):.4f}")
    console.print(qt)
    if _latency_rows(report):
        console.print(latency_table(report["latency"]))
    if report.get("search"):
        console.print(search_table(report["search"]))
    ex = report.get("exports", {})
    if "onnx" in ex:
        ver = ex["onnx"]["verification"]
        console.print(f"ONNX verified in onnxruntime: {json.dumps(ver)[:300]}")


def windows_table(choice: dict[str, Any]) -> Table:
    """sparse-attention: every plan validated under the density budget; * marks the chosen."""
    held = "the profile batches" if choice["validated_on_profile_batches"] else "held-back"
    t = Table(
        title=(
            f"sparse-attention: windows at density {choice['budget']:g}, profiled at N = "
            f"{choice['lengths']} on {choice['profile_batches']} batches, validated on "
            f"{choice['validation_batches']} {held} calibration batch(es)"
        )
    )
    for c in ("plan", "density", "estimate", "validation (vs dense)"):
        t.add_column(c)
    for r in choice["plans"]:
        chosen = r["label"] == choice["chosen"]
        windows = r["windows"]
        if isinstance(windows, dict):
            windows = "; ".join(f"{b}: {', '.join(w)}" for b, w in windows.items())
        t.add_row(
            ("[bold green]* [/bold green]" if chosen else "") + r["label"],
            " / ".join(f"{d:.3f}" for d in r["density"]),
            f"{r['estimate']:+.4f}",
            f"{r['validation_loss']:.5f}",
        )
        if chosen:
            t.caption = (
                "estimate: first-order loss change vs uniform (loss) or attention mass lost "
                "(mass); validation: KL from the dense model's next-token distributions (causal "
                f"LM) or 1 - cosine with its output; chosen windows (alpha + beta N), by block: "
                f"{windows}"
            )
    return t


def search_table(search: dict[str, Any]) -> Table:
    """Every candidate the search looked at; verified ones carry measured numbers."""
    t = Table(
        title=(
            f"search: target {search['target']}x on {search['runtime']}, baseline "
            f"{search['baseline_ms']:.1f} ms, goal {search['goal_ms']:.1f} ms, "
            f"{'reached' if search['reached'] else 'NOT reached: ' + search['reason']}, "
            f"{search['seconds']:.0f} s"
        ),
        caption=search.get("note") or None,
    )
    for c in ("plan", "pred. x", "meas. x", "calib. loss", "held-out"):
        t.add_column(c)
    chosen = search["chosen"]["label"]
    for c in search["candidates"]:
        q = c.get("quality") or {}
        held = ", ".join(f"{k} {v:.4f}" for k, v in q.items() if k in ("perplexity", "cosine"))
        mark = (
            "[bold green]* [/bold green]"
            if (c["label"] == chosen and c["measured_speedup"])
            else ""
        )
        t.add_row(
            mark + c["label"],
            f"{c['predicted_speedup']:.3f}",
            "-" if c["measured_speedup"] is None else f"{c['measured_speedup']:.3f}",
            "-" if c["proxy_quality_loss"] is None else f"{c['proxy_quality_loss']:.4f}",
            held or "-",
        )
    return t


def print_summary(console: Console, report: dict[str, Any], out_dir: Path) -> None:
    q = report["quality"]["delta"]
    parts = [f"wrote {out_dir}/ (recipe.yaml, model.pt2"]
    if "onnx" in report.get("exports", {}):
        parts.append(", model.onnx")
    if "int8" in report.get("exports", {}):
        parts.append(", model.int8.onnx")
    if "int8_torch" in report.get("exports", {}):
        parts.append(", model.int8.pt2")
    parts.append(", report.json)")
    console.print("".join(parts))
    console.print(
        f"params {_num(report['baseline']['params'])} -> {_num(report['result']['params'])}, "
        f"FLOPs {_num(report['baseline']['flops'])} -> {_num(report['result']['flops'])}"
    )
    for rt, o, n, s in _latency_rows(report):
        console.print(f"{rt}: {o} ms -> {n} ms  ({s} at {report['latency']['shape']})")
    console.print(f"quality: {q.get('summary', q)}")
    q8 = report["quality"].get("delta_int8")
    if q8:
        console.print(f"quality of model.int8.onnx in onnxruntime: {q8.get('summary', q8)}")
    q8t = report["quality"].get("delta_int8_torch")
    if q8t:
        console.print(f"quality of model.int8.pt2 in torch: {q8t.get('summary', q8t)}")
    other = (report.get("latency") or {}).get("speedup_other") or {}
    for name, ratio in other.items():
        console.print(f"{name} (not compiled): {ratio:.3f}x; torch int8 needs torch.compile")
    console.print(f"next: trimformer inspect {out_dir}")

"""report.html: the run report for people — tables and two plots, one self-contained file."""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any


def _plot_png(draw: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _frontier(search: dict[str, Any]) -> str:
    def draw(ax: Any) -> None:
        pts = [c for c in search["candidates"] if c["proxy_quality_loss"] is not None]
        ax.scatter(
            [c["predicted_speedup"] for c in pts],
            [c["proxy_quality_loss"] for c in pts],
            s=14,
            alpha=0.5,
            label="looked at (predicted speedup)",
        )
        ver = [c for c in pts if c["measured_speedup"] is not None]
        ax.scatter(
            [c["measured_speedup"] for c in ver],
            [c["proxy_quality_loss"] for c in ver],
            s=40,
            marker="D",
            color="C3",
            label="built and measured",
        )
        ax.axvline(search["target"], color="grey", ls="--", lw=1, label="target")
        ax.set_xlabel("speedup")
        ax.set_ylabel("quality loss on calibration data")
        ax.legend(fontsize=8)

    return _plot_png(draw)


def _importance(record: dict[str, Any]) -> str:
    imp = record["importance"]

    def draw(ax: Any) -> None:
        units = [u for u in ("attention", "mlp") if imp.get(u)]
        for k, u in enumerate(units):
            idx = sorted(int(i) for i in imp[u])
            vals = [imp[u].get(str(i), imp[u].get(i)) for i in idx]
            ax.bar([i + 0.4 * k for i in idx], vals, width=0.4, label=u)
        ax.set_xlabel("block")
        ax.set_ylabel("1 - cos(in, out)")
        ax.legend(fontsize=8)

    return _plot_png(draw)


def render_html(report: dict[str, Any]) -> str:
    m = report["model"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>trimformer report</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>trimformer run of {html.escape(m['source'])}</h1>",
        f"<p>{html.escape(m['kind'])}, made {html.escape(report['created'])} by trimformer "
        f"{html.escape(report['trimformer'])} (torch {html.escape(report['environment']['torch'])}"
        f", {report['environment']['threads']} threads)</p>",
        "<h2>Result</h2>",
    ]
    lat = report.get("latency") or {}
    rows = []
    for rt, s in (lat.get("speedup") or {}).items():
        o, n = lat["runs"][f"{rt}/original"], lat["runs"][f"{rt}/optimized"]
        rows.append(
            [rt, lat["shape"], f"{o['median_ms']:.2f}", f"{n['median_ms']:.2f}", f"{s:.3f}x"]
        )
    parts.append(_table(["runtime", "shape", "original ms", "optimized ms", "speedup"], rows))
    q = report["quality"]
    parts.append(
        _table(
            ["metric (held-out)", "original", "optimized"],
            [
                [k, f"{v:.4f}", f"{q['after']['metrics'].get(k, float('nan')):.4f}"]
                for k, v in q["before"]["metrics"].items()
            ],
        )
    )
    parts.append("<h2>Passes</h2>")
    parts.append(
        _table(
            ["pass", "exactness", "config", "params", "FLOPs", "seconds"],
            [
                [
                    p["name"],
                    p["exactness"],
                    json.dumps(p["config"])[:200],
                    f"{p['params']['before']:,} -> {p['params']['after']:,}",
                    f"{p['flops']['before']:,} -> {p['flops']['after']:,}",
                    p["seconds"],
                ]
                for p in report["passes"]
            ],
        )
    )
    for p in report["passes"]:
        if p["name"] == "drop" and p.get("importance"):
            parts.append("<h3>Per-block importance (drop)</h3>")
            parts.append(f"<img alt='importance' src='{_importance(p)}'>")
    if report.get("search"):
        s = report["search"]
        parts.append("<h2>Search</h2>")
        parts.append(
            f"<p>target {s['target']}x on {s['runtime']}: baseline {s['baseline_ms']:.1f} ms, goal "
            f"{s['goal_ms']:.1f} ms; {'reached' if s['reached'] else 'not reached: ' + s['reason']}"
            f" in {s['seconds']:.0f} s. Chosen: {html.escape(s['chosen']['label'])}"
            f"{'. ' + html.escape(s['note']) if s.get('note') else ''}</p>"
        )
        parts.append(f"<img alt='quality vs speedup' src='{_frontier(s)}'>")
        parts.append(
            _table(
                ["plan", "predicted x", "measured x", "calibration loss"],
                [
                    [
                        c["label"],
                        c["predicted_speedup"],
                        c["measured_speedup"] or "-",
                        c["proxy_quality_loss"],
                    ]
                    for c in s["candidates"]
                ],
            )
        )
    parts.append("<h2>Structure after</h2>")
    parts.append(
        _table(
            ["#", "block", "attention heads", "mlp width"],
            [
                [
                    b["index"],
                    b["name"],
                    b["attention"]["heads"] if b["attention"] else "dropped",
                    b["mlp"]["width"] if b["mlp"] else "dropped",
                ]
                for b in report["structure"]["after"]["blocks"]
            ],
        )
    )
    parts.append("</body></html>")
    return "\n".join(parts)

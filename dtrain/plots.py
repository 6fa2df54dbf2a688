"""Pictures of a run drawn with the standard library: ``loss.svg`` from ``metrics.jsonl``.

:func:`read_history` replays metrics.jsonl as runlog.py defines it: a ``start`` record at
step s (a resume) drops the records of earlier runs after step s, so the curves are those of
the steps that count, and the steps where the run resumed are marked. :func:`loss_svg`
draws two panels against step: training and validation loss, and the caption metrics
(BLEU-4, ROUGE-L, CIDEr-D) of each evaluation, with a dashed line at every resume.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from .atomic import write_text_atomic

METRIC_KEYS = (("bleu4", "BLEU-4"), ("rouge_l", "ROUGE-L"), ("cider_d", "CIDEr-D"))
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def read_history(metrics_path) -> dict:
    """{"train": [(step, loss)], "eval": [record], "resumes": [step]} from metrics.jsonl."""
    train, evals, resumes = [], [], []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: skip it
        kind, step = rec.get("kind"), rec.get("step")
        if kind == "start":
            train = [t for t in train if t[0] <= step]
            evals = [e for e in evals if e["step"] <= step]
            resumes = [r for r in resumes if r < step]
            if rec.get("resumed_from"):
                resumes.append(step)
        elif kind == "train":
            train.append((step, rec["loss"]))
        elif kind == "eval" and not rec.get("stopped"):
            evals.append(rec)
    return {"train": train, "eval": evals, "resumes": resumes}


def _ticks(lo, hi, n=5):
    """About n round numbers (1, 2 or 5 times a power of ten apart) within [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _panel(x0, y0, w, h, series, resumes, x_range, title, ylabel):
    """SVG of one panel: series [(label, [(x, y)], dashed)], axes, ticks, legend."""
    (xa, xb) = x_range
    ys = [y for _, pts, _ in series for _, y in pts]
    ya, yb = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if yb - ya < 1e-12:
        ya, yb = ya - 0.5, yb + 0.5
    pad = 0.05 * (yb - ya)
    ya, yb = ya - pad, yb + pad

    def sx(x):
        return x0 + (x - xa) / ((xb - xa) or 1) * w

    def sy(y):
        return y0 + h - (y - ya) / (yb - ya) * h

    out = [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="white" stroke="#444"/>',
           f'<text x="{x0 + w / 2}" y="{y0 - 8}" text-anchor="middle" font-size="14">'
           f'{escape(title)}</text>',
           f'<text x="{x0 - 48}" y="{y0 + h / 2}" font-size="12" text-anchor="middle" '
           f'transform="rotate(-90 {x0 - 48} {y0 + h / 2})">{escape(ylabel)}</text>']
    for t in _ticks(xa, xb):
        out.append(f'<line x1="{sx(t):.1f}" y1="{y0 + h}" x2="{sx(t):.1f}" y2="{y0 + h + 4}" '
                   'stroke="#444"/>')
        out.append(f'<text x="{sx(t):.1f}" y="{y0 + h + 16}" font-size="11" '
                   f'text-anchor="middle">{t:g}</text>')
    for t in _ticks(ya, yb):
        out.append(f'<line x1="{x0 - 4}" y1="{sy(t):.1f}" x2="{x0 + w}" y2="{sy(t):.1f}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 6}" y="{sy(t) + 4:.1f}" font-size="11" '
                   f'text-anchor="end">{t:.4g}</text>')
    for r in resumes:
        out.append(f'<line x1="{sx(r):.1f}" y1="{y0}" x2="{sx(r):.1f}" y2="{y0 + h}" '
                   'stroke="#888" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{sx(r) + 3:.1f}" y="{y0 + 12}" font-size="10" fill="#666">'
                   f'resumed @ {r}</text>')
    for k, (label, pts, markers) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.3"/>')
        if markers:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>'
                    for x, y in pts]
        out.append(f'<text x="{x0 + w - 8}" y="{y0 + 16 + 14 * k}" font-size="11" fill="{colour}" '
                   f'text-anchor="end">{escape(label)}</text>')
    out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 32}" font-size="12" '
               'text-anchor="middle">step</text>')
    return out


def loss_svg(history, width=760, panel_h=250) -> str:
    """The SVG document of a run's curves (see the module docstring)."""
    train, evals, resumes = history["train"], history["eval"], history["resumes"]
    steps = [s for s, _ in train] + [e["step"] for e in evals] + list(resumes)
    x_range = (min(steps, default=0), max(steps, default=1))
    loss_series = [("train loss", train, False)]
    if evals:
        loss_series.append(("val loss", [(e["step"], e["val_loss"]) for e in evals
                                         if "val_loss" in e], True))  # none when stopped
    parts = _panel(70, 30, width - 100, panel_h, loss_series, resumes, x_range,
                   "loss", "loss (sum over tokens / captions)")
    metric_series = [(name, [(e["step"], e[key]) for e in evals if key in e], True)
                     for key, name in METRIC_KEYS]
    metric_series = [s for s in metric_series if s[1]]
    height = panel_h + 80
    if metric_series:
        parts += _panel(70, panel_h + 110, width - 100, panel_h, metric_series, resumes, x_range,
                        "caption metrics on the validation images", "score")
        height = 2 * panel_h + 160
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
            + "".join(parts) + "</svg>\n")


def write_loss_svg(metrics_path, out_path) -> Path | None:
    """Write ``out_path`` from ``metrics_path``; None when there is nothing to draw."""
    history = read_history(metrics_path)
    if not history["train"] and not history["eval"]:
        return None
    out_path = Path(out_path)
    return write_text_atomic(out_path, loss_svg(history))

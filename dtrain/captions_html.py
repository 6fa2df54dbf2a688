"""``evaluate --html-out``: one self-contained HTML page of sampled captions beside their
references, with the metrics of the evaluation (no scripts, no external files)."""

from __future__ import annotations

from html import escape
from pathlib import Path

from .atomic import write_text_atomic

NAMES = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4",
         "rouge_l": "ROUGE-L", "cider_d": "CIDEr-D", "meteor": "METEOR", "spice": "SPICE"}

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin-bottom: 20px; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.hyp { font-weight: bold; color: #1f4e9c; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
ul { margin: 0; padding-left: 18px; }
"""


def captions_page(title, metrics: dict, rows, details: dict) -> str:
    """rows: (image id, sampled caption, [references], image URL or None)."""
    head = "".join(f"<th>{escape(NAMES.get(k, k))}</th>" for k in metrics)
    values = "".join(f'<td class="num">{v:.4f}</td>' for v in metrics.values())
    info = " · ".join(f"{escape(str(k))}: {escape(str(v))}" for k, v in details.items())
    body = []
    for image_id, hyp, refs, url in rows:
        ident = (f'<a href="{escape(url, quote=True)}">{escape(str(image_id))}</a>' if url
                 else escape(str(image_id)))
        ref_items = "".join(f"<li>{escape(r)}</li>" for r in refs)
        body.append(f'<tr><td>{ident}</td><td class="hyp">{escape(hyp) or "<i>(empty)</i>"}'
                    f"</td><td><ul>{ref_items}</ul></td></tr>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{escape(title)}</h1><p>{info}</p>"
            f"<table><tr>{head}</tr><tr>{values}</tr></table>"
            "<table><tr><th>image</th><th>sampled</th><th>references</th></tr>"
            + "".join(body) + "</table></body></html>\n")


def write_captions_page(path, title, metrics, rows, details) -> Path:
    return write_text_atomic(path, captions_page(title, metrics, rows, details))

"""`deltalens report`: analyses as one self-contained HTML file, to attach to a paper or a PR.

Plotly's JavaScript (the `plotly` package's bundled plotly.min.js) is inlined, so the file opens
with no server and no network. Per analysis: what was compared, the CLI's summary, the figures of
its kind (`Analysis.figures`: overview heatmaps, geometry, series or overlap) and a table of every
matrix. Names are data: every cell is escaped, and Plotly's JSON escapes `<`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
import plotly.io as pio
from plotly.offline import get_plotlyjs

from deltalens.worker.notebook import Analysis, _layer_label, _short

CONFIG = {"displaylogo": False, "responsive": True}


def _count(v) -> str:
    return f"{int(v):,}"


def _share(v) -> str:
    return f"{100 * v:.2f}%"


def _number(v) -> str:
    return f"{v:.3g}"


# per kind: (column pattern of Analysis.tensors, header — may use the pattern's groups, format)
Column = tuple[str, str, Callable]
COMMON: list[Column] = [
    (r"name", "matrix", str),
    (r"layer", "layer", _layer_label),
    (r"matrix", "type", str),
    (r"shape", "shape", lambda s: "×".join(map(str, s))),
    (r"numel", "weights", _count),
]
TABLES: dict[str, list[Column]] = {
    "pair": [
        *COMMON,
        (r"sparsity@(.+)", "sparsity τ={0}", _share),
        (r"rank_pct", "rank %", lambda v: f"{v:.1f}"),
        (r"relative_change", "‖Δ‖/‖W‖", _number),
        (r"energy_in_top8", "energy in top-8", _share),
        (r"rank1_dominance", "rank-1 dominance", _share),
        (r"intruders_top8", "intruders (top-8)", _count),
        (r"enrichment_magnitude_1pct", "enrichment in top-1% |W₀|", _number),
    ],
    "series": [*COMMON, (r"(consistent|transient|untouched)", "{0}", _count)],
    "overlap": [
        *COMMON,
        (r"changed\[(\d+)\]", "changed, run {0}", _count),
        (r"jaccard\[(.+)\]", "Jaccard {0}", _number),
        (r"lift\[(.+)\]", "lift {0}", _number),
    ],
}

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 0 24px 48px;
       color: #1d2433; background: #fff; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 40px; border-bottom: 1px solid #d7dce5; padding-bottom: 6px; }
.meta { color: #5b6474; } nav a { margin-right: 14px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; } dt { color: #5b6474; }
dd { margin: 0; overflow-wrap: anywhere; }
pre { background: #f5f7fa; padding: 12px; overflow-x: auto; font-size: 12px; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid #e3e7ee; border-radius: 6px; padding: 4px; min-height: 320px; }
.table { max-height: 640px; overflow: auto; border: 1px solid #e3e7ee; }
table { border-collapse: collapse; font-size: 12px; width: 100%; }
th, td { padding: 3px 8px; text-align: right; white-space: nowrap; border-bottom: 1px solid #eef1f5; }
th { position: sticky; top: 0; background: #f5f7fa; } td:first-child, th:first-child { text-align: left; }
@media print { .table { max-height: none; overflow: visible; } figure { break-inside: avoid; } }
"""


def write_report(analyses: list[Analysis], path, title: str | None = None) -> Path:
    """Write the report of `analyses` to `path` (one HTML file); returns the path."""
    path = Path(path)
    title = title or "deltalens report"
    body = "\n".join(_section(a, i) for i, a in enumerate(analyses))
    nav = " ".join(f'<a href="#{_anchor(a)}">{html.escape(a.kind)} {html.escape(a.id)}</a>' for a in analyses)
    page = (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style>\n"
        f"<script>{get_plotlyjs()}</script></head>\n<body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="meta">{len(analyses)} analys{"is" if len(analyses) == 1 else "es"} · written '
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC by deltalens {_version()}</p><nav>{nav}</nav>\n"
        f"{body}\n</body></html>\n"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def _version() -> str:
    try:
        return version("deltalens")
    except PackageNotFoundError:
        return "(source)"


def _anchor(a: Analysis) -> str:
    return f"analysis-{re.sub(r'[^0-9A-Za-z_-]', '_', a.id)}"


def _section(a: Analysis, index: int) -> str:
    targets = {"pair": "target", "series": "checkpoints (last = final)", "overlap": "runs"}[a.kind]
    meta = [
        ("analysis", a.id),
        ("kind", a.kind),
        ("base", a.base),
        (targets, "\n".join(a.targets)),
        ("τ", ", ".join(f"{t:g}" for t in a.taus) + (" (relative: |Δ| > τ·|W|)" if a.relative else "")),
        ("family", a.family),
        ("computed", f"{a.created_at:%Y-%m-%d %H:%M} UTC"),
    ]
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{_lines(v)}</dd>" for k, v in meta)
    figures = "".join(
        f"<figure>{_plot(fig, f'fig-{index}-{k}')}</figure>" for k, fig in enumerate(a.figures().values())
    )
    heading = f"{a.kind}: {_short(a.base)} → {', '.join(_short(t) for t in a.targets)}"
    return (
        f'<section id="{_anchor(a)}"><h2>{html.escape(heading)}</h2><dl>{rows}</dl>'
        f"<h3>Summary</h3><pre>{html.escape(str(a))}</pre>"
        f'<h3>Figures</h3><div class="figures">{figures}</div>'
        f"<h3>Every matrix ({len(a.tensors)})</h3>{_table(a)}</section>"
    )


def _lines(text: str) -> str:
    return "<br>".join(html.escape(line) for line in str(text).split("\n"))


def _plot(fig, div_id: str) -> str:
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=CONFIG)


def _table(a: Analysis) -> str:
    """Every matrix, with the columns of TABLES[kind] that the analysis has."""
    frame = a.tensors
    columns = []  # (column, header, format)
    for pattern, header, fmt in TABLES[a.kind]:
        for column in frame.columns:
            if match := re.fullmatch(pattern, column):
                columns.append((column, header.format(*match.groups()), fmt))
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row[c], fmt))}</td>" for c, _, fmt in columns) + "</tr>"
        for row in frame.to_dict("records")
    )
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _cell(value, fmt) -> str:
    if not isinstance(value, list | tuple) and pd.isna(value):
        return _layer_label(None) if fmt is _layer_label else "–"
    return fmt(value)

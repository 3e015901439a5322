"""The human-readable summary the CLI prints on stdout."""

from __future__ import annotations


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in cells
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _grouped(title: str, groups: list[dict], key: str) -> str:
    taus = [c["tau"] for c in groups[0]["changed"]] if groups else []
    rows = [
        [
            g[key] if g[key] is not None else "-",
            f"{g['numel']:,}",
            *[f"{1 - c['count'] / g['numel']:.2%}" if g["numel"] else "-" for c in g["changed"]],
        ]
        for g in groups
    ]
    return f"{title}\n" + _table([key, "params", *[f"sparsity@{t:g}" for t in taus]], rows)


def _skipped(doc: dict) -> str:
    skipped = doc.get("skipped", {})
    parts = [f"{len(v)} {k.replace('_', ' ')}" for k, v in skipped.items() if v and k != "resized"]
    notes = [f"note: {n}" for n in doc.get("notes", [])]  # e.g. a trainer checkpoint's optimizer left out
    resized = [  # compared on the rows all inputs share: not skipped
        f"resized: {r['name']} ({' vs '.join('x'.join(map(str, s)) for s in r['shapes'])}): "
        f"first {r['compared_rows']:,} rows compared, the extra rows not"
        for r in skipped.get("resized", [])
    ]
    warnings = [f"warning: {w['message']}" for w in doc.get("warnings", [])]
    return "\n".join(["skipped: " + (", ".join(parts) if parts else "none"), *resized, *notes, *warnings])


def pair_summary(doc: dict) -> str:
    s = doc["summary"]
    lines = [
        f"pair  {doc['base']}  ->  {doc['target']}",
        f"family {doc['family']}, {s['numel']:,} parameters compared, {doc['mode']} τ",
        "",
    ]
    lines.append(
        _table(
            ["τ", "changed", "sparsity"],
            [
                [f"{c['tau']:g}", f"{c['count']:,}", _pct(sp["value"])]
                for c, sp in zip(s["changed"], s["sparsity"])
            ],
        )
    )
    sim = s["similarity"]
    lines.append(
        f"\nsimilarity: {_pct(sim['equal_share'])} of weights equal within τ={sim['tau']:g}; "
        f"relative L2 ‖Δ‖/‖base‖ = {sim['relative_l2']:.3e}"
        if sim["relative_l2"] is not None
        else ""
    )
    if s["mean_rank_pct"] is not None:
        lines.append(f"update rank: mean {s['mean_rank_pct']:.1f}% of full, min {s['min_rank_pct']:.1f}%")
    lines += _precision(s.get("precision"), doc.get("masters"))
    lines += [
        "",
        _grouped("by matrix type", s["by_matrix"], "matrix"),
        "",
        _grouped("by layer", s["by_layer"], "layer"),
        "",
        _skipped(doc),
    ]
    return "\n".join(lines)


def _precision(p: dict | None, masters: dict | None) -> list[str]:
    """One line on ULP steps (worker/precision.py), and the masters' true vs visible change."""
    out = []
    if p and p["numel"]:
        out.append(
            f"precision: {p['one_ulp']:,} weights moved by at most one ULP of the base's dtype "
            f"({_pct(p['one_ulp_share'])} of weights, {_pct(p['one_ulp_of_changed'])} of changed ones)"
        )
    if masters:
        rows = [
            [f"{t['tau']:g}", f"{t['count']:,}", f"{v['count']:,}", f"{h['count']:,}"]
            for t, v, h in zip(masters["true"], masters["visible"], masters["hidden"])
        ]
        a = masters["any"]
        rows.insert(0, ["0 (any)", f"{a['true']:,}", f"{a['visible']:,}", f"{a['hidden']:,}"])
        out += ["", f"fp32 masters {masters['path']}: true vs visible change"]
        out.append(_table(["τ", "true (masters)", "visible (stored)", "hidden"], rows))
    return out


def series_summary(doc: dict) -> str:
    rows = [
        [st["checkpoint"], f"{st['changed']:,}", f"{st['outside_final']:,}", _pct(st["transient_fraction"])]
        for st in doc["steps"]
    ]
    c, n = doc["categories"], doc["numel"]
    return "\n".join(
        [
            f"series  base {doc['base']}, {len(doc['steps'])} checkpoints, τ={doc['tau']:g}",
            "",
            _table(["checkpoint", "changed", "not in final", "transient"], rows),
            "",
            f"consistent {c['consistent']:,} ({c['consistent'] / n:.2%})   transient {c['transient']:,} "
            f"({c['transient'] / n:.2%})   untouched {c['untouched']:,} ({c['untouched'] / n:.2%})",
            "",
            _skipped(doc),
        ]
    )


def overlap_summary(doc: dict) -> str:
    s = doc["summary"]
    runs = [
        [i, r, f"{c:,}", _pct(1 - c / s["numel"])] for i, (r, c) in enumerate(zip(doc["runs"], s["changed"]))
    ]
    pairs = [
        [
            f"{p['a']}&{p['b']}",
            f"{p['both']:,}",
            _pct(p["o1"]),
            _pct(p["baseline1"]),
            _pct(p["o2"]),
            _pct(p["baseline2"]),
            _pct(p["jaccard"]),
        ]
        for p in s["pairs"]
    ]
    return "\n".join(
        [
            f"overlap  base {doc['base']}, {len(doc['runs'])} runs, τ={doc['tau']:g}, "
            f"{s['numel']:,} parameters",
            "",
            _table(["#", "run", "changed", "sparsity"], runs),
            "",
            _table(["pair", "both", "o1", "random", "o2", "random", "jaccard"], pairs),
            "",
            _skipped(doc),
        ]
    )


SUMMARIES = {"pair": pair_summary, "series": series_summary, "overlap": overlap_summary}

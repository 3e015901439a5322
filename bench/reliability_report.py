"""Print the figures of the last reliability runs (test-output/reliability/*.json, bench/.data/load.json)
as the markdown tables of docs/reliability.md.

    python bench/reliability_report.py        # `make reliability` ends with this
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "test-output" / "reliability"


def load(name: str) -> dict | None:
    path = FIGURES / f"{name}.json" if not name.endswith(".json") else ROOT / name
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    rows = []
    for name, what in (
        ("hostile_cli", "hostile corpus through the CLI: exit 2, one line naming the file"),
        ("hostile_api", "hostile corpus through upload API + register-by-path: 4xx, store unchanged"),
    ):
        if d := load(name):
            rows.append((what, f"{d['passed']}/{d['cases']}"))
    if d := load("header_fuzz"):
        rows.append(
            (
                "header fuzzing vs safetensors.safe_open: cases / disagreements",
                f"{d['cases']:,} / {d['disagreements']} ({d['accepted']:,} accepted, "
                f"{d['rejected']:,} refused by both, "
                f"{d['policy_rejected']:,} refused by policy)",
            )
        )
    if d := load("api_fuzz"):
        rows.append(
            (
                "Schemathesis: operations / requests / failures / 5xx",
                f"{d['operations']} / {d['requests']:,} ({d['stateful_requests']} stateful) / "
                f"{d['failures']} / "
                f"{sum(n for code, n in d['status_codes'].items() if code.startswith('5'))}",
            )
        )
    if d := load("soak_worker_kill"):
        ok = sum(r["outcome"] == "done" and r["exact"] and not r["partial_seen"] for r in d["rows"])
        landed = [r for r in d["rows"] if r["landed"]]
        recovered = sorted(r["recovered_s"] for r in landed)
        rows.append(
            (
                "worker pool process SIGKILLed at a random point of a running analysis",
                f"{len(landed)} kills landed mid-analysis (at {min(r['kill_after_s'] for r in landed)}–"
                f"{max(r['kill_after_s'] for r in landed)} s of a {d['running_span_s']} s run); all "
                f"{ok}/{d['runs']} "
                f"runs done, exact, never partial; retry finished in median "
                f"{recovered[len(recovered) // 2]} s",
            )
        )
    for name, what, check in (
        (
            "soak_redis_restart",
            "Redis SIGKILLed with 3 jobs queued: all done, exact",
            lambda r: r["done"] == r["jobs"] and r["exact"],
        ),
        (
            "soak_api_upload",
            "API SIGKILLed mid-upload: resumed, sha256 equal, registered once",
            lambda r: r["status"] == 201 and r["sha256_matches"] and r["registered_once"],
        ),
        (
            "soak_api_ingest",
            "API SIGKILLed inside the ingest transaction: done, each row once",
            lambda r: r["api_died_in_ingest"] and r["outcome"] == "done" and r["exact"],
        ),
    ):
        if d := load(name):
            rows.append((what, f"{sum(map(check, d['rows']))}/{d['runs']}"))
    if d := load("soak_disk_full"):
        r = d["rows"][0]
        rows.append(
            (
                "disk full: refused up front / mid-upload / resumed after freeing space",
                f"{r['refused_up_front']} / {r['mid_upload']} (nothing registered) / {r['completed']} "
                f"(sha256 {'equal' if r['sha256_matches'] else 'DIFFERS'})",
            )
        )
    if d := load("bench/.data/load.json"):
        lo = d["load"]
        rows.append(
            (
                f"{lo['readers']} readers, {lo['duration_s']:.0f} s, worker publishing "
                f"({lo['analyses_ingested_during_window']} ingested)",
                f"{lo['requests']:,} requests, {lo['errors']} errors, p50 {lo['all']['p50_ms']:.1f} ms, "
                f"p95 {lo['all']['p95_ms']:.1f} ms, p99 {lo['all']['p99_ms']:.1f} ms",
            )
        )
    print("| what | result |\n|---|---|")
    for what, result in rows:
        print(f"| {what} | {result} |")


if __name__ == "__main__":
    main()

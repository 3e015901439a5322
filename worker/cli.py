"""`deltalens` command line: analyze | series | overlap (see ARCHITECTURE.md, "CLI contract").

Exit 0 on success; bad input exits 2 with one line on stderr naming the file and the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def _tau(text: str) -> float:
    from deltalens.worker.contract import TAU_RULE, valid_tau

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"τ must be a number, got {text!r}") from None
    if not valid_tau(value):
        raise argparse.ArgumentTypeError(f"{TAU_RULE}, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser, many_taus: bool) -> None:
    p.add_argument(
        "--tau",
        type=_tau,
        nargs="+",
        action="extend",
        metavar="T",
        help="tolerance(s) τ: a weight counts as changed when |Δ| > τ (default 1e-5)"
        + ("" if many_taus else "; the first one is used"),
    )
    p.add_argument("--relative", action="store_true", help="relative mode: changed when |Δ| > τ·|base|")
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available"
    )
    p.add_argument("--out", metavar="FILE.duckdb", help="add the results to this DuckDB file")
    p.add_argument("--json", metavar="FILE|-", help="write the result object as JSON ('-' = stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--prefer",
        choices=["safetensors", "bin", "dcp", "module", "fp32"],
        help="a folder holding several weight sets (model.safetensors, pytorch_model.bin, a DCP "
        "checkpoint, a DeepSpeed checkpoint): read this one (without it such a folder is refused); "
        "DeepSpeed: module = its module weights, fp32 = the fp32 master weights (the default when "
        "its optimizer partitions are there)",
    )
    p.add_argument(
        "--fp8",
        choices=["dequantized", "raw"],
        default="dequantized",
        help="fp8 weights with scales: compare code × scale (default) or the stored fp8 values alone",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltalens", description="Where did fine-tuning change a model?")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="base -> target: changed weights, histograms, rank, update maps")
    p.add_argument("base")
    p.add_argument("target")
    _common(p, many_taus=True)
    p.add_argument("--no-rank", action="store_true", help="skip singular spectra (faster)")
    p.add_argument(
        "--masters",
        metavar="DIR",
        help="the fp32 master weights of the TARGET (any checkpoint deltalens reads): report the true "
        "change (masters vs base) against the visible one (stored target vs base) at each τ",
    )
    p.add_argument(
        "--no-geometry",
        action="store_true",
        help="skip the principal geometry of ΔW and the mask enrichment (faster)",
    )
    p = sub.add_parser("series", help="base, checkpoints..., final: transient updates over training")
    p.add_argument("base")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    _common(p, many_taus=False)
    p = sub.add_parser("overlap", help="base + runs: overlap of update masks against the random baseline")
    p.add_argument("base")
    p.add_argument("runs", nargs="+", metavar="RUN")
    _common(p, many_taus=False)
    p = sub.add_parser("up", help="run the API and a worker on this machine (no Docker, no Redis)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--data-dir", type=Path, default=Path("deltalens-data"))
    p.add_argument(
        "--demo", type=Path, metavar="DIR", help="serve the demo in DIR (trained meanwhile when it has none)"
    )
    p.add_argument("--quick", action="store_true", help="with --demo: train DIR with demo-data --quick")
    p.add_argument(
        "--import",
        dest="imports",
        type=Path,
        action="append",
        metavar="FILE.duckdb",
        help="first add the analyses of this DuckDB file (the CLI's --out, computed elsewhere) to the data "
        "folder, so the dashboard shows them; repeatable; not while another `up` runs on the folder",
    )
    p = sub.add_parser("report", help="analyses as one self-contained HTML file (opens with no network)")
    p.add_argument(
        "source",
        metavar="ANALYSIS_OR_DUCKDB",
        help="a DuckDB file (the CLI's --out, or a service artifact results/<id>.duckdb), or the id of an "
        "analysis of the service's data folder (--data-dir)",
    )
    p.add_argument("-o", "--output", type=Path, default=Path("report.html"), help="default: report.html")
    p.add_argument("--id", action="append", metavar="ID", help="only this analysis of the file (repeatable)")
    p.add_argument("--title", help="the page's title (default: deltalens report)")
    p.add_argument("--data-dir", type=Path, default=Path("deltalens-data"))
    p = sub.add_parser("api", help="run the API alone (hosted mode; settings from DELTALENS_* variables)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--log-level", default="info")
    p.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-* from a reverse proxy")
    p = sub.add_parser("worker", help="run one analysis worker (a Celery worker; settings from DELTALENS_*)")
    p.add_argument("--queue", default=None, help="queue to take analyses from (default: DELTALENS_QUEUE)")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--pool-pids", type=Path, metavar="DIR", help="each pool process leaves a pid file here")
    p = sub.add_parser(
        "demo-data", help="train a tiny Llama through pretrain / SFT / RL / DPO into OUT (CPU, minutes)"
    )
    p.add_argument("out", type=Path)
    p.add_argument("--quick", action="store_true", help="a seconds-long version (fewer steps, smaller model)")
    p.add_argument("--seed", type=int, default=0)
    return parser


class ProgressBar:
    """A tqdm bar over bytes read, created on first use (after validation), only on a terminal."""

    def __init__(self, enabled: bool, desc: str = "comparing"):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar, self.desc = None, desc

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            width = shutil.get_terminal_size((0, 0)).columns or 100  # a fresh pty may report 0 columns
            self.bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                leave=False,
                desc=self.desc,
                mininterval=0.25,
                ncols=width,
            )
        self.bar.n, self.bar.total = done, total  # a download's total grows once its index is read
        self.bar.set_postfix_str(name[-40:], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("up", "api", "worker"):
        from deltalens.worker import service  # the CLI is the one place that starts the service

        if args.command == "api":
            return service.run_api(args.host, args.port, args.log_level, args.proxy_headers)
        if args.command == "worker":
            from deltalens.worker.settings import get_settings

            return service.run_worker(args.queue or get_settings().queue, args.loglevel, args.pool_pids)
        if args.imports and (code := service.import_artifacts(args.imports, args.data_dir)):
            return code
        return service.up(args.port, args.data_dir, args.host, demo=args.demo, quick=args.quick)
    if args.command == "report":
        return _report(args)
    if args.command == "demo-data":
        from deltalens.worker.demo import DemoConfig, make_demo_data

        summary = make_demo_data(args.out, DemoConfig.quick() if args.quick else DemoConfig(), seed=args.seed)
        print(
            f"demo checkpoints in {args.out} ({summary['seconds']} s); training log: {args.out / 'log.json'}"
        )
        return 0
    from deltalens.worker.analyses import Options, run_analysis
    from deltalens.worker.errors import InputError
    from deltalens.worker.report import SUMMARIES

    kind = {"analyze": "pair", "series": "series", "overlap": "overlap"}[args.command]
    paths = [
        args.base,
        *([args.target] if kind == "pair" else args.checkpoints if kind == "series" else args.runs),
    ]
    progress = ProgressBar(enabled=not args.quiet)
    opts = Options(
        taus=args.tau or [1e-5],
        relative=args.relative,
        rank=not getattr(args, "no_rank", False),
        geometry=not getattr(args, "no_geometry", False),
        device=args.device,
        progress=progress,
    )
    try:
        from deltalens.worker.checkpoint import preferring
        from deltalens.worker.quantized import fp8_mode

        local = [_local(p, args.quiet) for p in paths]  # hf://org/name[@rev] -> its snapshot folder
        with preferring(args.prefer), fp8_mode(args.fp8):
            result = run_analysis(kind, local, opts)
            if getattr(args, "masters", None):
                from deltalens.worker.precision import masters_figures

                result.document["masters"] = masters_figures(*local, args.masters, opts.taus, opts.relative)
        _label_inputs(result.document, dict(zip(local, paths)))
        if args.out:
            from deltalens.worker.store import write_artifact

            write_artifact(result, args.out)
    except InputError as e:
        print(f"deltalens: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"deltalens: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        progress.close()
    text = json.dumps(result.document, indent=1)
    if args.json == "-":
        print(text)
    else:
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
        print(SUMMARIES[kind](result.document))
    return 0


def _report(args) -> int:
    """`deltalens report`: the analyses of one artifact as one HTML file (worker/html_report.py)."""
    from deltalens.worker.artifacts import describe
    from deltalens.worker.errors import InputError

    source = Path(args.source)
    if not source.exists() and (args.data_dir / "results" / f"{args.source}.duckdb").is_file():
        source = args.data_dir / "results" / f"{args.source}.duckdb"  # an analysis id of the data folder
    try:
        found = describe(source)
        missing = set(args.id or []) - {a["analysis_id"] for a in found}
        if missing:
            raise InputError(source, f"holds no analysis {', '.join(sorted(missing))}")
        from deltalens.worker.html_report import write_report
        from deltalens.worker.notebook import load

        chosen = [a for a in found if not args.id or a["analysis_id"] in args.id]
        write_report(load(source, chosen), args.output, args.title)
    except InputError as e:
        print(f"deltalens: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file it names: the output not writable, or the source gone meanwhile
        print(f"deltalens: error: {e.filename or args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"report of {len(chosen)} analys{'is' if len(chosen) == 1 else 'es'}: {args.output}")
    return 0


def _label_inputs(document: dict, named: dict[str, str]) -> None:
    """Name each downloaded input as the user did (hf://org/name@rev), with a note of its folder."""
    named = {local: given for local, given in named.items() if local != given}
    if not named:
        return
    for key in ("base", "target"):
        if key in document:
            document[key] = named.get(document[key], document[key])
    for key in ("checkpoints", "runs"):
        if key in document:
            document[key] = [named.get(p, p) for p in document[key]]
    document["notes"] = [f"{given}: read from {local}" for local, given in named.items()] + document["notes"]


def _local(path: str, quiet: bool) -> str:
    """A local path for an input: a hub model (worker/hub.py) is downloaded first, with its own bar."""
    from deltalens.worker import hub

    bar = ProgressBar(enabled=not quiet, desc="downloading")
    try:
        return hub.locate(path, progress=lambda s: bar(s.done_bytes, s.total_bytes, s.file))
    finally:
        bar.close()


def main() -> None:
    try:
        sys.exit(run())
    except BrokenPipeError:  # `deltalens ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()

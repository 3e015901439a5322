"""Benchmark: a 2 GiB checkpoint uploaded through the API in chunks, over loopback.

    python bench/upload.py [--size-gib 2] [--chunk-mib 16]

Prints the upload throughput beside a local baseline (read + sha256 + write of the same file, no
HTTP), and the API process's resident memory before and at its peak (VmHWM), which must stay
flat — a few MiB above idle — whatever the file size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from service import free_port, wait_for  # noqa: E402

from deltalens.worker.service import api_command, safe_environment  # noqa: E402


def make_file(path: Path, size: int) -> None:
    """A valid safetensors file of `size` bytes: one U8 tensor of zeros (written sparse)."""
    data = size - 8 - 100
    while True:  # the header's length depends on the number it holds; settle both
        header = json.dumps({"blob": {"dtype": "U8", "shape": [data], "data_offsets": [0, data]}}).encode()
        if 8 + len(header) + data == size:
            break
        data = size - 8 - len(header)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(size)


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--chunk-mib", type=int, default=16)
    args = ap.parse_args()
    size, chunk = int(args.size_gib * (1 << 30)), args.chunk_mib << 20
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        tmp = Path(tmp)
        source = tmp / "model.safetensors"
        make_file(source, size)
        start = time.perf_counter()  # baseline: what the server must do anyway, without HTTP
        h = hashlib.sha256()
        with open(source, "rb") as f, open(tmp / "copy", "wb") as out:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
                out.write(block)
        baseline = time.perf_counter() - start
        (tmp / "copy").unlink()

        port = free_port()
        env = {
            **os.environ,
            "DELTALENS_DATA_DIR": str(tmp / "data"),
            "DELTALENS_BROKER_URL": "filesystem://",
            "DELTALENS_RESULT_BACKEND": f"file://{tmp / 'results'}",
            "DELTALENS_MAX_UPLOAD_BYTES": str(size),
        }
        (tmp / "results").mkdir()
        api = subprocess.Popen(api_command("127.0.0.1", port), env=safe_environment(env), cwd=ROOT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: httpx.get(url + "/api/health").status_code == 200, 60, what="the API")
            idle = rss_kib(api.pid, "VmRSS")
            with httpx.Client(base_url=url, timeout=120) as client, open(source, "rb") as f:
                sid = client.post(
                    "/api/uploads", json={"files": [{"name": "model.safetensors", "size": size}]}
                ).json()["id"]
                start = time.perf_counter()
                for offset in range(0, size, chunk):
                    r = client.put(
                        f"/api/uploads/{sid}/files/model.safetensors",
                        params={"offset": offset},
                        content=f.read(chunk),
                    )
                    r.raise_for_status()
                sent = time.perf_counter() - start
                r = client.post(f"/api/uploads/{sid}/complete")
                if r.status_code != 201:
                    sys.exit(f"complete failed: {r.text}")
                total = time.perf_counter() - start
            peak = rss_kib(api.pid, "VmHWM")
        finally:
            api.terminate()
            api.wait(20)
    mib = size / (1 << 20)
    print(
        f"upload of a {mib / 1024:.1f} GiB safetensors file in {args.chunk_mib} MiB chunks over "
        f"loopback, {os.cpu_count()} cores"
    )
    print(f"{'':34} {'seconds':>8} {'MiB/s':>8}")
    print(f"{'API upload (chunks sent)':34} {sent:8.2f} {mib / sent:8.0f}")
    print(f"{'API upload + validate + register':34} {total:8.2f} {mib / total:8.0f}")
    print(f"{'baseline: read + sha256 + write':34} {baseline:8.2f} {mib / baseline:8.0f}")
    print(f"throughput ratio upload/baseline: {baseline / total:.2f}")
    print(
        f"API resident memory: idle {idle / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB "
        f"(+{(peak - idle) / 1024:.0f} MiB during the upload)"
    )


if __name__ == "__main__":
    main()

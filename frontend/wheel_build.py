"""setuptools build step: the wheel carries the built dashboard (package data of deltalens.backend).

`pip wheel .` / `pip install .` run `npm ci && npm run build` in frontend/ when
backend/dashboard/index.html is missing; an editable install only warns, so the Python side can
be developed without Node.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parents[1]
FRONTEND, BUILT = ROOT / "frontend", ROOT / "backend" / "dashboard" / "index.html"


def build_dashboard() -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("the dashboard needs Node.js 20+ and npm to build (apt-get install nodejs npm)")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=FRONTEND, check=True)
    subprocess.run([npm, "run", "build"], cwd=FRONTEND, check=True)


class BuildPyWithDashboard(build_py):
    def run(self) -> None:
        if not BUILT.is_file():
            try:
                build_dashboard()
            except (RuntimeError, subprocess.CalledProcessError) as e:
                if not self.editable_mode:
                    raise
                print(f"warning: dashboard not built ({e}); the API will say so at /")
            self.__dict__.pop("data_files", None)  # collect the files just built
        super().run()

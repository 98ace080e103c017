"""How long `edgebuild check` takes on the built example (goal: under 2 seconds).

Run: .venv/bin/python bench/check.py
"""
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from goals import goal, verdict

REPO = Path(__file__).resolve().parents[1]


def edgebuild(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgebuild", *args], cwd=project, capture_output=True, text=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as temporary:
        project = Path(temporary)
        shutil.copytree(REPO / "examples", project / "examples", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "edgebuild.yaml.example", project / "edgebuild.yaml")
        if edgebuild(project, "build").returncode != 0:
            sys.exit("build failed")
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            result = edgebuild(project, "check")
            timings.append(time.perf_counter() - start)
            if result.returncode != 0:
                sys.exit(f"check failed:\n{result.stderr}")
    timings.sort()
    goal(f"edgebuild check: median {timings[2]:.3f} s, worst {timings[-1]:.3f} s over 5 runs (goal: worst < 2 s)",
         timings[-1] < 2.0)
    verdict()


if __name__ == "__main__":
    main()

"""Cold build vs no-op rebuild of the shipped example; prints both wall times and their ratio.

Run: .venv/bin/python bench/rebuild.py
"""
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from goals import goal, verdict

REPO = Path(__file__).resolve().parents[1]


def timed_build(project: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "edgebuild", "build", "-f", "edgebuild.yaml"],
                            cwd=project, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"build failed ({result.returncode}):\n{result.stderr}")
    return elapsed


def main() -> None:
    with tempfile.TemporaryDirectory() as temporary:
        project = Path(temporary)
        shutil.copytree(REPO / "examples", project / "examples", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "edgebuild.yaml.example", project / "edgebuild.yaml")
        cold = timed_build(project)
        noop = timed_build(project)
    print(f"cold build:     {cold:7.2f} s")
    print(f"no-op rebuild:  {noop:7.2f} s")
    goal(f"ratio:          {noop / cold:7.3f}  (goal <= 0.1)", noop / cold <= 0.1)
    verdict()


if __name__ == "__main__":
    main()

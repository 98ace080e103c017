"""Mixed-precision search: `sensitivity` vs `exhaustive` over the same per-layer grid.

For each model prints the full evaluations each strategy used and their ratio (goal <= 0.2), both
chosen sizes, whether the sensitivity choice is on the exhaustive Pareto front (no exhaustive
assignment both smaller and meeting the floor), and the chosen bundle's bytes against
sum(params x bits)/8 + 16 KB (goal <= 1.10x).

Run: .venv/bin/python bench/search.py
"""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from goals import goal, verdict

REPO = Path(__file__).resolve().parents[1]
CASES = [
    # (name, example folder, entry, metric, accuracy)
    ("digits CNN (4 weight layers)", "digits", "examples/digits/model.py:build", "agreement", {"floor": 1.0}),
    ("deep MLP (6 weight layers)", "deep", "examples/deep/model.py:build", "agreement", {"floor": 1.0}),
]
BITS = {"fp16": 16, "int8": 8, "int4": 4}


def build(project: Path, strategy: str, max_evaluations: int) -> dict:
    manifest = yaml.safe_load((project / "edgebuild.yaml").read_text())
    manifest["search"] = {"strategy": strategy, "max_evaluations": max_evaluations}
    (project / "edgebuild.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "edgebuild", "build"], cwd=project, capture_output=True, text=True)
    if result.returncode not in (0, 1):
        sys.exit(f"build failed ({result.returncode}):\n{result.stderr}")
    return json.loads((project / ".edgebuild" / "targets" / "android" / "search.json").read_text())


def main() -> None:
    rows = []
    for name, folder, entry, metric, accuracy in CASES:
        with tempfile.TemporaryDirectory() as temporary:
            project = Path(temporary)
            shutil.copytree(REPO / "examples" / folder, project / "examples" / folder,
                            ignore=shutil.ignore_patterns("__pycache__"))
            (project / "edgebuild.yaml").write_text(yaml.safe_dump({
                "version": 1, "model": {"name": folder, "source": "python", "entry": entry},
                "data": {"calibration": f"examples/{folder}/calib.npz", "evaluation": f"examples/{folder}/eval.npz"},
                "metric": metric, "reports": ["json"],
                "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "accuracy": accuracy}],
            }, sort_keys=False))
            sensitivity = build(project, "sensitivity", 12)
            exhaustive = build(project, "exhaustive", 100_000)
        chosen = sensitivity["chosen"]
        passing = [e for e in exhaustive["evaluated"] if e["status"] == "pass"]
        smaller = [e for e in passing if chosen and e["bytes"] < chosen["bytes"]]
        params = {layer["name"]: layer["params"] for layer in sensitivity["layers"]}
        ideal = (sum(params[n] * BITS[p] for n, p in chosen["assignment"].items()) // 8 + 16_000) if chosen else None
        rows.append((name, sensitivity, exhaustive, chosen, smaller, ideal))

    for name, sensitivity, exhaustive, chosen, smaller, ideal in rows:
        grid = len(exhaustive["evaluated"])
        print(f"== {name}: {len(sensitivity['layers'])} layers x {len(sensitivity['precisions'])} precisions "
              f"= {grid} assignments")
        ratio = sensitivity['evaluations'] / exhaustive['evaluations']
        goal(f"   full evaluations: sensitivity {sensitivity['evaluations']}, exhaustive {exhaustive['evaluations']}, "
             f"ratio {ratio:.3f} (goal <= 0.2)", ratio <= 0.2)
        s_bytes = chosen["bytes"] if chosen else None
        e_bytes = exhaustive["chosen"]["bytes"] if exhaustive["chosen"] else None
        print(f"   chosen bytes: sensitivity {s_bytes}, exhaustive {e_bytes}")
        goal(f"   sensitivity choice on the exhaustive Pareto front: {'yes' if chosen and not smaller else 'NO'}"
             + (f" ({len(smaller)} smaller passing assignments)" if smaller else ""), bool(chosen and not smaller))
        if chosen:
            goal(f"   bytes vs sum(params x bits)/8 + 16 KB: {s_bytes} / {ideal} = {s_bytes / ideal:.3f} (goal <= 1.10)",
                 s_bytes / ideal <= 1.10)
            print(f"   assignment: {chosen['assignment']}")
        for note in sensitivity["notes"]:
            print(f"   note: {note}")
    verdict()


if __name__ == "__main__":
    main()

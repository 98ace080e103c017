"""Quantization-aware training vs post-training quantization at the same compression.

TFLite: the outliers example at 28 KB, where post-training int4 misses the floor. Core ML: the
digits example at 20 KB, where only 2-bit palettization fits. Prints fp32, PTQ and QAT metric and
bytes, and the share of the PTQ drop that QAT recovered (goal >= 50%).

Run: .venv/bin/python bench/qat.py
"""
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from goals import goal, verdict

REPO = Path(__file__).resolve().parents[1]


def run(example: str, metric: str, target: dict, train: str) -> dict:
    with tempfile.TemporaryDirectory() as temporary:
        project = Path(temporary)
        shutil.copytree(REPO / "examples" / example, project / "examples" / example,
                        ignore=shutil.ignore_patterns("__pycache__"))
        (project / "edgebuild.yaml").write_text(yaml.safe_dump({
            "version": 1, "model": {"name": example, "source": "python", "entry": f"examples/{example}/model.py:build"},
            "data": {"calibration": f"examples/{example}/calib.npz", "evaluation": f"examples/{example}/eval.npz",
                     "train": train},
            "metric": metric, "reports": ["json"], "targets": [target],
        }, sort_keys=False))
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "edgebuild", "build"], cwd=project, capture_output=True, text=True)
        if result.returncode not in (0, 1):
            sys.exit(result.stderr)
        report = json.loads((project / "dist" / "report.json").read_text())["targets"][0]
        report["seconds"] = time.perf_counter() - start
        return report


def show(title: str, target: dict) -> None:
    ptq = next(c for c in target["candidates"] if c["technique"] == target["qat"]["trained_for"])
    qat = next(c for c in target["candidates"] if c["technique"].startswith("qat-"))
    fp32 = next(c for c in target["candidates"] if c["technique"] == "fp32")
    recovered = (qat["metric"] - ptq["metric"]) / (target["baseline"]["metric"] - ptq["metric"])
    print(f"== {title}")
    print(f"   fp32:  metric {fp32['metric']:.4f}  {fp32['bytes']:>7} B")
    print(f"   PTQ  {ptq['technique']}: metric {ptq['metric']:.4f}  {ptq['bytes']:>7} B")
    print(f"   QAT  {qat['technique']}: metric {qat['metric']:.4f}  {qat['bytes']:>7} B  "
          f"({target['qat']['training']['steps']} steps, {target['qat']['training']['seconds']} s)")
    print(f"   chosen {target['chosen']['technique']}; whole build {target['seconds']:.1f} s")
    goal(f"   share of the PTQ drop recovered: {recovered:.1%} (goal >= 50%)", recovered >= 0.5)


def main() -> None:
    show("TFLite, outliers model, 28 KB, agreement >= 0.5", run(
        "outliers", "agreement", {"name": "android", "format": "tflite", "devices": ["pixel-8"],
                                  "budget": {"size": "28KB"}, "accuracy": {"floor": 0.5}, "qat": "auto"},
        "examples/outliers/train.npz"))
    show("Core ML, digits CNN, 20 KB, top1 drop <= 0.01", run(
        "digits", "top1", {"name": "ios", "format": "coreml", "devices": ["iphone-x"], "budget": {"size": "20KB"},
                           "accuracy": {"max_drop": 0.01}, "qat": {"mode": "auto", "epochs": 4}},
        "examples/digits/train.npz"))
    verdict()


if __name__ == "__main__":
    main()

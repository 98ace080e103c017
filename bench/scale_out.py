"""Past one machine (issue #18): Ray executor vs local, the shared cache, sharded evaluation data.

Prints, each measured in this run:
1. the digits example's cold build locally and on a local Ray cluster (`--executor ray`): wall
   time, stages each ran, and whether the bundles are byte-identical;
2. a second clone at another path with `--cache` pointing at the first one's cache: stages run,
   stages fetched, whether the bundles are the same;
3. peak RSS of a build (`--jobs 1`, one process: export, reference, conversion, evaluations)
   whose evaluation set is a folder of .npz shards of 2 GB, against the same build on 0.2 GB.
   The model is a small convolutional net on 3x256x256 float32 images (786 KB a sample).
   Goal: peak RSS at 2 GB <= 1.2x peak RSS at 0.2 GB.

Run: .venv/bin/python bench/scale_out.py   (about 10 minutes on 2 cores; needs the [ray] extra
and 2.5 GB of free disk under $TMPDIR)
"""
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from goals import goal, verdict

REPO = Path(__file__).resolve().parents[1]
SHARD_SAMPLES = 128  # 128 x 786 KB = 100 MB a shard

IMAGE_MODEL = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    return model, (torch.zeros(1, 3, 256, 256),)
'''


def example(root: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(REPO / "examples", root / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "edgebuild.yaml.example", root / "edgebuild.yaml")
    return root


def build(project: Path, *args: str) -> tuple[float, dict]:
    """(wall seconds, the --json summary) of one build."""
    begin = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "edgebuild", "build", "--json", *args], cwd=project,
                          capture_output=True, text=True)
    wall = time.perf_counter() - begin
    if done.returncode not in (0, 1):
        sys.exit(f"build in {project} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout)


def delivered(project: Path) -> dict[str, bytes]:
    return {p.relative_to(project).as_posix(): p.read_bytes() for p in sorted((project / "dist").rglob("*"))
            if p.is_file() and p.name not in ("report.json", "report.md", "report.html", "junit.xml")}


def sharded_project(root: Path, gigabytes: float) -> Path:
    root.mkdir(parents=True)
    (root / "net").mkdir()
    (root / "net" / "model.py").write_text(IMAGE_MODEL)
    shards = root / "eval"
    shards.mkdir()
    sample_bytes = 3 * 256 * 256 * 4
    total = int(gigabytes * 1e9 // sample_bytes)
    rng = np.random.default_rng(0)
    for index, start in enumerate(range(0, total, SHARD_SAMPLES)):
        count = min(SHARD_SAMPLES, total - start)
        np.savez(shards / f"part-{index:05d}.npz", x=rng.random((count, 3, 256, 256), dtype=np.float32))
    (root / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1, "model": {"name": "images", "source": "python", "entry": "net/model.py:build"},
        "data": {"evaluation": "eval"}, "metric": "sqnr",
        "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "accuracy": {"floor": 20}}],
        "search": {"techniques": ["int8-weight-only"]}, "reports": ["json"],
    }, sort_keys=False))
    return root


def peak_rss_of_build(project: Path) -> tuple[int, float, int]:
    """(peak RSS in bytes, wall seconds, samples) of a one-process build of `project`, measured in
    a child of its own so that nothing else counts."""
    probe = ("import resource, subprocess, sys; "
             "done = subprocess.run([sys.executable, '-m', 'edgebuild', 'build', '--jobs', '1'], capture_output=True, text=True); "
             "sys.stderr.write(done.stderr[-2000:] if done.returncode else ''); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, done.returncode)")
    begin = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe], cwd=project, capture_output=True, text=True)
    wall = time.perf_counter() - begin
    peak, code = done.stdout.split()
    if int(code) not in (0, 1):
        sys.exit(f"build in {project} failed ({code}):\n{done.stderr}")
    report = json.loads((project / "dist" / "report.json").read_text())
    samples = sum(len(np.load(p)["x"]) for p in sorted((project / "eval").glob("*.npz")))
    assert report["targets"][0]["candidates"], "no candidate evaluated"
    return int(peak), wall, samples


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="edgebuild-scale-out-") as temporary:
        work = Path(temporary)
        local, on_ray = example(work / "local"), example(work / "ray")
        local_wall, local_summary = build(local, "--cache", str(work / "cache"))
        ray_wall, ray_summary = build(on_ray, "--executor", "ray")
        print(f"digits example, cold: local {local_wall:.1f} s ({len(local_summary['executed'])} stages run), "
              f"ray {ray_wall:.1f} s ({len(ray_summary['executed'])} stages run, heavy ones as Ray tasks); "
              f"ray / local {ray_wall / local_wall:.2f}x")
        goal("bundles built on Ray are byte-identical to the local build's", delivered(on_ray) == delivered(local))

        clone = example(work / "elsewhere" / "clone")
        clone_wall, clone_summary = build(clone, "--cache", str(work / "cache"))
        heavy = [s for s in clone_summary["executed"]
                 if s.split(":")[0] in ("export", "reference", "baseline", "convert", "compress", "evaluate", "search", "qat")]
        print(f"second clone at another path with the cache: {clone_wall:.1f} s, {len(clone_summary['cached'])} stages "
              f"from the cache, {len(clone_summary['executed'])} run ({', '.join(clone_summary['executed'])})")
        goal("the second clone reruns no export, conversion, compression, evaluation or search", not heavy)
        goal("the second clone ships the same bytes", delivered(clone) == delivered(local))

        peaks = {}
        for gigabytes in (0.2, 2.0):
            project = sharded_project(work / f"sharded-{gigabytes}", gigabytes)
            peak, wall, samples = peak_rss_of_build(project)
            peaks[gigabytes] = peak
            print(f"sharded evaluation set of {gigabytes:.1f} GB ({samples} samples of 3x256x256 float32 in "
                  f"{len(list((project / 'eval').glob('*.npz')))} shards): build {wall:.1f} s, peak RSS "
                  f"{peak / 2**20:,.0f} MiB")
            shutil.rmtree(project)
        ratio = peaks[2.0] / peaks[0.2]
        goal(f"peak RSS at 2 GB / at 0.2 GB: {ratio:.2f}x (goal <= 1.2x)", ratio <= 1.2)
    verdict()


if __name__ == "__main__":
    main()

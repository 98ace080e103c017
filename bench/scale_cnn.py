"""A real-size convolutional model through a whole cold build (issue #16): where the time goes.

The model is a CRAFT-style text detector built here: a VGG16-BN encoder, dilated fc6/fc7
convolutions and a U-Net decoder with skip connections, two score maps as two outputs (region,
affinity). 23.1M parameters, random but fixed weights (seed 0), input 1x3x320x640, 8
evaluation images (smoothed noise, fixed seed). The Android target's budget lies between uniform
int4 and int8 with an SQNR floor that uniform int4 misses, so the build needs mixed precision.

Prints the cold build's wall and user+system CPU time, the time of every stage, the number of
runtime invocations (interpreter runs, from the build's own log), the chosen bundle, and the wall
time as a multiple of one single-thread fp32 evaluation of the 8 images in ai-edge-litert,
measured in the same run (issue #16's goal: <= 35x).

Run: .venv/bin/python bench/scale_cnn.py [--height 320 --width 640 --images 8] [--keep DIR]
                                         [--sensitivity auto|torch|runtime]
     (about 10-30 minutes on 2 cores at the default size; smaller sizes for a quick look)
"""
import argparse
import json
import re
import resource
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
GOAL_MULTIPLE = 35.0

MODEL = '''"""CRAFT-style text detector: VGG16-BN encoder, U-Net decoder, region and affinity maps."""
import torch
import torch.nn.functional as F
from torch import nn

HEIGHT, WIDTH = {height}, {width}


def conv_bn(cin, cout, kernel=3, padding=1, dilation=1):
    return [nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation), nn.BatchNorm2d(cout), nn.ReLU()]


class DoubleConv(nn.Sequential):
    def __init__(self, cin, mid, cout):
        super().__init__(*conv_bn(cin + mid, mid, 1, 0), *conv_bn(mid, cout))


class Craft(nn.Module):
    def __init__(self):
        super().__init__()
        def stage(cin, cout, convs, pool=True):
            layers = [nn.MaxPool2d(2)] if pool else []
            for i in range(convs):
                layers += conv_bn(cin if i == 0 else cout, cout)
            return nn.Sequential(*layers)
        self.slice1 = nn.Sequential(stage(3, 64, 2, pool=False), stage(64, 128, 2))
        self.slice2 = stage(128, 256, 3)
        self.slice3 = stage(256, 512, 3)
        self.slice4 = stage(512, 512, 3)
        self.slice5 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                                    nn.Conv2d(1024, 1024, 1))
        self.up1 = DoubleConv(1024, 512, 256)
        self.up2 = DoubleConv(512, 256, 128)
        self.up3 = DoubleConv(256, 128, 64)
        self.up4 = DoubleConv(128, 64, 32)
        self.head = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1),
                                  nn.ReLU(), nn.Conv2d(16, 2, 1))

    def forward(self, x):
        s1 = self.slice1(x)
        s2 = self.slice2(s1)
        s3 = self.slice3(s2)
        s4 = self.slice4(s3)
        s5 = self.slice5(s4)
        y = self.up1(torch.cat([s5, s4], 1))
        y = F.interpolate(y, size=s3.shape[2:], mode="bilinear", align_corners=False)
        y = self.up2(torch.cat([y, s3], 1))
        y = F.interpolate(y, size=s2.shape[2:], mode="bilinear", align_corners=False)
        y = self.up3(torch.cat([y, s2], 1))
        y = F.interpolate(y, size=s1.shape[2:], mode="bilinear", align_corners=False)
        y = self.up4(torch.cat([y, s1], 1))
        maps = self.head(y)
        return maps[:, 0:1], maps[:, 1:2]


def build():
    torch.manual_seed(0)
    model = Craft()
    with torch.no_grad():  # BatchNorm statistics that are not the identity: folding must matter
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval(), (torch.zeros(1, 3, HEIGHT, WIDTH),)
'''


def images(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smoothed noise in [0, 1]: structure at several scales, like a photo more than white noise."""
    rng = np.random.default_rng(seed)
    out = np.zeros((count, 3, height, width), np.float32)
    for scale in (8, 32, 128):
        coarse = rng.random((count, 3, -(-height // scale), -(-width // scale)), dtype=np.float32)
        out += np.repeat(np.repeat(coarse, scale, axis=2), scale, axis=3)[:, :, :height, :width] / 3
    return out


def fp32_evaluation_seconds(project: Path, data: np.ndarray) -> float:
    """One single-thread fp32 run of the evaluation images in ai-edge-litert: the unit of the goal."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(str(project / ".edgebuild" / "tflite" / "fp32.tflite"), num_threads=1)
    runner = interpreter.get_signature_runner()
    name = next(iter(runner.get_input_details()))
    runner(**{name: data[:1]})  # allocation and weight packing are not the evaluation
    begin = time.perf_counter()
    for image in data:
        runner(**{name: image[None]})
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it")
    parser.add_argument("--sensitivity", choices=("auto", "torch", "runtime"), default="auto",
                        help="search.sensitivity: how the per-layer probes are measured (before/after rows)")
    args = parser.parse_args()

    project = args.keep or Path(tempfile.mkdtemp(prefix="scale_cnn_"))
    if project.exists():
        shutil.rmtree(project)
    (project / "data").mkdir(parents=True)
    (project / "model.py").write_text(MODEL.format(height=args.height, width=args.width))
    np.savez(project / "data" / "calib.npz", x=images(args.images, args.height, args.width, seed=1))
    evaluation = images(args.images, args.height, args.width, seed=2)
    np.savez(project / "data" / "eval.npz", x=evaluation)
    # Budget between uniform int4 (11.7 MB) and int8 (23.3 MB); uniform int4 misses the floor (37.7 dB).
    (project / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1, "model": {"name": "craft", "source": "python", "entry": "model.py:build"},
        "data": {"calibration": "data/calib.npz", "evaluation": "data/eval.npz"},
        "metric": "sqnr", "reports": ["json"], "search": {"sensitivity": args.sensitivity},
        "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"],
                     "budget": {"size": "15MB"}, "accuracy": {"floor": 42.0}}],
    }, sort_keys=False))

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    begin = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "edgebuild", "build", "--json"], cwd=project,
                            capture_output=True, text=True)
    wall = time.monotonic() - begin
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if result.returncode not in (0, 1):
        sys.exit(f"build failed ({result.returncode}):\n{result.stderr[-4000:]}")

    unit = fp32_evaluation_seconds(project, evaluation)
    stages = [(m.group(1), float(m.group(2))) for m in re.finditer(r"done (\S+) \(([\d.]+)s\)", result.stderr)]
    report = json.loads((project / "dist" / "report.json").read_text())
    search = json.loads((project / ".edgebuild" / "targets" / "android" / "search.json").read_text())
    target = report["targets"][0]
    chosen = target.get("chosen") or {}
    print(f"model: CRAFT-style U-Net, input 1x3x{args.height}x{args.width}, {args.images} images, "
          f"search.sensitivity: {args.sensitivity}")
    print(f"cold build: wall {wall:.1f} s, user+system {cpu:.1f} s ({cpu / wall:.2f} cores busy on average)")
    for name, seconds in sorted(stages, key=lambda s: -s[1]):
        print(f"  {name:<40} {seconds:8.1f} s")
    measured = {}
    for layer in search.get("layers", []):
        for precision, how in layer.get("measured_by", {}).items():
            how = how.split(" (")[0]  # a first-order estimate names its weight error gap
            measured[how] = measured.get(how, 0) + 1
    print(f"sensitivity probes by how measured: {measured or 'none'}")
    runs = sum(1 for c in target["candidates"] if "evaluated_by" in c) + search.get("evaluations", 0)
    print(f"full runtime evaluations: {runs} (candidates and search), "
          f"runtime sensitivity probes: "
          f"{sum(v for k, v in measured.items() if not k.startswith(('torch', 'first-order', 'not offered')))}")
    print(f"chosen: {chosen.get('technique')} {chosen.get('bytes')} B, sqnr {chosen.get('metric')} dB "
          f"(target status {target['status']})")
    print(f"one single-thread fp32 evaluation of the {args.images} images: {unit:.2f} s")
    goal(f"cold build wall / fp32 evaluation: {wall / unit:.1f}x (goal <= {GOAL_MULTIPLE:.0f}x)",
         wall / unit <= GOAL_MULTIPLE)
    if not args.keep:
        shutil.rmtree(project, ignore_errors=True)
    verdict()


if __name__ == "__main__":
    main()

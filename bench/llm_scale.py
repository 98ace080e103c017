"""LLM scale: a ~100M-parameter Llama-shaped model (random weights, built here) through edgebuild's
own pipeline, one stage per fresh process: wall time and peak RSS of each stage, against the
fp32 weight bytes (issue #7's goal: every stage's peak RSS <= 3x those bytes).

Each stage runs as `edgebuild build` would run it (the doit runner, `only=[task]`), so the state it
leaves is the build's own; a final ordinary `edgebuild build` then only selects, packages and
reports, and must exit 0. `--whole` adds one clean `edgebuild build` of everything: a model this
large has its heavy stages run in processes of their own. Peak RSS is the sampled sum over the
whole process tree (the build and the stage process it started are alive together); the largest
single process's peak is printed beside it. Exits 1 when the goal is missed.

Run: .venv/bin/python bench/llm_scale.py [--ios] [--whole] [--layers N] [--keep DIR]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from goals import goal, verdict

REPO = Path(__file__).resolve().parents[1]
SEQUENCE_LENGTH = 64
WINDOWS = 8
GOAL = 3.0
PAGE = os.sysconf("SC_PAGE_SIZE")


def config(layers: int) -> dict:
    """Llama-3-style proportions at ~100M parameters (8 layers), grouped-query attention."""
    return dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)


def make_project(root: Path, layers: int, ios: bool) -> int:
    """Model folder (safetensors + a tokenizer trained on the README), evaluation text, manifest.
    Returns the parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = (REPO / "README.md").read_text(encoding="utf-8")
    folder = root / "models" / "llama-100m"
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=4000, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config(layers)))
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    # Enough text for WINDOWS windows of SEQUENCE_LENGTH tokens, and no more.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:WINDOWS * SEQUENCE_LENGTH + 1]
    (root / "eval.txt").write_text(tokenizer.decode(ids), encoding="utf-8")
    # An LLM ships in a Play asset pack: the base module's 200 MB would refuse models from ~400M parameters.
    targets = [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "delivery": "asset-pack",
                "accuracy": {"floor": 0.0}}]
    if ios:
        targets.append({"name": "ios", "format": "coreml", "devices": ["iphone-16"], "accuracy": {"floor": 0.0}})
    manifest = {
        "version": 1,
        "model": {"name": "llama-100m", "source": "hf", "path": "models/llama-100m", "sequence_length": SEQUENCE_LENGTH},
        "data": {"evaluation": "eval.txt"},
        "metric": "token_agreement", "report_metrics": ["perplexity", "kl"],
        # One int4 candidate per backend: the scale question, not the search.
        "search": {"strategy": "uniform", "techniques": ["int4-blockwise32", "int4-block32"]},
        "reports": ["json", "md"],
        "targets": targets,
    }
    (root / "edgebuild.yaml").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return parameters


def tree_rss(root_pid: int) -> int:
    """Resident bytes of a process and all its descendants, summed, read from /proc."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as statm:
                pages = int(statm.read().split()[1])
        except (OSError, IndexError, ValueError):  # a process that ended while we looked
            continue
        parents[int(entry)] = int(fields[1])
        rss[int(entry)] = pages * PAGE
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in tree)


def run_child(arguments: list[str], cwd: Path) -> tuple[float, int, int, int, str]:
    """(wall seconds, peak summed RSS of the child's whole process tree, peak RSS of its largest single
    process, exit code, stderr tail). The tree is sampled every 50 ms: a build and the stage process it
    started are alive together, and both count."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen([sys.executable, *arguments], cwd=cwd, stdout=subprocess.DEVNULL, stderr=errors)
        peak, done = [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss(process.pid))
                done.wait(0.05)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        done.set()
        sampler.join()
        wall = time.perf_counter() - start
        errors.seek(0)
        tail = errors.read().decode(errors="replace")[-2000:]
    largest = usage.ru_maxrss * 1024
    return wall, max(peak[0], largest), largest, os.waitstatus_to_exitcode(status), tail


def child(stage: str, project: Path) -> None:
    """Inside a fresh process: run one pipeline task exactly as `edgebuild build` would."""
    from rich.console import Console

    from edgebuild.manifest import load_manifest
    from edgebuild.pipeline.layout import Build
    from edgebuild.pipeline.runner import run_pipeline
    from edgebuild.plugins import default_registry

    registry = default_registry()
    manifest = load_manifest(project / "edgebuild.yaml", registry)
    result = run_pipeline(Build(manifest, registry), console=Console(stderr=True), only=[stage])
    if result.failed or result.errors:
        sys.exit(f"stage {stage} failed: {[str(e) for e in result.errors]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ios", action="store_true", help="also the Core ML target (iOS 18, int4 per-block)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (8: ~100M parameters)")
    parser.add_argument("--whole", action="store_true", help="also time one clean `edgebuild build` of everything")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "PROJECT"), help=argparse.SUPPRESS)
    parser.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    if args.setup:
        print(make_project(args.setup, args.layers, args.ios))
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="edgebuild-llm-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        # Setup runs in a child too: this process stays small, because a child's peak RSS counts
        # the memory of the process it was started from (Linux keeps the high-water mark across exec).
        started = time.perf_counter()
        setup = subprocess.run([sys.executable, __file__, "--setup", str(root), "--layers", str(args.layers)]
                               + (["--ios"] if args.ios else []), capture_output=True, text=True)
        if setup.returncode != 0:
            sys.exit(f"setup failed:\n{setup.stderr[-2000:]}")
        parameters = int(setup.stdout.split()[-1])
        weight_bytes = parameters * 4
        print(f"model: Llama-shaped, {args.layers} layers, {parameters / 1e6:.1f}M parameters, "
              f"fp32 weights {weight_bytes / 2**20:.0f} MiB (setup {time.perf_counter() - started:.1f} s)")
        print(f"goal: every stage's peak RSS <= {GOAL:.0f}x the fp32 weight bytes = {GOAL * weight_bytes / 2**20:.0f} MiB")
        stages = ["tokenize:evaluation", "export", "reference", "baseline",
                  "convert:tflite", "compress:tflite:int4-blockwise32", "evaluate:tflite:int4-blockwise32"]
        if args.ios:
            stages += ["convert:coreml-ios18", "compress:coreml-ios18:int4-block32", "evaluate:coreml-ios18:int4-block32"]
        print(f"\n{'stage':40s} {'wall s':>8s} {'tree RSS MiB':>13s} {'x fp32 weights':>15s} {'largest proc MiB':>17s}")
        worst = 0.0

        def row(label, wall, rss, largest):
            print(f"{label:40s} {wall:8.1f} {rss / 2**20:13.0f} {rss / weight_bytes:15.2f} {largest / 2**20:17.0f}")
        for stage in stages:
            wall, rss, largest, code, tail = run_child([str(Path(__file__).resolve()), "--child", stage, str(root)], root)
            if code != 0:
                sys.exit(f"{stage} failed (exit {code}):\n{tail}")
            worst = max(worst, rss / weight_bytes)
            row(stage, wall, rss, largest)
        wall, rss, largest, code, tail = run_child(["-m", "edgebuild", "build"], root)
        row("edgebuild build (select, package, report)", wall, rss, largest)
        if code != 0:
            sys.exit(f"the final build failed (exit {code}):\n{tail}")
        worst = max(worst, rss / weight_bytes)
        if args.whole:
            shutil.rmtree(root / ".edgebuild")
            shutil.rmtree(root / "dist")
            wall, rss, largest, code, tail = run_child(["-m", "edgebuild", "build"], root)
            if code != 0:
                sys.exit(f"the clean build failed (exit {code}):\n{tail}")
            worst = max(worst, rss / weight_bytes)
            row("edgebuild build, clean, everything", wall, rss, largest)
        report = json.loads((root / "dist" / "report.json").read_text(encoding="utf-8"))
        print()
        for target in report["targets"]:
            chosen = target["chosen"]
            metrics = ", ".join(f"{name} {value:.4f}" for name, value in chosen["metrics"].items())
            print(f"{target['name']}: {chosen['technique']} {chosen['bytes'] / 2**20:.1f} MiB "
                  f"({chosen['bytes'] / weight_bytes:.3f}x fp32), {metrics}; fp32 perplexity "
                  f"{target['baseline']['metrics']['perplexity']:.1f}")
        print()
        goal(f"worst peak (whole process tree, summed): {worst:.2f}x the fp32 weight bytes (goal <= {GOAL:.0f}x)",
             worst <= GOAL)
        verdict()
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

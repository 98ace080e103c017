"""Hugging Face models from local folders (model.source: hf): tiny Llama and Mistral, built here
with a tokenizer trained here, evaluated on a text file."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import read_report, run_edgebuild

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parent.parent
SEQUENCE_LENGTH = 16


def tiny_model(folder: Path, family: str, *, tokenizer: bool = True) -> None:
    """A randomly initialised 2-layer model; with a byte-level BPE tokenizer trained on the README."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    vocab_size = 256
    if tokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        bpe = Tokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator([(REPOSITORY / "README.md").read_text(encoding="utf-8")], trainers.BpeTrainer(
            vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        fast.save_pretrained(folder)
        vocab_size = len(fast)
    torch.manual_seed(0)
    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(folder)
    else:
        MistralForCausalLM(MistralConfig(**shape, sliding_window=None)).save_pretrained(folder)


def windows(folder: Path, text: str) -> tuple[np.ndarray, np.ndarray]:
    """The test's own tokenization: inputs and next tokens, non-overlapping windows."""
    from transformers import AutoTokenizer

    ids = np.asarray(AutoTokenizer.from_pretrained(str(folder))(text, add_special_tokens=False)["input_ids"])
    count = (len(ids) - 1) // SEQUENCE_LENGTH
    span = count * SEQUENCE_LENGTH
    return ids[:span].reshape(count, -1), ids[1:span + 1].reshape(count, -1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """The test's own, in float64 (independent of the metrics plugin it checks)."""
    logits = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def perplexity(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.exp(-np.take_along_axis(log_softmax(logits), labels[..., None], -1).mean()))


LLM_TECHNIQUES = ["fp32", "fp16", "int8-dynamic", "int8-linear", "int4-blockwise32", "int4-blockwise128",
                  "int4-blockwise32-int8-embeddings", "int4-block32", "int4-block32-int8-embeddings"]


@pytest.mark.parametrize("family, search", [
    ("llama", {"strategy": "sensitivity", "precisions": ["int8", "int4-block32"]}),
    ("mistral", {"strategy": "uniform"}),
])
def test_tiny_causal_lm_ships_int4_blockwise_bundles_with_token_agreement_and_perplexity(tmp_path, family, search):
    folder = tmp_path / "models" / family
    tiny_model(folder, family)
    text = (REPOSITORY / "README.md").read_text(encoding="utf-8")[:4000]
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    (tmp_path / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1,
        "model": {"name": f"tiny-{family}", "source": "hf", "path": f"models/{family}",
                  "sequence_length": SEQUENCE_LENGTH},
        "data": {"evaluation": "eval.txt"},
        "metric": "token_agreement", "report_metrics": ["perplexity", "kl"],
        "search": {**search, "techniques": LLM_TECHNIQUES}, "reports": ["json", "md"],
        # Budgets only int4 weights meet (fp32 is ~550 KB, int8 ~225 KB); a floor random weights hold at int4.
        "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "budget": {"size": "200KB"},
                     "accuracy": {"floor": 0.6}},
                    {"name": "ios", "format": "coreml", "devices": ["iphone-16"], "budget": {"size": "160KB"},
                     "accuracy": {"floor": 0.6}}],
    }, sort_keys=False))
    # --evaluate-all: the fp32 candidates are over budget, and their perplexity is checked below.
    result = run_edgebuild("build", "--evaluate-all", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = read_report(tmp_path)
    assert report["model"]["inputs"] == [{"name": "input_ids", "shape": [1, SEQUENCE_LENGTH], "dtype": "int64"}]
    assert [m["name"] for m in report["metrics"]] == ["token_agreement", "perplexity", "kl"]
    inputs, labels = windows(folder, text)
    android, ios = report["targets"]

    # The fp32 baseline perplexity is the torch model's on the test's own tokenization of the text.
    import torch
    from transformers import AutoModelForCausalLM

    network = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        logits = network(input_ids=torch.from_numpy(inputs)).logits.numpy()
    assert android["baseline"]["metrics"]["perplexity"] == pytest.approx(perplexity(logits, labels), rel=1e-4)

    # Android: the shipped .tflite holds int4 weights; rerun in plain ai-edge-litert, it gives the
    # perplexity and token agreement the report states.
    from ai_edge_litert.interpreter import Interpreter
    from edgebuild_tflite.backend import weight_tensors

    chosen = android["chosen"]
    bundle = tmp_path / chosen["path"]
    assert bundle.suffix == ".tflite"
    assert chosen["technique"] in ("mixed-precision", "int4-blockwise32", "int4-blockwise32-int8-embeddings")
    stored = {t["name"]: t["dtype"] for t in weight_tensors(bundle)}
    assert "int4" in stored.values()
    assert chosen["bytes"] <= 200_000
    runner = Interpreter(model_path=str(bundle)).get_signature_runner("serving_default")
    name = next(iter(runner.get_input_details()))
    shipped = np.concatenate([next(iter(runner(**{name: row[None].astype(np.int32)}).values())) for row in inputs])
    assert chosen["metrics"]["perplexity"] == pytest.approx(perplexity(shipped, labels), rel=1e-4)
    assert chosen["metrics"]["token_agreement"] == pytest.approx(
        float(np.mean(shipped.argmax(-1) == logits.argmax(-1))), abs=1e-6)
    if search["strategy"] == "sensitivity":
        # The search decided each layer, embeddings and lm_head included, between int8 and int4 blocks.
        decided = {d["layer"]: d["precision"] for d in android["search"]["chosen"]["decision_log"]}
        assert any("embed_tokens" in layer for layer in decided) and any("lm_head" in layer for layer in decided)
        assert set(decided.values()) <= {"int8", "int4-block32"}
    # Techniques that do not fit this model are skipped with the reason, not failed.
    by_name = {c["technique"]: c for c in android["candidates"]}
    assert by_name["int4-blockwise128"]["status"] == "skipped"
    assert "divisible by 128" in by_name["int4-blockwise128"]["reason"]
    assert by_name["int4-blockwise32-int8-embeddings"]["bytes"] > by_name["int4-blockwise32"]["bytes"]

    # iOS 18: the shipped .mlpackage holds int4 weights in blocks of 32; every candidate carries
    # token agreement and perplexity, evaluated on the exact weights the bundle stores.
    from edgebuild_coreml.backend import CoreMLBackend

    chosen = ios["chosen"]
    package = tmp_path / chosen["path"]
    assert package.suffix == ".mlpackage" and package.is_dir()
    assert chosen["technique"] in ("int4-block32", "int4-block32-int8-embeddings")
    kinds = {w["name"]: w["dtype"] for w in CoreMLBackend().weights(package)}
    assert kinds["inner_model_layers_0_mlp_down_proj_weight"] == "linear int4 block32"
    by_name = {c["technique"]: c for c in ios["candidates"]}
    assert by_name["int4-block32"]["bytes"] < by_name["fp16"]["bytes"] / 2
    for candidate in (c for c in ios["candidates"] if c["status"] in ("pass", "fail") and "not_evaluated" not in c):
        assert candidate["evaluated_by"].startswith("weights-exact torch simulation")
        assert set(candidate["metrics"]) == {"token_agreement", "perplexity", "kl"}
        assert candidate["metrics"]["perplexity"] > 1.0
    assert by_name["fp32"]["metrics"]["perplexity"] == pytest.approx(ios["baseline"]["metrics"]["perplexity"], rel=1e-3)
    embeddings = {w["name"]: w["dtype"] for w in CoreMLBackend().weights(
        tmp_path / ".edgebuild" / "coreml-ios18" / "candidates" / "int4-block32-int8-embeddings.mlpackage")}
    assert embeddings["inner_model_embed_tokens_weight"] == embeddings["inner_lm_head_weight"] == "linear int8"
    assert embeddings["inner_model_layers_0_mlp_down_proj_weight"] == "linear int4 block32"

    markdown = (tmp_path / "dist" / "report.md").read_text(encoding="utf-8")
    assert "| token_agreement | perplexity | kl |" in markdown


def test_hf_without_text_data_still_measures_fidelity_from_token_arrays(tmp_path):
    """No tokenizer needed when the evaluation set is token ids: kl and agreement need no labels."""
    tiny_model(tmp_path / "models" / "m", "mistral", tokenizer=False)
    np.savez(tmp_path / "eval.npz", input_ids=np.random.default_rng(0).integers(0, 256, (4, 8)))
    (tmp_path / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1, "model": {"name": "m", "source": "hf", "path": "models/m", "sequence_length": 8},
        "data": {"evaluation": "eval.npz"}, "metric": "kl", "reports": ["json"],
        "search": {"strategy": "uniform", "techniques": ["fp32", "int8-dynamic"]},
        "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "accuracy": {"max_drop": 0.05}}],
    }, sort_keys=False))
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    target = read_report(tmp_path)["targets"][0]
    assert target["chosen"]["technique"] == "int8-dynamic"
    assert 0 <= target["chosen"]["metric"] <= 0.05
    # The reported KL, recomputed here: fp32 logits from transformers in torch, the shipped bundle's
    # logits from ai-edge-litert, KL(fp32 || bundle) per position, averaged.
    import torch
    from transformers import AutoModelForCausalLM

    from edgebuild_tflite.backend import TFLiteBackend

    ids = np.load(tmp_path / "eval.npz")["input_ids"]
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "models" / "m")).eval()
        fp32 = model(torch.as_tensor(ids)).logits.numpy().astype(np.float64)
    shipped = TFLiteBackend().predict(tmp_path / "dist" / "android" / "m.tflite", [ids]).outputs
    shipped = np.asarray(shipped[0] if isinstance(shipped, list) else next(iter(shipped.values())), np.float64)
    p, q = log_softmax(fp32), log_softmax(shipped.reshape(fp32.shape))
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    assert kl > 1e-6  # int8 moved the distribution: a metric stuck at 0 would not match
    assert target["chosen"]["metric"] == pytest.approx(kl, rel=0.02)
    fp32_candidate = next(c for c in target["candidates"] if c["technique"] == "fp32")
    assert fp32_candidate["metric"] < kl / 10


def write_manifest(tmp_path: Path, model: dict, data: dict, metric: str = "perplexity") -> None:
    (tmp_path / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1, "model": {"name": "m", "source": "hf", **model}, "data": data, "metric": metric,
        "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "accuracy": {"max_drop": 5}}],
    }, sort_keys=False))


def test_hf_folder_without_config_is_refused(tmp_path):
    (tmp_path / "models" / "empty").mkdir(parents=True)
    np.savez(tmp_path / "eval.npz", input_ids=np.zeros((2, 4), int))
    write_manifest(tmp_path, {"path": "models/empty"}, {"evaluation": "eval.npz"}, "token_agreement")
    result = run_edgebuild("validate", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("edgebuild.yaml:5:9: model.path: config.json not found in 'models/empty' "
                                     "(a local Hugging Face folder is needed; nothing is downloaded)")


def test_text_data_needs_the_model_to_bring_a_tokenizer(tmp_path):
    tiny_model(tmp_path / "models" / "m", "llama", tokenizer=False)
    (tmp_path / "eval.txt").write_text("some text\n")
    write_manifest(tmp_path, {"path": "models/m"}, {"evaluation": "eval.txt"})
    result = run_edgebuild("validate", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "edgebuild.yaml:7:15: data.evaluation: no tokenizer in 'models/m' (looked for tokenizer.json, tokenizer.model, "
        "vocab.json) to tokenize 'eval.txt'")


def test_text_data_needs_a_causal_lm(tmp_path):
    np.savez(tmp_path / "weights.npz", x=np.zeros(1))
    (tmp_path / "eval.txt").write_text("some text\n")
    (tmp_path / "model.py").write_text("def build():\n    pass\n")
    (tmp_path / "edgebuild.yaml").write_text(
        "version: 1\nmodel: {name: m, source: python, entry: model.py:build}\ndata: {evaluation: eval.txt}\n"
        "targets: [{name: a, format: tflite, devices: [pixel-8], accuracy: {floor: 0.5}}]\n")
    result = run_edgebuild("validate", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "edgebuild.yaml:3:20: data.evaluation: text data is tokenized with a Hugging Face model's tokenizer; "
        "model.source is 'python' (give an .npz file instead)")


def test_text_too_short_for_one_window_is_one_line_naming_the_file(tmp_path):
    tiny_model(tmp_path / "models" / "m", "llama")
    (tmp_path / "eval.txt").write_text("hi\n")
    write_manifest(tmp_path, {"path": "models/m", "sequence_length": 16}, {"evaluation": "eval.txt"})
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("eval.txt")]
    assert len(lines) == 1 and "one window of sequence_length 16 needs 17" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "dist").exists()


def test_text_the_tokenizer_cannot_serve_is_one_line_naming_the_file(tmp_path):
    import json

    tiny_model(tmp_path / "models" / "m", "llama")
    write_manifest(tmp_path, {"path": "models/m", "sequence_length": 4}, {"evaluation": "eval.txt"})
    (tmp_path / "eval.txt").write_bytes(b"caf\xe9 au lait\n")  # Latin-1, not UTF-8
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "eval.txt: not UTF-8 text (byte 3)"

    (tmp_path / "eval.txt").write_text("edgebuild turns a trained model into mobile bundles.\n", encoding="utf-8")
    config = tmp_path / "models" / "m" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 10}))
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    # (Loading the weights fails too, against the edited config: a separate line.)
    lines = [line for line in result.stderr.splitlines() if line.startswith("eval.txt: ")]
    assert len(lines) == 1 and lines[0].startswith("eval.txt: the tokenizer gives token id ") and lines[0].endswith(
        ", beyond the model's vocab_size 10: tokenizer and model do not belong together"), result.stderr
    assert "Traceback" not in result.stderr


def test_hf_text_classification_from_model_task(tmp_path):
    """`model.task: text-classification` on a folder whose config.json names no task suffix: the
    classifier's logits are exported, and its top-1 on labelled token ids matches transformers'."""
    import json

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path / "models" / "intent"
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertModel"]  # nothing to infer the task from: model.task must say it
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 128, (24, 12))
    with torch.no_grad():
        reference = BertForSequenceClassification.from_pretrained(str(folder)).eval()
        labels = reference(torch.as_tensor(ids)).logits.argmax(-1).numpy()
    labels[:6] = (labels[:6] + 1) % 3  # a quarter of the labels disagree with the model: top1 is 0.75
    np.savez(tmp_path / "eval.npz", input_ids=ids, y=labels)
    manifest = {
        "version": 1, "model": {"name": "intent", "source": "hf", "path": "models/intent", "sequence_length": 12},
        "data": {"evaluation": "eval.npz"}, "metric": "top1", "reports": ["json"],
        "search": {"strategy": "uniform", "techniques": ["fp32", "int8-dynamic"]},
        "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "accuracy": {"max_drop": 0.1}}],
    }
    (tmp_path / "edgebuild.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    refused = run_edgebuild("validate", cwd=tmp_path)
    manifest["model"]["task"] = "text-classification"
    (tmp_path / "edgebuild.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = read_report(tmp_path)
    assert report["model"]["outputs"][0]["shape"][-1] == 3
    target = report["targets"][0]
    assert target["baseline"]["metric"] == pytest.approx(0.75)
    fp32 = next(c for c in target["candidates"] if c["technique"] == "fp32")
    assert fp32["metric"] == pytest.approx(0.75)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().endswith("model.path: cannot tell the task from architectures ['BertModel']; "
                                           "set model.task (config.json in 'models/intent')")

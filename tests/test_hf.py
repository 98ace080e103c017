"""Hugging Face models from local folders (model.source: hf): tiny Llama and Mistral, built here."""
import numpy as np
import pytest
import yaml

from tests.conftest import read_report, run_edgebuild

pytestmark = pytest.mark.slow


def tiny_model(folder, family: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(folder)
    else:
        MistralForCausalLM(MistralConfig(**shape, sliding_window=None)).save_pretrained(folder)


@pytest.mark.parametrize("family, metric, accuracy", [
    ("llama", "token_agreement", {"floor": 0.9}),
    ("mistral", "kl", {"max_drop": 0.05}),
])
def test_tiny_causal_lm_builds_for_android_and_ios_with_fidelity_metrics(tmp_path, family, metric, accuracy):
    tiny_model(tmp_path / "models" / family, family)
    np.savez(tmp_path / "eval.npz", input_ids=np.random.default_rng(0).integers(0, 256, (8, 16)))
    (tmp_path / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1,
        "model": {"name": f"tiny-{family}", "source": "hf", "path": f"models/{family}", "sequence_length": 16},
        "data": {"evaluation": "eval.npz"}, "metric": metric, "search": {"strategy": "uniform"},
        "reports": ["json"],
        "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "budget": {"size": "300KB"},
                     "accuracy": accuracy},
                    {"name": "ios", "format": "coreml", "devices": ["iphone-15"], "budget": {"size": "300KB"},
                     "accuracy": accuracy}],
    }, sort_keys=False))
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = read_report(tmp_path)
    assert report["model"]["inputs"] == [{"name": "input_ids", "shape": [1, 16], "dtype": "int64"}]
    target = report["targets"][0]
    by_name = {c["technique"]: c for c in target["candidates"]}
    # Every quantized candidate was run and compared with fp32 token by token.
    assert by_name["fp32"]["metric"] == pytest.approx(1.0 if metric == "token_agreement" else 0.0, abs=1e-4)
    assert by_name["int4-blockwise32"]["bytes"] < by_name["int8-dynamic"]["bytes"] < by_name["fp32"]["bytes"]
    assert target["chosen"]["bytes"] <= 300_000
    # Core ML: the transformers graph converts (aten.alias registered), int4 per-block weights on
    # iOS 18, every weight simulated exactly.
    ios = report["targets"][1]
    block = next(c for c in ios["candidates"] if c["technique"] == "int4-block32")
    fp16 = next(c for c in ios["candidates"] if c["technique"] == "fp16")
    assert block["bytes"] < fp16["bytes"] / 2
    assert all(c["evaluated_by"].startswith("weights-exact torch simulation")
               for c in ios["candidates"] if c["status"] in ("pass", "fail"))
    assert ios["chosen"] is not None


def test_hf_folder_without_config_is_refused(tmp_path):
    (tmp_path / "models" / "empty").mkdir(parents=True)
    np.savez(tmp_path / "eval.npz", input_ids=np.zeros((2, 4), int))
    (tmp_path / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1, "model": {"name": "m", "source": "hf", "path": "models/empty"},
        "data": {"evaluation": "eval.npz"}, "metric": "token_agreement",
        "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "accuracy": {"floor": 0.9}}],
    }, sort_keys=False))
    result = run_edgebuild("validate", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("edgebuild.yaml:5:9: model.path: config.json not found in 'models/empty' "
                                     "(a local Hugging Face folder is needed; nothing is downloaded)")

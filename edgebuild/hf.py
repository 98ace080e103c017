"""Local Hugging Face folders: which task a folder holds, and text tokenized with its tokenizer.

Nothing here downloads: folders are read with HF_HUB_OFFLINE set.
"""
import json
import os
from pathlib import Path

import numpy as np

from .errors import InputError

CAUSAL_LM = "text-generation"
TASKS = (CAUSAL_LM, "text-classification", "image-classification")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# optimum's TasksManager cannot infer a task from a local folder: read config.json's architectures.
_TASK_SUFFIXES = {"ForCausalLM": CAUSAL_LM, "ForSequenceClassification": "text-classification",
                  "ForImageClassification": "image-classification"}
DEFAULT_SEQUENCE_LENGTH = 32


def task_of(model: dict, folder: Path) -> str:
    """`model.task`, or the task config.json's `architectures` name."""
    if model.get("task"):
        return model["task"]
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read config.json: {exc}", file=model.get("path")) from None
    architectures = config.get("architectures") or []
    for architecture in architectures:
        for suffix, task in _TASK_SUFFIXES.items():
            if architecture.endswith(suffix):
                return task
    raise InputError(f"cannot tell the task from architectures {architectures}; set model.task", field="model.task")


def tokenize_text(text_file: Path, model_folder: Path, sequence_length: int, label: str) -> dict[str, np.ndarray]:
    """Next-token windows of a text: `input_ids` (N, L) and `y` (N, L), the token after each position.

    The text is tokenized once as a whole (no special tokens added) and cut into windows that
    do not overlap, so every token is predicted exactly once; a trailing part shorter than a
    window is dropped.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte {exc.start})", file=label) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the model's tokenizer: {str(exc).splitlines()[0][:200]}",
                         file=label) from None
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    vocabulary = json.loads((model_folder / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    if vocabulary and len(ids) and int(ids.max()) >= vocabulary:
        raise InputError(f"the tokenizer gives token id {int(ids.max())}, beyond the model's vocab_size "
                         f"{vocabulary}: tokenizer and model do not belong together", file=label)
    windows = (len(ids) - 1) // sequence_length
    if windows < 1:
        raise InputError(f"holds {len(ids)} tokens; one window of sequence_length {sequence_length} needs "
                         f"{sequence_length + 1}", file=label)
    span = windows * sequence_length
    return {"input_ids": ids[:span].reshape(windows, sequence_length),
            "y": ids[1:span + 1].reshape(windows, sequence_length)}

"""Finding a model and its tokenizer: the embedded default, a local directory or a hub name."""

from __future__ import annotations

import difflib
import importlib
import os
from pathlib import Path

# Built-in models by name: "module:function", the function building (once) and returning the
# model's directory. Resolved by name, so the core package imports no built-in (they import
# specific environments); the modules live in models/ at the top of the repository.
BUILT_IN = {"tiny-arithmetic": "models.tiny_arithmetic:ensure_tiny_model",
            "tiny-pairsums": "models.tiny_pairsums:ensure_feedback_model",
            "tiny-calculator": "models.tiny_calculator:ensure_tiny_calculator"}
EMBEDDED = set(BUILT_IN)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_model_path(path: str) -> str:
    check_model_path(path)
    if path in BUILT_IN:
        module, _, function = BUILT_IN[path].partition(":")
        return getattr(importlib.import_module(module), function)()
    local = Path(path).expanduser()
    return str(local) if local.is_dir() else path


def check_model_path(path: str, key: str = "model.path") -> None:
    """Fails, naming model.path and what to fix, when the model cannot be what the user meant: cheap
    (no weights read, no network), so it runs before any actor starts."""
    if path in EMBEDDED:
        return
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"{key}={path!r} is a file: give the model's directory (config.json, weights, tokenizer)")
        missing = []
        if not (local / "config.json").is_file():
            missing.append("config.json")
        if not any(next(local.glob(p), None) for p in WEIGHT_PATTERNS):
            missing.append("weights (*.safetensors or pytorch_model*.bin)")
        if not any((local / f).is_file() for f in TOKENIZER_FILES):
            missing.append(f"tokenizer ({' or '.join(TOKENIZER_FILES)})")
        if missing:
            raise ValueError(f"{key}={path!r} is not a Hugging Face model folder: it has no {', no '.join(missing)}. "
                             "Save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)")
        return
    # Hub names are "name" or "org/name"; anything else that does not exist is a local path that is missing.
    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or "\\" in path:
        raise ValueError(f"{key}={path!r}: no such directory (relative paths start from {os.getcwd()}). "
                         f"Give a model folder, a hub name like Qwen/Qwen3-8B, or one of: {', '.join(sorted(EMBEDDED))}")
    first = path.split("/")[0]
    if "/" in path and Path(first).expanduser().is_dir():  # "models/mine" with ./models present: a local path
        raise ValueError(f"{key}={path!r}: no such directory ({first}/ exists in {os.getcwd()}, but not {path})")
    close = difflib.get_close_matches(path, EMBEDDED, n=1, cutoff=0.8)
    if close:
        raise ValueError(f"{key}={path!r} is neither a directory nor an embedded model: did you mean {close[0]!r}?")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise ValueError(f"{key}={path!r} is not a local directory, and HF_HUB_OFFLINE is set while the hub "
                             "cache holds no copy of it: download it first or give a local model folder")


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def stop_token_ids(model_path: str, tokenizer) -> list[int]:
    """EOS ids from the generation config (chat models often list several), else the tokenizer's."""
    from transformers import GenerationConfig

    ids: list[int] = []
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    except OSError:
        pass
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"model {model_path!r} defines no EOS token: generation would never stop")
    return ids

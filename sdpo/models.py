"""Finding a model and its tokenizer: the embedded default, a local directory or a hub name."""

from __future__ import annotations

from transformers import AutoTokenizer, GenerationConfig

EMBEDDED = {"tiny-arithmetic"}


def resolve_model_path(path: str) -> str:
    if path in EMBEDDED:
        from sdpo.tiny.warmstart import ensure_tiny_model

        return ensure_tiny_model()
    return path


def load_tokenizer(model_path: str):
    return AutoTokenizer.from_pretrained(model_path)


def stop_token_ids(model_path: str, tokenizer) -> list[int]:
    """EOS ids from the generation config (chat models often list several), else the tokenizer's."""
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

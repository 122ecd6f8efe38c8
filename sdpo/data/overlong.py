"""Dropping prompts longer than a token budget after preparation, as the authors' data loader does
(verl's RLHFDataset with ``filter_overlong_prompts``: the chat-templated prompt, with the run's
template arguments and the generation prompt, must be at most ``max_prompt_length`` = 2048 tokens;
it filters the training and the validation files alike, after their splits were drawn, so filtering
the prepared files changes no split). It needs the run's tokenizer, so it lives here, not in the
environments' preparers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdpo.chat import chat_ids


def drop_overlong_prompts(out_dir: Path, tokenizer_path: str, max_prompt_tokens: int,
                          template_kwargs: dict[str, Any] | None = None) -> dict[str, dict[str, int]]:
    """Rewrites ``out_dir``/{train,test}.jsonl without rows whose ``messages`` template to more than
    ``max_prompt_tokens`` tokens; records it in manifest.json; returns kept/dropped per split."""
    from sdpo.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(tokenizer_path))
    summary = {}
    for split in ("train", "test"):
        path = out_dir / f"{split}.jsonl"
        if not path.is_file():
            continue
        kept, dropped = [], 0
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" not in row:
                raise ValueError(f"{path}:{number}: no 'messages' to measure; --max-prompt-tokens needs prepared rows")
            if len(chat_ids(tokenizer, row["messages"], **(template_kwargs or {}))) <= max_prompt_tokens:
                kept.append(line)
            else:
                dropped += 1
        path.write_text("".join(f"{line}\n" for line in kept))
        summary[split] = {"kept": len(kept), "dropped": dropped}
    manifest = out_dir / "manifest.json"
    info = json.loads(manifest.read_text()) if manifest.is_file() else {}
    info["overlong_filter"] = {"tokenizer": tokenizer_path, "max_prompt_tokens": max_prompt_tokens,
                               "chat_template_kwargs": template_kwargs or {}, **summary}
    manifest.write_text(json.dumps(info, indent=2, default=str) + "\n")
    return summary

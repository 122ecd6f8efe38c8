"""GSM8K (``openai/gsm8k``, config ``main``: parquet data files, no script) with the authors' math
prompt (lasgroup/SDPO data/format/prompts.py: the problem, then "Please reason step by step, and put
your final answer within \\boxed{}.") and the final number after "####" as the answer. The paper does
not train on GSM8K (the authors prepare its test split for evaluation); the training split is the
dataset's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from environments.math import gsm8k_answer
from environments.prepare.common import is_local, iter_hub, iter_local, write_jsonl, write_manifest

HUB_NAME, HUB_CONFIG = "openai/gsm8k", "main"
SPLITS = ("train", "test")
PROMPT = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def split_rows(source: str | None, revision: str | None, split: str) -> Iterable[dict[str, Any]]:
    if source and is_local(source):
        path = Path(source)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.name.startswith(split) and p.suffix in (".jsonl", ".json", ".parquet"))
            if not matches:
                raise ValueError(f"{path} holds no {split}*.jsonl / .json / .parquet file")
            return (row for p in matches for row in iter_local(p))
        return iter_local(Path(source.replace("{split}", split)))
    return iter_hub(source or HUB_NAME, split, config=HUB_CONFIG, revision=revision)


def prepare(out_dir: Path, source: str | None = None, revision: str | None = None) -> dict[str, Any]:
    counts = {}
    for split in SPLITS:
        rows = []
        for i, row in enumerate(split_rows(source, revision, split)):
            rows.append({"id": f"gsm8k-{split}-{i}", "question": row["question"],
                         "messages": [{"role": "user", "content": PROMPT.format(problem=row["question"])}],
                         "answer": gsm8k_answer(row["answer"])})
        counts[split] = write_jsonl(out_dir / f"{split}.jsonl", rows)
    write_manifest(out_dir, "gsm8k", {"source": source or f"{HUB_NAME} ({HUB_CONFIG})", "revision": revision, "rows": counts})
    return counts

"""SciKnowEval Chemistry as the authors prepared it (lasgroup/SDPO data/format/sciknoweval.py,
data/load_dataset.py, data/split_tasks.py, data/preprocess.py).

The hub dataset ``hicai-zju/SciKnowEval`` has one split, ``test`` (``data/{Domain}/sciknoweval_
{domain}_test.jsonl``). Kept: ``domain`` Chemistry, ``details.level`` L3, ``type`` mcq-4-choices or
mcq-2-choices (L3 also holds "filling" rows with no choices); 2,100 rows, numbered in file order
(the authors' ``idx``). Split 90/10 with seed 42 as ``datasets``' train_test_split draws it: 1,890
training and 210 test rows (checked against the authors' committed datasets/sciknoweval/chemistry/
{train,test}.json in tests/test_paper_settings.py). The prompt is the authors': their system prompt
asking for <reasoning> and <answer> tags, the question, the options as "A: text", and "Please reason
step by step."; the answer is the row's ``answerKey``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from environments.mcq import answer_key
from environments.prepare.common import is_local, iter_hub, iter_local, seeded_split, write_jsonl, write_manifest

HUB_NAME = "hicai-zju/SciKnowEval"
LEVELS = ("L3",)
TYPES = ("mcq-4-choices", "mcq-2-choices")
TEST_FRACTION, SEED = 0.1, 42
# The authors' system prompt (data/format/sciknoweval.py), kept to the character: the model was
# trained on exactly this text.
SYSTEM_PROMPT = (
    "\nGiven a question and four options, please select the right answer. Respond in the following format:\n"
    "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n\n"
    "For the answer, only output the letter corresponding to the correct option (A, B, C, or D), and nothing else. "
    "Do not restate the answer text. For example, if the answer is \"A\", just output:\n<answer>\nA\n</answer>\n"
)


def keep(row: dict[str, Any], domain: str) -> bool:
    return (row.get("domain") == domain and (row.get("details") or {}).get("level") in LEVELS
            and row.get("type") in TYPES)


def prepared_row(row: dict[str, Any], idx: int, domain: str) -> dict[str, Any]:
    where = f"SciKnowEval {domain} row idx={idx}"
    choices = row.get("choices") or {}
    labels, texts = list(choices.get("label") or []), list(choices.get("text") or [])
    if not labels or len(labels) != len(texts):
        raise ValueError(f"{where}: 'choices' must hold as many labels as texts, got {choices!r:.200}")
    options = "\n".join(f"{label}: {text}" for label, text in zip(labels, texts))
    user = f"{row['question']}\n\n{options}\nPlease reason step by step."
    answer = answer_key(row, where)  # answerKey: the `answer` field is empty on these rows
    if answer not in labels:
        raise ValueError(f"{where}: answerKey {answer!r} is not one of the labels {labels}")
    return {"id": f"sciknoweval-{domain.lower()}-{idx}", "idx": idx, "domain": domain, "type": row.get("type"),
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
            "answer": answer, "labels": labels}


def source_rows(source: str | None, revision: str | None) -> Iterable[dict[str, Any]]:
    if source and is_local(source):
        return iter_local(Path(source))
    return iter_hub(source or HUB_NAME, "test", revision=revision)


def prepare(out_dir: Path, source: str | None = None, revision: str | None = None, domain: str = "Chemistry") -> dict[str, Any]:
    rows = [r for r in source_rows(source, revision) if keep(r, domain)]
    prepared = [prepared_row(r, idx, domain) for idx, r in enumerate(rows)]
    train, test = seeded_split(len(prepared), TEST_FRACTION, SEED)
    counts = {"train": write_jsonl(out_dir / "train.jsonl", (prepared[i] for i in train)),
              "test": write_jsonl(out_dir / "test.jsonl", (prepared[i] for i in test))}
    write_manifest(out_dir, f"sciknoweval_{domain.lower()}", {
        "source": source or HUB_NAME, "revision": revision, "filters": {"domain": domain, "level": LEVELS, "type": TYPES},
        "split": {"test_fraction": TEST_FRACTION, "seed": SEED, "method": "datasets.train_test_split"}, "rows": counts})
    return counts

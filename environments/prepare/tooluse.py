"""ToolUse (ToolAlpaca) as the authors ship it: lasgroup/SDPO ``datasets/tooluse/{train,test}.json``
(JSON lines: ``prompt``, a ReAct prompt listing the tools and ending in "Question: ..."; ``answer``,
a JSON string of ``[{"Action": name, "Action_Input": "<JSON object>"}]``, several for multi-step
requests; no system prompt). Their split is kept as it is; each row is converted to what
environments/tooluse.py reads (``messages``, ``golden_actions``).

Source: a directory holding train.json and test.json (a clone of lasgroup/SDPO's datasets/tooluse),
or, by default, those files at a pinned commit of the authors' repository on GitHub.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from environments.prepare.common import iter_local, write_jsonl, write_manifest
from environments.tooluse import from_authors_row

# lasgroup/SDPO main at the commit "Filter SciKnowEval to multiple-choice questions only (#20)"
AUTHORS_COMMIT = "0e6d5106abe69f578c63bf38a9394e22905c8773"
DEFAULT_SOURCE = f"https://raw.githubusercontent.com/lasgroup/SDPO/{AUTHORS_COMMIT}/datasets/tooluse"
SPLITS = ("train", "test")


def split_rows(source: str, split: str) -> Iterator[dict[str, Any]]:
    if source.startswith(("http://", "https://")):
        url = f"{source.rstrip('/')}/{split}.json"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - a fixed https URL
                text = response.read().decode()
        except OSError as err:
            raise ValueError(f"could not download {url}: {err}. Without network access, clone lasgroup/SDPO "
                             "and pass --source path/to/SDPO/datasets/tooluse") from err
        for line in text.splitlines():
            if line.strip():
                yield json.loads(line)
        return
    path = Path(source)
    yield from iter_local(path / f"{split}.json" if path.is_dir() else Path(str(path).replace("{split}", split)))


def prepare(out_dir: Path, source: str | None = None, revision: str | None = None) -> dict[str, Any]:
    if revision is not None:
        raise ValueError("tooluse: --revision does not apply; pass --source with the files or URL you want")
    source = source or DEFAULT_SOURCE
    counts, actions = {}, {}
    for split in SPLITS:
        rows = [from_authors_row(row, f"tooluse {split} row {i}") for i, row in enumerate(split_rows(source, split))]
        counts[split] = write_jsonl(out_dir / f"{split}.jsonl", rows)
        actions[split] = sum(len(r["golden_actions"]) for r in rows)
    write_manifest(out_dir, "tooluse", {"source": source, "rows": counts, "golden_actions": actions})
    return counts

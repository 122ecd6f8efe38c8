"""What every preparer shares: reading a source (local files streamed row by row, or a hub dataset
through ``datasets`` without scripts), the authors' seeded splits, and writing JSONL plus a manifest
that records where the rows came from."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


def is_local(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or Path(source).exists()


def iter_local(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a .jsonl / .json / .parquet file, one at a time (LiveCodeBench's files are GBs)."""
    if not path.is_file():
        raise ValueError(f"source file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # comes with `datasets`

        for batch in pq.ParquetFile(path).iter_batches(batch_size=16):
            yield from batch.to_pylist()
        return
    with path.open() as f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":  # a JSON array (the authors' data_handling.write_hf_to_json form)
            yield from json.load(f)
            return
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not valid JSON: {err}") from None


def iter_hub(name: str, split: str, *, config: str | None = None, revision: str | None = None,
             data_files: Any = None) -> Iterator[dict[str, Any]]:
    """Rows of a hub dataset, through ``datasets`` (data files only: no loading scripts, no
    trust_remote_code). Errors say how to prepare from local files instead."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise ValueError("loading from the hub needs `pip install datasets`") from err
    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision, data_files=data_files)
    except Exception as err:  # network, unknown name, a script-only repository: say which and how to go offline
        raise ValueError(
            f"could not load hub dataset {name!r} (config {config!r}, split {split!r}, revision {revision!r}): "
            f"{type(err).__name__}: {err}. Without network access, download the files and pass --source PATH."
        ) from err
    for row in ds:
        yield row


def seeded_split(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, test indices) exactly as ``datasets.Dataset.train_test_split(test_size=
    test_fraction, seed=seed)`` draws them (the authors' data/split_tasks.py): a PCG64 permutation
    of the rows, the first ceil(fraction * n) of it the test split, the rest the training split,
    both in permutation order."""
    import numpy as np  # comes with `datasets`

    if n < 2:
        raise ValueError(f"cannot split {n} row(s) into a training and a test split")
    n_test = math.ceil(test_fraction * n)
    permutation = np.random.default_rng(seed).permutation(n).tolist()
    return permutation[n_test:], permutation[:n_test]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)  # a half-written file never looks prepared
    return count


def write_manifest(out_dir: Path, name: str, info: dict[str, Any]) -> Path:
    path = out_dir / "manifest.json"
    path.write_text(json.dumps({"dataset": name, **info}, indent=2, default=str) + "\n")
    return path

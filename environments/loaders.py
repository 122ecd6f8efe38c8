"""Where built-in environments get their rows: a local JSON / JSONL / Parquet file, a Hugging Face
dataset name (``datasets`` is imported only then), or the small sample bundled with the package so
that tests and demos run offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


def load_rows(source: str, split: str, *, config: str | None = None, sample: str | None = None,
              limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of ``source`` for ``split``.

    ``source`` is ``"sample"`` (the bundled file ``sample``, every split the same rows), a path to a
    .json/.jsonl/.parquet file (a ``{split}`` in the path is replaced by the split name), or a hub
    dataset name (``config`` is its subset)."""
    if source == "sample":
        if sample is None:
            raise ValueError("this environment has no bundled sample; give a dataset name or a file path")
        rows = read_local(DATA_DIR / sample)
    elif source.endswith(LOCAL_SUFFIXES):
        rows = read_local(Path(source.replace("{split}", split)))
    else:
        rows = read_hub(source, split, config)
    return rows[:limit] if limit is not None else rows


def read_local(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"dataset file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # comes with `datasets`

        return pq.read_table(path).to_pylist()
    text = path.read_text()
    # A .json that starts with an object is JSON lines: what `datasets`' to_json writes (the SDPO
    # authors' datasets/*/train.json, for one).
    if path.suffix == ".jsonl" or (path.suffix == ".json" and text.lstrip().startswith("{") and "\n" in text.strip()):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not valid JSON: {err}") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if isinstance(data, dict):  # {"train": [...], "test": [...]} is common too
        raise ValueError(f"{path} holds an object; expected a list of rows (or name the split's file)")
    return list(data)


def read_hub(name: str, split: str, config: str | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise ValueError(f"loading {name!r} from the hub needs `pip install datasets`") from err
    try:
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as err:  # network, unknown name, unknown split: say which and how to go offline
        raise ValueError(
            f"could not load hub dataset {name!r} (config {config!r}, split {split!r}): {type(err).__name__}: {err}. "
            "Without network access, pass a local .json/.jsonl/.parquet file instead."
        ) from err


def require(row: dict[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise ValueError(f"{where}: row has no {key!r} field (fields: {sorted(row)})")
    return row[key]


# The paper's datasets, prepared as the SDPO authors prepared them (environments/prepare/): name ->
# "module:function". `python -m sdpo.data prepare NAME --out DIR` reaches them only through here.
PREPARERS = {
    "sciknoweval_chemistry": "environments.prepare.sciknoweval:prepare",
    "livecodebench_v6": "environments.prepare.livecodebench:prepare",
    "tooluse": "environments.prepare.tooluse:prepare",
    "gsm8k": "environments.prepare.gsm8k:prepare",
}


def prepare_dataset(name: str, out_dir: str | Path, source: str | None = None, revision: str | None = None) -> dict[str, int]:
    """Writes ``out_dir``/train.jsonl and test.jsonl (and manifest.json) for dataset ``name``;
    returns the rows written per split. ``source``: local files or a hub name instead of the default."""
    import importlib

    if name not in PREPARERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(PREPARERS))}")
    module_name, _, function = PREPARERS[name].partition(":")
    prepare = getattr(importlib.import_module(module_name), function)
    return prepare(Path(out_dir), source=source, revision=revision)

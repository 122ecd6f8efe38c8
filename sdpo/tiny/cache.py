"""The cache of embedded models: build once, publish atomically, share between processes and users.

Every embedded model (``models.tiny_arithmetic``, ``models.tiny_pairsums``) is a Hugging Face
directory under ``$SDPO_CACHE_DIR`` (default ``~/.cache/sdpo``), built by its own training function
the first time something asks for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from typing import Callable

from sdpo.tiny.model import tiny_generation_config

REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "warmstart.json")


def default_cache_dir() -> str:
    return os.environ.get("SDPO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sdpo")


def is_complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in REQUIRED_FILES)


def save_model(model, tok, metrics: dict, path: str) -> None:
    """A Hugging Face directory: weights, generation config, tokenizer, and how the build went."""
    model.save_pretrained(path, safe_serialization=True)
    tiny_generation_config(model.config).save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "warmstart.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)


def ensure_built(name: str, build: Callable[[], tuple], *, cache_dir: str | None, force: bool,
                 log: Callable[[str], None], expected: str) -> tuple[str, dict | None]:
    """Path of the cached model ``name``, building it with ``build() -> (model, tokenizer, metrics)``
    when missing (or ``force``). Returns the path and, when this call built it, its metrics."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    target = os.path.join(cache_dir, name)
    if is_complete(target) and not force:
        return target, None
    os.makedirs(cache_dir, exist_ok=True)
    with _build_lock(target + ".lock"):
        if is_complete(target) and not force:  # another process built it while we waited
            return target, None
        log(f"[tiny] building {target} ({expected} on 2 CPU cores)")
        model, tok, metrics = build()
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir)
        try:
            save_model(model, tok, metrics, tmp)
            _make_readable(tmp)
            if os.path.exists(target) and (force or not is_complete(target)):  # leftover or --force
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=cache_dir)
                os.replace(target, os.path.join(old, "x"))
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, target)  # atomic: readers see no directory or a complete one
            except OSError:
                if not is_complete(target):  # lost a race (no lock): use the winner's, else fail
                    raise
                log(f"[tiny] another process built {target} first; using it")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target, metrics


def cli(prog: str, description: str, ensure: Callable[..., str], argv: list[str] | None = None) -> None:
    """`python -m models.<builder> [--cache-dir DIR] [--force]`: build (if needed), print the path and metrics."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--cache-dir", default=None, help="default: $SDPO_CACHE_DIR or ~/.cache/sdpo")
    parser.add_argument("--force", action="store_true", help="rebuild even if the model is already there")
    args = parser.parse_args(argv)
    path = ensure(args.cache_dir, force=args.force)
    with open(os.path.join(path, "warmstart.json")) as fh:
        metrics = json.load(fh)
    metrics.pop("history", None)
    print(path)
    print(json.dumps(metrics, indent=2))


@contextlib.contextmanager
def _build_lock(path: str):
    """Lets a second process wait for the first build instead of training a copy of its own. The
    atomic rename is what keeps the result correct; the lock only saves work (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, both build, the loser uses the winner's directory
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _make_readable(path: str) -> None:
    """mkdtemp (and the safetensors writer) create owner-only files; a shared cache must be readable
    by the other users of the machine."""
    os.chmod(path, 0o755)
    for name in os.listdir(path):
        os.chmod(os.path.join(path, name), 0o644)

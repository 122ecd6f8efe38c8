"""Checkpoints on disk: layout, atomic commit, retention, and finding the newest one to resume.

    RUN_DIR/checkpoints/step_000040/
        learner/           torch.distributed.checkpoint shards: student, optimizer, EMA teacher
                           (model.lora: the adapters, their optimizer state, the teacher's adapters)
        rank0.pt ...       per-rank scheduler and RNG states
        driver.pt          step, prompt sampler, RNG, the held-out success before training
        config.yaml        the run's config: a resume checks its own against it
        MANIFEST.json      every file's size (and SHA-256 up to 16 MiB), recorded at commit
        COMPLETE           written last: a directory without it is not a checkpoint

Everything is written into ``.tmp-step_000040`` and renamed into place at the end, so a run
killed while saving leaves either the whole checkpoint or none (the next save removes the debris).
A checkpoint damaged afterwards (a shard truncated or deleted, a disk error) fails its manifest:
the resume skips it, says why, and takes the newest one that verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sdpo.config import Config
from sdpo.recipe import to_yaml

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission): the run stops, the previous
    checkpoint is intact, and re-running the same command resumes from it."""


class Checkpoints:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.root = run_dir / "checkpoints"

    def latest(self) -> Path | None:
        """The newest complete checkpoint that verifies, or None. The ones skipped on the way are in
        ``self.skipped`` as (path, why) and are reported on stderr once."""
        self.skipped: list[tuple[Path, str]] = []
        if not self.root.is_dir():  # (also when something else sits at that path: save() will say so)
            return None
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "COMPLETE").exists()]
        for _, path in sorted(found, reverse=True):
            problem = verify(path)
            if problem is None:
                return path
            self.skipped.append((path, problem))
            if path not in _REPORTED:
                _REPORTED.add(path)
                print(f"warning: checkpoint {path} is damaged and skipped: {problem}; trying an older one",
                      file=sys.stderr)
        return None

    def save(self, step: int, learners: Any, driver_state: dict[str, Any]) -> tuple[Path, float]:
        """Writes checkpoint ``step`` whole or not at all; returns its path and the seconds it took."""
        started = time.perf_counter()
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".tmp-step_{step:06d}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            learners.call("save_checkpoint", str(tmp))
            torch.save(driver_state, tmp / "driver.pt")
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            write_manifest(tmp)
            (tmp / "COMPLETE").write_text(f"step {step}\n")
            _fsync_dir(tmp)
        except Exception as err:
            # A disk error is an OSError here, or one wrapped in a RayTaskError from a learner rank.
            if not isinstance(err, OSError) and not isinstance(getattr(err, "cause", None), OSError):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # free what the partial write took
            raise CheckpointError(
                f"the checkpoint of step {step} could not be written under {self.root}: {err}. The last complete "
                f"checkpoint ({self.latest() or 'none yet'}) is intact: free space or fix the directory, then run the "
                "same command again to resume from it") from err
        shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step after a resume
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self._prune()
        return final, time.perf_counter() - started

    def load_driver_state(self, path: Path) -> dict[str, Any]:
        # Our own file, holding Python RNG state: weights_only=False is needed and safe here.
        return torch.load(path / "driver.pt", weights_only=False)

    def _prune(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        complete = sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)))
        for _, path in complete[:-keep] if keep else []:
            shutil.rmtree(path, ignore_errors=True)
        for debris in self.root.glob(".tmp-step_*"):
            shutil.rmtree(debris, ignore_errors=True)


_REPORTED: set[Path] = set()
MANIFEST = "MANIFEST.json"
HASHED_BYTES = 16 << 20  # hashing every shard of a large model would double a save's time: sizes only above this
REQUIRED = ("driver.pt", "rank0.pt", "learner/.metadata")  # what a checkpoint from before manifests must hold


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, "COMPLETE")):
        size = file.stat().st_size
        files[file.relative_to(directory).as_posix()] = {"bytes": size, "sha256": _sha256(file) if size <= HASHED_BYTES else None}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify(directory: Path) -> str | None:
    """Why the checkpoint at ``directory`` cannot be trusted, or None."""
    manifest = directory / MANIFEST
    if not manifest.is_file():  # written before manifests existed: the files a resume reads must be there
        missing = [name for name in REQUIRED if not (directory / name).is_file()]
        return f"it has no {', no '.join(missing)}" if missing else None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"its {MANIFEST} cannot be read ({err})"
    for name, recorded in files.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != recorded["bytes"]:
            return f"{name} has {size} bytes, {recorded['bytes']} were written"
        if recorded.get("sha256") and _sha256(file) != recorded["sha256"]:
            return f"{name} does not match the checksum recorded when it was written"
    return None


def recorded_config(directory: Path) -> dict[str, Any]:
    """The config a checkpoint was taken with, as plain data (read without the schema, which may have
    changed since)."""
    import yaml

    return yaml.safe_load((directory / "config.yaml").read_text()) or {}


def step_of(checkpoint: Path | None) -> int:
    return int(_STEP_DIR.match(checkpoint.name).group(1)) if checkpoint is not None else 0


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop metric rows past ``after_step``: a resumed run replays those steps and logs them again.
    In place (not write-and-rename), so a logger holding the file open in append mode keeps
    writing to it."""
    if not path.exists():
        return
    import json

    with path.open("r+") as f:
        offset = 0
        for line in iter(f.readline, ""):
            if line.strip() and json.loads(line)["step"] > after_step:
                break
            offset = f.tell()
        f.truncate(offset)


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

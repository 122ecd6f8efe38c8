"""Driver helpers: build a model, start benchmark sides as subprocesses, time their steps interleaved."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from protocol import PREFIX  # noqa: E402
from workload import model_config  # noqa: E402


def build_model(shape: str, directory: str, seed: int = 0, save_dtype: str = "float32") -> str:
    """A random-init Qwen2 of the given shape (built in code: no hub). Both sides load it as fp32
    master weights; ``save_dtype`` bfloat16 only halves the file."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if not os.path.exists(os.path.join(directory, "config.json")):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(**model_config(shape)))
        model.to(getattr(torch, save_dtype)).save_pretrained(directory)
    return directory


class Side:
    """One implementation's learner, set up once in its own process, stepped on command."""

    def __init__(self, name: str, argv: list[str], log_path: str):
        self.name = name
        self.log = open(log_path, "w")
        env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        raise RuntimeError(f"{self.name} exited (code {self.proc.wait()}); see {self.log.name}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()  # our own child only
        self.log.close()


@contextlib.contextmanager
def started(specs: list[tuple[str, list[str], str]]):
    """Start one Side per (name, argv, log path); every one started is closed on the way out."""
    sides: list[Side] = []
    try:
        for name, argv, log_path in specs:
            sides.append(Side(name, argv, log_path))
        yield sides
    finally:
        for side in sides:
            side.close()


def interleave(sides: list[Side], steps: int, warmup: int = 1) -> dict[str, list[dict]]:
    """Warm-up steps, then ``steps`` rounds of one step per side in turn (the order rotates each
    round), so that load from other users of a shared machine falls on every side alike."""
    for side in sides:
        for _ in range(warmup):
            side.ask("step")
    results: dict[str, list[dict]] = {s.name: [] for s in sides}
    for r in range(steps):
        for side in sides[r % len(sides):] + sides[: r % len(sides)]:
            results[side.name].append(side.ask("step"))
    return results


def median_seconds(records: list[dict]) -> float:
    return statistics.median(r["seconds"] for r in records)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())

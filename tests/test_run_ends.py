"""However a run ends, it leaves the machine as it found it: a run that fails with an exception, one
stopped with Ctrl-C (SIGINT to its process group, as a terminal sends it) and one stopped with
SIGTERM (a job scheduler) each end with no process of theirs alive, no weight files of theirs in
/dev/shm, and a metrics file whose every line is complete. Ctrl-C and SIGTERM print one line, no
traceback, naming the last checkpoint and the command that resumes from it.

Only this test's own runs are looked at (their process trees and their run names): other Ray
clusters may be running on the same machine."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
# Long enough never to finish on its own; a checkpoint at step 2 for the message to name.
ENDLESS = ["steps=10000", "prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.samples_per_micro_batch=8",
           "eval.max_tasks=4", "eval.greedy=false", "checkpoint.every_steps=2", "checkpoint.export_hf=false",
           "environment.kwargs={limit_per_split: 8}"]
# The failure: an exception in the driver at the third weight sync, after weight files exist.
FAILING = """
import sys
import sdpo.run, sdpo.trainer

sync, calls = sdpo.trainer.Run.sync, []
def failing_sync(self, step, timer):
    calls.append(step)
    if len(calls) == 3:
        raise RuntimeError("injected failure")
    return sync(self, step, timer)
sdpo.trainer.Run.sync = failing_sync
sys.exit(sdpo.run.main(sys.argv[1:]))
"""


def start(run_dir: Path, script: str | None = None) -> subprocess.Popen:
    args = ["recipes/quickstart.yaml", *ENDLESS, f"logging.run_dir={run_dir}"]
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "sdpo.run", *args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A session of its own: SIGINT to its group is what Ctrl-C in a terminal sends. Output to a file
    # (a pipe nobody reads while the run goes could fill and block it).
    log = open(f"{run_dir}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_ctrl_c_as_in_a_terminal)


def _ctrl_c_as_in_a_terminal() -> None:
    # A suite started in the background (`pytest ... &` in a script) inherits SIGINT ignored, and
    # Python then never raises KeyboardInterrupt: the run would rightly go on, as a background job
    # should. The run under test gets SIGINT as a terminal's foreground job has it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def output(run_dir: Path) -> str:
    return Path(f"{run_dir}.log").read_text()


def wait_for(condition, proc: subprocess.Popen, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:g} s"
        time.sleep(0.1)


def own_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The run's process tree (driver, Ray's services and workers, vLLM engine processes), plus
    anything else in its session."""
    found = {p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)}
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                found[p.pid] = p
        except (ProcessLookupError, PermissionError):
            pass
    return list(found.values())


def alive(processes: list[psutil.Process], timeout_s: float = 60) -> list[str]:
    """Those still running after ``timeout_s`` (Ray's services take a moment to go)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = []
        for p in processes:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def weight_files(run_dir: Path) -> list[str]:
    return glob.glob(f"/dev/shm/sdpo-*-{glob.escape(run_dir.name)}-*")


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # each line whole


def trained_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum('"learn/loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_run_cleans_up_and_says_how_to_resume(tmp_path, signum):
    run_dir = tmp_path / f"stopped-{signum.name.lower()}"
    proc = start(run_dir)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step_000002" / "COMPLETE").exists() and trained_steps(run_dir) >= 3,
                 proc, "a checkpoint and a third step")
        assert weight_files(run_dir), "the run has no weight files in /dev/shm: nothing to check"
        processes = own_processes(proc)
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # the whole group, as a terminal's Ctrl-C
        else:
            os.kill(proc.pid, signal.SIGTERM)  # the driver only, as a scheduler's stop
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = output(run_dir)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {signum.name} after step "), last
    assert "last checkpoint " + str(run_dir / "checkpoints" / "step_0000") in last, last
    assert "resume: python -m sdpo.run recipes/quickstart.yaml " in last and f"logging.run_dir={run_dir}" in last, last
    assert not alive(processes), alive(processes)
    assert not weight_files(run_dir), weight_files(run_dir)
    assert metrics_rows(run_dir)


def test_a_failed_run_cleans_up(tmp_path):
    run_dir = tmp_path / "failed"
    proc = start(run_dir, FAILING)
    try:
        wait_for(lambda: trained_steps(run_dir) >= 1, proc, "a first step")
        processes = own_processes(proc)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = output(run_dir)
    assert proc.returncode == 1 and "RuntimeError: injected failure" in stderr, stderr[-3000:]
    assert not alive(processes), alive(processes)
    assert not weight_files(run_dir), weight_files(run_dir)
    assert [r["step"] for r in metrics_rows(run_dir) if "learn/loss" in r] == [1, 2]

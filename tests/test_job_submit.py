"""`ray job submit` end to end, as docs/ray_jobs.md tells a user to do it: a Ray head on loopback
(`ray start --head` from the venv), the repository uploaded as the job's working directory, the
quickstart run as the job's driver attached to that cluster through the RAY_ADDRESS Ray sets, logs
followed to the end, the result read back. About a minute on 2 cores.

Teardown stops exactly the head this test started (its process group, then anything still naming its
private temp dir), not `ray stop`, which would stop every Ray cluster on the machine, other people's too."""

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import free_ports

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
UPLOAD_LIMIT_BYTES = 5 * 2**20  # source, recipes, docs and tests: well under a MiB today


def ray_env() -> dict[str, str]:
    """What the docs say to do: the venv first on PATH (so the job's `python` is the venv's), and a
    token for Ray 2.60's token auth. A token of our own keeps this cluster off ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    return env


def processes_naming(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass  # gone already
    return pids


@pytest.fixture()
def ray_head():
    # A short private temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="sdpo-rj-", dir="/tmp")
    gcs, dashboard, client, agent, metrics = free_ports(5)
    env = ray_env()
    # Ray's own processes, stopped with the head, can leave multiprocessing's /tmp/pymp-* folders
    # behind: give them a temp dir that the fixture removes
    env["TMPDIR"] = temp_dir
    log = open(f"{temp_dir}.log", "w")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # its own group, to stop it whole
    try:
        wait_for_dashboard(dashboard, head, f"{temp_dir}.log")
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "temp_dir": temp_dir}
    finally:
        stop_head(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        os.unlink(f"{temp_dir}.log")


def wait_for_dashboard(port: int, head: subprocess.Popen, log_path: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # up, and asking for the token
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the dashboard did not answer within {timeout_s} s:\n{Path(log_path).read_text()[-3000:]}")


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM lets `ray start --block` drain and stop its processes; SIGKILL whatever is left after a
    minute, then anything outside the group that still names this cluster's temp dir."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)
    for pid in processes_naming(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def submit(ray_head: dict, name: str, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    out = subprocess.run(
        ["ray", "job", "submit", "--address", ray_head["address"], "--submission-id", name, "--working-dir", ".",
         "--", "python", "-m", "sdpo.run", "recipes/quickstart.yaml", *args],
        cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=400)
    return out, out.stdout + out.stderr


def test_quickstart_as_a_ray_job(ray_head, tmp_path):
    # A recipe typo: the job fails in seconds, the error is in the followed logs, and `ray job submit`
    # exits non-zero, so a script (or CI) that submits sees it.
    bad, logs = submit(ray_head, f"bad-{uuid.uuid4().hex[:8]}", "loss.alpah=1")
    assert bad.returncode != 0 and "loss.alpah: unknown key" in logs and "failed" in logs, logs[-5000:]

    name = f"job-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / name  # absolute: the job's cwd is a copy of the working dir inside Ray's temp dir
    submission, logs = submit(ray_head, name, "steps=2", "prompts_per_step=4", "rollout.samples_per_prompt=4",
                              "learner.samples_per_micro_batch=4", "eval.max_tasks=8", "eval.every_steps=0",
                              f"logging.run_dir={run_dir}")
    weights = Path("/dev/shm").glob(f"sdpo-*-{name}-*")  # the run's weight-sync files
    for path in weights:
        shutil.rmtree(path, ignore_errors=True)
    assert submission.returncode == 0, logs[-5000:]
    assert f"Job '{name}' succeeded" in logs, logs[-5000:]
    # The driver attached to this cluster (through the RAY_ADDRESS Ray gives a job) instead of starting one.
    assert "Connecting to existing Ray cluster" in logs and "Started a local Ray instance" not in logs, logs[-5000:]
    # The followed logs carry the result: held-out success before -> after.
    assert re.search(r"held-out success\s+success_t: \d\.\d{3} -> \d\.\d{3}", logs), logs[-5000:]

    status = subprocess.run(["ray", "job", "status", "--address", ray_head["address"], name], cwd=ROOT,
                            env=ray_head["env"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and f"Job '{name}' succeeded" in status.stdout, status.stdout + status.stderr

    # The result lands where the recipe said, readable on the submitting side and plottable.
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum('"learn/loss"' in r for r in rows) == 2 and sum('"eval/success_t"' in r for r in rows) == 2
    plot = subprocess.run([sys.executable, "-m", "sdpo.plot", str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert plot.returncode == 0 and (run_dir / "plots" / "overview.png").is_file(), plot.stderr

    # What was uploaded: the working dir as unpacked on the cluster, without runs, venvs, git or caches.
    # One package per distinct content (files edited between the two submissions make a second one).
    uploads = [p for p in Path(ray_head["temp_dir"]).glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
               if p.is_dir()]  # not session_latest (a link to the same session) nor the .zip.lock
    assert 1 <= len(uploads) <= 2, uploads
    for upload in uploads:
        files = [p for p in upload.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        top = {p.relative_to(upload).parts[0] for p in files}
        print(f"working-dir upload: {len(files)} files, {size / 2**10:.0f} KiB")
        assert {"sdpo", "environments", "recipes", "pyproject.toml"} <= top
        assert not top & {"runs", ".venv", ".git", "sdpo.egg-info", "wandb", ".pytest_cache"}, top
        assert not any("__pycache__" in p.parts for p in files)
        assert size < UPLOAD_LIMIT_BYTES, size

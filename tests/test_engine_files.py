"""An engine's scratch directory outlives a SIGKILLed engine; the next engine to start removes it."""

import os
import subprocess
import sys
import tempfile

from sdpo.rollout.engine_files import SCRATCH_PREFIX, new_scratch_dir


def test_a_new_engine_removes_the_scratch_dirs_of_dead_engines_only(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{SCRATCH_PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{SCRATCH_PREFIX}{os.getppid()}-def"  # a running process's engine
    other = tmp_path / "sdpo-vllm-notapid"  # not ours to judge
    for d in (orphan, live, other):
        d.mkdir()
        (d / "vllm_dist_x").write_text("store")
    mine = new_scratch_dir()
    assert not orphan.exists() and live.exists() and other.exists()
    assert os.path.basename(mine).startswith(f"{SCRATCH_PREFIX}{os.getpid()}-") and os.path.dirname(mine) == str(tmp_path)

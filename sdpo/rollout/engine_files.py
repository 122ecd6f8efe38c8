"""What a vLLM engine leaves on the machine unless someone removes it, and removing it.

vLLM puts a torch.distributed FileStore (``vllm_dist_*``) and ZMQ IPC sockets (uuid names) in the
temp directory, and an out-of-process engine core's shared-memory queues (``psm_*``) and semaphores (``sem.mp-*``) in
/dev/shm.
It removes none of them when its process is killed, and not all of them when it shuts down. So each
engine gets a temp directory of its own for the first two, and notes the queues its processes map;
the engine removes both when it closes, and whoever kills an engine's process (the rollout pool, on a
dead replica or a hung shutdown) removes them from the record the engine handed out when it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field


@dataclass
class EngineFiles:
    scratch_dir: str | None = None  # the engine's private temp directory
    shm: list[str] = field(default_factory=list)  # /dev/shm files mapped by the engine's processes
    host: str = field(default_factory=lambda: os.uname().nodename)  # paths mean something only on this host

    def remove(self) -> None:
        """Idempotent; a no-op on another host (the files are that host's)."""
        if self.host != os.uname().nodename:
            return
        if self.scratch_dir:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)
        for path in self.shm:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


SCRATCH_PREFIX = "sdpo-vllm-"


def new_scratch_dir() -> str:
    """A private temp directory for one engine, named after this process; first removes those of
    engines whose process is gone without closing them (SIGKILL, e.g. Ray killing the actors of a
    driver that was itself killed), which nobody else knows to remove."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if name.startswith(SCRATCH_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to judge
        return True
    return True


@contextlib.contextmanager
def temp_dir_for_engine(path: str):
    """While the engine starts (its processes spawn and its stores and sockets are made), this process's
    temp directory is ``path``; child processes inherit it. Restored afterwards: the caller may be a
    test process or a driver with temp files of its own."""
    saved_env = {key: os.environ.get(key) for key in ("TMPDIR", "VLLM_RPC_BASE_PATH")}
    saved_default = tempfile.tempdir
    os.environ["TMPDIR"] = os.environ["VLLM_RPC_BASE_PATH"] = path
    tempfile.tempdir = path
    try:
        yield
    finally:
        tempfile.tempdir = saved_default
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc: no psutil in the core dependencies)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, p in parents.items() if p == parent]
        found.update(children)
        frontier.extend(children)
    return found


_SHM_PREFIXES = ("psm_", "sem.mp-")  # shared_memory segments; multiprocessing's named semaphores


def shm_files() -> set[str]:
    return {os.path.join("/dev/shm", name) for name in os.listdir("/dev/shm") if name.startswith(_SHM_PREFIXES)}


def shm_files_of(pids: set[int]) -> set[str]:
    """The /dev/shm files of shared_memory segments and named semaphores that ``pids`` have mapped."""
    files = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                files.update(path for path in (line.split()[-1] for line in f)
                             if path.startswith("/dev/shm/") and path[9:].startswith(_SHM_PREFIXES))
        except OSError:
            continue
    return files

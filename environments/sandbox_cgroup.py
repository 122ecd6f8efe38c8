"""One cgroup per sandbox: a single budget for everything a run starts, whatever it forks.

rlimits count per process: N processes may each take the address-space limit, and SysV shared
memory, memfd files and tmpfs pages are not in any process's address space at all. A memory cgroup
charges every page the run's processes fault in or write (anonymous, shm, memfd, tmpfs, and kernel
memory such as inodes), a pids cgroup caps the whole tree, the CPU counter sums the whole tree, and
killing the cgroup kills every member, daemons that called setsid() included.

Works on cgroup v2 (``memory``/``pids`` enabled in the caller's cgroup's ``subtree_control``, or
enable-able there), on v1, and on hybrid machines (v1 controllers plus a v2 hierarchy, where the v2
side still gives ``cgroup.kill`` and ``cpu.stat``). Each controller is taken from the hierarchy that
has it; the sandbox's cgroups are children of the caller's own, so the caller's limits still apply.

Standard library only: the launcher imports it in a fresh ``python -I -S`` interpreter.
"""

from __future__ import annotations

import os
import signal
import time

PREFIX = "sdpo-sandbox-"


def _mounts() -> tuple[str | None, dict[str, str]]:
    """(cgroup2 mount point or None, {v1 controller: mount point}) from /proc/self/mountinfo."""
    v2, v1 = None, {}
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, {}
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or fields[3] != "/":  # only whole hierarchies
            continue
        if tail[0] == "cgroup2" and v2 is None:
            v2 = fields[4]
        elif tail[0] == "cgroup":
            for option in tail[2].split(","):
                if option in ("memory", "pids", "cpuacct"):
                    v1.setdefault(option, fields[4])
    return v2, v1


def _own_paths() -> tuple[str | None, dict[str, str]]:
    """(this process's v2 cgroup path, {v1 controller: path}) from /proc/self/cgroup."""
    v2, v1 = None, {}
    with open("/proc/self/cgroup") as f:
        for line in f.read().splitlines():
            hier_id, controllers, path = line.split(":", 2)
            if hier_id == "0" and controllers == "":
                v2 = path
            for name in controllers.split(","):
                v1[name] = path
    return v2, v1


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def plan() -> tuple[dict | None, str]:
    """(where each job is done, or None; why not). Jobs: memory, pids, cpu, kill; each maps to
    {"kind": "v1"|"v2", "parent": the caller's cgroup directory in that hierarchy}."""
    v2_mount, v1_mounts = _mounts()
    try:
        v2_path, v1_paths = _own_paths()
    except OSError as err:
        return None, f"cannot read /proc/self/cgroup: {err}"
    jobs: dict[str, dict] = {}
    problems = []
    if v2_mount and v2_path is not None:
        parent = os.path.join(v2_mount, v2_path.lstrip("/"))
        try:
            available = _read(os.path.join(parent, "cgroup.controllers")).split()
            enabled = _read(os.path.join(parent, "cgroup.subtree_control")).split()
        except OSError as err:
            available, enabled = [], []
            problems.append(f"{parent}: {err.strerror}")
        for controller in ("memory", "pids"):
            if controller in available and controller not in enabled:
                try:  # fails (EBUSY) where the caller's cgroup holds processes and is not the root
                    _write(os.path.join(parent, "cgroup.subtree_control"), f"+{controller}")
                    enabled.append(controller)
                except OSError as err:
                    problems.append(f"cannot enable {controller} in {parent}/cgroup.subtree_control: {err.strerror}")
            if controller in enabled:
                jobs[controller] = {"kind": "v2", "parent": parent}
        if os.path.exists(os.path.join(parent, "cgroup.procs")):
            jobs["cpu"] = {"kind": "v2", "parent": parent}  # cpu.stat's usage_usec needs no controller
            jobs["kill"] = {"kind": "v2", "parent": parent}
    for controller, job in (("memory", "memory"), ("pids", "pids"), ("cpuacct", "cpu")):
        if job not in jobs and controller in v1_mounts and controller in v1_paths:
            jobs[job] = {"kind": "v1", "parent": os.path.join(v1_mounts[controller], v1_paths[controller].lstrip("/"))}
    missing = [job for job in ("memory", "pids", "cpu") if job not in jobs]
    if missing:
        problems.insert(0, f"no cgroup hierarchy offers {', '.join(missing)}")
        return None, "; ".join(problems)
    # Try it: make, limit and remove one cgroup in every parent we would use.
    try:
        group = SandboxCgroup.create(jobs, f"probe-{os.getpid()}", memory_bytes=64 << 20, pids=8)
        group.remove()
    except OSError as err:
        return None, f"cannot create a cgroup: {err}"
    return jobs, ""


class SandboxCgroup:
    """The cgroups of one sandbox run (one directory per hierarchy used)."""

    def __init__(self, jobs: dict, dirs: dict[str, str]):
        self.jobs, self.dirs = jobs, dirs  # dirs: job -> this run's directory

    @classmethod
    def create(cls, jobs: dict, name: str, memory_bytes: int, pids: int) -> SandboxCgroup:
        dirs, made = {}, {}
        group = cls(jobs, dirs)
        try:
            for job, where in jobs.items():
                path = os.path.join(where["parent"], PREFIX + name)
                if path not in made:
                    os.mkdir(path, 0o755)
                    made[path] = True
                dirs[job] = path
            memory = jobs["memory"]
            if memory["kind"] == "v2":
                _write(dirs["memory"] + "/memory.max", str(memory_bytes))
                _write_if_present(dirs["memory"] + "/memory.swap.max", "0")
                _write_if_present(dirs["memory"] + "/memory.oom.group", "1")  # an OOM ends the whole run
            else:
                _write(dirs["memory"] + "/memory.limit_in_bytes", str(memory_bytes))
                _write_if_present(dirs["memory"] + "/memory.memsw.limit_in_bytes", str(memory_bytes))
            _write(dirs["pids"] + "/pids.max", str(pids))
        except BaseException:
            group.remove()
            raise
        return group

    def join(self) -> None:
        """Move the calling process in; everything it starts afterwards is counted here."""
        pid = str(os.getpid())
        for path in sorted(set(self.dirs.values())):
            _write(path + "/cgroup.procs", pid)

    def cpu_s(self) -> float:
        if self.jobs["cpu"]["kind"] == "v2":
            for line in _read(self.dirs["cpu"] + "/cpu.stat").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
            return 0.0
        return int(_read(self.dirs["cpu"] + "/cpuacct.usage")) / 1e9

    def cpu_file(self) -> str:
        """The file the CPU counter is read from (v2 ``cpu.stat`` or v1 ``cpuacct.usage``)."""
        return self.dirs["cpu"] + ("/cpu.stat" if self.jobs["cpu"]["kind"] == "v2" else "/cpuacct.usage")

    def memory_peak_mib(self) -> float | None:
        name = "/memory.peak" if self.jobs["memory"]["kind"] == "v2" else "/memory.max_usage_in_bytes"
        try:
            return int(_read(self.dirs["memory"] + name)) / (1 << 20)
        except (OSError, ValueError):
            return None  # memory.peak needs Linux 5.19

    def oom_kills(self) -> int:
        name = "/memory.events" if self.jobs["memory"]["kind"] == "v2" else "/memory.oom_control"
        for line in _read(self.dirs["memory"] + name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def kill(self, timeout_s: float = 10.0) -> bool:
        """SIGKILL every member and wait until none is left. False if some survived ``timeout_s``."""
        kill_dir = self.dirs.get("kill")
        if kill_dir and os.path.exists(kill_dir + "/cgroup.kill"):
            _write(kill_dir + "/cgroup.kill", "1")  # Linux 5.14: atomic, forks cannot race it
        deadline = time.monotonic() + timeout_s
        while True:
            members = self.members()
            if not members:
                return True
            if time.monotonic() > deadline:
                return False
            for pid in members:  # v1 only (or dying members): a new fork shows up in the next pass
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.001)

    def members(self) -> list[int]:
        pids: set[int] = set()
        for path in set(self.dirs.values()):
            try:
                pids.update(int(p) for p in _read(path + "/cgroup.procs").split())
            except FileNotFoundError:
                pass
        return sorted(pids)

    def remove(self) -> None:
        """Remove the directories (they must be empty of processes); tries for a second."""
        for path in sorted(set(self.dirs.values()), reverse=True):
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the last member is being torn down
                    time.sleep(0.01)


def _write_if_present(path: str, value: str) -> None:
    if os.path.exists(path):
        _write(path, value)

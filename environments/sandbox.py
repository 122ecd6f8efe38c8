"""Run untrusted programs (model-written code) in a cage, one fresh process tree per run.

    result = run_sandboxed(python_argv("main.py"), files={"main.py": code}, stdin=b"1 2\\n",
                           limits=SandboxLimits(wall_s=5))

Every run gets: a separate process started from a fresh interpreter, a wall-clock limit enforced by
the caller, a CPU-time limit (RLIMIT_CPU), an address-space limit (RLIMIT_AS), a file-size limit
(RLIMIT_FSIZE), a process-count limit (RLIMIT_NPROC), few open files (RLIMIT_NOFILE), no core dumps,
a scrubbed environment (only the variables passed in, plus ``SDPO_SANDBOX_LEVEL``), a fresh private
working directory holding only the given files (removed afterwards), a fresh empty session keyring
(and, for a uid of its own, emptied user keyrings), and stdout/stderr capped at ``output_bytes``
each (the run is killed when it writes more).

A supervisor process (``sandbox_launcher.py``) sits between the caller and the program. The caller
holds the only write end of a "lifeline" pipe to it: when the caller ends the run (wall clock,
output cap) or dies -- even by SIGKILL -- the supervisor kills the whole run and removes the
scratch directory. The program's processes die with the supervisor (PR_SET_PDEATHSIG).

Where the machine lets us make cgroups (root, or a delegated cgroup; v2, v1 or hybrid, see
``sandbox_cgroup.py``), each run has its own, a child of the caller's, and then also:
  - memory: ``total_memory_mib`` for the whole run -- every process, SysV shared memory, memfd and
    tmpfs pages, kernel memory (inodes) -- enforced by the kernel's OOM killer (``memory_limited``);
  - processes: ``processes`` (+4 for the set-up) for the whole run, whatever uid;
  - CPU: the whole tree's CPU time (``cpu_s`` in the result) is held to ``limits.cpu_s``
    (``cpu_total_limited``), and a judge inside can read it (``SDPO_SANDBOX_CPU_FILE``);
  - the end: every member is killed (``cgroup.kill`` or a kill loop), setsid() daemons included.
Without cgroups the result says ``cgroup=False`` and a warning is logged once: memory is then bounded
per process only, CPU per process (NPROC x CPU), and at the rlimits level daemons may survive.

Two levels, chosen automatically (``level="auto"``) and reported in every result:

``namespaces`` (Linux x86-64 with user namespaces, or root). What holds, beyond the list above:
  - No network: a fresh network namespace with only a down loopback; connect() fails.
  - No files of the machine: the program sees a minimal root built on a tmpfs -- read-only binds of
    /usr (and /bin, /lib*, /sbin links), the Python install, /etc/ld.so.cache and four /dev nodes --
    then ``pivot_root`` and a detached old root. The project's source and datasets, /etc/shadow,
    /root, /home, other runs' files do not exist in it. The root is read-only; only /sandbox (the
    working dir) and /tmp are writable, each a tmpfs capped in size (``workdir_mib``, ``tmp_mib``)
    and in files (``inodes``), so no write can reach the disk.
  - No privileges: as root, the program runs under an unprivileged uid of its own (from
    200000 up), so RLIMIT_NPROC is enforced (the kernel exempts uid 0) and it cannot signal
    anything outside. As a normal user, it runs as root of its own user namespace with an empty capability
    bounding set, so it holds no capabilities after execve, and RLIMIT_NPROC counts only the
    processes of that namespace. ``no_new_privs`` is set.
  - Its own IPC namespace: SysV shared memory, semaphores and queues vanish with the run.
  - Nothing outlives the run: a fresh PID namespace whose PID 1 is our launcher; when it exits or is
    killed the kernel kills every process left in it, daemons included.
  - The verdict channel is a pipe the program cannot reach; test expectations never enter the cage.
  Not covered: kernel exploits and side channels.

``rlimits`` (fallback: no user namespaces, or not Linux x86-64). Only the common list holds, plus,
as root, an unprivileged uid of its own (so /etc/shadow, /root and other 0700/0600 files are
unreadable, NPROC holds, and its SysV IPC objects are removed after the run). World-readable files
(the project, its datasets), world-writable directories (/tmp, /dev/shm), the network and the
caller's other processes are reachable. Use it for trusted code or inside a container/VM: the code
environment refuses it for model-written code unless asked for as ``unsafe-rlimits``
(``level_for_untrusted_code``). A warning is logged once when the fallback is taken.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import platform
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Literal

from environments import sandbox_cgroup

log = logging.getLogger(__name__)

Level = Literal["auto", "namespaces", "rlimits"]
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")
FIRST_SANDBOX_UID = 200_000  # above any uid a distribution hands out
SANDBOX_UIDS = 60_000


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not the program's fault)."""


UNSAFE_RLIMITS = "unsafe-rlimits"  # the name a recipe must use to run model-written code without isolation


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: float = 10.0  # per process (RLIMIT_CPU) and, with a cgroup, for the whole run
    memory_mib: int = 1024  # address space per process
    file_mib: int = 16  # largest file a process may write
    processes: int = 16  # processes (threads count too) of the sandbox's uid; with a cgroup, of the run
    open_files: int = 64
    output_bytes: int = 1 << 20  # per stream (stdout, stderr); more and the run is killed
    workdir_mib: int = 64  # tmpfs for /sandbox (namespaces level)
    tmp_mib: int = 16  # tmpfs for /tmp (namespaces level)
    inodes: int = 16384  # files per tmpfs (namespaces level); each costs kernel memory beyond size=
    total_memory_mib: int = 0  # the whole run with a cgroup; 0: memory_mib + workdir_mib + tmp_mib + 64

    def rlimits(self) -> dict[str, list[int]]:
        cpu = max(1, math.ceil(self.cpu_s))
        mib = 1 << 20
        return {
            # Soft CPU limit delivers SIGXCPU; the hard one a second later is SIGKILL.
            "RLIMIT_CPU": [cpu, cpu + 1],
            "RLIMIT_AS": [self.memory_mib * mib] * 2,
            "RLIMIT_FSIZE": [self.file_mib * mib] * 2,
            "RLIMIT_NPROC": [self.processes] * 2,
            "RLIMIT_NOFILE": [self.open_files] * 2,
            "RLIMIT_CORE": [0, 0],
        }

    def total_memory_bytes(self) -> int:
        # The 64 MiB cover the two small interpreters that set the cage up (launcher, PID 1).
        mib = self.total_memory_mib or self.memory_mib + self.workdir_mib + self.tmp_mib + 64
        return mib << 20


@dataclasses.dataclass
class SandboxResult:
    exit_code: int | None  # None when the program was killed by a signal or the time limit
    signal: int | None  # the signal that ended the program (SIGXCPU: CPU limit, SIGXFSZ: file size)
    stdout: bytes
    stderr: bytes
    timed_out: bool  # wall-clock limit
    output_limited: bool  # wrote more than output_bytes on a stream
    wall_s: float
    level: str
    cgroup: bool = False  # the run had a cgroup: memory, processes and CPU counted for the whole tree
    cpu_s: float | None = None  # CPU time of every process the run started (None without a cgroup)
    memory_peak_mib: float | None = None  # the whole run's peak memory (None without a cgroup)
    memory_limited: bool = False  # the cgroup's OOM killer ended a process of the run
    cpu_total_limited: bool = False  # the whole tree's CPU time passed cpu_s

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.output_limited or self.memory_limited
                                            or self.cpu_total_limited)

    @property
    def cpu_limited(self) -> bool:
        if self.cpu_total_limited:
            return True
        return (self.signal in (signal.SIGXCPU, signal.SIGKILL) and not self.timed_out and not self.output_limited
                and not self.memory_limited)

    def describe(self) -> str:
        """One line on how the run ended, for feedback and logs."""
        if self.timed_out:
            return "time limit exceeded (wall clock)"
        if self.output_limited:
            return "output limit exceeded"
        if self.memory_limited:
            return "memory limit exceeded"
        if self.cpu_total_limited or self.signal == signal.SIGXCPU:
            return "time limit exceeded (CPU)"
        if self.signal == signal.SIGXFSZ:
            return "file size limit exceeded"
        if self.signal is not None:
            return f"killed by signal {signal.Signals(self.signal).name}"
        return f"exit code {self.exit_code}"


def python_argv(script: str, *args: str) -> list[str]:
    """argv that runs ``script`` (a file in the working directory) with this Python.

    -E ignores PYTHON* variables, -s the user site, -B writes no bytecode. The interpreter's real
    path is used because the sandbox has no PATH lookup and no virtualenv."""
    return [os.path.realpath(sys.executable), "-E", "-s", "-B", script, *args]


def run_sandboxed(
    argv: list[str],
    files: dict[str, str | bytes] | None = None,
    stdin: bytes | str = b"",
    limits: SandboxLimits = SandboxLimits(),
    env: dict[str, str] | None = None,
    level: Level = "auto",
) -> SandboxResult:
    """Run ``argv`` (argv[0] an absolute path) in a fresh sandbox holding ``files`` in its
    working directory. Returns how it ended; raises SandboxError only if the cage failed."""
    if not argv or not os.path.isabs(argv[0]):
        raise ValueError(f"sandbox argv[0] must be an absolute path (no PATH lookup inside), got {argv[:1]}")
    return _run_sandboxed(argv, files, stdin, limits, env, resolve_level(level))


def level_for_untrusted_code(level: str) -> str:
    """The level to run model-written code at. ``rlimits`` cannot keep such code from reading the
    project (a dataset's expected outputs included), the network or other users' files, so it is
    refused unless asked for by its unsafe name."""
    if level == UNSAFE_RLIMITS:
        return "rlimits"
    chosen = resolve_level(level)  # type: ignore[arg-type]
    if chosen == "rlimits":
        why = _level_cache.get("probe") or "asked for by name"
        raise SandboxError(
            f"model-written code needs the 'namespaces' sandbox level, which is not available here ({why}): "
            "at the 'rlimits' level it could read the dataset's expected outputs and the project, and reach the "
            f"network. Run on Linux with util-linux and user namespaces (or as root), or set the environment's "
            f"sandbox_level: {UNSAFE_RLIMITS} in the recipe to run it anyway (trusted code, or inside a VM).")
    return chosen


def _run_sandboxed(argv, files, stdin, limits, env, chosen: str) -> SandboxResult:
    root_user = os.geteuid() == 0
    uid = _next_uid() if root_user else None
    if uid is not None and chosen == "rlimits" and not _others_can_run(argv[0]):
        raise SandboxError(
            f"sandbox level 'rlimits' runs programs as an unprivileged uid, which cannot reach {argv[0]!r} "
            "(a directory on its path is not world-searchable); use an interpreter under /usr, or the "
            "'namespaces' level")
    # A fresh directory per run (0700 until handed over): never a fixed name in a shared /tmp.
    scratch = tempfile.mkdtemp(prefix="sdpo-sandbox-")
    try:
        files_dir = os.path.join(scratch, "files")
        os.mkdir(files_dir)
        for name, content in (files or {}).items():
            if os.path.basename(name) != name or name in (".", ".."):
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
            with open(os.path.join(files_dir, name), "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
        program_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/sandbox", "LANG": "C.UTF-8",
                       "SDPO_SANDBOX_LEVEL": chosen}
        if chosen == "rlimits":
            program_env.update(HOME=files_dir, TMPDIR=files_dir)
            if uid is not None:
                os.chmod(scratch, 0o711)
                if not _others_can_run(scratch):
                    raise SandboxError(f"sandbox level 'rlimits' runs programs as an unprivileged uid, which cannot "
                                       f"reach the scratch dir {scratch!r}: point TMPDIR at a world-searchable dir")
                for path in [files_dir] + [os.path.join(files_dir, n) for n in os.listdir(files_dir)]:
                    os.chown(path, uid, uid)
        jobs = cgroup_plan()
        spec = {
            "isolate": chosen == "namespaces",
            "scratch": scratch,
            "new_root": os.path.join(scratch, "root"),
            "files_dir": files_dir,
            "ro_paths": _read_only_paths(),
            "uid": uid,
            "user_namespace": chosen == "namespaces" and not root_user,
            "drop_capabilities": chosen == "namespaces" and not root_user,
            "argv": list(argv),
            "env": {**program_env, **(env or {})},
            "rlimits": limits.rlimits(),
            "tmp_mib": limits.tmp_mib,
            "workdir_mib": limits.workdir_mib,
            "inodes": limits.inodes,
            "cgroup": jobs,
            "memory_total_bytes": limits.total_memory_bytes(),
            "pids": limits.processes + 4,  # + the starter, PID 1, and room for the set-up's own forks
            "cpu_total_s": limits.cpu_s,
        }
        if spec["isolate"]:
            os.mkdir(spec["new_root"])
            spec["argv"], spec["env"] = _relocate(spec["argv"], spec["env"])
        spec_path = os.path.join(scratch, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        return _run(spec_path, stdin.encode() if isinstance(stdin, str) else stdin, limits, chosen)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # normally the launcher has removed it already


def _run(spec_path: str, stdin: bytes, limits: SandboxLimits, level: str) -> SandboxResult:
    status_r, status_w = os.pipe()
    # The lifeline: we hold the only write end. Closing it (or dying) tells the launcher to end the run.
    lifeline_r, lifeline_w = os.pipe()
    launcher = [os.path.realpath(sys.executable), "-I", "-S", "-B", LAUNCHER, spec_path, str(status_w), str(lifeline_r)]
    started = time.monotonic()
    try:
        proc = subprocess.Popen(launcher, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(status_w, lifeline_r), start_new_session=True, env={"PATH": "/usr/bin:/bin"})
    except BaseException:
        for fd in (status_r, lifeline_w):
            os.close(fd)
        raise
    finally:
        os.close(status_w)
        os.close(lifeline_r)
    try:
        stdout, stderr, timed_out, output_limited = _communicate(proc, stdin, limits, started)
        if timed_out or output_limited:
            os.close(lifeline_w)
            lifeline_w = -1
        # The streams are closed; the program may still run (it closed them itself).
        if not _wait_for(proc, started + limits.wall_s - time.monotonic()):
            timed_out = True
    finally:
        if lifeline_w >= 0:
            os.close(lifeline_w)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # the launcher is stuck: nothing of ours should be
            proc.kill()
            proc.wait()
    wall_s = time.monotonic() - started
    with os.fdopen(status_r, "rb") as f:
        raw = f.read()
    report = json.loads(raw) if raw else {}
    if "setup_error" in report:
        raise SandboxError(f"sandbox set-up failed ({level}): {report['setup_error']}; stderr: {stderr[-500:]!r}")
    if "cleanup_error" in report:
        log.warning("sandbox: cleaning up after a run failed (%s): a cgroup or scratch dir may be left",
                    report["cleanup_error"])
    exit_code, sig = report.get("exit"), report.get("signal")
    if exit_code is None and sig is None:  # the program never reported: it was killed with its cage
        sig = signal.SIGKILL
    memory_limited = bool(report.get("oom_kills"))
    cpu_total_limited = report.get("stopped") == "cpu"
    if timed_out or output_limited or memory_limited or cpu_total_limited:
        exit_code = None
    if not report.get("cgroup") and "warned-cgroup" not in _level_cache:
        _level_cache["warned-cgroup"] = "yes"
        log.warning("sandbox: no cgroup for this run (%s): memory is bounded per process only (not shared memory, "
                    "memfd or tmpfs pages across processes), CPU time per process, and at the rlimits level a child "
                    "that calls setsid() outlives the run", _cgroup_problem or "the launcher reported none")
    return SandboxResult(exit_code, sig, stdout, stderr, timed_out, output_limited, wall_s, level,
                         cgroup=bool(report.get("cgroup")), cpu_s=report.get("cpu_s"),
                         memory_peak_mib=report.get("memory_peak_mib"), memory_limited=memory_limited,
                         cpu_total_limited=cpu_total_limited)


def _wait_for(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Whether ``proc`` ended within ``timeout_s``. Popen.wait(timeout) polls with sleeps of up to
    50 ms (CPython's subprocess._wait); a pidfd wakes us the moment it exits."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Linux < 5.3
        try:
            proc.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        ready = select.select([fd], [], [], max(0.0, timeout_s))[0]
    finally:
        os.close(fd)
    if ready:
        proc.wait()
    return bool(ready)


def _communicate(proc: subprocess.Popen, stdin: bytes, limits: SandboxLimits, started: float):
    """Feed stdin and read both streams, up to the output cap and the wall-clock deadline."""
    deadline = started + limits.wall_s
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    sizes = dict.fromkeys(chunks, 0)
    sel = selectors.DefaultSelector()
    for stream in (proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream.fileno(), selectors.EVENT_READ)
    pending = memoryview(stdin)
    stdin_fd = proc.stdin.fileno()
    if pending:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    timed_out = output_limited = False
    open_streams = 2
    while open_streams:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in sel.select(timeout=min(remaining, 0.5)):
            fd = key.fd
            if fd == stdin_fd:
                try:
                    pending = pending[os.write(fd, pending[:65536]):]
                except (BrokenPipeError, BlockingIOError) as err:
                    if isinstance(err, BrokenPipeError):
                        pending = pending[:0]
                if not pending:
                    sel.unregister(fd)
                    proc.stdin.close()
                continue
            data = os.read(fd, 65536)
            if not data:
                sel.unregister(fd)
                open_streams -= 1
                continue
            chunks[fd].append(data)
            sizes[fd] += len(data)
            if sizes[fd] > limits.output_bytes:
                output_limited = True
                open_streams = 0
                break
    sel.close()
    if not proc.stdin.closed:
        proc.stdin.close()
    out, err = (b"".join(chunks[s.fileno()])[: limits.output_bytes] for s in (proc.stdout, proc.stderr))
    proc.stdout.close()
    proc.stderr.close()
    return out, err, timed_out, output_limited


_uid_counter = itertools.count()
_uid_lock = threading.Lock()


def _next_uid() -> int:
    # A uid per concurrent run, so RLIMIT_NPROC counts one run's processes, not everyone's.
    with _uid_lock:
        n = next(_uid_counter)
    return FIRST_SANDBOX_UID + (os.getpid() * 1009 + n) % SANDBOX_UIDS


SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")
PYTHON_MOUNT = "/python"  # where an interpreter installed outside /usr appears (e.g. under a home)


def _python_prefix() -> str | None:
    """This interpreter's install prefix when /usr does not already hold it."""
    prefix = os.path.realpath(sys.base_prefix)
    return None if any(prefix == p or prefix.startswith(p + "/") for p in SYSTEM_PATHS) else prefix


def _read_only_paths() -> list[list[str]]:
    """(host path, path in the sandbox) pairs, bound read-only."""
    pairs = [[p, p] for p in SYSTEM_PATHS if os.path.lexists(p)]
    prefix = _python_prefix()
    if prefix:  # bound elsewhere, so that its parent (e.g. /root) does not appear in the sandbox
        pairs.append([prefix, PYTHON_MOUNT])
    return pairs


def _relocate(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    prefix = _python_prefix()
    if not prefix or not argv[0].startswith(prefix + "/"):
        return argv, env
    # The interpreter finds its library by an absolute RUNPATH into the old prefix: point the loader
    # at the new one (its standard library it finds relative to the executable).
    return [PYTHON_MOUNT + argv[0][len(prefix):], *argv[1:]], {"LD_LIBRARY_PATH": f"{PYTHON_MOUNT}/lib", **env}


def _others_can_run(path: str) -> bool:
    path = os.path.realpath(path)
    parts = [path] + [os.path.dirname(path)]
    while parts[-1] != "/":
        parts.append(os.path.dirname(parts[-1]))
    return all(os.stat(p).st_mode & 0o001 for p in parts)


_level_cache: dict[str, str] = {}
_cgroup_jobs: dict | None = None
_cgroup_problem: str | None = None  # None: not probed yet


def cgroup_plan() -> dict | None:
    """Where this machine lets each sandbox have its own cgroup (probed once), or None."""
    global _cgroup_jobs, _cgroup_problem
    if _cgroup_problem is None:
        if platform.system() != "Linux":
            _cgroup_jobs, _cgroup_problem = None, f"cgroups need Linux, this is {platform.system()}"
        else:
            _cgroup_jobs, _cgroup_problem = sandbox_cgroup.plan()
    return _cgroup_jobs


def resolve_level(level: Level = "auto") -> str:
    """``auto`` -> ``namespaces`` when a probe run succeeds here, else ``rlimits`` (warned once)."""
    if level == "rlimits":
        return level
    if level not in ("auto", "namespaces"):
        raise ValueError(f"sandbox level must be auto, namespaces or rlimits, got {level!r}")
    if "probe" not in _level_cache:
        _level_cache["probe"] = _probe_namespaces()
    problem = _level_cache["probe"]
    if not problem:
        return "namespaces"
    if level == "namespaces":
        raise SandboxError(f"sandbox level 'namespaces' is not available here: {problem}")
    if "warned" not in _level_cache:
        _level_cache["warned"] = "yes"
        log.warning("sandbox: namespaces unavailable (%s); falling back to rlimits only (no network or "
                    "file-system isolation)", problem)
    return "rlimits"


def _probe_namespaces() -> str:
    """Empty string if the namespaces level works here, else why not."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux x86-64, this is {platform.system()} {platform.machine()}"
    try:
        result = _run_sandboxed([os.path.realpath(sys.executable), "-c", "print('ok')"], None, b"", SandboxLimits(), None,
                                "namespaces")
    except (SandboxError, OSError) as err:
        return str(err)
    if result.stdout.strip() != b"ok":
        return f"probe run ended with {result.describe()}: {result.stderr[-300:]!r}"
    return ""

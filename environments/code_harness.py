"""Runs inside the sandbox (copied in as harness.py): executes solution.py on each test input in a
forked child, and prints what each run produced as one JSON list. Standard library only.

It never sees expected outputs -- those stay outside the sandbox, where the comparison happens --
so the program can only pass by printing the right answer, within the time limit. What keeps the
time limit and the answers honest, whatever the program forks, sleeps or rewrites:
- CPU time is that of everything the test started: the sandbox cgroup's counter
  (``SDPO_SANDBOX_CPU_FILE``) read before and after the test, less the harness's own. Without a
  cgroup it falls back to the rusage of every reaped descendant (this process is a child
  subreaper, so orphans come back to it); a child auto-reaped under SIGCHLD=SIG_IGN escapes that.
- When the test's process exits (or runs out of time or output), everything the test started is
  killed before its output is read: ``kill(-1)`` in the sandbox's own PID namespace, else a walk
  of /proc for our descendants. No daemon from one test lives into the next.
- Output comes through pipes into this process's memory, which no test can reach: the harness is
  not dumpable, so a program with the same uid and no capabilities cannot ptrace it or open
  /proc/<harness>/fd or /mem. Input comes from a memfd private to the test.
A program can still kill or stop the harness; that only loses it the run.
"""

import ctypes
import json
import math
import os
import resource
import select
import signal
import sys
import time
import traceback

PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36
ERROR_TAIL_BYTES = 4000


class CpuClock:
    """CPU seconds used by everything in the sandbox except this process."""

    def __init__(self):
        self.path = os.environ.get("SDPO_SANDBOX_CPU_FILE")
        if self.path:
            try:
                self._tree_s()
            except (OSError, ValueError):
                self.path = None
        self.source = "cgroup" if self.path else "rusage"

    def _tree_s(self):
        with open(self.path) as f:
            text = f.read()
        if text.startswith("usage_usec"):  # cgroup v2 cpu.stat
            return int(text.split()[1]) / 1e6
        return int(text.split()[0]) / 1e9  # cgroup v1 cpuacct.usage, nanoseconds

    def read(self):
        me = resource.getrusage(resource.RUSAGE_SELF)
        own = me.ru_utime + me.ru_stime
        if self.path:
            return self._tree_s() - own
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return children.ru_utime + children.ru_stime


def run_child(source, spec, stdin_fd, out_w, err_w):
    """In the forked child: wire stdio, lower the limits, run the program, never return."""
    for fd, target in ((0, stdin_fd), (1, out_w), (2, err_w)):
        os.dup2(target, fd)
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.setpgid(0, 0)
    cpu = math.ceil(spec["time_limit_s"]) + 1  # backstop; the verdict compares the tree's CPU to the limit
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["output_bytes"], spec["output_bytes"]))
    code = 0
    try:
        if spec["kind"] == "stdin":
            exec(compile(source, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            namespace = {"__name__": "solution", "__builtins__": __builtins__}
            exec(compile(source, "solution.py", "exec"), namespace)
            fn_name = spec["fn_name"]
            if "Solution" in namespace and hasattr(namespace["Solution"], fn_name):
                fn = getattr(namespace["Solution"](), fn_name)
            elif fn_name in namespace:
                fn = namespace[fn_name]
            else:
                raise NameError(f"no function {fn_name!r} (nor class Solution with it) was defined")
            args = [json.loads(line) for line in spec["current_input"].split("\n") if line.strip()]
            sys.stdout.write(json.dumps(fn(*args)))
    except SystemExit as err:
        code = 0 if err.code in (None, 0) else 1
        if code:
            sys.stderr.write(f"SystemExit: {err.code}\n")
    except BaseException as err:  # noqa: BLE001 -- the program's own error is the verdict
        tb = traceback.extract_tb(err.__traceback__)
        line = next((f.lineno for f in reversed(tb) if f.filename == "solution.py"), None)
        where = f" (line {line})" if line else ""
        sys.stderr.write(f"{type(err).__name__}: {err}{where}\n")
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 -- e.g. the harness stopped reading
        code = code or 1
    os._exit(code)


def kill_everything_else():
    """SIGKILL every process the tests started, and reap them all."""
    if os.environ.get("SDPO_SANDBOX_LEVEL") == "namespaces":
        # Our own PID namespace: kill(-1) reaches everything but PID 1 and us, atomically (no fork races it).
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        while True:
            try:
                os.wait()
            except ChildProcessError:
                return
    while True:  # no PID namespace: our descendants, found in /proc (orphans are reparented to us)
        mine = descendants(os.getpid())
        if not mine:
            return
        for pid in mine:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        reap_exited()
        time.sleep(0.001)


def descendants(root):
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            parent[int(name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found, frontier = [], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        found.extend(frontier)
    return found


def reap_exited():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stdin_for(test_input):
    fd = os.memfd_create("stdin")  # close-on-exec, like every fd here; dup2 gives the child a plain one
    data = test_input.encode()
    while data:
        data = data[os.write(fd, data):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def run_test(source, test_input, spec, clock):
    limit_s = spec["time_limit_s"]
    stdin_fd = stdin_for(test_input if spec["kind"] == "stdin" else "")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    cpu_before = clock.read()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            run_child(source, {**spec, "current_input": test_input}, stdin_fd, out_w, err_w)
        finally:
            os._exit(1)
    for fd in (stdin_fd, out_w, err_w):
        os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    wall_limit_s = 3 * limit_s + 1  # CPU time is the limit; wall clock only catches sleepers
    out, err = bytearray(), bytearray()
    streams = {out_r: out, err_r: err}
    status = None
    stopped = ""
    poll_s = 0.05 if clock.source == "cgroup" or pidfd is None else 0.25
    while status is None and not stopped:
        remaining = started + wall_limit_s - time.monotonic()
        if remaining <= 0:
            stopped = "timeout"
            break
        waiting = list(streams) + ([pidfd] if pidfd is not None else [])
        ready, _, _ = select.select(waiting, [], [], min(remaining, poll_s))
        for fd in ready:
            if fd in streams:
                stopped = stopped or read_into(fd, streams, spec["output_bytes"])
        if pidfd is None or pidfd in ready:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = code
        if not stopped and clock.read() - cpu_before > limit_s:
            stopped = "timeout"  # the whole tree used more CPU than allowed, whoever spent it
    kill_everything_else()  # the test is over: nothing it started reads, writes or computes on
    if status is None:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # already reaped by kill_everything_else
            status = signal.SIGKILL
    while streams and not stopped:  # what was written before the kill; every writer is gone now
        ready = select.select(list(streams), [], [], 1.0)[0]
        if not ready:
            break
        for fd in ready:
            stopped = stopped or read_into(fd, streams, spec["output_bytes"])
    for fd in (out_r, err_r):
        os.close(fd)
    if pidfd is not None:
        os.close(pidfd)
    cpu_s = max(0.0, clock.read() - cpu_before)
    output = bytes(out[: spec["output_bytes"]]).decode("utf-8", "replace")
    error = bytes(err[-ERROR_TAIL_BYTES:]).decode("utf-8", "replace").strip().splitlines()
    result = {"output": output, "error": error[-1] if error else "", "cpu_s": round(cpu_s, 4)}
    if stopped == "output_limit":
        result["status"] = "output_limit"
    elif stopped == "timeout" or cpu_s > limit_s:
        result["status"] = "timeout"
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            result["status"] = "timeout"
        else:
            result["status"] = "runtime_error"
            result["error"] = result["error"] or f"killed by signal {signal.Signals(sig).name}"
    elif os.WEXITSTATUS(status) != 0:
        result["status"] = "runtime_error"
        if "MemoryError" in result["error"]:
            result["error"] = "MemoryError (memory limit exceeded)"
    else:
        result["status"] = "ok"
    return result


def read_into(fd, streams, cap):
    """Read what is there; "" normally, "output_limit" past the cap. Closed streams leave ``streams``."""
    data = os.read(fd, 65536)
    if not data:
        del streams[fd]
        return ""
    buf = streams[fd]
    buf += data
    if len(buf) > cap:
        return "output_limit"
    return ""


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # the program (same uid) may not ptrace us or read our fds
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of a test come back to us, to be killed and reaped
    with open("tests.json") as f:
        spec = json.load(f)
    with open("solution.py") as f:
        source = f.read()
    clock = CpuClock()
    results = []
    for test_input in spec["inputs"]:
        result = run_test(source, test_input, spec, clock)
        results.append(result)
        if spec["stop_early"] and result["status"] != "ok":
            break
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()

"""The host side of one sandbox run: ``python -I -S sandbox_launcher.py SPEC.json STATUS_FD LIFELINE_FD``.
Standard library only (plus the sibling ``sandbox_cgroup``): it runs in a fresh interpreter.

Three processes, see ``environments/sandbox.py`` for what each level guarantees:

supervisor (this script's process, outside every limit): makes the run's cgroup, forks the
  *starter*, and waits for it. It ends the run -- kills the cgroup, so daemons die too -- when the
  starter ends, when the whole tree's CPU time passes the limit, or when the caller closes the
  lifeline pipe (wall-clock limit, output cap, or the caller itself was killed: a dead caller closes
  its end too, so a killed verifier takes its sandbox with it). Then it removes the cgroup, the run's
  SysV IPC objects (``rlimits`` as root) and the scratch directory, and writes one JSON report on
  STATUS_FD.
starter: joins the cgroup, dies with the supervisor (PR_SET_PDEATHSIG), then either
  ``rlimits`` -- drops to the run's uid, sets the limits and execs the program; or
  ``isolate`` -- unshares user (when not root), mount, PID, network, IPC and UTS namespaces and forks:
cage init (PID 1 of the new PID namespace, dies with the starter): builds a minimal root on tmpfs
  (read-only binds of the system libraries and the Python install, size- and inode-capped tmpfs
  for the program's files and /tmp), ``pivot_root``s into it, detaches the old root, forks the
  program with every privilege dropped, reaps, and reports how the program ended. When it exits the
  kernel kills whatever is left in the namespace.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import select
import shutil
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sandbox_cgroup import SandboxCgroup

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
SYS_PIVOT_ROOT, SYS_KEYCTL = 155, 250  # x86-64; other architectures fall back to rlimits (the caller checks)
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_CLEAR = 1, 7
KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -4, -5
CPU_FILE_IN_CAGE = "/.sandbox/cpu"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option: int, value: int, what: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), what)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s):
        return s.encode() if s is not None else None

    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def bind_read_only(source: str, target: str) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    # A remount inside a user namespace must keep the locked flags of the original mount.
    st = os.statvfs(target)
    kept = st.f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)


def build_root(spec: dict) -> None:
    root = spec["new_root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount may leak back to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=256,mode=0755")
    for path, inside in spec["ro_paths"]:
        target = root + inside
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
            bind_read_only(path, target)
        elif os.path.isfile(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
            bind_read_only(path, target)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in ("null", "zero", "urandom", "random"):
        open(f"{root}/dev/{dev}", "w").close()
        mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, MS_BIND)
    if spec.get("cpu_file"):  # the run's CPU counter, read-only, for a judge inside (code_harness.py)
        os.makedirs(root + os.path.dirname(CPU_FILE_IN_CAGE))
        open(root + CPU_FILE_IN_CAGE, "w").close()
        bind_read_only(spec["cpu_file"], root + CPU_FILE_IN_CAGE)
    uid = spec["uid"]
    for name, size_mib in (("tmp", spec["tmp_mib"]), ("sandbox", spec["workdir_mib"])):
        os.makedirs(f"{root}/{name}")
        # nr_inodes: size= caps pages only; each inode costs ~1 KiB of kernel memory besides.
        mount("tmpfs", f"{root}/{name}", "tmpfs", MS_NOSUID | MS_NODEV,
              f"size={size_mib}m,nr_inodes={spec['inodes']},mode=1777")
    for name in os.listdir(spec["files_dir"]):  # the program's files, copied onto the capped tmpfs
        shutil.copy(os.path.join(spec["files_dir"], name), f"{root}/sandbox/{name}")
        if uid is not None:
            os.chown(f"{root}/sandbox/{name}", uid, uid)
    if uid is not None:
        os.chown(f"{root}/sandbox", uid, uid)
    os.makedirs(root + "/.old_root")
    _check(_libc.syscall(SYS_PIVOT_ROOT, root.encode(), (root + "/.old_root").encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old_root", MNT_DETACH), "umount old root")
    os.rmdir("/.old_root")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def drop_privileges(spec: dict) -> None:
    uid = spec["uid"]
    if uid is not None:  # we were real root: become a uid that owns nothing and counts its processes
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    elif spec["drop_capabilities"]:
        # We are root of our own user namespace (the caller was not root). Emptying the bounding set
        # means execve grants the program no capability, though it keeps uid 0 of the namespace.
        for cap in range(64):
            if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
                _check(-1, f"drop capability {cap}")
    prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")


def fresh_keyrings(spec: dict) -> None:
    """A new, empty session keyring; for a uid of our own also empty its user keyrings, which the
    kernel keeps between runs that reuse the uid (keyrings(7))."""
    if _libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        _check(-1, "join a new session keyring")
    if spec["uid"] is not None or spec["isolate"]:  # never the caller's own keyrings (rlimits, not root)
        for ring in (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING):
            _libc.syscall(SYS_KEYCTL, KEYCTL_CLEAR, ring)


def set_limits(limits: dict) -> None:
    for name, value in limits.items():
        kind = getattr(resource, name)
        soft, hard = (value, value) if not isinstance(value, list) else value
        resource.setrlimit(kind, (soft, hard))


def exec_program(spec: dict) -> None:
    drop_privileges(spec)
    fresh_keyrings(spec)
    set_limits(spec["rlimits"])
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


def cage_init(spec: dict, report_fd: int) -> None:
    """PID 1 of the new namespaces: build the root, run the program, report how it ended."""
    build_root(spec)
    pid = os.fork()
    if pid == 0:
        os.close(report_fd)
        try:
            os.chdir("/sandbox")
            os.setsid()
            exec_program(spec)
        except BaseException as err:  # noqa: BLE001 -- report any set-up failure as exit 127
            os.write(2, f"sandbox set-up failed: {err}\n".encode())
        os._exit(127)
    prctl(PR_SET_DUMPABLE, 0, "not dumpable")
    status = None
    while True:  # PID 1 reaps orphans too; the program's status is the one we report
        try:
            child, code = os.wait()
        except ChildProcessError:
            break
        if child == pid:
            status = code
            break
    os.write(report_fd, json.dumps(_how_it_ended(status)).encode())
    os._exit(0)  # the kernel now kills whatever the program left in the namespace


def _how_it_ended(status: int) -> dict:
    return {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}


def die_with_parent(parent: int) -> None:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "parent-death signal")
    if os.getppid() != parent:  # it died before the line above
        os._exit(137)


def starter(spec: dict, group: SandboxCgroup | None, report_fd: int, supervisor: int) -> None:
    """The supervisor's child: enters the cgroup, then becomes (rlimits) or starts (isolate) the program."""
    try:
        if group is not None:
            group.join()
        die_with_parent(supervisor)
        os.setsid()
        if not spec["isolate"]:
            os.chdir(spec["files_dir"])
            exec_program(spec)  # report_fd is close-on-exec
        uid, gid = os.getuid(), os.getgid()
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
        _check(_libc.unshare(flags | (CLONE_NEWUSER if spec["user_namespace"] else 0)), "unshare")
        if spec["user_namespace"]:  # map ourselves to root of the new namespace (unshare --map-root-user)
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        init = os.fork()
        if init == 0:
            die_with_parent(0)  # our parent is outside the new PID namespace: getppid() says 0
            cage_init(spec, report_fd)
        _, status = os.waitpid(init, 0)
        os._exit(0 if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else 1)
    except BaseException as err:  # noqa: BLE001
        try:
            os.write(report_fd, json.dumps({"setup_error": f"{type(err).__name__}: {err}"}).encode())
        except OSError:
            pass
        os._exit(127)


class Stop(Exception):
    """SIGTERM to the supervisor: end the run and clean up."""


def supervise(spec: dict, starter_pid: int, group: SandboxCgroup | None, lifeline_fd: int) -> tuple[int | None, str]:
    """Wait for the starter; (its wait status or None, why the run was ended early or "")."""
    try:
        pidfd = os.pidfd_open(starter_pid)
    except (AttributeError, OSError):
        pidfd = None  # Linux < 5.3: poll instead
    poller = select.poll()
    poller.register(lifeline_fd, select.POLLIN | select.POLLHUP)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    # Without a pidfd we poll; with a cgroup, we look at the tree's CPU time 10 times a second.
    tick_ms = 100 if group is not None else (None if pidfd is not None else 5)
    try:
        while True:
            events = dict(poller.poll(tick_ms))
            if pidfd is None or pidfd in events:
                done, status = os.waitpid(starter_pid, os.WNOHANG)
                if done:
                    return status, ""
            if lifeline_fd in events:
                return None, "stopped"
            if group is not None and group.cpu_s() > spec["cpu_total_s"]:
                return None, "cpu"
    except Stop:
        return None, "stopped"
    finally:
        if pidfd is not None:
            os.close(pidfd)


def remove_ipc_of(uid: int) -> None:
    """SysV IPC objects outlive their processes; a uid of our own tells us which are the run's."""
    for kind, ctl in (("shm", _libc.shmctl), ("sem", _libc.semctl), ("msg", _libc.msgctl)):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                header, *rows = f.read().splitlines()
        except (OSError, ValueError):
            continue
        column = {name: i for i, name in enumerate(header.split())}
        for row in rows:
            fields = row.split()
            if uid in (int(fields[column["uid"]]), int(fields[column["cuid"]])):
                ctl(int(fields[1]), 0, None)  # IPC_RMID; the second column is shmid, semid or msqid


def _stop(*_) -> None:
    raise Stop()


def main() -> None:
    spec_path, status_fd, lifeline_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for fd in (status_fd, lifeline_fd):
        os.set_inheritable(fd, False)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    report: dict = {}
    spec: dict = {}
    group = None
    try:
        with open(spec_path) as f:
            spec = json.load(f)
        signal.signal(signal.SIGTERM, _stop)
        if spec["cgroup"]:
            group = SandboxCgroup.create(spec["cgroup"], os.path.basename(spec["scratch"]),
                                         memory_bytes=spec["memory_total_bytes"], pids=spec["pids"])
            report["cgroup"] = True
            # The judge inside (code_harness.py) reads the whole tree's CPU time from this file.
            spec["cpu_file"] = group.cpu_file()
            spec["env"]["SDPO_SANDBOX_CPU_FILE"] = CPU_FILE_IN_CAGE if spec["isolate"] else group.cpu_file()
        report_r, report_w = os.pipe()
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            starter(spec, group, report_w, me)
        os.close(report_w)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # only the sandbox may hold the program's pipes, so they close when it ends
            os.dup2(devnull, fd)
        status, stopped = supervise(spec, pid, group, lifeline_fd)
        if group is not None:
            group.kill()
            report["cpu_s"] = round(group.cpu_s(), 4)
            report["memory_peak_mib"] = group.memory_peak_mib()
            report["oom_kills"] = group.oom_kills()
        else:
            for target in (pid, -pid):  # the starter, then its process group
                try:
                    os.kill(target, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if status is None:
            _, status = os.waitpid(pid, 0)
        with os.fdopen(report_r, "rb") as f:
            inner = f.read()
        report.update(json.loads(inner) if inner else {})
        if not spec["isolate"] and "setup_error" not in report:
            report.update(_how_it_ended(status))  # the starter became the program
        if stopped:
            report["stopped"] = stopped
    except BaseException as err:  # noqa: BLE001
        report["setup_error"] = f"{type(err).__name__}: {err}"
    finally:
        try:
            if group is not None:
                group.kill()
                group.remove()
            if not spec.get("isolate") and spec.get("uid") is not None:
                remove_ipc_of(spec["uid"])
            if spec.get("scratch"):
                shutil.rmtree(spec["scratch"], ignore_errors=True)
        except BaseException as err:  # noqa: BLE001 -- still report, and say what was left behind
            report["cleanup_error"] = f"{type(err).__name__}: {err}"
        try:
            os.write(status_fd, json.dumps(report).encode())
        except OSError:
            pass


if __name__ == "__main__":
    main()

"""The child side of the sandbox: run as a script (``python -I -S sandbox_launcher.py SPEC.json``),
before the untrusted program, to set up its cage and then start it. Standard library only, no
imports from this project: it runs in a fresh interpreter that must not trust or need the tree.

Two modes (see ``environments/sandbox.py`` for what each guarantees):

``isolate`` -- we are PID 1 of fresh PID/mount/network/IPC/UTS namespaces made by ``unshare``
(and in a user namespace when the caller was not root). We build a minimal root on a
tmpfs (read-only binds of the system libraries and the Python install, a size-capped tmpfs for the
program's files and /tmp), ``pivot_root`` into it and detach the old root so nothing else of the
machine is reachable, drop every privilege, fork the program, reap everything, and report how the
program ended on a pipe the program cannot reach. When PID 1 exits the kernel kills every process
left in the namespace, so nothing outlives the run.

``rlimits`` -- no namespaces: drop to an unprivileged uid when root, set the limits, exec.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import shutil
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 38, 4, 24
SYS_PIVOT_ROOT = 155  # x86-64; other architectures fall back to rlimits (the caller checks)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
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
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
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
    uid = spec["uid"]
    for name, size_mib in (("tmp", spec["tmp_mib"]), ("sandbox", spec["workdir_mib"])):
        os.makedirs(f"{root}/{name}")
        mount("tmpfs", f"{root}/{name}", "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mib}m,mode=1777")
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
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def set_limits(limits: dict) -> None:
    for name, value in limits.items():
        kind = getattr(resource, name)
        soft, hard = (value, value) if not isinstance(value, list) else value
        resource.setrlimit(kind, (soft, hard))


def run_isolated(spec: dict, status_fd: int) -> None:
    build_root(spec)
    pid = os.fork()
    if pid == 0:
        os.close(status_fd)
        try:
            drop_privileges(spec)
            os.chdir("/sandbox")
            os.setsid()
            set_limits(spec["rlimits"])
            os.execve(spec["argv"][0], spec["argv"], spec["env"])
        except BaseException as err:  # noqa: BLE001 -- report any set-up failure as exit 127
            os.write(2, f"sandbox set-up failed: {err}\n".encode())
        os._exit(127)
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "not dumpable")
    status = None
    while True:  # PID 1 reaps orphans too; the program's status is the one we report
        try:
            child, code = os.wait()
        except ChildProcessError:
            break
        if child == pid:
            status = code
            break
    if os.WIFSIGNALED(status):
        report = {"signal": os.WTERMSIG(status)}
    else:
        report = {"exit": os.WEXITSTATUS(status)}
    os.write(status_fd, json.dumps(report).encode())
    os._exit(0)  # the kernel now kills whatever the program left in the namespace


def main() -> None:
    spec_path, status_fd = sys.argv[1], int(sys.argv[2])
    with open(spec_path) as f:
        spec = json.load(f)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        if spec["isolate"]:
            run_isolated(spec, status_fd)
        os.set_inheritable(status_fd, False)  # closes at execve; set-up errors before it are still reported
        os.chdir(spec["files_dir"])
        drop_privileges(spec)
        set_limits(spec["rlimits"])
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as err:  # noqa: BLE001
        try:
            os.write(status_fd, json.dumps({"setup_error": f"{type(err).__name__}: {err}"}).encode())
        except OSError:
            pass
        os._exit(127)


if __name__ == "__main__":
    main()

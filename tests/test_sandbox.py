"""Escape attempts against the sandbox, and resource and reward attacks.
Each program below tries one thing it must not be able to do; the test checks the run ended as a
contained failure, that the machine shows no trace of it (no file written, no connection received,
no process left, no memory or inodes beyond the limit, no reward), and that the next run works.

The file-system and network checks need the ``namespaces`` level and are skipped, with the reason,
on the fallback. The resource and reward attacks run at both levels (``rlimits`` as root needs
/usr/bin/python3, which an unprivileged uid can reach); where ``rlimits`` cannot contain one, the test
asserts the refusal or the documented gap instead. Memory attacks use small limits (tens of MiB).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import environments.code as code_env
from environments import sandbox
from environments.sandbox import (
    SandboxError,
    SandboxLimits,
    python_argv,
    resolve_level,
    run_sandboxed,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LEVEL = resolve_level("auto")
FAST = SandboxLimits(wall_s=5, cpu_s=2, memory_mib=512, processes=16, output_bytes=1 << 16)
needs_namespaces = pytest.mark.skipif(LEVEL != "namespaces", reason="needs the namespaces level (unshare)")


def run(code: str, limits: SandboxLimits = FAST, stdin: str = ""):
    result = run_sandboxed(python_argv("main.py"), files={"main.py": textwrap.dedent(code)}, stdin=stdin, limits=limits)
    assert result.level == LEVEL
    return result


def processes_with(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(pid)
    return found


def assert_next_run_works():
    result = run("print(sum(range(10)))")
    assert result.ok and result.stdout == b"45\n", result


def test_a_normal_program_runs_with_stdin_and_files():
    code = "import sys; print(sys.stdin.read().upper(), len(open('main.py').read()))"
    result = run(code, stdin="abc")
    assert result.ok, result
    assert result.stdout == f"ABC {len(code)}\n".encode()


@needs_namespaces
@pytest.mark.parametrize("path", [str(ROOT / "environments" / "sandbox.py"), str(ROOT / "README.md"),
                                  str(ROOT / "environments" / "data" / "code_sample.jsonl"), "/etc/shadow",
                                  os.path.expanduser("~/.bashrc"), os.path.expanduser("~"), "/proc/1/environ"])
def test_reading_outside_the_sandbox_fails(path):
    result = run(f"""
        import os
        try:
            print(os.listdir({path!r}) if os.path.isdir({path!r}) else open({path!r}, 'rb').read()[:50])
        except OSError as err:
            print('DENIED', type(err).__name__)
    """)
    assert result.stdout.startswith(b"DENIED"), result


@needs_namespaces
def test_writing_outside_the_sandbox_fails_and_leaves_no_file(tmp_path):
    targets = [str(tmp_path / "escaped"), str(ROOT / "escaped_by_sandbox"), "/usr/escaped", "/escaped", "/tmp/../escaped"]
    result = run(f"""
        for path in {targets!r}:
            try:
                open(path, 'w').write('x')
                print('WROTE', path)
            except OSError as err:
                print('DENIED', path, type(err).__name__)
    """)
    assert b"WROTE" not in result.stdout, result
    assert result.stdout.count(b"DENIED") == len(targets)
    assert not any(Path(p).exists() for p in targets[:2])


def test_filling_the_disk_stops_at_the_file_size_limit():
    result = run("""
        try:
            with open('big', 'wb') as f:
                for _ in range(100):
                    f.write(b'x' * (1 << 20))
        except OSError as err:
            print('STOPPED', err.errno)
    """, SandboxLimits(wall_s=5, cpu_s=2, file_mib=4, output_bytes=1 << 16))
    assert b"STOPPED 27" in result.stdout, result  # EFBIG


@needs_namespaces
def test_network_is_unreachable_even_on_loopback():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        result = run(f"""
            import socket
            for host in ('127.0.0.1', '1.1.1.1', '8.8.8.8'):
                try:
                    socket.create_connection((host, {port} if host == '127.0.0.1' else 53), timeout=1)
                    print('CONNECTED', host)
                except OSError as err:
                    print('DENIED', host, type(err).__name__)
        """)
        with pytest.raises(socket.timeout):
            listener.accept()  # the host's listener saw no connection
    finally:
        listener.close()
    assert b"CONNECTED" not in result.stdout and result.stdout.count(b"DENIED") == 3, result


def test_fork_bomb_is_contained_and_leaves_nothing():
    marker = f"forkbomb-{uuid.uuid4().hex}"
    result = run(f"""
        import os, sys, time
        sys.argv.append({marker!r})
        n = 0
        while True:
            try:
                os.fork()
                n += 1
            except OSError:
                time.sleep(0.01)
    """, SandboxLimits(wall_s=3, cpu_s=2, processes=16, output_bytes=1 << 16))
    assert not result.ok
    time.sleep(0.2)
    assert processes_with(marker) == [] or LEVEL == "rlimits"
    assert_next_run_works()


def test_unbounded_memory_is_refused():
    result = run("""
        blocks = []
        while True:
            blocks.append(bytearray(64 << 20))
    """, SandboxLimits(wall_s=10, cpu_s=5, memory_mib=256, output_bytes=1 << 16))
    assert result.exit_code == 1 and b"MemoryError" in result.stderr, result


def test_spinning_hits_the_cpu_limit():
    result = run("while True: pass", SandboxLimits(wall_s=20, cpu_s=1, output_bytes=1 << 16))
    assert result.signal in (signal.SIGXCPU, signal.SIGKILL) and not result.timed_out, result
    assert result.describe() == "time limit exceeded (CPU)" or result.signal == signal.SIGKILL


def test_sleeping_hits_the_wall_clock_limit():
    result = run("import time; time.sleep(60)", SandboxLimits(wall_s=1, cpu_s=5, output_bytes=1 << 16))
    assert result.timed_out and result.exit_code is None, result
    assert result.wall_s < 30  # killed, not waited for (generous: a loose bound, not a timing test)


def test_printing_gigabytes_is_cut_at_the_output_cap():
    result = run("""
        import sys
        chunk = 'x' * (1 << 20)
        for _ in range(4096):
            sys.stdout.write(chunk)
    """, SandboxLimits(wall_s=20, cpu_s=10, output_bytes=1 << 20))
    assert result.output_limited and len(result.stdout) <= 1 << 20, result
    assert_next_run_works()


def test_killing_its_parent_ends_only_its_own_run():
    result = run("""
        import os, signal
        os.kill(os.getppid(), signal.SIGKILL)
        for pid in (1, -1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        import time; time.sleep(5)
    """)
    assert not result.ok
    assert_next_run_works()  # and this test process is, evidently, still alive


@needs_namespaces
def test_the_program_holds_no_privileges():
    result = run("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        print('uid', os.getuid())
        print('mount', libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, None))
        try:
            os.chroot('/tmp'); print('CHROOTED')
        except OSError as err:
            print('chroot', type(err).__name__)
        try:
            os.setuid(0); print('SETUID')
        except OSError as err:
            print('setuid', type(err).__name__)
    """)
    out = result.stdout.decode()
    assert "mount -1" in out and "CHROOTED" not in out, out
    if os.geteuid() == 0:  # as root the program runs under an unprivileged uid of its own
        assert "SETUID" not in out and "uid 0" not in out, out


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not Path("/usr/bin/python3").exists(),
                    reason="covers the non-root path from a root CI machine; needs setpriv and /usr/bin/python3")
def test_as_an_unprivileged_caller_the_cage_holds_too():
    """The same cage built by a normal user (user namespace instead of a uid switch)."""
    probe_dir = Path(tempfile.mkdtemp(prefix="sdpo-sandbox-test-"))
    probe = probe_dir / "probe.py"
    program = textwrap.dedent(f"""
        import os, socket
        for p in ({str(ROOT / "README.md")!r}, "/etc/shadow"):
            try: open(p).read(); print("READ", p)
            except OSError: print("DENIED")
        try: socket.create_connection(("1.1.1.1", 53), timeout=1); print("CONNECTED")
        except OSError: print("DENIED")
        try:
            while True: os.fork() or os._exit(0)
        except OSError: pass
    """)
    probe.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from environments.sandbox import python_argv, run_sandboxed, SandboxLimits
        r = run_sandboxed(python_argv("m.py"), files={{"m.py": {program!r}}}, limits=SandboxLimits(wall_s=5, processes=8))
        print(r.level, r.stdout.decode().count("DENIED"), b"READ" in r.stdout or b"CONNECTED" in r.stdout)
    """))
    probe_dir.chmod(0o755)
    probe.chmod(0o644)
    try:
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", str(probe)],
                             capture_output=True, text=True, timeout=60, cwd="/", check=False)
    finally:
        shutil.rmtree(probe_dir)
    assert len(out.stdout.split()) == 3, out
    level, denied, escaped = out.stdout.split()
    if level != "namespaces":
        pytest.skip(f"user namespaces are not available to unprivileged users here: {out.stderr[-200:]}")
    assert (denied, escaped) == ("3", "False"), out


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="absolute path"):
        run_sandboxed(["python3", "x.py"])
    with pytest.raises(ValueError, match="plain names"):
        run_sandboxed(python_argv("x.py"), files={"../x.py": "print(1)"})
    with pytest.raises(ValueError, match="sandbox level"):
        run_sandboxed(python_argv("x.py"), level="docker")  # type: ignore[arg-type]


def test_rlimits_level_still_limits_and_reports():
    python = os.path.realpath(sys.executable)
    if os.geteuid() == 0 and not Path("/usr/bin/python3").exists():
        pytest.skip("as root the rlimits level needs a world-reachable interpreter")
    if os.geteuid() == 0:
        python = "/usr/bin/python3"  # ours may live under a 0700 home the unprivileged uid cannot enter
    result = run_sandboxed([python, "main.py"], files={"main.py": "while True: pass"},
                           limits=SandboxLimits(wall_s=20, cpu_s=1, output_bytes=1 << 16), level="rlimits")
    assert result.level == "rlimits" and result.signal in (signal.SIGXCPU, signal.SIGKILL), result


# ---- resources that rlimits do not count, and reward the judge must not give ----------------------

ROOTED = os.geteuid() == 0
SYSTEM_PYTHON = "/usr/bin/python3"
RLIMITS_USABLE = not ROOTED or Path(SYSTEM_PYTHON).exists()  # as root: an interpreter the sandbox uid can reach
LEVELS = [lvl for lvl in dict.fromkeys([LEVEL, "rlimits"]) if lvl != "rlimits" or RLIMITS_USABLE]
CGROUP = sandbox.cgroup_plan() is not None
SMALL_MEMORY = SandboxLimits(wall_s=20, cpu_s=10, memory_mib=256, processes=16, output_bytes=1 << 16, total_memory_mib=96)


def argv_at(level: str, script: str = "main.py") -> list[str]:
    if level == "rlimits" and ROOTED:
        return [SYSTEM_PYTHON, "-E", "-s", "-B", script]
    return python_argv(script)


def run_at(level: str, code: str, limits: SandboxLimits = FAST, stdin: str = ""):
    result = run_sandboxed(argv_at(level), files={"main.py": textwrap.dedent(code)}, stdin=stdin, limits=limits,
                           level=level)
    assert result.level == level
    return result


def require_cgroup(result) -> None:
    """Without a cgroup these attacks are a documented gap: say so (the result and a warning do)."""
    if not result.cgroup:
        assert not CGROUP and sandbox._cgroup_problem, "a cgroup was planned but the run had none"
        pytest.skip(f"no cgroup here ({sandbox._cgroup_problem}): per-process limits only, as documented")


def shm_segments_with_keys(keys: set[int]) -> list[int]:
    rows = Path("/proc/sysvipc/shm").read_text().splitlines()
    column = {name: i for i, name in enumerate(rows[0].split())}
    return [int(r.split()[column["shmid"]]) for r in rows[1:] if int(r.split()[column["key"]]) in keys]


@pytest.mark.parametrize("level", LEVELS)
def test_sysv_shared_memory_is_bounded_by_the_run_and_removed_after(level):
    base_key = int.from_bytes(os.urandom(3), "big") << 4
    keys = {base_key + i for i in range(16)}
    result = run_at(level, f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmat.restype = ctypes.c_void_p
        for i in range(16):  # 16 x 16 MiB, each attached, touched and detached: no address space kept
            sid = libc.shmget({base_key} + i, 16 << 20, 0o1600)
            p = libc.shmat(sid, None, 0)
            ctypes.memset(p, 1, 16 << 20)
            libc.shmdt(ctypes.c_void_p(p))
            print('segment', i, flush=True)
    """, SMALL_MEMORY)
    leftovers = shm_segments_with_keys(keys)
    for shmid in leftovers:  # clean up before asserting, so a failure leaves nothing behind
        subprocess.run(["ipcrm", "-m", str(shmid)], check=False)
    require_cgroup(result)
    assert result.memory_limited and not result.ok, result
    assert result.stdout.count(b"segment") * 16 <= 96, result.stdout  # held memory stayed under the run's limit
    assert result.memory_peak_mib is None or result.memory_peak_mib <= 96 + 1, result
    if level == "rlimits" and not ROOTED:
        pytest.skip("rlimits as a normal user: segments of the caller's own uid cannot be told apart (documented)")
    assert leftovers == [], "SysV segments outlived the run"


@pytest.mark.parametrize("level", LEVELS)
def test_memfd_files_are_bounded_by_the_run(level):
    result = run_at(level, """
        import os
        fds, chunk = [], b'x' * (1 << 20)
        for mib in range(512):
            if mib % 8 == 0:
                fds.append(os.memfd_create('x'))  # 8 MiB per file: under the file-size limit
                print('MiB', mib, flush=True)
            os.write(fds[-1], chunk)
    """, SMALL_MEMORY)
    require_cgroup(result)
    assert not result.ok and (result.memory_limited or b"Error" in result.stderr), result
    assert result.stdout.count(b"MiB") * 8 <= 96 + 8, result.stdout


@pytest.mark.parametrize("level", LEVELS)
def test_processes_share_one_memory_budget(level):
    result = run_at(level, """
        import os, time
        for i in range(6):  # 6 x 40 MiB, each far under the per-process address-space limit
            if os.fork() == 0:
                block = bytearray(40 << 20)
                print('allocated', flush=True)
                time.sleep(2)
                os._exit(0)
        for _ in range(6):
            os.wait()
    """, SMALL_MEMORY)
    require_cgroup(result)
    assert result.memory_limited and not result.ok, result
    # The OOM killer may end one child and let the next allocate, so count the peak, not the children.
    assert result.memory_peak_mib is None or result.memory_peak_mib <= 96 + 1, result


@pytest.mark.parametrize("level", LEVELS)
def test_inodes_are_bounded_and_the_scratch_dir_goes(level):
    result = run_at(level, """
        import os
        print(os.getcwd(), flush=True)
        where = '/tmp' if os.environ['SDPO_SANDBOX_LEVEL'] == 'namespaces' else '.'
        n = 0
        try:
            for n in range(5000):
                open(f'{where}/f{n}', 'w').close()
        except OSError as err:
            print('stopped', err.errno)
        print('files', n)
    """, SandboxLimits(wall_s=20, cpu_s=10, output_bytes=1 << 16, inodes=2000))
    lines = result.stdout.decode().split()
    files = int(lines[-1])
    if level == "namespaces":
        assert "stopped" in lines and files <= 2000, result  # ENOSPC at nr_inodes
    else:  # rlimits: files go to the run's private scratch dir (inodes bounded only by the disk, documented)
        assert not Path(lines[0]).exists(), f"the scratch dir {lines[0]} outlived the run"
    assert_next_run_works()


@pytest.mark.parametrize("level", LEVELS)
def test_children_left_behind_are_killed(level):
    marker = f"daemon-{uuid.uuid4().hex}"
    result = run_at(level, f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()  # a daemon: new session, parent gone
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)', {marker!r}])
            os._exit(0)
        print('parent done')
    """)
    left = processes_with(marker)
    for pid in left:  # clean up before asserting
        os.kill(int(pid), signal.SIGKILL)
    if level == "rlimits":
        require_cgroup(result)
    assert result.ok and left == [], left


@pytest.mark.parametrize("level", LEVELS)
def test_cpu_time_is_counted_across_forks(level):
    result = run_at(level, """
        import os
        for _ in range(3):
            if os.fork() == 0:
                while True:
                    pass
        while True:
            pass
    """, SandboxLimits(wall_s=30, cpu_s=1, processes=16, output_bytes=1 << 16))
    require_cgroup(result)
    assert result.cpu_limited and not result.timed_out and not result.ok, result
    assert result.describe() == "time limit exceeded (CPU)"


@pytest.mark.parametrize("level", LEVELS)
def test_keyrings_do_not_carry_over_between_runs(level, monkeypatch):
    if level == "rlimits" and not ROOTED:
        pytest.skip("rlimits as a normal user: the program shares the caller's user keyring (documented)")
    monkeypatch.setattr(sandbox, "_next_uid", lambda: 233_333)  # two runs that reuse a uid
    name = f"sdpo-leak-{uuid.uuid4().hex[:8]}"
    keys = {"session": -3, "user": -4, "user-session": -5}
    add = run_at(level, f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for ring, spec in {keys!r}.items():
            key = libc.syscall(248, b'user', ({name!r} + ring).encode(), b'secret', 6, spec)  # add_key
            print(ring, 'added' if key > 0 else 'refused')
    """)
    look = run_at(level, f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for ring, spec in {keys!r}.items():
            key = libc.syscall(250, 10, spec, b'user', ({name!r} + ring).encode(), 0)  # KEYCTL_SEARCH
            print(ring, 'FOUND' if key > 0 else 'absent')
    """)
    assert add.stdout.count(b"added") >= 1, add
    assert b"FOUND" not in look.stdout and look.stdout.count(b"absent") == 3, look
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(250, 10, -3, b"user", f"{name}session".encode(), 0) < 0, "the key reached the caller's keyring"


@pytest.mark.integration
@pytest.mark.parametrize("level", LEVELS)
def test_a_killed_verifier_takes_its_sandbox_with_it(level, tmp_path):
    marker = f"orphan-{uuid.uuid4().hex}"
    program = textwrap.dedent(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)', {marker!r}])
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)', {marker!r}])
    """)
    verifier = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from environments.sandbox import SandboxLimits, run_sandboxed
        run_sandboxed({argv_at(level)!r}, files={{"main.py": {program!r}}}, level={level!r},
                      limits=SandboxLimits(wall_s=120, cpu_s=5, output_bytes=1 << 16))
    """)
    scratch_parent = Path(tempfile.mkdtemp(prefix="sdpo-sandbox-test-"))  # reachable by the sandbox's uid
    scratch_parent.chmod(0o711)
    script = tmp_path / "verifier.py"  # a file, so that the marker is not on the verifier's own command line
    script.write_text(verifier)
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "TMPDIR": str(scratch_parent)})
    try:
        deadline = time.monotonic() + 20
        while len(processes_with(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(processes_with(marker)) == 2, "the program never started"
        assert list(scratch_parent.iterdir()), "no scratch dir"
        proc.kill()  # SIGKILL: the verifier gets no chance to clean up
        proc.wait()
        deadline = time.monotonic() + 10
        while (processes_with(marker) or list(scratch_parent.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = processes_with(marker)
        scratch_left = list(scratch_parent.iterdir())
    finally:
        for pid in processes_with(marker):
            os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(scratch_parent, ignore_errors=True)
    if level == "rlimits" and not CGROUP:
        pytest.skip("rlimits without a cgroup: the setsid() child outlives the run (documented)")
    assert left == [], "the sandbox outlived its killed verifier"
    assert scratch_left == [], "the scratch dir outlived its killed verifier"


# The judge (environments/code.py + code_harness.py): a too-slow or wrong program gets no reward.

SPIN = "import time\ndef spin(s):\n    t = time.process_time()\n    while time.process_time() - t < s:\n        pass\n    return 42\n"


def judge(level: str, monkeypatch, code: str, tests: list[dict], time_limit_s: float = 0.5):
    if level == "rlimits":
        level = sandbox.UNSAFE_RLIMITS
        if ROOTED:
            monkeypatch.setattr(code_env, "python_argv", lambda script: argv_at("rlimits", script))
    env = code_env.Code(time_limit_s=time_limit_s, sandbox_level=level)
    task = env.task_from_row({"question": "q", "tests": tests}, "attack")
    return env.verify(task, "```python\n" + code + "\n```")


@pytest.mark.parametrize("level", LEVELS)
def test_judge_counts_the_cpu_of_workers_it_never_waits_for(level, monkeypatch):
    tests = [{"input": "1\n", "output": "42\n"}]
    assert judge(level, monkeypatch, "input(); print(42)", tests).reward == 1.0  # the fast program passes
    honest = judge(level, monkeypatch, SPIN + "input(); print(spin(1.5))", tests)
    cheat = judge(level, monkeypatch, SPIN + textwrap.dedent("""
        import os, signal
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # auto-reaped: no rusage ever reaches a parent
        input()
        r, w = os.pipe()
        if os.fork() == 0:
            os.write(w, str(spin(1.5)).encode())
            os._exit(0)
        os.close(w)
        print(os.read(r, 100).decode())
    """), tests)
    assert honest.reward == 0.0 and honest.feedback.startswith("Time Limit Exceeded"), honest
    if not CGROUP:
        pytest.skip("without a cgroup the judge counts CPU by rusage, which an auto-reaped child escapes (documented)")
    assert cheat.reward == 0.0 and cheat.feedback.startswith("Time Limit Exceeded"), cheat


@pytest.mark.parametrize("level", LEVELS)
def test_judge_output_cannot_be_written_by_a_daemon_of_an_earlier_test(level, monkeypatch):
    tests = [{"input": "0\n", "output": "0\n"}, {"input": "1\n", "output": "42\n"}, {"input": "2\n", "output": "42\n"}]
    cheat = judge(level, monkeypatch, SPIN + textwrap.dedent("""
        import glob, os, sys, time
        n = int(input())
        if n == 0:  # the cheap first test starts a daemon that does the expensive ones out of sight
            if os.fork() == 0:
                os.setsid()
                answer = str(spin(1.5)) + '\\n'
                open('/tmp/ready', 'w').close()
                # the harness's own stdout, too: only where no process of the test runner shares our uid
                own_uid = os.environ['SDPO_SANDBOX_LEVEL'] == 'namespaces' or os.getuid() >= 200000
                while True:
                    for path in glob.glob('/tmp/out*') + (glob.glob('/proc/*/fd/1') if own_uid else []):
                        try:
                            open(path, 'w').write(answer)
                        except OSError:
                            pass
                    time.sleep(0.01)
            print(0)
        else:  # wait, without spending CPU, for the daemon; print nothing ourselves
            deadline = time.time() + 2.2
            while time.time() < deadline and not os.path.exists('/tmp/ready'):
                time.sleep(0.01)
    """), tests)
    assert cheat.reward == 0.0, cheat
    assert cheat.info["passed"] <= 1, cheat.info


def test_model_written_code_refuses_the_rlimits_level_unless_named_unsafe(monkeypatch):
    task = code_env.Code().tasks("train")[0]
    with pytest.raises(SandboxError, match="sandbox_level: unsafe-rlimits"):
        code_env.Code(sandbox_level="rlimits").verify(task, task.demonstration)
    monkeypatch.setitem(sandbox._level_cache, "probe", "namespaces simulated as unavailable")
    with pytest.raises(SandboxError, match="namespaces simulated as unavailable"):
        code_env.Code(sandbox_level="auto").verify(task, task.demonstration)
    if RLIMITS_USABLE:  # the opt-in by name runs it (and the dataset is then readable: why it is opt-in)
        if ROOTED:
            monkeypatch.setattr(code_env, "python_argv", lambda script: argv_at("rlimits", script))
        assert code_env.Code(sandbox_level=sandbox.UNSAFE_RLIMITS).verify(task, task.demonstration).reward == 1.0


@pytest.mark.parametrize("level", LEVELS)
def test_judge_cannot_be_ptraced_or_read_by_the_program(level, monkeypatch):
    verdict = judge(level, monkeypatch, textwrap.dedent("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        judge = os.getppid()
        print('attach', libc.ptrace(16, judge, None, None))  # PTRACE_ATTACH to the harness
        for path in (f'/proc/{judge}/mem', f'/proc/{judge}/fd/1'):
            try:
                open(path, 'rb' if path.endswith('mem') else 'wb').close()
                print('OPENED', path)
            except OSError:
                print('denied')
    """), [{"input": "1\n", "output": "never\n"}])
    assert verdict.reward == 0.0 and "attach -1" in verdict.feedback, verdict
    assert "OPENED" not in verdict.feedback and verdict.feedback.count("denied") == 2, verdict

"""Runs inside the sandbox (copied in as harness.py): executes solution.py on each test input in a
forked child with its own limits, and prints what each run produced as one JSON list.

It never sees expected outputs -- those stay outside the sandbox, where the comparison happens --
so a program that tampers with the harness can at worst spoil its own results, not fake a pass.
Standard library only.
"""

import json
import math
import os
import resource
import signal
import sys
import time
import traceback


def run_child(source, test_input, spec, out_path, err_path):
    """In the forked child: redirect stdio, lower the limits, run the program, never return."""
    os.setpgid(0, 0)
    cpu = math.ceil(spec["time_limit_s"]) + 1  # backstop; the real verdict compares rusage to the limit
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["output_bytes"], spec["output_bytes"]))
    in_path = out_path + ".in"
    with open(in_path, "w") as f:
        f.write(test_input if spec["kind"] == "stdin" else "")
    for fd, path, mode in ((0, in_path, os.O_RDONLY), (1, out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                           (2, err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        target = os.open(path, mode, 0o600)
        os.dup2(target, fd)
        os.close(target)
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
            args = [json.loads(line) for line in test_input.split("\n") if line.strip()]
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
    except BaseException:  # noqa: BLE001 -- e.g. SIGXFSZ turned into an error while flushing
        code = code or 1
    os._exit(code)


def read_capped(path, limit):
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def run_test(source, test_input, spec, index):
    out_path, err_path = f"/tmp/out{index}", f"/tmp/err{index}"
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            run_child(source, test_input, spec, out_path, err_path)
        finally:
            os._exit(1)
    wall_limit_s = 3 * spec["time_limit_s"] + 1  # CPU time is the limit; wall clock only catches sleepers
    status = rusage = None
    while True:
        done, status, rusage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - started > wall_limit_s:
            os.killpg(pid, signal.SIGKILL)
            _, status, rusage = os.wait4(pid, 0)
            break
        time.sleep(0.002)
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever the program spawned in its group
    except OSError:
        pass
    cpu_s = rusage.ru_utime + rusage.ru_stime
    output = read_capped(out_path, spec["output_bytes"])
    error = read_capped(err_path, 4000).strip().splitlines()
    result = {"output": output, "error": error[-1] if error else "", "cpu_s": round(cpu_s, 4)}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXFSZ:
            result["status"] = "output_limit"
        elif sig in (signal.SIGXCPU, signal.SIGKILL) or cpu_s > spec["time_limit_s"]:
            result["status"] = "timeout"
        else:
            result["status"] = "runtime_error"
            result["error"] = result["error"] or f"killed by signal {signal.Signals(sig).name}"
    elif cpu_s > spec["time_limit_s"]:
        result["status"] = "timeout"
    elif os.WEXITSTATUS(status) != 0 and "[Errno 27]" in result["error"]:
        result["status"] = "output_limit"  # Python ignores SIGXFSZ, so the file-size limit shows as EFBIG
    elif os.WEXITSTATUS(status) != 0:
        result["status"] = "runtime_error"
        if "MemoryError" in result["error"]:
            result["error"] = "MemoryError (memory limit exceeded)"
    else:
        result["status"] = "ok"
    return result


def main():
    with open("tests.json") as f:
        spec = json.load(f)
    with open("solution.py") as f:
        source = f.read()
    results = []
    for index, test_input in enumerate(spec["inputs"]):
        result = run_test(source, test_input, spec, index)
        results.append(result)
        if spec["stop_early"] and result["status"] != "ok":
            break
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()

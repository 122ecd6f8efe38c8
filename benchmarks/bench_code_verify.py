"""Verification throughput of the `code` environment (tasks per second), and what the sandbox costs.

Verifies the bundled code sample's reference solutions (all tests pass: every test runs) over and
over, in one process with N concurrent verifications, and times it. Also times one trivial program
per sandbox level against a bare subprocess, to show what the cage itself costs per run.

    python benchmarks/bench_code_verify.py [--rounds 8] [--concurrency 1 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from environments import sandbox
from environments.code import Code
from environments.sandbox import python_argv, resolve_level, run_sandboxed


def tasks_per_s(env: Code, rounds: int, concurrency: int) -> tuple[float, int]:
    tasks = env.tasks("train")
    work = [t for _ in range(rounds) for t in tasks]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        verdicts = list(pool.map(lambda t: env.verify(t, t.demonstration), work))
    elapsed = time.perf_counter() - started
    assert all(v.reward == 1.0 for v in verdicts), [v.feedback for v in verdicts if v.reward != 1.0][:1]
    return len(work) / elapsed, sum(len(t.data["tests"]) for t in work)


def per_run_ms(runner, n: int = 20) -> float:
    runner()
    started = time.perf_counter()
    for _ in range(n):
        runner()
    return (time.perf_counter() - started) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    level = resolve_level("auto")
    plan = getattr(sandbox, "cgroup_plan", lambda: None)()  # absent before per-run cgroups existed
    print(f"cores: {os.cpu_count()}, sandbox level: {level}, euid: {os.geteuid()}, "
          f"cgroup per run: {sorted(plan) if plan else 'no'}")
    env = Code(time_limit_s=6.0)
    base = None
    for c in args.concurrency:
        rate, tests = tasks_per_s(env, args.rounds, c)
        base = base or rate
        print(f"code verify, concurrency {c}: {rate:.2f} tasks/s ({tests} tests, {tests / args.rounds / len(env.tasks('train')):.1f} "
              f"per task), x{rate / base:.2f} vs concurrency {args.concurrency[0]}")
    python = os.path.realpath(sys.executable)
    bare = per_run_ms(lambda: subprocess.run([python, "-E", "-s", "-B", "-c", "pass"], check=True))
    rows = [("bare subprocess", bare)]
    for lvl in ("namespaces", "rlimits"):
        if lvl == "namespaces" and level != "namespaces":
            continue
        argv = python_argv("m.py")
        if lvl == "rlimits" and os.geteuid() == 0:
            if not os.path.exists("/usr/bin/python3"):
                continue  # as root the rlimits level needs an interpreter outside 0700 homes
            argv = ["/usr/bin/python3", "-E", "-s", "-B", "m.py"]
        rows.append((f"sandbox {lvl}", per_run_ms(lambda lvl=lvl, argv=argv: run_sandboxed(argv, files={"m.py": "pass"}, level=lvl))))
    for name, ms in rows:
        print(f"one trivial python run, {name}: {ms:.1f} ms (x{ms / bare:.2f} vs bare)")


if __name__ == "__main__":
    main()

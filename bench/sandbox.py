"""The sandbox's cost per test run: the same command with and without bubblewrap.

    .venv/bin/python bench/sandbox.py [--runs 15]

For three commands (an empty one, a Python start, the sample repository's pytest suite) it
times, in one process and interleaved so machine noise hits all alike:
- `plain`: `bash -c CMD` as a plain subprocess in the same directory;
- `none`: `run_sandboxed` with `isolation: none` (codeloop's limits, no namespaces);
- `bwrap`: `run_sandboxed` with bubblewrap (what every job uses), with its control group
  where the host gives one;
- `no-cgroup`: the same without the control group (as on a host that gives none);
- `egress`: a set-up step's sandbox (`setup=True`): bwrap plus the egress proxy and its forwarder;
- `run_tests`: the whole validation step (private copy of the tree + bwrap + cleanup).
It prints the median and p90 in milliseconds and the ratio of each to `plain`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.demo import make_sample_repo  # noqa: E402
from bot.sandbox import cgroup, run_sandboxed  # noqa: E402
from bot.settings import SandboxSettings  # noqa: E402
from bot.validate import run_tests  # noqa: E402

COMMANDS = {
    "true": "true",
    "python -c pass": "python -c pass",
    "pytest (sample repo)": "python -m pytest -q -p no:cacheprovider",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    bwrap, none = SandboxSettings(timeout_seconds=120), SandboxSettings(isolation="none")
    venv_bin = str(Path(sys.executable).parent)
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_sample_repo(Path(tmp) / "repo")
        ways = {
            "plain": lambda cmd: subprocess.run(
                ["bash", "-c", cmd], cwd=repo, check=True, capture_output=True,
                env={"PATH": f"{venv_bin}:/usr/bin:/bin", "HOME": tmp}),
            "none": lambda cmd: _ok(run_sandboxed(cmd, repo, none)),
            "bwrap": lambda cmd: _ok(run_sandboxed(cmd, repo, bwrap)),
            "no-cgroup": lambda cmd: _without_cgroup(lambda: _ok(run_sandboxed(cmd, repo, bwrap))),
            "egress": lambda cmd: _ok(run_sandboxed(cmd, repo, bwrap, setup=True)),
            "run_tests": lambda cmd: _ok(run_tests(repo, cmd, bwrap)),
        }
        times: dict[tuple[str, str], list[float]] = {}
        for name, cmd in COMMANDS.items():
            for way in ways.values():
                way(cmd)  # warm caches once
            for _ in range(args.runs):
                for way_name, way in ways.items():
                    start = time.perf_counter()
                    way(cmd)
                    times.setdefault((name, way_name), []).append(time.perf_counter() - start)
    where, why = cgroup.placement()
    print(f"sandbox overhead, {args.runs} runs each (ms; ratio to plain at the median); "
          f"control group: {where.describe() if where else 'none (' + why + ')'}\n")
    print(f"{'command':<22} {'way':<10} {'median':>9} {'p90':>9} {'× plain':>8}")
    for name in COMMANDS:
        base = statistics.median(times[(name, "plain")])
        for way_name in ways:
            values = sorted(times[(name, way_name)])
            median = statistics.median(values)
            p90 = values[int(0.9 * (len(values) - 1))]
            print(f"{name:<22} {way_name:<10} {median * 1000:>9.1f} {p90 * 1000:>9.1f} "
                  f"{median / base:>8.2f}")
    return 0


def _without_cgroup(run):
    saved = cgroup._cached
    cgroup._cached = (None, "off for this measurement")
    try:
        return run()
    finally:
        cgroup._cached = saved


def _ok(result):
    if not getattr(result, "ok", False):
        raise SystemExit(f"the command failed: {getattr(result, 'output', result)}")
    return result


if __name__ == "__main__":
    raise SystemExit(main())

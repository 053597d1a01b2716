"""Coverage-guided fuzzing of every parser of outside bytes (atheris, libFuzzer).

    python tests/fuzz/run.py [--seconds N] [TARGET ...]     # every target, N s each

Each target (``tests/fuzz/targets.py``) runs in its own process, with p2p's modules
instrumented for coverage, for ``--seconds`` (default ``$FUZZ_SECONDS`` or 60). Its
corpus is kept in ``.fuzz-corpus/TARGET/`` (seeded from valid inputs, not in git). An
input that raises anything but a P2PError, runs past 20 s or takes the process past
2 GiB is written to ``tests/fuzz/crashes/TARGET/``: commit it, fix the bug, and
``tests/test_fuzz_regressions.py`` replays it in every ``make test`` from then on.

Prints one line per target (executions, coverage, seconds, crash or not) and one JSON
line per target to ``$P2P_CHAOS_REPORT`` when that is set (``make chaos``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CRASHES = HERE / "crashes"
CORPUS = ROOT / ".fuzz-corpus"
RSS_LIMIT_MB = 2048
INPUT_TIMEOUT_S = 20
MAX_LEN = 256 * 1024
"""Longest input libFuzzer makes: past the handshake limits, enough for nested bombs."""


def fuzz_one(name: str, seconds: int) -> None:
    """In this process: fuzz ``name`` until the time is up (libFuzzer exits the process)."""
    import atheris

    with atheris.instrument_imports(include=["p2p"]):
        import targets

    corpus = CORPUS / name
    if not corpus.is_dir() or not any(corpus.iterdir()):
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(targets.SEEDS[name]()):
            (corpus / f"seed-{i}").write_bytes(seed)
    crashes = CRASHES / name
    crashes.mkdir(parents=True, exist_ok=True)

    def one_input(data: bytes) -> None:
        targets.replay(name, data)  # a P2PError is a refusal; anything else a crash

    atheris.Setup(
        [
            sys.argv[0],
            str(corpus),
            f"-max_total_time={seconds}",
            f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-timeout={INPUT_TIMEOUT_S}",
            f"-max_len={MAX_LEN}",
            f"-artifact_prefix={crashes}/",
            "-print_final_stats=1",
        ],
        one_input,
    )
    atheris.Fuzz()


def run(name: str, seconds: int) -> dict[str, object]:
    """Fuzz one target in a child process; what it did."""
    started = time.monotonic()
    before = set(_crash_files(name))
    done = subprocess.run(
        [sys.executable, __file__, "--one", name, "--seconds", str(seconds)],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=seconds + 600,
    )
    log = done.stderr
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", log))
    coverage = re.findall(r"cov: (\d+)", log)
    found = sorted(set(_crash_files(name)) - before)
    return {
        "target": name,
        "seconds": round(time.monotonic() - started, 1),
        "executions": int(stats.get("number_of_executed_units", 0)),
        "coverage": int(coverage[-1]) if coverage else 0,
        "exit": done.returncode,
        "crashes": [str(p.relative_to(ROOT)) for p in found],
        "tail": "" if done.returncode == 0 else log[-3000:],
    }


def _crash_files(name: str) -> list[Path]:
    folder = CRASHES / name
    return list(folder.iterdir()) if folder.is_dir() else []


def main() -> int:
    sys.path.insert(0, str(HERE))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="targets to run (default: all)")
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", 60)))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        fuzz_one(args.one, args.seconds)
        return 0
    import targets

    names = args.targets or sorted(targets.TARGETS)
    unknown = set(names) - set(targets.TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {sorted(targets.TARGETS)}")
    report = os.environ.get("P2P_CHAOS_REPORT")
    failed = False
    for name in names:
        result = run(name, args.seconds)
        failed |= bool(result["exit"]) or bool(result["crashes"])
        if result["crashes"]:
            verdict = f"CRASH {result['crashes']}"
        else:
            verdict = f"exit {result['exit']}" if result["exit"] else "ok"
        print(
            f"{name:18} {result['executions']:>9} runs  cov {result['coverage']:>5}  "
            f"{result['seconds']:>6} s  {verdict}",
            flush=True,
        )
        if result["tail"]:
            print(result["tail"], file=sys.stderr)
        if report:
            with open(report, "a") as out:
                out.write(json.dumps({"kind": "fuzz", **result, "tail": ""}) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

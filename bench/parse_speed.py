"""Lines per second of `agent parse` on a generated fail2ban log, against awk doing the same job.

Both keep NOTICE+Ban lines, split them into the seed's fields, add machine=server and print one
JSON object per line to /dev/null. Runs are interleaved; medians are printed.

`--engines` measures instead, in one process, the parser (`SourceParser.documents`) on the same
lines with each regex engine the agent could use for users' patterns: `re` (backtracking; what
870a13b used for all), RE2 (`google-re2`, linear time) through the binding the agent uses
(`agent.patterns.Re2Pattern`) and through google-re2's `re`-like wrapper, and the `regex`
module with a time limit per match. Sources: the seed's schema, a regex source with a regex
filter, and JSON lines with a regex filter. Best of `--runs`, interleaved.

    .venv/bin/python bench/parse_speed.py [--lines 1000000] [--runs 5] [--engines]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fail2ban_log import SEED_SCHEMA, lines  # noqa: E402

BAN_REGEX = (r"^(?P<date>\S+) (?P<hour>\S+) fail2ban\.actions\s+\[\d+\]:\s+NOTICE\s+"
             r"\[(?P<process>[^\]]+)\]\s+Ban\s+(?P<ip>\S+)")
ENGINE_SOURCES: dict[str, dict[str, Any]] = {
    "schema": {"schema": SEED_SCHEMA, "include": ["NOTICE", "Ban"]},
    "regex": {"regex": BAN_REGEX, "include": [r"NOTICE\s"]},
    "json": {"format": "json", "include": [r"Ban \d"]},
}

AWK = r"""/NOTICE/ && /Ban/ {
  if ($3 == "fail2ban.actions" && $6 ~ /^\[.*\]$/) {
    p = substr($6, 2, length($6) - 2)
    printf "{\"date\":\"%s\",\"hour\":\"%s\",\"process\":\"%s\",", $1, $2, p
    printf "\"ip\":\"%s\",\"machine\":\"server\"}\n", $8
  } else { printf "{\"message\":\"%s\",\"machine\":\"server\"}\n", $0 }
}"""


def workload(count: int) -> Path:
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / f"fail2ban-{count}.log"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", buffering=1024 * 1024) as f:
            for text in lines(count):
                f.write(text + "\n")
        tmp.rename(path)
    return path


def timed(command: list[str], source: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one run, output to /dev/null."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with source.open("rb") as stdin, open(os.devnull, "wb") as devnull:
        subprocess.run(command, stdin=stdin, stdout=devnull, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def engines() -> dict[str, Callable[[str], Any]]:
    import re

    import re2
    import regex

    from agent.patterns import Re2Pattern, TimedPattern

    options = re2.Options()
    options.log_errors = False
    return {"re": re.compile, "re2": Re2Pattern,
            "re2 (re2.compile)": lambda text: re2.compile(text, options),
            "regex+timeout": lambda text: TimedPattern(regex.compile(text), "bench")}


def engine_source(keys: dict[str, Any], engine: str, compile_: Callable[[str], Any]) -> Any:
    """The source as config builds it, with every pattern compiled on `engine` instead."""
    from agent.config import source_from_mapping
    from agent.schema import schema_texts

    problems: list[Any] = []
    source = source_from_mapping("bench", {"name": "bench", "paths": ["/x"], **keys}, problems)
    assert source is not None and not problems, problems
    if source.format == "schema":
        texts = schema_texts(keys["schema"])
        pattern = compile_(texts.re2 if engine.startswith("re2") else texts.re)
    else:
        pattern = None if source.pattern is None else compile_(source.pattern.pattern)
    return replace(source, pattern=pattern, include=tuple(compile_(p.pattern) for p in source.include))


def measure_engines(log: Path, runs: int) -> None:
    import orjson

    from agent.counters import SourceCounters
    from agent.lines import LineSplitter
    from agent.parser import LineContext, SourceParser
    from agent.types import FileId, SourceFile

    raw = log.read_bytes()
    data = {"text": raw, "json": b"".join(orjson.dumps({"line": line.decode()}) + b"\n"
                                          for line in raw.splitlines())}
    splitter = LineSplitter(1 << 20)
    framed = {kind: splitter.feed(blob) for kind, blob in data.items()}
    context = LineContext(SourceFile("bench", FileId(1, 1, "f")), str(log), "2026-01-01T00:00:00Z")
    best: dict[tuple[str, str], float] = {}
    for _ in range(runs):
        for source_name, keys in ENGINE_SOURCES.items():
            lines = framed["json" if source_name == "json" else "text"]
            for engine, compile_ in engines().items():
                parser = SourceParser(engine_source(keys, engine, compile_), "h", SourceCounters())
                started = time.process_time()
                parser.documents(lines, context)
                spent = time.process_time() - started
                key = (source_name, engine)
                best[key] = min(best.get(key, spent), spent)
    count = len(framed["text"])
    print(f"parser only, {count} lines, best of {runs} (CPU s; lines/s; vs re)")
    for source_name in ENGINE_SOURCES:
        base = best[(source_name, "re")]
        cells = [f"{e} {best[(source_name, e)]:.2f} s {count / best[(source_name, e)]:,.0f}/s "
                 f"x{best[(source_name, e)] / base:.2f}" for e in engines()]
        print(f"{source_name:7} " + " | ".join(cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--engines", action="store_true",
                        help="compare regex engines on the parser alone, in process")
    args = parser.parse_args()
    log = workload(args.lines)
    if args.engines:
        measure_engines(log, args.runs)
        return 0
    agent = [sys.executable, "-m", "agent", "parse", "--schema", SEED_SCHEMA,
             "--include", "NOTICE", "--include", "Ban", "--fields", "machine=server"]
    awk_binary = shutil.which("mawk") or shutil.which("awk") or "awk"
    peers = {"agent parse": agent, f"{Path(awk_binary).name} (same job)": [awk_binary, AWK]}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in peers}
    for _ in range(args.runs):
        for name, command in peers.items():
            results[name].append(timed(command, log))
    print(f"workload: {args.lines} lines, {log.stat().st_size / 1e6:.0f} MB ({log}); "
          f"median of {args.runs} interleaved runs")
    print(f"{'':24} {'wall s':>8} {'CPU s':>8} {'lines/s':>12}")
    medians = {}
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        medians[name] = wall
        print(f"{name:24} {wall:8.2f} {cpu:8.2f} {args.lines / wall:12,.0f}")
    agent_wall, peer_wall = medians["agent parse"], list(medians.values())[1]
    print(f"agent/awk wall-time ratio: {agent_wall / peer_wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

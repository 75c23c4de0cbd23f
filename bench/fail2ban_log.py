"""Deterministic fail2ban log generator, shared by the benchmarks, the demo and the tests.

About 30% of the lines are dropped by the seed's filter (`grep NOTICE | grep Ban`),
a few pass the filter but not the seed's schema, the rest are Ban lines.

    python bench/fail2ban_log.py --lines 1000000 --out /tmp/fail2ban.log
    python bench/fail2ban_log.py --lines 2000 --rate 400 --out log   # grows like a live log
    python bench/fail2ban_log.py --lines 20000 --rate 1000 --live --out log  # stamped now (UTC)
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

SEED_SCHEMA = r"$date $hour _ _ _ \[$process\] _ $ip"
STAMP_LENGTH = len("2017-06-14 17:16:12,329")
JAILS = ("sshd", "recidive", "nginx-http-auth", "postfix", "dovecot")


def line(rng: random.Random, index: int) -> str:
    """Line `index` of the log (no newline)."""
    seconds = index // 7
    stamp = (f"2017-06-{14 + seconds // 86400 % 15:02d} {seconds // 3600 % 24:02d}:"
             f"{seconds // 60 % 60:02d}:{seconds % 60:02d},{index * 37 % 1000:03d}")
    if rng.random() < 0.4:
        # Repeat offenders, so per-IP reports have something to show.
        ip = f"203.0.113.{int(rng.paretovariate(1.2)) % 254 + 1}"
    else:
        ip = f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    jail = JAILS[rng.randrange(len(JAILS))]
    kind = rng.random()
    if kind < 0.62:
        return f"{stamp} fail2ban.actions        [1112]: NOTICE  [{jail}] Ban {ip}"
    if kind < 0.70:
        # fail2ban 0.8's layout: passes the filter, not the seed's schema.
        return f"{stamp} fail2ban.actions[1112]: NOTICE [{jail}] Ban {ip}"
    if kind < 0.90:
        return f"{stamp} fail2ban.filter         [1112]: INFO    [{jail}] Found {ip} - {stamp[:19]}"
    return f"{stamp} fail2ban.actions        [1112]: NOTICE  [{jail}] Unban {ip}"


def seed_keeps(text: str) -> bool:
    """Whether the seed's filter (`grep NOTICE | grep Ban`) keeps this line."""
    return "NOTICE" in text and "Ban" in text


def count_kept(path: Path) -> int:
    """How many lines of the log at `path` the seed's filter keeps: the documents it makes."""
    with path.open(encoding="utf-8") as log:
        return sum(1 for text in log if seed_keeps(text))


def lines(count: int, seed: int = 1, start: int = 0) -> Iterator[str]:
    rng = random.Random(seed * 1_000_003 + start)
    for index in range(start, start + count):
        yield line(rng, index)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0, help="lines per second (0: all at once)")
    parser.add_argument("--live", action="store_true",
                        help="stamp each line with the time it is written (UTC, milliseconds)")
    args = parser.parse_args()
    with args.out.open("a", buffering=1 if args.rate else 1024 * 1024) as out:
        started = time.monotonic()
        for written, text in enumerate(lines(args.lines, args.seed), 1):
            if args.live:
                now = time.time()
                text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)) + \
                    f",{int(now * 1000) % 1000:03d}" + text[STAMP_LENGTH:]
            out.write(text + "\n")
            if args.rate:
                ahead = written / args.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    return 0


if __name__ == "__main__":
    sys.exit(main())

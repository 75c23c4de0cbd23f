"""Per-source counters: what happened to every line read, for logs, `agent parse` and status.
What happened to the documents is counted per database, by the shipper."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class SourceCounters:
    """Running totals for one source. Every line read lands in exactly one of
    `matched`, `unmatched`, `filtered` or `empty`; the rest are side notes."""

    lines: int = 0
    matched: int = 0
    unmatched: int = 0
    filtered: int = 0
    empty: int = 0
    dropped_unmatched: int = 0
    invalid_encoding: int = 0
    nul_bytes: int = 0
    truncated: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

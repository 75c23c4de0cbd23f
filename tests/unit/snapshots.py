"""Damaging status snapshots for the `agent status` property tests: any JSON value, every place
in a snapshot, and one place replaced or removed."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from hypothesis import strategies as st

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                               max_size=4),
    max_leaves=20)


def paths(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON value, the value itself first."""
    yield at
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, inner in items:
        yield from paths(inner, (*at, key))


def damage(snap: dict[str, Any], place: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """`snap` (changed in place) with what stands at `place` removed if `value` is KeyError,
    else replaced by a copy of `value`."""
    target: Any = snap
    for key in place[:-1]:
        target = target[key]
    if value is KeyError:
        del target[place[-1]]
    else:
        target[place[-1]] = copy.deepcopy(value)
    return snap

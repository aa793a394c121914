"""Key checks shared by the state-dict adapters: one message format for unknown, missing and
wrongly shaped tensors."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

MAX_LISTED = 20


def listing(keys) -> str:
    """``N key(s): a, b, ... and K more`` (sorted, at most MAX_LISTED shown)."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return f"{len(keys)} key(s): {', '.join(keys[:MAX_LISTED])}{more}"


def _same_shape(actual: Sequence[int], expected: Sequence) -> bool:
    return tuple(actual) == tuple(expected)


def key_problems(state: Mapping, expected: Mapping[str, tuple],
                 shape_ok: Callable[[tuple, tuple], bool] = _same_shape) -> list[str]:
    """What is wrong with ``state`` against ``expected`` shapes (empty list = nothing)."""
    unknown = set(state) - set(expected)
    missing = set(expected) - set(state)
    wrong = {f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}"
             for k in set(state) & set(expected)
             if not shape_ok(tuple(state[k].shape), tuple(expected[k]))}
    problems = []
    if unknown:
        problems.append(f"unknown {listing(unknown)}")
    if missing:
        problems.append(f"missing {listing(missing)}")
    if wrong:
        problems.append(f"wrong shape in {listing(wrong)}")
    return problems

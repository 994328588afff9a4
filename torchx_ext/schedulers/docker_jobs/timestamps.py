"""The Docker daemon's timestamps (containers' start and end, volumes' creation, log lines)."""

from __future__ import annotations

import calendar
import time
from typing import Optional

_EPOCH: dict[str, int] = {}


def parse_ts(text: str) -> Optional[float]:
    """Unix time of a daemon timestamp (``2026-11-21T09:54:37.113819260Z``); None if unset.

    Hand-rolled because log lines carry nanoseconds (``fromisoformat`` wants at most 6 digits)
    and it is called once per log line: the whole-second part is cached.
    """
    if len(text) < 20 or text.startswith("0001-"):
        return None
    base, rest = text[:19], text[19:]
    secs = _EPOCH.get(base)
    if secs is None:
        try:
            secs = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            return None
        if len(_EPOCH) > 4096:
            _EPOCH.clear()
        _EPOCH[base] = secs
    offset = 0
    if rest[-6:-5] in ("+", "-") and rest[-3:-2] == ":":  # only UTC "Z" from dockerd, but be lenient
        sign = 1 if rest[-6] == "+" else -1
        offset = sign * (int(rest[-5:-3]) * 3600 + int(rest[-2:]) * 60)
        rest = rest[:-6]
    rest = rest.rstrip("Z")
    frac = float("0" + rest) if rest.startswith(".") and rest[1:].isdigit() else 0.0
    return secs + frac - offset

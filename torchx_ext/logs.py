"""Log filtering shared by every scheduler: regex, since/until and tailing, the same everywhere."""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Callable, Iterable, Iterator, Optional, Tuple

TimedLine = Tuple[Optional[float], str]


def filter_lines(
    lines: Iterable[TimedLine],
    regex: Optional[str] = None,
    since: Optional[datetime] = None,
    until: Optional[datetime] = None,
) -> Iterator[str]:
    """Yields the text of lines matching ``regex`` whose time is within [since, until].

    Lines without a timestamp (None) are never dropped by since/until: better one line too many
    than a silently missing one.
    """
    pattern = re.compile(regex) if regex else None
    lo = since.timestamp() if since else None
    hi = until.timestamp() if until else None
    if pattern is None and lo is None and hi is None:  # the common `torchx log -f`: per line, only the newline
        for _, text in lines:
            yield text if text.endswith("\n") else text + "\n"
        return
    for ts, text in lines:
        if ts is not None and ((lo is not None and ts < lo) or (hi is not None and ts > hi)):
            continue
        if pattern is not None and not pattern.search(text):
            continue
        yield text if text.endswith("\n") else text + "\n"


def follow(
    read_new: Callable[[], Iterable[TimedLine]],
    is_done: Callable[[], bool],
    should_tail: bool,
    interval: float = 0.2,
) -> Iterator[TimedLine]:
    """Yields what ``read_new`` returns; with ``should_tail`` keeps polling until ``is_done``.

    ``is_done`` is checked *before* the last read so that output written just before the app
    ended is never lost.
    """
    while True:
        done = is_done() if should_tail else True
        yield from read_new()
        if done:
            return
        time.sleep(interval)

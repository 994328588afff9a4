"""Log filtering shared by every scheduler: regex, since/until and tailing, the same everywhere."""

from __future__ import annotations

import itertools
import re
import time
from datetime import datetime
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

TimedLine = Tuple[Optional[float], str]


class PlainLines(List[str]):
    """Whole lines of a log (each ending in ``\\n``) whose times were not asked for.

    A reader hands one per chunk when there is no since/until to apply, so that following a long
    log costs per chunk and not per line (bench/bench_logs.py). Its lines are never dropped by
    since/until, as a line without a time is not.
    """


LogItem = Union[TimedLine, PlainLines]


def filter_lines(
    lines: Iterable[LogItem],
    regex: Optional[str] = None,
    since: Optional[datetime] = None,
    until: Optional[datetime] = None,
) -> Iterator[str]:
    """Yields the text of lines matching ``regex`` whose time is within [since, until].

    Lines without a timestamp (None) are never dropped by since/until: better one line too many
    than a silently missing one.
    """
    return itertools.chain.from_iterable(filter_batches(lines, regex, since, until))


def filter_batches(
    lines: Iterable[LogItem],
    regex: Optional[str] = None,
    since: Optional[datetime] = None,
    until: Optional[datetime] = None,
) -> Iterator[Sequence[str]]:
    """:func:`filter_lines` in batches: a reader's :class:`PlainLines` stays one batch (flattened
    by ``itertools.chain`` in C, with no Python step per line), a timed line is a batch of one."""
    pattern = re.compile(regex) if regex else None
    lo = since.timestamp() if since else None
    hi = until.timestamp() if until else None
    if pattern is None and lo is None and hi is None:  # the common `torchx log -f`: per line, only the newline
        for item in lines:
            if isinstance(item, PlainLines):
                yield item
                continue
            text = item[1]
            yield (text if text.endswith("\n") else text + "\n",)
        return
    for item in lines:
        if isinstance(item, PlainLines):
            yield item if pattern is None else list(filter(pattern.search, item))
            continue
        ts, text = item
        if ts is not None and ((lo is not None and ts < lo) or (hi is not None and ts > hi)):
            continue
        if pattern is not None and not pattern.search(text):
            continue
        yield (text if text.endswith("\n") else text + "\n",)


def follow(
    read_new: Callable[[], Iterable[LogItem]],
    is_done: Callable[[], bool],
    should_tail: bool,
    interval: float = 0.2,
    check_s: float = 1.0,
) -> Iterator[LogItem]:
    """Yields what ``read_new`` returns; with ``should_tail`` keeps polling until ``is_done``.

    ``is_done`` is checked *before* the last read so that output written just before the app
    ended is never lost. While lines keep coming it is asked at most every ``check_s`` (asking
    may cost the backend a round trip: slurm_jobs runs squeue); a poll that brought nothing
    always asks, so a quiet app's follow ends within ``interval`` of its end, a chatty one's
    within ``check_s``.
    """
    last_check = -check_s
    got = False
    while True:
        now = time.monotonic()
        if not should_tail:
            done = True
        elif got and now - last_check < check_s:
            done = False
        else:
            done, last_check = is_done(), now
        got = False
        for item in read_new():
            got = True
            yield item
        if done:
            return
        time.sleep(interval)

"""Progress of work that can take more than a couple of seconds (a workspace copied, shipped,
built or uploaded), on stderr, only when stderr is a terminal: scripts and CI logs stay quiet.

Standard library only: one line rewritten in place (``\\r``) at most every :data:`EVERY_S`, ended
by a newline. Why not rich or tqdm: neither is a dependency of the base install, and a line of
counts is all there is to show.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import Optional, TextIO, Type

EVERY_S = 0.2  # a line rewritten more often only costs the terminal
AFTER_S = 1.0  # work that ends before this shows nothing at all


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class Progress:
    """``with Progress("copying the workspace") as p: p.update(files=3, nbytes=1234)``.

    Args:
        label: what is being done, in the user's words
        stream: where to write (default: stderr); nothing is written unless it is a terminal
        after_s: show nothing for work that ends sooner than this
        quiet: show nothing at all (e.g. there is no workspace to upload this time)
    """

    def __init__(self, label: str, stream: Optional[TextIO] = None, after_s: float = AFTER_S,
                 quiet: bool = False) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = not quiet and bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.after_s = after_s
        self._last = 0.0
        self._shown = False
        self._text = ""

    def __enter__(self) -> Progress:
        return self

    def update(self, text: str = "", files: Optional[int] = None, nbytes: Optional[int] = None,
               force: bool = False) -> None:
        """Shows ``text`` (or the counts) if enough time has passed since the last line."""
        if not self.enabled:
            return
        parts = [text] if text else []
        if files is not None:
            parts.append(f"{files} files")
        if nbytes is not None:
            parts.append(mib(nbytes))
        self._text = ", ".join(parts)
        now = time.monotonic()
        if not force and (now - self.started < self.after_s or now - self._last < EVERY_S):
            return
        self._last = now
        self._shown = True
        self.stream.write(f"\r\033[K{self.label}: {self._text} ({now - self.started:.0f} s)")
        self.stream.flush()

    def ticking(self, text: str = "") -> Progress:
        """Keeps the line's clock going while a call that reports nothing blocks (an upload)."""
        if self.enabled:
            self._stop = threading.Event()

            def tick() -> None:
                while not self._stop.wait(EVERY_S):
                    self.update(text)

            threading.Thread(target=tick, name="torchx-ext-progress", daemon=True).start()
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        if not self._shown:
            return
        end = "done" if exc_type is None else "stopped"
        self.stream.write(f"\r\033[K{self.label}: {self._text}, {end} in "
                          f"{time.monotonic() - self.started:.1f} s\n")
        self.stream.flush()

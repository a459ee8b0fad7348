"""Progress bars that suit where they are written.

On a terminal :func:`progress_bar` is an ordinary redrawing tqdm bar. Written to a file or a pipe
(CI logs, ``nohup``, ``| tee``), where a carriage return does not redraw, the bar prints whole
lines instead, at most one every :data:`LOG_INTERVAL_S` seconds plus the last one, so a log
holds a few readable lines instead of one line of hundreds of carriage-return updates.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any, Optional

__all__ = ["LOG_INTERVAL_S", "progress_bar"]

LOG_INTERVAL_S = 30.0


class _WholeLines:
    """A text stream for tqdm that turns each redraw (``"\\r" + status``) into one line, and
    drops a redraw that repeats the last line."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line and line != self._last:   # closing a bar redraws its last state
            self._stream.write(line + "\n")
            self._last = line
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def _interactive(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:   # a closed stream
        return False


def progress_bar(iterable: Optional[Iterable[Any]] = None, *, file: Optional[IO[str]] = None,
                 **options: Any) -> Any:
    """A tqdm bar over ``iterable`` (or updated by hand) with tqdm's ``options`` (``total``,
    ``desc``, ``unit``, ``disable``, ``leave``, ...), written to ``file`` (default
    ``sys.stderr``): redrawn in place on a terminal, whole lines at most every
    :data:`LOG_INTERVAL_S` s elsewhere."""
    stream = sys.stderr if file is None else file
    if _interactive(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, file=stream, **options)
    from tqdm import tqdm

    options.setdefault("mininterval", LOG_INTERVAL_S)
    options.setdefault("maxinterval", options["mininterval"])   # tqdm's monitor would print every 10 s
    options.pop("dynamic_ncols", None)   # no terminal to measure
    return tqdm(iterable, file=_WholeLines(stream), ascii=True, ncols=100, **options)

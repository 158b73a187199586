"""Progress bars for long CLI work; silent with ``--quiet`` or when stderr is not a terminal log."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

ProgressFn = Callable[[int, int], None]


@contextmanager
def progress_bar(description: str, quiet: bool, unit: str = "frame") -> Iterator[ProgressFn | None]:
    """Yields a ``progress(done, total)`` callback driving a tqdm bar (or None when quiet)."""
    if quiet:
        yield None
        return
    bar = tqdm(desc=description, unit=unit, dynamic_ncols=True, leave=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()

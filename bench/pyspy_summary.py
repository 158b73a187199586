"""Read py-spy's raw (collapsed) profiles as text: per thread, where its samples went.

Why: bench/device/profile_load.sh brings back flame-graph files from the lent GPU machine
(profile.tgz: ``*-gil.raw`` = samples of the thread holding the GIL, ``*-threads.raw`` = all
active threads). A flame graph needs a browser; a device session's decisions need the numbers:
which thread holds the GIL how often, and in which of our functions. Per thread this prints its
share of the samples, the functions its samples ended in (self) and, inclusive, the functions of
this repository on its stacks (a function counted once per sample however often it recurs).

    python bench/pyspy_summary.py profile.tgz            # every .raw file inside
    python bench/pyspy_summary.py device-gil.raw --top 15
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: A frame as py-spy writes it: "function (path/to/file.py:123)".
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")
#: The first frame of a stack recorded with --threads: "thread (0x7f..): name" or "thread (123): name".
_THREAD = re.compile(r"^thread \((?:0x[0-9a-fA-F]+|\d+)\): (?P<name>.*)$")
#: The "thread" of stacks recorded without --threads.
ALL_THREADS = "(all threads)"
NO_FRAME = "(no Python frame)"
#: Our code: frames from these top-level folders count for the inclusive table.
OURS = ("pipeline/", "server/", "bench/")


@dataclass
class ThreadProfile:
    samples: int = 0
    leaf: collections.Counter = field(default_factory=collections.Counter)
    ours: collections.Counter = field(default_factory=collections.Counter)


def frame_name(frame: str) -> tuple[str, str]:
    """(``function (file)`` without the line, file) for one collapsed frame."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    return f"{match['func']} ({match['file']})", match["file"]


def parse(lines: Iterable[str]) -> dict[str, ThreadProfile]:
    """Collapsed stacks (``frame;frame;... count``) per thread: the first frame names it when
    py-spy ran with --threads, else every sample goes to :data:`ALL_THREADS`."""
    threads: dict[str, ThreadProfile] = collections.defaultdict(ThreadProfile)
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            raise ValueError(f"not a collapsed stack line (no sample count at the end): {line[:120]!r}") from None
        frames = stack.split(";")
        named = _THREAD.match(frames[0])
        if named is not None:  # recorded with --threads: the first frame names the thread
            thread, frames = named["name"], frames[1:]
        else:  # e.g. --gil alone: whichever thread held the GIL
            thread = ALL_THREADS
        profile = threads[thread]
        profile.samples += count
        names = [frame_name(f) for f in frames]
        # no Python frame: the thread was in native code with nothing of Python's on its stack
        profile.leaf[names[-1][0] if names else NO_FRAME] += count
        for name in {name for name, file in names if file.startswith(OURS)}:
            profile.ours[name] += count
    return dict(threads)


def report(title: str, threads: dict[str, ThreadProfile], top: int) -> str:
    total = sum(p.samples for p in threads.values())
    out = [f"== {title}: {total} samples, {len(threads)} threads"]
    for name, profile in sorted(threads.items(), key=lambda item: -item[1].samples):
        share = 100 * profile.samples / total if total else 0.0
        out.append(f"-- {name}: {profile.samples} samples ({share:.1f} %)")
        out.append("   self:")
        out.extend(f"   {100 * n / profile.samples:5.1f} %  {func}" for func, n in profile.leaf.most_common(top))
        if profile.ours:
            out.append("   ours, inclusive:")
            out.extend(f"   {100 * n / profile.samples:5.1f} %  {func}" for func, n in profile.ours.most_common(top))
    return "\n".join(out)


def sources(paths: list[Path]) -> Iterable[tuple[str, list[str]]]:
    """(title, lines) of every raw profile named or inside a named .tgz."""
    for path in paths:
        if path.suffix in (".tgz", ".gz"):
            with tarfile.open(path) as archive:
                for member in sorted(archive.getmembers(), key=lambda m: m.name):
                    if member.isfile() and member.name.endswith(".raw"):
                        data = archive.extractfile(member)
                        assert data is not None
                        yield f"{path.name}:{Path(member.name).name}", data.read().decode().splitlines()
        else:
            yield path.name, path.read_text().splitlines()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", help="py-spy --format raw files, or a .tgz of them")
    parser.add_argument("--top", type=int, default=10, help="functions shown per thread and table")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        for title, lines in sources(args.paths):
            print(report(title, parse(lines), args.top), end="\n\n")
    except (ValueError, tarfile.TarError) as exc:
        print(f"pyspy_summary: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Summarise a py-spy collapsed-stacks file: where the worker's CPU samples went.

    python -m bench.profile FILE [--top N] [--match TEXT]

Prints the functions with the most samples on top of the stack (self) and on the stack at all
(inclusive), as a share of all samples. py-spy leaves idle samples out by default, so shares are
of busy CPU time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

__all__ = ["load", "main", "summarise"]

_LINE = re.compile(r" \((?P<file>[^:()]+):\d+\)")


def _frame(raw: str) -> str:
    """`func (path/to/module.py:123)` → `func (module.py)`, so lines of a function add up."""
    return _LINE.sub(lambda m: f" ({m['file'].rsplit('/', 1)[-1]})", raw.strip())


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append(([_frame(f) for f in stack.split(";")], int(count)))
    return stacks


def summarise(stacks: list[tuple[list[str], int]]) -> tuple[int, Counter[str], Counter[str]]:
    total = sum(n for _, n in stacks)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return total, own, inclusive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", help="inclusive list: only frames containing this text")
    args = parser.parse_args(argv)
    total, own, inclusive = summarise(load(args.file))
    if not total:
        print("no samples")
        return 1
    print(f"{total} samples")
    print("\nself")
    for frame, n in own.most_common(args.top):
        print(f"{100 * n / total:6.1f}%  {frame}")
    print("\ninclusive")
    shown = 0
    for frame, n in inclusive.most_common():
        if args.match and args.match not in frame:
            continue
        print(f"{100 * n / total:6.1f}%  {frame}")
        shown += 1
        if shown >= args.top:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())

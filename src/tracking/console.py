"""Fixed-width console tables whose columns are as wide as their longest cell (an `arch@/path/to/file` model name
then pushes its column out instead of running into the next one)."""
from __future__ import annotations

from typing import Iterable, List, Sequence


def columns(header: Sequence[str], rows: Iterable[Sequence[object]], right: Sequence[int] = ()) -> List[str]:
    """The header and rows as lines; cells are str()-ed, columns padded to their widest cell and separated by two
    spaces; columns whose index is in `right` are right-aligned (numbers)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in cells]

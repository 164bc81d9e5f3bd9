"""What a process costs and how long calls took: resident memory and CPU time of a pid
(from /proc), and quantiles of many values."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int, peak: bool = False) -> float:
    """The resident memory of `pid` in MiB: now (VmRSS), or its peak so far (VmHWM);
    NaN when /proc does not say."""
    field = "VmHWM:" if peak else "VmRSS:"
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return math.nan


def cpu_seconds(pid: int) -> float:
    """CPU time `pid` has used, user and system."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def quantiles(values: Iterable[float], qs: Sequence[float], bucket: float = 0) -> list[float]:
    """The nearest-rank quantiles `qs` (0.5, 0.99, ...) of `values`, NaN each when there
    are none. Values are counted, not kept: with `bucket` > 0, by buckets of that width
    (each quantile is then its bucket's low edge), so that the tens of millions of
    latencies of a soak fit in memory."""
    counts = Counter((value // bucket) * bucket if bucket else value for value in values)
    total = sum(counts.values())
    if not total:
        return [math.nan for _ in qs]
    ordered = sorted(counts.items())
    result = []
    for q in qs:
        # The value at 0-based index int(q * total) of the sorted values.
        rank = min(total, int(q * total) + 1)
        seen = 0
        for value, count in ordered:
            seen += count
            if seen >= rank:
                result.append(value)
                break
    return result

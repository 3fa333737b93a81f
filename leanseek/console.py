"""What the commands print: aligned text tables and one-line metrics."""

from __future__ import annotations

import json


def table(rows: list[list], header: list) -> str:
    """Rows under a header, the first column left-aligned and the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def metrics_line(line: dict) -> str:
    """A run's final metrics line as JSON, floats rounded for the terminal."""
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()})

"""The README's headline table, made from a committed benchmark run.

    python -m benchmarks.headline [benchmarks/results/results.json]

Prints an reStructuredText table: ops/s per subject for the scenarios most
users ask about.  tests/test_docs.py checks that README.rst shows exactly this.
"""

from __future__ import annotations

import json
import sys
from typing import Any

COLUMNS = [("a", 0, "1 thread"), ("b", 0, "8 threads, 1 key"), ("d", 0, "4 processes, 1 key"), ("e", 100_000, "N = 100,000")]


def table(path: str) -> str:
    with open(path) as f:
        cells: list[dict[str, Any]] = json.load(f)["cells"]
    found = {(c["scenario"], c["subject"], c["size"]): c for c in cells}
    subjects: list[tuple[str, str]] = []
    for c in cells:
        if c["scenario"] == "a" and "ops_s" in c and (c["subject"], c["name"]) not in subjects:
            subjects.append((c["subject"], c["name"]))
    subjects.sort(key=lambda s: -found[("a", s[0], 0)]["ops_s"])
    header = ["subject"] + [f"{label} ({scenario})" for scenario, _size, label in COLUMNS]
    rows = []
    for subject, name in subjects:
        row = [name]
        for scenario, size, _label in COLUMNS:
            cell = found.get((scenario, subject, size))
            if cell is None or "ops_s" not in cell:
                row.append("–")
            else:
                lost = f", lost {cell['lost']:,}" if cell.get("lost") else ""
                row.append(f"{cell['ops_s']:,.0f}{lost}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(rule)
    return "\n".join(lines) + "\n"


def main() -> None:
    print(table(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/results.json"), end="")


if __name__ == "__main__":
    main()

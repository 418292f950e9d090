"""Summarise `ncu --page source --print-source sass --csv` output: the SASS instructions with the
most warp-stall samples, with their top stall reasons. Reads the CSV from stdin.

    ncu --import rep.ncu-rep --page source --print-source sass --csv | python -m benchmarks.probes.ncu_top_stalls
"""

from __future__ import annotations

import csv
import sys


def main() -> int:
    rows = list(csv.reader(sys.stdin))
    header_index = next(i for i, r in enumerate(rows) if any("Source" == c.strip() for c in r))
    header = [c.strip() for c in rows[header_index]]
    body = rows[header_index + 1:]
    col = {name: i for i, name in enumerate(header)}
    sample_cols = [name for name in header if name.startswith("stall_") or "Samples" in name]
    total_col = next((n for n in header if n in ("Warp Stall Sampling (All Samples)", "Sampling Data (All)")), None)
    if total_col is None:
        print("columns:", header)
        return 1

    def num(r, name):
        try:
            return float(r[col[name]].replace(",", "") or 0)
        except (ValueError, IndexError):
            return 0.0
    total = sum(num(r, total_col) for r in body)
    print(f"total samples {total:.0f}; columns {len(header)}")
    reason_cols = [n for n in header if n.startswith("stall_")] or [n for n in sample_cols if n != total_col]
    top = sorted(body, key=lambda r: -num(r, total_col))[:int(sys.argv[1]) if len(sys.argv) > 1 else 30]
    for r in top:
        reasons = sorted(((num(r, n), n) for n in reason_cols), reverse=True)[:3]
        why = ", ".join(f"{n}={v:.0f}" for v, n in reasons if v > 0)
        print(f"{100 * num(r, total_col) / total:5.1f}%  {r[col['Address']] if 'Address' in col else ''}  "
              f"{r[col['Source']].strip()[:70]:70s}  {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

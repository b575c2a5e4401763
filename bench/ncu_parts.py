"""Where a kernel's warps spend their time, by part of the kernel, from Nsight Compute.

    ncu --clock-control none -k regex:_half_topk_ws -s 2 -c 1 --set full -o ws \
        python3 bench/topk_ws.py --once '{}'
    ncu --import ws.ncu-rep --page source --csv --print-source sass > ws.csv
    python3 bench/ncu_parts.py ws.csv

The source page lists every SASS instruction with how often it ran and the warp-state samples
taken at it. A run of consecutive instructions that ran equally often is one part of the
kernel (a loop body, the code between two loops), so this prints, for each part with at least
``--min-samples`` samples or ``--min-length`` instructions: its instructions, how often each
ran, its samples and their share, and the stall reasons that took most of them. Parts of
different warps (a warp-specialised kernel's consumers and loader) are listed apart: compare
a part's samples with the other parts of the same warps.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field


@dataclass
class Part:
    first: int  # index of its first instruction in the listing
    last: int
    executed: int  # how often each of its instructions ran
    samples: int = 0
    stalls: dict[str, int] = field(default_factory=dict)
    opening: str = ""  # its first instruction


def parts(rows: list[dict[str, str]]) -> list[Part]:
    """Runs of consecutive instructions with the same execution count, with their samples."""
    out: list[Part] = []
    for k, row in enumerate(rows):
        executed = int(row.get("Instructions Executed") or 0)
        samples = int(row.get("Warp Stall Sampling (All Samples)") or 0)
        if not out or out[-1].executed != executed:
            out.append(Part(k, k, executed, opening=row.get("Source", "").strip()))
        part = out[-1]
        part.last = k
        part.samples += samples
        for name, value in row.items():
            if name.startswith("stall_") and "Not Issued" not in name and value:
                part.stalls[name[6:]] = part.stalls.get(name[6:], 0) + int(value)
    return out


def read_source_page(path: str) -> list[dict[str, str]]:
    """The instruction rows of ``ncu --page source --csv --print-source sass`` output (the
    kernel's name line first, then a header)."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    start = next(i for i, line in enumerate(lines) if line and line[0] == "Address")
    header = lines[start]
    return [dict(zip(header, line, strict=False)) for line in lines[start + 1 :] if line]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="the source page as CSV (see above)")
    ap.add_argument("--min-samples", type=int, default=100)
    ap.add_argument("--min-length", type=int, default=40)
    args = ap.parse_args(argv)
    rows = read_source_page(args.csv)
    found = parts(rows)
    total = sum(p.samples for p in found) or 1
    print(f"{len(rows)} instructions, {total} samples")
    print("| instructions | length | ran | samples | share | top stalls | opens with |")
    print("|---|---|---|---|---|---|---|")
    for p in found:
        if p.samples < args.min_samples and p.last - p.first + 1 < args.min_length:
            continue
        top = sorted(p.stalls.items(), key=lambda kv: -kv[1])[:3]
        stalls = ", ".join(f"{name} {n}" for name, n in top)
        print(f"| {p.first}-{p.last} | {p.last - p.first + 1} | {p.executed} | {p.samples} | "
              f"{p.samples / total:.1%} | {stalls} | `{p.opening[:40]}` |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/ncu_parts.py: Nsight Compute's source page cut into the parts of a kernel."""

import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

import ncu_parts  # noqa: E402

HEADER = [
    "Address",
    "Source",
    "Warp Stall Sampling (All Samples)",
    "Instructions Executed",
    "stall_barrier",
    "stall_wait",
    "stall_barrier (Not Issued)",
]


def write_page(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "_some_kernel", ""])
        w.writerow(HEADER)
        for k, (source, samples, executed, barrier, wait) in enumerate(rows):
            w.writerow([hex(0x100 + 16 * k), source, samples, executed, barrier, wait, 99])


def test_parts_are_runs_of_equal_execution_counts_with_their_samples_and_stalls(tmp_path):
    page = tmp_path / "page.csv"
    write_page(
        page,
        [
            ("LDC R1", 1, 8, 0, 1),  # the start: ran once a warp
            ("HGMMA", 5, 128, 1, 4),  # a loop body: 16 times a warp
            ("FMNMX", 7, 128, 0, 7),
            ("BRA", 2, 128, 2, 0),
            ("EXIT", 3, 8, 3, 0),  # after the loop
        ],
    )
    rows = ncu_parts.read_source_page(str(page))
    assert [r["Source"] for r in rows] == ["LDC R1", "HGMMA", "FMNMX", "BRA", "EXIT"]
    found = ncu_parts.parts(rows)
    assert [(p.first, p.last, p.executed, p.samples) for p in found] == [
        (0, 0, 8, 1),
        (1, 3, 128, 14),
        (4, 4, 8, 3),
    ]
    # the not-issued columns are a subset of the samples: not counted again
    assert found[1].stalls == {"barrier": 3, "wait": 11}
    assert found[1].opening == "HGMMA"


def test_the_table_lists_the_parts_that_pass_either_threshold(tmp_path, capsys):
    page = tmp_path / "page.csv"
    write_page(page, [("A", 50, 1, 50, 0), ("B", 1, 2, 0, 1), ("C", 200, 3, 0, 200)])
    assert ncu_parts.main([str(page), "--min-samples", "40", "--min-length", "5"]) == 0
    out = capsys.readouterr().out
    assert "3 instructions, 251 samples" in out
    table = [line for line in out.splitlines() if line.startswith("| ") and "`" in line]
    assert len(table) == 2  # B has 1 sample and 1 instruction: left out
    assert table[0].startswith("| 0-0 | 1 | 1 | 50 | 19.9% | barrier 50")
    assert table[1].startswith("| 2-2 | 1 | 3 | 200 | 79.7% | wait 200")

"""bench/kernels.py's timing in turns: the ratios the acceptance reads, taken within rounds."""

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
)

import kernels  # noqa: E402


def test_turns_time_each_in_order_a_round_at_a_time_and_ratios_cancel_the_drift():
    calls = []
    drift = [1.0, 1.5, 0.8, 1.2, 1.1]  # the machine's speed, round by round

    def timer(name, ms):
        def t():
            calls.append(name)
            return ms * drift[calls.count("FFN") - 1]  # the FFN opens each round

        return t

    times = kernels.in_turns(
        {"FFN": timer("FFN", 0.8), 1024: timer(1024, 1.6), 4096: timer(4096, 2.08)}, rounds=5
    )
    assert calls == ["FFN", 1024, 4096] * 5
    assert times["FFN"] == [0.8 * d for d in drift]

    kernels.ROWS.clear()
    kernels.turns_rows(times, "FFN", {1024: "1M", 4096: "16M"}, "target")
    kernels.turns_rows(times, 1024, {4096: "16M / 1M"})
    (one, one_ffn, one_note), (six, six_ffn, _), (ratio, ratio_x, ratio_note) = (
        (r[0], r[2], r[3]) for r in kernels.ROWS
    )
    assert (one, one_ffn) == ("1M", "2.000x") and (six, six_ffn) == ("16M", "2.600x")
    # every round's own ratio is exact, though the medians come from different rounds
    assert "5 rounds in turns: 2.000-2.000x round by round; target" == one_note
    assert (ratio, ratio_x) == ("16M / 1M", "1.300x")
    assert "1.300-1.300x" in ratio_note
    assert kernels.ROWS[0][1] == f"{1.6 * 1.1:.3f} ms"  # the median of 1.6 x the drifts


def test_the_median_of_an_odd_and_an_even_count():
    assert kernels.median([3.0, 1.0, 2.0]) == 2.0
    assert kernels.median([4.0, 1.0, 3.0, 2.0]) == 3.0  # the upper of the middle two

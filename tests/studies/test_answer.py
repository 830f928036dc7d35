"""The per-family answer (studies.answer): table at matched FLOPs, sentence, PNG."""

from __future__ import annotations

import math

from studies.answer import Entry, family_table, format_answer, front, matched_flops, plot_front
from studies.answer import sentence as front_sentence

E = [
    Entry(0, "standard", 2.20, 1e5, 0.02, 2, attrs={"width": 32, "lr": 3e-3}),
    Entry(1, "standard", 2.10, 4e5, 0.01, 2),
    Entry(2, "mlr", 2.15, 2e5, 0.03, 2),
    Entry(3, "mlr", 2.00, 8e5, 0.02, 2),
    Entry(4, "sliding_window", 2.30, 5e4, 0.05, 2),
    Entry(5, "sliding_window", 2.40, 3e5, 0.01, 2),
    Entry(6, "bilinear_dense", math.nan, 1e5),
]


def test_matched_flops_is_the_costliest_familys_cheapest_point():
    assert matched_flops(E) == 2e5


def test_family_table_compares_own_fronts_at_matched_flops():
    rows = {r.family: r for r in family_table(E)}
    assert set(rows) == {"standard", "mlr", "sliding_window"}  # NaN-only family dropped
    assert (rows["standard"].matched_loss, rows["standard"].matched_flops) == (2.20, 1e5)
    assert (rows["mlr"].matched_loss, rows["mlr"].best_loss) == (2.15, 2.00)
    assert rows["sliding_window"].matched_loss == 2.30 and rows["sliding_window"].front == 1
    assert rows["standard"].trials == 4 and rows["standard"].matched_std == 0.02
    assert [r.family for r in family_table(E)] == ["mlr", "standard", "sliding_window"]


def test_front_and_sentence():
    assert [e.number for e in front(E)] == [4, 0, 2, 1, 3]
    s = front_sentence(E)
    assert s.startswith("The front has 5 points from 3 families: going up in compute, "
                        "sliding_window at 5e+04 FLOPs/token, then standard at 1e+05")
    assert s.endswith("the lowest loss is 2 (mlr, 8e+05 FLOPs/token).")
    one = front_sentence(E[:2])
    assert "standard is best at every FLOPs tried" in one
    assert front_sentence([]) == "No architecture finished, so there is no front yet."
    assert front_sentence([E[0], E[5]]) == (
        "The front is one point: #0 (standard, 1e+05 FLOPs/token, loss 2.2); every other "
        "architecture costs more FLOPs and reaches a higher loss.")


def test_format_answer_and_png(tmp_path):
    png = plot_front(E, tmp_path / "front.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = format_answer(E, png)
    assert "matched = best loss at <= 2e+05 FLOPs/token" in text
    assert "2.1500 ± 0.0300" in text and "width 32" in text and "lr 0.003" in text
    assert text.splitlines()[-1] == f"Picture of the front: {png}"
    assert format_answer([]) == "No architecture finished: nothing to compare yet."

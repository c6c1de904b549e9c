"""Level numbering against a known column: the true half-level of every structure is the
generator's, so each numbering is checked against where the structure was put, not against
a previous run."""

from __future__ import annotations

import numpy as np
import pytest

from instances import level_name, number_levels

HALF_LEVEL_MM = 15.0  # from a body's centre to the next disc's


def _column(rng: np.random.Generator, missing: set[int], jitter: float):
    """Discs at half-levels 1, 3, ..., 17 (L5/S1 .. T12/L1 and above) and bodies at 2, 4, ...,
    18, each moved by up to `jitter` half-levels; the half-levels in `missing` left out.
    Returns (vertebrae id -> height, discs id -> height, true numbers by id)."""
    vertebrae, discs, truth = {}, {}, {}
    for position in range(1, 19):
        if position in missing:
            continue
        height = (position + rng.uniform(-jitter, jitter)) * HALF_LEVEL_MM
        identifier = 1000 + position
        if position % 2:
            discs[identifier] = height
            truth[identifier] = (position + 1) // 2  # disc k sits below vertebra k
        else:
            vertebrae[identifier] = height
            truth[identifier] = position // 2
    return vertebrae, discs, truth


def test_a_complete_column_is_numbered_from_the_lowest_disc():
    vertebrae, discs, truth = _column(np.random.default_rng(0), set(), 0.15)
    numbers, disc_numbers, notes = number_levels(vertebrae, discs)
    assert {**numbers, **disc_numbers} == truth and notes == []
    assert level_name(numbers[1002]) == "L5" and level_name(numbers[1010]) == "L1"


@pytest.mark.parametrize(
    "missing",
    [
        {4},  # one vertebra (L4): the discs around it are one gap of 2 half-levels apart
        {5},  # one disc
        {4, 5},  # a vertebra and the disc above it: 3 half-levels, other kind
        {5, 6, 7},  # disc, vertebra, disc: 4 half-levels, same kind
        {4, 5, 6, 7},  # 5 half-levels
        {8, 9, 10, 11, 12},  # 6 half-levels: three levels lost at once
        {3, 4, 5, 9, 10},  # two separate gaps
    ],
)
def test_missing_levels_keep_every_name_above_them(missing):
    """Each gap is crossed by rounding its length to the nearest half-level count of the right
    parity; many jittered columns, so a gap of 2.6 or 3.4 half-levels occurs."""
    rng = np.random.default_rng(len(missing) * 100 + min(missing))
    for _ in range(40):
        vertebrae, discs, truth = _column(rng, missing, 0.2)
        numbers, disc_numbers, notes = number_levels(vertebrae, discs)
        assert {**numbers, **disc_numbers} == truth
        assert notes, "a gap must be noted"


def test_the_gap_rule_rounds_to_the_nearest_level():
    """Hand cases, H = 15 mm: a disc 2.6 H above a vertebra is 3 half-levels up (not 1); a
    vertebra 3.4 H above a vertebra is 4 up (not 2), and 2.4 H above it 2 up (not 4)."""
    h = HALF_LEVEL_MM
    # L5/S1 disc at 0, L5 at H, L4/L5 disc at 2 H, L4 at 3 H (half-levels 1 to 4)
    vertebrae, discs = {1: 1 * h, 2: 3 * h}, {11: 0.0, 12: 2 * h}
    _, disc_numbers, notes = number_levels(vertebrae, {**discs, 13: 3 * h + 2.6 * h})
    assert disc_numbers[13] == 4  # half-level 7: the L2/L3 disc (L3/L4 disc and L3 missing)
    assert notes == ["not found between L4 and L2/L3 disc: L3/L4 disc, L3"]
    for step, number in ((3.4, 3), (2.4, 2), (1.6, 2), (4.6, 3), (5.4, 4)):
        numbers, _, _ = number_levels({1: h, 3: h + step * h}, {11: 0.0})
        assert numbers[3] == number, step  # half-level 2 + the nearest even count


def test_numbers_are_integers_and_one_kind_alone_still_counts():
    h = HALF_LEVEL_MM
    numbers, disc_numbers, _ = number_levels({1: h, 2: 3 * h}, {11: 0.0, 12: 2 * h})
    assert all(type(n) is int for n in [*numbers.values(), *disc_numbers.values()])
    # vertebrae alone, 2 H apart (H is then half their median distance): L5, L4, L3
    numbers, discs, notes = number_levels({1: 0.0, 2: 2 * h, 3: 4 * h}, {})
    assert numbers == {1: 1, 2: 2, 3: 3} and discs == {}
    assert notes == ["no disc found: vertebrae counted upward from the lowest as L5"]
    # discs alone with a missing disc between: numbered across the gap, no gap note without
    # vertebrae to place it
    numbers, discs, notes = number_levels({}, {11: 0.0, 12: 2 * h, 13: 4 * h, 14: 8 * h})
    assert discs == {11: 1, 12: 2, 13: 3, 14: 5}
    assert notes == ["no vertebra found: discs counted upward from the lowest as L5/S1"]


def test_a_gap_above_a_lowest_vertebra_is_named():
    """No L5/S1 disc: the lowest vertebra is L5, and a missing L4 above it is noted by name."""
    h = HALF_LEVEL_MM
    numbers, discs, notes = number_levels({1: 0.0, 3: 4 * h}, {12: h, 13: 5 * h})
    assert numbers == {1: 1, 3: 3} and discs == {12: 2, 13: 4}
    assert notes[1] == "not found between L4/L5 disc and L3: L4, L3/L4 disc"


def test_disc_pieces_beyond_the_column_and_beside_a_single_structure():
    h = HALF_LEVEL_MM
    vertebrae, discs = {1: h, 2: 3 * h}, {11: 0.0, 12: 2 * h}
    # a piece 1.9 H above the top vertebra (L4): nearest the L3/L4 disc (2 H would be L3)
    assert number_levels(vertebrae, discs, {20: 3 * h + 0.9 * h})[1][20] == 3
    assert number_levels(vertebrae, discs, {21: 3 * h + 3.1 * h})[1][21] == 4  # L2/L3
    # one structure only: no scale, the piece takes the lowest disc number the column allows
    assert number_levels({}, {11: 0.0}, {22: 3 * h})[1] == {11: 1, 22: 1}
    assert number_levels({1: 0.0}, {}, {23: 3 * h})[1] == {23: 1}

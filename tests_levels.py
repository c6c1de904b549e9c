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

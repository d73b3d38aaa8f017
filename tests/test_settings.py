"""The checks every settings record applies (medcam3d.settings), and the records built on them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from medcam3d.errors import UsageError
from medcam3d.segment_records import SegmentSettings
from medcam3d.settings import Settings, check_number, check_numbers, check_range, check_whole
from medcam3d.weak import SeedSettings, TrainSettings


def test_check_number_returns_the_float_and_names_field_rule_and_value():
    assert check_number(3, "margin_mm") == 3.0 and isinstance(check_number(3, "margin_mm"), float)
    assert check_number(np.float32(0.5), "beta") == 0.5
    assert check_number(2.5, "reach", minimum=2.5) == 2.5
    with pytest.raises(UsageError, match=r"^margin_mm must be a finite number >= 0, not -1\.0\.$"):
        check_number(-1.0, "margin_mm")
    with pytest.raises(UsageError, match=r"^seed setting reach must be a finite number >= 5 \(at least\), not 2\.$"):
        check_number(2, "reach", minimum=5, note=" (at least)", prefix="seed setting ")
    for bad in (float("nan"), float("inf"), True, "1", None):
        with pytest.raises(UsageError, match="must be a finite number"):
            check_number(bad, "x")


def test_check_range_open_and_closed_ends():
    assert check_range(1, "candidate", 0, 1, low_open=True) == 1.0
    assert check_range(0, "background", 0, 1, high_open=True) == 0.0
    with pytest.raises(UsageError, match=r"^candidate must lie in \(0, 1\], not 0\.$"):
        check_range(0, "candidate", 0, 1, low_open=True)
    with pytest.raises(UsageError, match=r"^quantile must lie in \(0, 1\) \(e\.g\. 0\.9\), not 1\.0\.$"):
        check_range(1.0, "quantile", 0, 1, low_open=True, high_open=True, note=" (e.g. 0.9)")
    with pytest.raises(UsageError, match=r"^decay must lie in \[0, 1\], not 1\.5\.$"):
        check_range(1.5, "decay", 0, 1)
    for bad in (float("nan"), False, "0.5"):
        with pytest.raises(UsageError, match="must lie in"):
            check_range(bad, "x", 0, 1)


def test_check_whole_refuses_floats_and_bools():
    assert check_whole(np.int64(3), "epochs") == 3 and isinstance(check_whole(np.int64(3), "epochs"), int)
    assert check_whole(0, "iterations", minimum=0) == 0
    for bad in (0, 2.0, True, "2"):
        with pytest.raises(UsageError, match=r"^epochs must be a whole number >= 1, not "):
            check_whole(bad, "epochs")


def test_check_numbers_reads_each_named_field():
    @dataclass(frozen=True)
    class Record(Settings):
        a: float = 1.0
        b: float = -2.0

    check_numbers(Record(), ("a",))
    with pytest.raises(UsageError, match=r"^b must be a finite number >= 0, not -2\.0\.$"):
        check_numbers(Record(), ("a", "b"))
    assert Record().to_dict() == {"a": 1.0, "b": -2.0}


def test_the_settings_records_use_the_checks_and_write_their_fields():
    with pytest.raises(UsageError, match=r"^foreground must lie in \(0, 1\] \(a fraction of the map's maximum\), not 1\.5\.$"):
        SegmentSettings(foreground=1.5)
    with pytest.raises(UsageError, match=r"^background must lie in \[0, 0\.4\) \(below candidate"):
        SegmentSettings(candidate=0.4, background=0.5)
    with pytest.raises(UsageError, match=r"^iterations must be a whole number >= 0, not -1\.$"):
        SegmentSettings(iterations=-1)
    with pytest.raises(UsageError, match=r"^seed setting region_radius must be a finite number >= 0, not -1\.0\.$"):
        SeedSettings(region_radius=-1.0)
    with pytest.raises(UsageError, match=r"^seed setting background_reach must be a finite number >= 5 "):
        SeedSettings(background_distance=5.0, background_reach=2.0)
    with pytest.raises(UsageError, match=r"^decay must lie in \[0, 1\] \(0: max pooling, 1: mean\), not 2\.0\.$"):
        TrainSettings(decay=2.0)
    with pytest.raises(UsageError, match=r"^batch_size must be a whole number >= 1, not 0\.$"):
        TrainSettings(batch_size=0)
    written = json.loads(json.dumps(SegmentSettings(margin_mm=4.0).to_dict()))
    assert written["margin_mm"] == 4.0 and written["method"] == "random_walker" and len(written) == 14
    assert SeedSettings(quantile=0.7).to_dict()["quantile"] == 0.7
    assert TrainSettings(epochs=2).to_dict()["epochs"] == 2

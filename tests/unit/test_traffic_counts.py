from __future__ import annotations

from collections import Counter

from forecast_lab.traffic import Received


def test_exactly_once_needs_every_sequence_number_once() -> None:
    r = Received(Counter({"t 0": 1, "t 1": 1, "t 2": 1, "other 0": 5}))
    assert r.exactly_once("t", 3)
    assert not r.exactly_once("t", 4)  # one lost
    assert r.total("other") == 5


def test_duplicates_are_not_exactly_once() -> None:
    r = Received(Counter({"t 0": 1, "t 1": 2}))
    assert not r.exactly_once("t", 2)
    assert r.for_tag("t") == Counter({0: 1, 1: 2})


def test_tags_do_not_bleed_into_each_other() -> None:
    r = Received(Counter({"lan-ab 0": 1, "lan-abc 0": 1}))
    assert r.for_tag("lan-ab") == Counter({0: 1})


def test_padding_is_not_part_of_the_sequence_number() -> None:
    r = Received(Counter({"t 0 .......": 1, "t 1 ...": 1}))
    assert r.exactly_once("t", 2)

"""The arrival gate: places plus queued items never exceed the capacity."""

from __future__ import annotations

import pytest

from service.http.admission import ArrivalGate, NoPlace


def test_places_and_queued_items_share_the_capacity():
    queued = [0]
    gate = ArrivalGate(3, lambda: queued[0])
    a, b = gate.enter(), gate.enter()
    queued[0] = 1
    with pytest.raises(NoPlace, match="1 requests queued and 2 arriving"):
        gate.enter()
    a.release()  # a was queued: its place goes back, the queue counts it
    queued[0] = 2
    with pytest.raises(NoPlace):
        gate.enter()
    b.release()
    with gate.enter():
        assert gate.arriving == 1
    assert gate.arriving == 0


def test_release_is_idempotent():
    gate = ArrivalGate(1, lambda: 0)
    with gate.enter() as place:
        place.release()  # queued
    # leaving the block released nothing twice
    assert gate.arriving == 0
    gate.enter()
    with pytest.raises(NoPlace):
        gate.enter()

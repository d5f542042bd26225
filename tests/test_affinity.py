"""Requests' pins (tts_server/affinity.py): random or prompt-derived ids, keys per scope, what
is released and when."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from tts_server.affinity import Affinity, Pins


def test_ids_are_random_and_opaque() -> None:
    ids = {Affinity.new().id for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_request_scope_gives_every_label_the_requests_key() -> None:
    pin = Affinity("abc", "request")
    assert pin.keys(["0", "1"], 2) == ["abc", "abc"]
    assert pin.keys(None, 3) == ["abc"] * 3
    assert pin.issued_keys() == ["abc"]


def test_subtree_scope_gives_each_label_its_own_key() -> None:
    pin = Affinity("abc", "subtree")
    assert pin.keys(["0", "1", "0"], 3) == ["abc-0", "abc-1", "abc-0"]
    assert pin.key() == "abc"  # a PRM call, a tokenize: the request's own
    assert pin.issued_keys() == ["abc", "abc-0", "abc-1"]


def test_one_label_per_prompt() -> None:
    with pytest.raises(ValueError, match="2 affinity labels for 3 prompts"):
        Affinity("abc").keys(["0", "1"], 3)


def test_random_pins_are_each_requests_own_and_released_at_once() -> None:
    pins = Pins()
    first, second = pins.acquire("same question"), pins.acquire("same question")
    assert first.id != second.id
    assert pins.held == 2
    first.key()
    assert pins.release(first) == [first.id]
    assert pins.shared == 0 and pins.held == 1


def test_prompt_pins_are_shared_by_the_same_prompt_and_released_after_the_last() -> None:
    pins = Pins("subtree", "prompt", secret="s3cret")
    first = pins.acquire("Tom has 3 apples.")
    second = pins.acquire("Tom has 3 apples.")
    other = pins.acquire("Ann has 4 pears.")
    assert first is second and first.holders == 2
    assert other.id != first.id and pins.shared == 2 and pins.held == 2
    first.key()
    second.key("1")  # the second request's DVTS subtree
    assert pins.release(first) == []  # the second one still holds it
    assert pins.release(second) == [first.id, f"{first.id}-1"]
    assert pins.shared == 1 and pins.held == 1
    # A later request with that prompt gets the same pin afresh.
    again = pins.acquire("Tom has 3 apples.")
    assert again.id == first.id and again.holders == 1 and again.issued_keys() == []


def test_prompt_pins_are_keyed_digests_that_do_not_carry_the_prompt() -> None:
    prompt = "Tom has 3 apples."
    expected = hmac.new(b"s3cret", prompt.encode(), hashlib.sha256).hexdigest()[:32]
    assert Pins(key="prompt", secret="s3cret").acquire(prompt).id == expected
    # Without a configured secret each process draws its own: no one can recompute the pin.
    assert Pins(key="prompt").acquire(prompt).id != Pins(key="prompt").acquire(prompt).id
    assert Pins(key="prompt", secret="other").acquire(prompt).id != expected

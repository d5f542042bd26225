"""One request's pin (tts_server/affinity.py): random ids, keys per scope, what is released."""

from __future__ import annotations

import pytest

from tts_server.affinity import Affinity


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

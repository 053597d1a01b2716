"""p2p.proto.ymap: root-map sets read from and written to Yjs updates without a
document, checked against what pycrdt writes and reads."""

from __future__ import annotations

import pycrdt
import pytest

from p2p.proto.model import side_heads
from p2p.proto.ymap import encode_sets, read_structs, value_at
from p2p.proto.ysplit import trim_update
from p2p.proto.yupdate import check_update


def _doc(client: int) -> tuple[pycrdt.Doc, pycrdt.Map, pycrdt.Map]:  # type: ignore[type-arg]
    doc: pycrdt.Doc = pycrdt.Doc(client_id=client)  # type: ignore[type-arg]
    return doc, doc.get("m", type=pycrdt.Map), doc.get("v", type=pycrdt.Map)


def test_structs_read_as_pycrdt_wrote_them() -> None:
    doc, m, v = _doc(7)
    before = doc.get_state()
    long = "é" * 200  # past the fast lane's short strings
    with doc.transaction():
        m["a"] = {"x": "1", "long": long}
        v["dev"] = {"b": "r1"}
        m["n"] = {"f": 1.5, "i": 3, "t": True, "nil": None, "nest": [1, {"k": "v"}]}
    update = bytes(doc.get_update(before))
    check_update(update, "s")
    structs, deleted = read_structs(update)
    assert deleted == []
    assert [(s.client, s.clock, s.name, s.key, s.origin) for s in structs] == [
        (7, 0, "m", "a", None),
        (7, 1, "v", "dev", None),
        (7, 2, "m", "n", None),
    ]
    values = [value_at(update, s.values_at) for s in structs]
    assert values == [m["a"], v["dev"], m["n"]]
    after = doc.get_state()
    v["dev"] = {"b": "r2"}
    replaced = bytes(doc.get_update(after))
    [again], deleted = read_structs(replaced)
    assert again.origin == (7, 1)
    assert again.name is None
    assert deleted == [(7, 1, 1)]


def test_sets_written_by_hand_are_what_map_set_makes() -> None:
    doc, m, v = _doc(9)
    with doc.transaction():
        v["dev"] = {"b": "r1"}
        m["a"] = {"x": "1"}
    written = encode_sets(9, 2, [("v", "dev", {"b": "r2"}, (9, 0)), ("m", "z", {"q": "é"}, None)])
    check_update(written, "s")
    other = pycrdt.Doc()
    other.apply_update(doc.get_update())
    other.apply_update(written)
    assert dict(other.get("v", type=pycrdt.Map).items()) == {"dev": {"b": "r2"}}
    assert other.get("m", type=pycrdt.Map)["z"] == {"q": "é"}
    heads = side_heads(bytes(other.get_update()))
    assert heads == {("v", "dev"): (9, 2, {"b": "r2"})}


def test_side_heads_follow_a_merged_run_of_replaced_items() -> None:
    """yrs merges consecutive replaced items into one deleted struct; the live item's
    origin points inside it."""
    doc, _m, v = _doc(5)
    for n in range(6):
        v["dev"] = {"b": f"r{n}"}
    full = bytes(doc.get_update())
    structs, _ = read_structs(full)
    assert any(s.length > 1 for s in structs)  # the merged run
    assert side_heads(full) == {("v", "dev"): (5, 5, {"b": "r5"})}


@pytest.mark.parametrize("held", [0, 1, 3, 6])
def test_trim_leaves_out_what_a_replica_holds(held: int) -> None:
    doc, m, _v = _doc(3)
    updates = []
    for n in range(6):
        before = doc.get_state()
        m[f"k{n}"] = {"n": str(n)}
        updates.append(bytes(doc.get_update(before)))
    whole = bytes(doc.get_update())
    trimmed = trim_update(whole, {3: held})
    if held == 6:
        assert trimmed is None
        return
    assert trimmed is not None
    # nothing held: the very bytes, not a copy (a snapshot of 100 MB is sent as it is)
    assert (trimmed is whole) == (held == 0)
    structs, _ = read_structs(trimmed)
    assert [s.clock for s in structs] == list(range(held, 6))
    peer = pycrdt.Doc()
    for update in updates[:held]:
        peer.apply_update(update)
    peer.apply_update(trimmed)
    assert peer.get_state() == doc.get_state()

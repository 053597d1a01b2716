"""Keys and the signed device list: rules, signatures, rollback, corruption, secrecy."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from p2p.errors import (
    DeviceListError,
    MalformedFrame,
    RemovedDevice,
    RollbackRefused,
    TooManyDevices,
    UnknownDevice,
    WireError,
)
from p2p.proto.identity import (
    DOMAIN_DEVICE_LIST,
    MAX_COMPANIONS,
    AccountKey,
    DeviceEntry,
    DeviceKeys,
    DeviceList,
    accept_device_list,
    parse_device_list,
    short_id,
)
from p2p.proto.wire import pack


def companion(account: AccountKey, keys: DeviceKeys, name: str = "laptop") -> DeviceEntry:
    return DeviceEntry.of(keys, account.public_key, name, "companion")


@pytest.fixture
def account() -> AccountKey:
    return AccountKey.generate()


@pytest.fixture
def primary() -> DeviceKeys:
    return DeviceKeys.generate()


@pytest.fixture
def v1(account: AccountKey, primary: DeviceKeys) -> DeviceList:
    return DeviceList.create(account, primary, "phone")


def full_list(account: AccountKey, v1: DeviceList) -> tuple[DeviceList, list[DeviceKeys]]:
    """A list with the primary and the maximum number of companions."""
    keys = [DeviceKeys.generate() for _ in range(MAX_COMPANIONS)]
    dl = v1
    for i, k in enumerate(keys):
        dl = dl.with_device(account, companion(account, k, f"companion-{i}"))
    return dl, keys


# ---- create / add / remove --------------------------------------------------------


def test_create(account: AccountKey, primary: DeviceKeys, v1: DeviceList) -> None:
    assert v1.version == 1
    assert v1.account_pk == account.public_key
    assert v1.account_id == account.account_id == short_id(account.public_key)
    assert v1.ids == {primary.device_id}
    assert v1.primary.device_id == primary.device_id
    assert v1.primary.name == "phone"
    assert v1.removed == ()
    assert len(v1.signature) == 64
    v1.verify(account.public_key)


def test_with_device(account: AccountKey, v1: DeviceList) -> None:
    laptop = DeviceKeys.generate()
    v2 = v1.with_device(account, companion(account, laptop))
    assert v2.version == 2
    assert v2.ids == v1.ids | {laptop.device_id}
    assert v2.entry(laptop.device_id).role == "companion"
    assert v2.entry(laptop.device_id).box_pk == laptop.box_pk
    v2.verify(account.public_key)
    assert v1.version == 1  # frozen values: the old list is untouched


def test_with_device_twice_refused(account: AccountKey, v1: DeviceList) -> None:
    laptop = DeviceKeys.generate()
    v2 = v1.with_device(account, companion(account, laptop))
    with pytest.raises(DeviceListError):
        v2.with_device(account, companion(account, laptop, "again"))


def test_without_device(account: AccountKey, v1: DeviceList) -> None:
    laptop = DeviceKeys.generate()
    v2 = v1.with_device(account, companion(account, laptop))
    v3 = v2.without_device(account, laptop.device_id)
    assert v3.version == 3
    assert laptop.device_id not in v3.ids
    assert laptop.device_id in v3.removed_ids
    # a removed device's key stays known, to check what it wrote while linked
    assert v3.signing_key_of(laptop.device_id) == laptop.sign_pk
    v3.verify(account.public_key)
    with pytest.raises(DeviceListError):  # and it cannot come back
        v3.with_device(account, companion(account, laptop))


def test_primary_cannot_be_removed(
    account: AccountKey, primary: DeviceKeys, v1: DeviceList
) -> None:
    with pytest.raises(DeviceListError):
        v1.without_device(account, primary.device_id)


def test_only_the_account_key_signs(account: AccountKey, v1: DeviceList) -> None:
    with pytest.raises(DeviceListError):
        v1.with_device(AccountKey.generate(), companion(account, DeviceKeys.generate()))


def test_fifth_companion_refused(account: AccountKey, v1: DeviceList) -> None:
    dl, _ = full_list(account, v1)
    assert len(dl.devices) == 1 + MAX_COMPANIONS
    dl.verify(account.public_key)
    with pytest.raises(TooManyDevices):
        dl.with_device(account, companion(account, DeviceKeys.generate(), "fifth"))


def test_removing_frees_a_companion_slot(account: AccountKey, v1: DeviceList) -> None:
    dl, keys = full_list(account, v1)
    dl = dl.without_device(account, keys[0].device_id)
    dl = dl.with_device(account, companion(account, DeviceKeys.generate(), "new"))
    assert len(dl.devices) == 1 + MAX_COMPANIONS


# ---- verify -----------------------------------------------------------------------


def test_verify_refuses_another_account(v1: DeviceList) -> None:
    with pytest.raises(DeviceListError, match="another account"):
        v1.verify(AccountKey.generate().public_key)


def test_list_signed_by_another_account_key_refused(
    account: AccountKey, primary: DeviceKeys, v1: DeviceList
) -> None:
    """The list names our account but another key signed it."""
    other = AccountKey.generate()
    forged = replace(v1, signature=other.sign(DOMAIN_DEVICE_LIST, v1._body()))
    with pytest.raises(DeviceListError):
        forged.verify(account.public_key)
    # a whole list of another account, offered as ours
    theirs = DeviceList.create(other, primary, "phone")
    with pytest.raises(DeviceListError):
        theirs.verify(account.public_key)
    with pytest.raises(DeviceListError):
        accept_device_list(v1, theirs)
    with pytest.raises(DeviceListError):
        parse_device_list(theirs.encode(), account.public_key)


def test_verify_refuses_edited_content(account: AccountKey, v1: DeviceList) -> None:
    laptop = DeviceKeys.generate()
    v2 = v1.with_device(account, companion(account, laptop))
    for edited in (
        replace(v2, version=3),
        replace(v2, max_companions=10),
        replace(v2, devices=v2.devices[:1]),
        replace(v2, devices=v2.devices[:1], removed=v2.devices[1:]),
        replace(v2, devices=(v2.devices[0], replace(v2.devices[1], name="evil"))),
        replace(v2, signature=bytes(64)),
        replace(v2, signature=b""),
    ):
        with pytest.raises(DeviceListError):
            edited.verify(account.public_key)


def test_verify_checks_rules_even_when_signed(account: AccountKey, primary: DeviceKeys) -> None:
    """A correctly signed list that breaks the rules is still refused."""
    two_primaries = DeviceList(
        account_pk=account.public_key,
        version=1,
        devices=(
            DeviceEntry(name="a", role="primary", sign_pk=primary.sign_pk, box_pk=primary.box_pk),
            DeviceEntry(
                name="b",
                role="primary",
                sign_pk=DeviceKeys.generate().sign_pk,
                box_pk=primary.box_pk,
            ),
        ),
    )
    signed = replace(
        two_primaries, signature=account.sign(DOMAIN_DEVICE_LIST, two_primaries._body())
    )
    with pytest.raises(DeviceListError, match="one primary"):
        signed.verify(account.public_key)


# ---- accepting a newer list -------------------------------------------------------


def test_accept_newer(account: AccountKey, v1: DeviceList) -> None:
    v2 = v1.with_device(account, companion(account, DeviceKeys.generate()))
    assert accept_device_list(v1, v2) == v2
    assert accept_device_list(v2, v2) is v2


def test_rollback_refused(account: AccountKey, v1: DeviceList) -> None:
    laptop = DeviceKeys.generate()
    v2 = v1.with_device(account, companion(account, laptop))
    v3 = v2.without_device(account, laptop.device_id)
    for older in (v1, v2):
        with pytest.raises(RollbackRefused) as info:
            accept_device_list(v3, older)
        assert info.value.offered == older.version
        assert info.value.current == 3
    assert issubclass(RollbackRefused, DeviceListError)


def test_same_version_other_content_refused(account: AccountKey, v1: DeviceList) -> None:
    """Two lists signed with one version number: a fork, refused both ways."""
    a = v1.with_device(account, companion(account, DeviceKeys.generate(), "a"))
    b = v1.with_device(account, companion(account, DeviceKeys.generate(), "b"))
    assert a.version == b.version == 2
    with pytest.raises(DeviceListError, match="two different"):
        accept_device_list(a, b)
    with pytest.raises(DeviceListError, match="two different"):
        accept_device_list(b, a)


# ---- entries ----------------------------------------------------------------------


def test_entry_removed_and_unknown(account: AccountKey, v1: DeviceList) -> None:
    laptop, stranger = DeviceKeys.generate(), DeviceKeys.generate()
    v3 = v1.with_device(account, companion(account, laptop)).without_device(
        account, laptop.device_id
    )
    with pytest.raises(RemovedDevice) as removed:
        v3.entry(laptop.device_id)
    assert removed.value.device == laptop.device_id
    assert isinstance(removed.value, UnknownDevice)
    with pytest.raises(UnknownDevice) as unknown:
        v3.entry(stranger.device_id)
    assert not isinstance(unknown.value, RemovedDevice)
    assert unknown.value.device == stranger.device_id
    assert v3.signing_key_of(stranger.device_id) is None
    with pytest.raises(RemovedDevice):
        v3.without_device(account, laptop.device_id)


# ---- encoding ---------------------------------------------------------------------


def test_encode_decode_round_trip(account: AccountKey, v1: DeviceList) -> None:
    dl, keys = full_list(account, v1)
    dl = dl.without_device(account, keys[1].device_id)
    decoded = DeviceList.decode(dl.encode())
    assert decoded == dl
    assert parse_device_list(dl.encode(), account.public_key) == dl


def test_decode_refuses_junk_with_wire_errors(account: AccountKey, v1: DeviceList) -> None:
    body = v1._body()
    for data in (
        b"",
        b"\xc1",
        pack([body]),
        pack([body, v1.signature, b""]),
        pack({"a": body, "b": v1.signature}),
        pack("ab"),
        pack(b"ab"),
        pack([[1, 2], v1.signature]),
        pack([body, v1.signature[:63]]),
        pack([pack([v1.account_pk, 1, [], []]), v1.signature]),
        pack([pack([v1.account_pk, 0, [], [], 4]), v1.signature]),
        pack([pack([v1.account_pk, True, [], [], 4]), v1.signature]),
        pack([pack([v1.account_pk, 1, [[1, 2, 3, 4]], [], 4]), v1.signature]),
        pack(
            [pack([v1.account_pk, 1, [["n", "king", b"k" * 32, b"b" * 32]], [], 4]), v1.signature]
        ),
        bytes(64 * 1024 + 1),
    ):
        with pytest.raises(WireError):
            DeviceList.decode(data)
        with pytest.raises(DeviceListError):
            parse_device_list(data, account.public_key)


def test_decode_refuses_non_canonical_body(account: AccountKey, v1: DeviceList) -> None:
    """The same values packed another way would let one signature cover two byte strings."""
    body = bytearray(v1._body())
    # version 1 is a positive fixint (0x01) right after the 34-byte bin8 account key
    assert body[1 + 34] == 0x01
    non_canonical = bytes(body[:35]) + b"\xcc\x01" + bytes(body[36:])
    with pytest.raises(MalformedFrame, match="canonical"):
        DeviceList.decode(pack([non_canonical, v1.signature]))


def test_every_corruption_of_an_encoded_list_is_refused(
    account: AccountKey, v1: DeviceList
) -> None:
    """Flip every bit of every byte, and write a random byte at every position: each
    result is refused with DeviceListError by ``parse_device_list``, or (never seen, but
    harmless) decodes to exactly the same list."""
    laptop = DeviceKeys.generate()
    dl = v1.with_device(account, companion(account, laptop)).with_device(
        account, companion(account, DeviceKeys.generate(), "tablet")
    )
    dl = dl.without_device(account, laptop.device_id)
    data = dl.encode()
    rng = random.Random(1234)
    variants: list[bytes] = []
    for pos in range(len(data)):
        for bit in range(8):
            b = bytearray(data)
            b[pos] ^= 1 << bit
            variants.append(bytes(b))
        b = bytearray(data)
        b[pos] = rng.choice([v for v in range(256) if v != data[pos]])
        variants.append(bytes(b))
    for cut in range(len(data)):
        variants.append(data[:cut])
    variants.append(data + b"\x00")
    refused = 0
    for corrupt in variants:
        try:
            parsed = parse_device_list(corrupt, account.public_key)
        except DeviceListError:
            refused += 1
            continue
        assert parsed == dl, f"corrupt list accepted as a different list: {corrupt.hex()}"
    assert refused == len(variants)


# ---- key secrecy ------------------------------------------------------------------


def test_reprs_never_show_private_keys() -> None:
    keys, account = DeviceKeys.generate(), AccountKey.generate()
    for secret_holder, secrets in (
        (keys, [keys.signing_seed, keys.box_secret]),
        (account, [account.seed]),
    ):
        for text in (repr(secret_holder), str(secret_holder), f"{secret_holder!r}"):
            for secret in secrets:
                assert secret.hex() not in text
                assert repr(secret) not in text
                assert str(list(secret)) not in text
                assert secret.hex().upper() not in text


# ---- device key records -----------------------------------------------------------


def test_device_keys_record_round_trip() -> None:
    keys = DeviceKeys.generate()
    again = DeviceKeys.from_record(keys.to_record())
    assert again == keys
    assert again.device_id == keys.device_id
    assert again.box_pk == keys.box_pk
    assert again.sign(b"d", b"m") == keys.sign(b"d", b"m")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        pack([b"x" * 32]),
        pack([b"x" * 32, b"y" * 31]),
        pack([b"x" * 32, "y" * 32]),
        pack([b"x" * 32, b"y" * 32, b"z" * 32]),
        pack({"a": 1}),
    ],
)
def test_device_keys_record_refuses_junk(data: bytes) -> None:
    with pytest.raises(WireError):
        DeviceKeys.from_record(data)


def test_device_id_is_short_hash_of_signing_key(account: AccountKey) -> None:
    keys = DeviceKeys.generate()
    assert keys.device_id == short_id(keys.sign_pk)
    assert len(keys.device_id) == 16
    assert companion(account, keys).device_id == keys.device_id


def test_a_link_in_progress_lists_nobody_and_no_later_list_reuses_its_version() -> None:
    """The primary signs the list adding a new device before sending it, but adopts it
    only when the device confirms its history. Whatever it signs meanwhile skips that
    version: a device that kept the unadopted list holds an older list, never a fork."""
    from test_sync_session import new_account

    from p2p.state.device import DeviceState
    from p2p.storage.memory import MemoryStore

    phone, [laptop] = new_account("laptop")
    entry = DeviceEntry.of(
        DeviceKeys.generate(), phone.device_list.account_pk, "tablet", "companion"
    )
    base = phone.device_list
    bundle, proposed, batch = phone.propose_enrollment(entry)
    assert phone.device_list is base  # nobody listed yet
    assert entry.device_id in proposed.ids
    assert bundle.device_list == proposed.encode()
    assert proposed.version == base.version + 1
    assert set(batch.records) == {"account/floor"}
    # the link is abandoned; the primary unlinks the laptop: a version past the proposal's
    phone.unlink(laptop.device_id)
    assert phone.device_list.version == proposed.version + 1
    assert accept_device_list(proposed, phone.device_list) is phone.device_list
    # a link that completes after such a change adds the device to the current list
    phone.adopt_enrollment(base, proposed, entry)
    assert entry.device_id in phone.device_list.ids
    assert laptop.device_id in phone.device_list.removed_ids
    assert phone.device_list.version == proposed.version + 2
    # the floor survives a restart
    store = MemoryStore()
    fresh, created = DeviceState.create_account("phone")
    store.write(created)
    for name in ("web", "desk"):  # two links, neither completed
        new = DeviceEntry.of(DeviceKeys.generate(), fresh.device_list.account_pk, name, "companion")
        _, _, floor = fresh.propose_enrollment(new)
    store.write(floor)
    assert DeviceState.load(store).list_floor == fresh.device_list.version + 2

"""bridge/keys.py: every key of an account is in the account's Redis Cluster
slot, and ``hash_tag`` reads a key's tag as Redis Cluster does (redis-py's
``key_slot``, the CRC16 of the tag, is the oracle)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from bridge import keys

ACCOUNTS = st.from_regex(r"[a-z]{1,8}\.[A-Za-z0-9_-]{1,24}", fullmatch=True)
PARTS = st.lists(st.text(st.characters(blacklist_categories=["Cs"]), max_size=12), max_size=3)
PREFIXES = st.from_regex(r"[a-z]{1,6}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(prefix=PREFIXES, account=ACCOUNTS, parts=PARTS, channel=st.text(max_size=20))
def test_every_key_of_an_account_is_in_its_slot(prefix: str, account: str, parts: list[str], channel: str) -> None:
    of_account = [
        keys.inbound_key(prefix, account),
        keys.outbound_key(prefix, account),
        keys.account_key(prefix, account, *parts),
        keys.rooms_key(prefix, account),
        keys.key_layout_key(prefix, account),
        keys.id_map_key(prefix, account, channel),
        keys.lease_key(prefix, account),
        keys.fence_key(prefix, account),
        keys.paused_key(prefix, account),
        keys.restart_key(prefix, account),
        keys.state_key(prefix, account),
        keys.degraded_key(prefix, account),
    ]
    assert {keys.hash_tag(key) for key in of_account} == {account}
    assert {key_slot(key.encode()) for key in of_account} == {key_slot(account.encode())}


@settings(max_examples=500, deadline=None)
@given(key=st.text(st.sampled_from("ab{}:"), max_size=12) | st.text(max_size=30))
def test_hash_tag_is_what_redis_cluster_hashes(key: str) -> None:
    tag = keys.hash_tag(key)
    assert key_slot(key.encode()) == key_slot((key if tag is None else tag).encode())


def test_a_dead_letter_names_the_inbound_stream_as_it_is_now() -> None:
    assert keys.current_stream_name("tb", "tb:in:api.a") == keys.inbound_key("tb", "api.a")
    for now in (keys.inbound_key("tb", "api.a"), keys.outbound_key("tb", "api.b"), "tb:in:", "other:in:api.a"):
        assert keys.current_stream_name("tb", now) == now

"""spillcache.policy: eviction order."""

from __future__ import annotations

import pytest

from spillcache.policy import LRUPolicy, make_policy


def filled(*rids: int) -> LRUPolicy:
    policy = LRUPolicy()
    for rid in rids:
        policy.insert(rid)
    return policy


def test_empty_policy_has_no_victims():
    policy = LRUPolicy()
    assert list(policy.victims()) == []
    assert len(policy) == 0
    assert 0 not in policy


def test_victims_in_insertion_order():
    policy = filled(3, 1, 2)
    assert list(policy.victims()) == [3, 1, 2]
    assert len(policy) == 3
    assert 1 in policy and 4 not in policy


def test_touch_makes_most_recently_used():
    policy = filled(1, 2, 3)
    policy.touch(1)
    assert list(policy.victims()) == [2, 3, 1]
    policy.touch(3)
    assert list(policy.victims()) == [2, 1, 3]


def test_touch_of_unknown_id_adds_nothing():
    policy = filled(1, 2)
    policy.touch(7)
    assert 7 not in policy
    assert list(policy.victims()) == [1, 2]


def test_insert_again_moves_to_the_end_without_duplicating():
    policy = filled(1, 2, 3)
    policy.insert(1)
    assert list(policy.victims()) == [2, 3, 1]
    assert len(policy) == 3


def test_remove():
    policy = filled(1, 2, 3)
    policy.remove(2)
    assert list(policy.victims()) == [1, 3]
    assert 2 not in policy
    policy.remove(2)  # removing an absent id is harmless
    policy.remove(99)
    assert list(policy.victims()) == [1, 3]


def test_removed_then_reinserted_is_most_recent():
    policy = filled(1, 2, 3)
    policy.remove(1)
    policy.insert(1)
    assert list(policy.victims()) == [2, 3, 1]


def test_victims_is_a_snapshot_safe_to_mutate_during_iteration():
    policy = filled(1, 2, 3, 4)
    seen = []
    for rid in policy.victims():
        seen.append(rid)
        policy.remove(rid)
        policy.insert(rid + 100)  # what a cache does when it moves a record
        policy.touch(4)
    assert seen == [1, 2, 3, 4]
    assert list(policy.victims()) == [101, 102, 103, 104]


def test_victims_does_not_see_later_changes():
    policy = filled(1, 2)
    victims = policy.victims()
    policy.insert(3)
    policy.remove(1)
    assert list(victims) == [1, 2]


def test_make_policy_lru():
    policy = make_policy("lru")
    assert isinstance(policy, LRUPolicy)
    assert policy.name == "lru"
    # A fresh, independent object each time.
    other = make_policy("lru")
    policy.insert(1)
    assert 1 not in other


@pytest.mark.parametrize("name", ["nope", "", "fifo?"])
def test_make_policy_unknown_name(name):
    with pytest.raises(ValueError, match="policy"):
        make_policy(name)

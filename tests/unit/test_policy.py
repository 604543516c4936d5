"""spillcache._internal.engine.tiers: eviction policies and their order."""

from __future__ import annotations

import pytest

from spillcache._internal.engine.tiers import LRUPolicy, ScanPolicy, make_policy, merged_victims


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


# ------------------------------------------------------------------ scan


def newcomer_victims(policy, batch: int) -> list[int]:
    """What a record of ``batch`` may evict in its own cache, as placement asks for it."""
    return list(merged_victims([policy], policy.bypass_score(batch)))


def scan_with(members: dict[int, int], position: int, num_batches: int) -> ScanPolicy:
    """A scan policy holding ``rid -> batch``, with the reader at ``position``."""
    policy = ScanPolicy()
    for rid, batch in members.items():
        policy.insert(rid, batch)
    policy.reached(position, num_batches)
    return policy


def test_scan_distance_follows_the_cyclic_order():
    policy = scan_with({}, position=3, num_batches=8)
    assert [policy.distance(b) for b in range(8)] == [5, 6, 7, 8, 1, 2, 3, 4]


def test_scan_before_any_read_expects_batch_0_first():
    policy = ScanPolicy()
    for rid in range(4):
        policy.insert(rid, batch=rid)
    assert list(policy.victims()) == [3, 2, 1, 0]


def test_scan_evicts_the_furthest_next_use_first():
    # Reader just took batch 2 of 6: batch 2 is needed last, batch 3 first.
    policy = scan_with({10: 0, 11: 2, 12: 3, 13: 5}, position=2, num_batches=6)
    assert list(policy.victims()) == [11, 10, 13, 12]


def test_scan_offers_only_victims_needed_later_than_the_newcomer():
    policy = scan_with({10: 0, 11: 2, 12: 3, 13: 5}, position=2, num_batches=6)
    # A record for batch 4 (distance 2) may evict those needed after it, not batch 3.
    assert newcomer_victims(policy, 4) == [11, 10, 13]
    # A record for the batch just read (distance 6, the furthest) evicts nothing: it bypasses.
    assert newcomer_victims(policy, 2) == []


def test_scan_keeps_all_records_of_a_batch_together():
    policy = scan_with({1: 0, 2: 0, 3: 1, 4: 1}, position=-1, num_batches=2)
    assert set(list(policy.victims())[:2]) == {3, 4}


def test_scan_remove_and_reinsert_moves_a_record_between_batches():
    policy = scan_with({1: 0, 2: 1}, position=-1, num_batches=2)
    policy.remove(1)
    assert 1 not in policy and len(policy) == 1
    policy.insert(2, batch=0)  # inserting again replaces the batch it belongs to
    assert newcomer_victims(policy, 1) == []
    assert list(policy.victims()) == [2]


def test_scan_counts_batches_past_the_known_number():
    # Appends can make a batch index beyond what the reader has seen.
    policy = scan_with({1: 9}, position=0, num_batches=4)
    assert policy.distance(9) == 9


def test_lru_ignores_batches_and_positions():
    policy = filled(1, 2, 3)
    policy.reached(2, 3)
    assert newcomer_victims(policy, 0) == [1, 2, 3]
    assert LRUPolicy.promotes_by_eviction and not ScanPolicy.promotes_by_eviction


def test_make_policy_scan():
    assert isinstance(make_policy("scan"), ScanPolicy)


# ----------------------------------------------------- scored, across caches


def test_scan_scored_is_furthest_next_use_first_as_fractions_of_a_pass():
    # Reader just took batch 2 of 8: batch 2 comes last (8/8), then 1, 0, 7, ...
    policy = scan_with({10: 3, 11: 1, 12: 6, 13: 2, 14: 1}, position=2, num_batches=8)
    scored = policy.scored()
    assert [rid for _, rid in scored] == [13, 11, 14, 12, 10]
    assert [score for score, _ in scored] == [1.0, 7 / 8, 7 / 8, 4 / 8, 1 / 8]
    # A newcomer may evict only records scoring above its own next use.
    assert policy.bypass_score(5) == 3 / 8


def test_lru_scored_is_least_recently_used_first():
    policy = filled(1, 2, 3)
    policy.touch(1)
    scored = policy.scored()
    assert [rid for _, rid in scored] == [2, 3, 1]
    assert scored[0][0] > scored[1][0] > scored[2][0]
    assert policy.bypass_score(0) == float("-inf")


def test_merged_victims_of_scan_policies_compare_fractions_of_each_pass():
    # Eight batches, reader before batch 0: batch 4 is 5/8 of a pass away, batch 6 7/8.
    eight = scan_with({1: 4, 2: 6, 3: 0}, position=-1, num_batches=8)
    # Four batches, reader took batch 2: batch 1 is 3/4 away (3 reads), batch 3 1/4.
    four = scan_with({4: 1, 5: 3}, position=2, num_batches=4)
    assert list(merged_victims([eight, four])) == [2, 4, 1, 5, 3]
    assert list(merged_victims([four, eight])) == [2, 4, 1, 5, 3]
    # For a newcomer of batch 1 of the eight (2/8): only those needed later go.
    assert list(merged_victims([eight, four], eight.bypass_score(1))) == [2, 4, 1]


def test_merged_victims_of_lru_policies_follow_one_clock():
    first, second = LRUPolicy(), LRUPolicy()
    first.insert(1)
    second.insert(2)
    first.insert(3)
    second.insert(4)
    first.touch(1)  # least recently used first: 2, 3, 4, 1
    assert list(merged_victims([first, second])) == [2, 3, 4, 1]
    assert list(merged_victims([second, first])) == [2, 3, 4, 1]

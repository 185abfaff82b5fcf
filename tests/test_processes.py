"""Tests of mrpo.data.processes: ``ordered_map`` keeps the items' order, reads them only as results are taken, and
raises a worker's exception in the caller (tokenization through it is tests/test_tokenization.py's)."""

import itertools
import operator

import pytest

from mrpo.data.processes import IN_FLIGHT_PER_WORKER, ordered_map


def test_in_this_process_and_in_workers_the_results_come_in_order():
    items = list(range(50))
    assert list(ordered_map(operator.add, 10, items, num_proc=None)) == [i + 10 for i in items]
    assert list(ordered_map(operator.add, 10, items, num_proc=2)) == [i + 10 for i in items]


def test_items_are_read_as_results_are_taken_and_a_worker_error_is_raised_here():
    read = []

    def endless():
        for i in itertools.count():
            read.append(i)
            yield i

    results = ordered_map(operator.add, 10, endless(), num_proc=2)
    assert [next(results) for _ in range(3)] == [10, 11, 12]
    assert len(read) <= 3 + IN_FLIGHT_PER_WORKER * 2  # a stream stays a stream
    results.close()  # cancels what is queued; the workers are stopped
    with pytest.raises(TypeError):
        list(ordered_map(operator.add, 10, [1, 2, "three", 4], num_proc=2))

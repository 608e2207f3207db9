"""Scheduler: FIFO admission within batch and prefill budgets; running sequences stay compact."""

from __future__ import annotations

from lockstep.core.clock import FakeClock
from lockstep.engine import SamplingParams
from lockstep.engine.request_handle import RequestHandle
from lockstep.engine.scheduler import Scheduler, SlotMove
from lockstep.engine.sequence import Sequence, SequenceStatus

from . import tokenizer


def seq(rid: int, n_prompt: int, prompt: list[int] | None = None) -> Sequence:
    """Request ``rid`` with a prompt of its own (``n_prompt`` tokens) unless ``prompt`` is given."""
    handle = RequestHandle(rid, n_prompt, lambda h: None)
    params = SamplingParams()
    ids = prompt if prompt is not None else [5 + rid] * n_prompt
    return Sequence(rid, ids, params, tokenizer(), frozenset(), None, handle, FakeClock())


def test_admits_fifo_up_to_the_batch_size() -> None:
    sched = Scheduler(max_batch_size=2, max_queue=10, prefill_token_budget=1000)
    seqs = [seq(i, 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert sched.admit() == seqs[:2]
    assert [s.slot for s in seqs] == [0, 1, -1]
    assert seqs[0].status is SequenceStatus.RUNNING and seqs[2].status is SequenceStatus.WAITING
    assert sched.admit() == []


def test_prefill_budget_counts_padded_tokens_but_admits_at_least_one() -> None:
    sched = Scheduler(max_batch_size=8, max_queue=10, prefill_token_budget=20)
    for i, n in enumerate([30, 4, 4, 8, 4]):
        sched.add(seq(i, n))
    assert [s.request_id for s in sched.admit()] == [0]  # alone over budget: still admitted
    assert [s.request_id for s in sched.admit()] == [1, 2]  # adding the 8-token prompt: 3 * 8 > 20
    assert [s.request_id for s in sched.admit()] == [3, 4]


def test_a_repeated_prompt_costs_the_budget_once() -> None:
    # A request for n answers submits its prompt n times; the runner prefills it once.
    sched = Scheduler(max_batch_size=16, max_queue=20, prefill_token_budget=20)
    for i in range(8):
        sched.add(seq(i, 10, prompt=[7] * 9 + [i // 4]))  # two prompts, four answers each
    sched.add(seq(8, 10))
    wave = sched.admit()
    assert [s.request_id for s in wave] == list(range(8))  # 2 distinct * 10 tokens: within 20
    assert Scheduler.padded_tokens(wave) == 20
    assert [s.request_id for s in sched.admit()] == [8]


def test_an_explicit_budget_and_no_minimum_for_later_waves_of_a_step() -> None:
    sched = Scheduler(max_batch_size=8, max_queue=10, prefill_token_budget=1000)
    for i, n in enumerate([6, 6, 6, 40, 6]):
        sched.add(seq(i, n))
    first = sched.admit(13)
    assert [s.request_id for s in first] == [0, 1] and Scheduler.padded_tokens(first) == 12
    assert sched.admit(1, at_least_one=False) == []  # 6 tokens do not fit in what is left of the step
    assert [s.request_id for s in sched.admit(32)] == [2]  # the 40-token prompt would pad the wave to 80
    assert [s.request_id for s in sched.admit(32)] == [3]  # alone over budget: the first wave takes it
    assert Scheduler.padded_tokens([]) == 0


def test_release_moves_the_last_sequence_into_the_hole() -> None:
    sched = Scheduler(max_batch_size=4, max_queue=10, prefill_token_budget=1000)
    seqs = [seq(i, 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    sched.admit()
    seqs[2].num_cached = 7
    assert sched.release(seqs[0]) == SlotMove(src=2, dst=0, length=7)
    assert sched.running == [seqs[2], seqs[1]] and [s.slot for s in sched.running] == [0, 1]
    assert sched.release(seqs[1]) is None  # the last one leaves: nothing to move
    assert sched.running == [seqs[2]]


def test_queue_full_and_remove_waiting() -> None:
    sched = Scheduler(max_batch_size=1, max_queue=2, prefill_token_budget=100)
    a, b, c = seq(1, 2), seq(2, 2), seq(3, 2)
    sched.add(a)  # the free slot takes it at the next step: nothing waits for a slot yet
    assert not sched.queue_full and sched.queued_for_slot == 0
    sched.add(b)
    assert not sched.queue_full and sched.queued_for_slot == 1
    sched.add(c)
    assert sched.queue_full and sched.queued_for_slot == 2
    assert sched.remove_waiting(a) and not sched.remove_waiting(a)
    assert list(sched.waiting) == [b, c] and not sched.queue_full


def test_a_long_prompt_takes_the_last_slot_and_joins_the_batch_once_prefilled() -> None:
    sched = Scheduler(max_batch_size=3, max_queue=10, prefill_token_budget=1000)
    short, long, behind = seq(0, 4), seq(1, 50), seq(2, 4)
    for s in (short, long, behind):
        sched.add(s)
    assert sched.admit(longest=16) == [short]  # the long head stops admission: FIFO
    assert sched.start_prefilling(longer_than=16) is long and long.slot == 2
    assert sched.capacity == 2 and sched.start_prefilling(longer_than=16) is None
    assert sched.admit(longest=16) == [behind] and behind.slot == 1
    assert sched.admit() == []  # slot 2 is the chunked prompt's
    long.num_cached = 50
    assert sched.join_prefilled(long) == SlotMove(src=2, dst=2, length=50)
    assert sched.running == [short, behind, long] and sched.prefilling is None and sched.capacity == 3


def test_no_chunk_slot_while_every_slot_decodes_or_for_a_short_head() -> None:
    sched = Scheduler(max_batch_size=2, max_queue=10, prefill_token_budget=1000)
    for i in range(2):
        sched.add(seq(i, 4))
    sched.admit()
    sched.add(seq(2, 50))
    assert sched.start_prefilling(longer_than=16) is None  # both slots decode
    sched.release(sched.running[0])
    assert sched.start_prefilling(longer_than=60) is None  # 50 tokens is not long here
    assert sched.start_prefilling(longer_than=16) is not None and sched.prefilling is not None

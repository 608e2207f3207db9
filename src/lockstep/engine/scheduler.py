"""Who runs next: a bounded FIFO of waiting sequences and a compact list of running ones."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from lockstep.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SlotMove:
    """Compaction: the sequence in slot ``src`` now lives in ``dst``; copy ``length`` cached positions."""

    src: int
    dst: int
    length: int


def reserved_tokens(seq: Sequence) -> int:
    """Cache positions a sequence may fill: its prompt and every token it may generate."""
    return len(seq.prompt_ids) + seq.params.max_new_tokens


class Scheduler:
    """Running sequences occupy slots ``0..B-1`` (``running[i].slot == i``), so decode reads cache views.

    Not thread-safe: the engine calls it under its lock.
    """

    def __init__(self, max_batch_size: int, max_queue: int, prefill_token_budget: int,
                 reserve: Callable[[int, int], bool] | None = None) -> None:
        """``reserve(slot, tokens)`` sets aside KV-cache room for a sequence entering ``slot`` (its prompt plus
        its ``max_new_tokens``); a sequence it has no room for waits, first in line (default: always room)."""
        self.max_batch_size = max_batch_size
        self._reserve = reserve or (lambda slot, tokens: True)
        self.max_queue = max_queue
        self.prefill_token_budget = prefill_token_budget  # padded prompt tokens per prefill forward
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # A long prompt prefilled a chunk per step, in the last slot (kept out of the decode batch until done).
        self.prefilling: Sequence | None = None

    @property
    def queue_full(self) -> bool:
        """Whether a newcomer is refused: ``max_queue`` wait for a slot beyond those the free slots will take."""
        return self.queued_for_slot >= self.max_queue

    @property
    def queued_for_slot(self) -> int:
        """Waiting sequences the free batch slots cannot take at the next step. A burst arrives before the engine
        steps: counting the ones free slots will take refused requests while slots were free."""
        return max(0, len(self.waiting) - max(0, self.capacity - len(self.running)))

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (the caller checked ``queue_full``)."""
        self.waiting.append(seq)

    def remove_waiting(self, seq: Sequence) -> bool:
        """Take a queued sequence out (cancelled before it ran); False if it is not queued."""
        try:
            self.waiting.remove(seq)
        except ValueError:
            return False
        return True

    @property
    def capacity(self) -> int:
        """Slots the decode batch may use: all but the one a chunked prefill holds."""
        return self.max_batch_size - (self.prefilling is not None)

    def admit(self, token_budget: int | None = None, at_least_one: bool = True,
              longest: int | None = None) -> list[Sequence]:
        """Move waiting sequences into free slots, FIFO, within ``token_budget`` padded prompt tokens
        (default: the prefill budget); with ``at_least_one`` the head of the queue goes in even when its
        prompt alone is over the budget, so a long prompt is never starved. A prompt over ``longest`` tokens
        stops admission (it waits for ``start_prefilling``)."""
        budget = self.prefill_token_budget if token_budget is None else token_budget
        admitted: list[Sequence] = []
        distinct: set[tuple[int, ...]] = set()  # a repeated prompt is prefilled once (the runner shares it)
        width = 0
        while self.waiting and len(self.running) < self.capacity:
            nxt = self.waiting[0]
            if longest is not None and len(nxt.prompt_ids) > longest:
                break
            prompt = tuple(nxt.prompt_ids)
            new_width = max(width, len(prompt))
            new_count = len(distinct) + (prompt not in distinct)
            if (admitted or not at_least_one) and new_width * new_count > budget:
                break
            if not self._reserve(len(self.running), reserved_tokens(nxt)):
                break
            self.waiting.popleft()
            width = new_width
            distinct.add(prompt)
            nxt.slot = len(self.running)
            nxt.status = SequenceStatus.RUNNING
            self.running.append(nxt)
            admitted.append(nxt)
        return admitted

    def start_prefilling(self, longer_than: int) -> Sequence | None:
        """Give the last slot to the queue's head when its prompt is over ``longer_than`` tokens, the slot is
        free and the batch does not need it; that sequence is then prefilled a chunk at a time."""
        if self.prefilling is not None or not self.waiting or len(self.waiting[0].prompt_ids) <= longer_than:
            return None
        if len(self.running) >= self.max_batch_size:
            return None  # every slot decodes: the last one is not free
        if not self._reserve(self.max_batch_size - 1, reserved_tokens(self.waiting[0])):
            return None
        seq = self.waiting.popleft()
        seq.slot = self.max_batch_size - 1
        seq.status = SequenceStatus.RUNNING
        self.prefilling = seq
        return seq

    def join_prefilled(self, seq: Sequence) -> SlotMove:
        """The chunked sequence's prompt is cached: it joins the batch in the next slot."""
        assert self.prefilling is seq, "prefilling bookkeeping out of sync"
        self.prefilling = None
        move = SlotMove(src=seq.slot, dst=len(self.running), length=seq.num_cached)
        seq.slot = move.dst
        self.running.append(seq)
        return move

    @staticmethod
    def padded_tokens(seqs: list[Sequence]) -> int:
        """Tokens one prefill forward over ``seqs`` processes: each distinct prompt once, right-padded to the
        longest."""
        return max((len(s.prompt_ids) for s in seqs), default=0) * len({tuple(s.prompt_ids) for s in seqs})

    def release(self, seq: Sequence) -> SlotMove | None:
        """Take a running sequence out; fill its slot with the last one. Returns the cache move to make."""
        hole = seq.slot
        assert self.running[hole] is seq, "slot bookkeeping out of sync"
        last = self.running.pop()
        seq.slot = -1
        if last is seq:
            return None
        self.running[hole] = last
        src, last.slot = last.slot, hole
        return SlotMove(src=src, dst=hole, length=last.num_cached)

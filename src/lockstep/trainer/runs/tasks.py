"""Built-in verifiable tasks: prompts (training and held-out) and a reward computed from the text alone.

Prompt words come from the shipped corpus. Each word belongs to the training or the held-out pool by a hash
of the word, so held-out prompts never share a prompt word with training prompts.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from lockstep.core.errors import BadRequest
from lockstep.models.tiny import corpus_text

RewardFn = Callable[[str, str], float]  # (prompt, completion) -> reward
HELD_OUT_SHARE = 5  # one word in five is held out


def digits_reward(prompt: str, completion: str) -> float:
    """Fraction of the completion's non-space characters that are digits (0 for an empty completion)."""
    chars = [c for c in completion if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c in "0123456789" for c in chars) / len(chars)


_TARGET = re.compile(r"the word '([^']+)'")


def target_word_reward(prompt: str, completion: str) -> float:
    """1 when the completion contains the word the prompt asks for (whole word, any case), else 0."""
    match = _TARGET.search(prompt)
    if match is None:
        return 0.0
    return 1.0 if re.search(rf"\b{re.escape(match.group(1))}\b", completion, re.IGNORECASE) else 0.0


@lru_cache(maxsize=1)
def _word_pools() -> tuple[tuple[str, ...], tuple[str, ...]]:
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{3,10}", corpus_text())})
    held = tuple(w for w in words if int(hashlib.sha256(w.encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0)
    train = tuple(w for w in words if w not in set(held))
    return train, held


def _digits_prompt(rng: random.Random, words: tuple[str, ...]) -> str:
    return f"Numbers for {' '.join(rng.sample(words, 3))}:"


def _target_word_prompt(rng: random.Random, words: tuple[str, ...]) -> str:
    return f"Say the word '{rng.choice(words)}':"


@dataclass(frozen=True)
class Task:
    """A built-in task: how its prompts look and how a completion is scored."""

    name: str
    description: str
    reward: RewardFn
    make_prompt: Callable[[random.Random, tuple[str, ...]], str]

    def prompts(self, n: int, *, seed: int, held_out: bool) -> list[str]:
        """``n`` prompts, the same for the same seed; held-out prompts use only held-out words."""
        train, held = _word_pools()
        rng = random.Random(f"{self.name}:{seed}:{'eval' if held_out else 'train'}")
        return [self.make_prompt(rng, held if held_out else train) for _ in range(n)]


TASKS: dict[str, Task] = {
    "digits": Task("digits", "reward = fraction of the completion's non-space characters that are digits; "
                   "a random model learns it within a few versions", digits_reward, _digits_prompt),
    "target_word": Task("target_word", "reward = 1 when the completion contains the word the prompt names; "
                        "sparse, needs many more steps and larger groups", target_word_reward,
                        _target_word_prompt),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise BadRequest(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}") from None

"""The ``task_score`` gate's evaluation: a built-in task's held-out prompts answered by the candidate, staged but
serving nobody yet, and by the committed version, on one replica (``X-Lockstep-Version``), before the first step."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx

from lockstep.core.http import bearer_headers
from lockstep.sync.coordinator import Coordinator
from lockstep.sync.rollout import TaskScore
from lockstep.trainer.runs.tasks import Task

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 16
TIMEOUT_S = 120.0


def fleet_task_score(coordinator: Coordinator, task: Task, prompts: int, token: str | None
                     ) -> Callable[[int], TaskScore | None]:
    """The evaluation a rollout runs on its candidate: mean reward of greedy answers, candidate and committed."""

    def score(candidate: int) -> TaskScore | None:
        state = coordinator.read_state()
        committed = state.committed.version if state.committed is not None else 0
        urls = [b.url for b in coordinator.live_replicas() if b.url]
        if not urls:
            log.warning("task_score: no live replica advertises a URL; the gate is skipped")
            return None
        questions = task.prompts(prompts, seed=0, held_out=True)
        with httpx.Client(base_url=urls[0], headers=bearer_headers(token), timeout=TIMEOUT_S) as http:
            def mean(version: int) -> float:
                total = 0.0
                for prompt in questions:
                    answer = http.post("/generate", headers={"X-Lockstep-Version": str(version)},
                                       json={"prompt": prompt, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0})
                    answer.raise_for_status()
                    total += task.reward(prompt, answer.json()["text"])
                return total / len(questions)

            result = TaskScore(score=mean(candidate), baseline=mean(committed), samples=len(questions))
        log.info("task_score (%s, %d held-out prompts, %s): v%d %.3f, committed v%d %.3f", task.name, prompts,
                 urls[0], candidate, result.score, committed, result.baseline or 0.0)
        return result

    return score

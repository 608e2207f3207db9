"""Continuous-batching generation engine: submit token ids, stream tokens and text, one engine per model."""

from lockstep.engine.engine import Engine
from lockstep.engine.event import Event, FinalEvent, FinishReason, TokenEvent
from lockstep.engine.request_handle import RequestHandle
from lockstep.engine.sampling_params import SamplingParams

__all__ = ["Engine", "Event", "FinalEvent", "FinishReason", "RequestHandle", "SamplingParams", "TokenEvent"]

"""The engine layer: requests in, streamed text out.

Owns: the generation loop with prefix reuse and the one context rule (`engine`), the shared
request queue and admission (`scheduler`: queue places, one prompt tokenized at a time, the
threads that read jobs' events; its bound and time limit given by the caller), the one consumer of a request's events (`replies`), sampling,
UTF-8-safe detokenizing, stop strings, chat templates, tool calls and multi-turn
conversations. May import edge.model; never an interface or edge.launch.

The refusals and failures every interface answers in its own shape are re-exported here:
`ContextFull` (a prompt or reply does not fit the context), `QueueFull` (no place left), and
`SequenceFailed` (one request failed while generating; `RequestFailed`: by its own input).
"""
from edge.engine.events import RequestFailed, SequenceFailed
from edge.engine.scheduler import QueueFull
from edge.model.kv_cache import ContextFull

__all__ = ["ContextFull", "QueueFull", "RequestFailed", "SequenceFailed"]

"""One request builder for every interface: interface options in, `GenerationParams` out.

Each interface maps its own wire names onto the canonical ones (`max_tokens`, `stop` and the
fields of `SamplingParams`) and calls `RequestDefaults.build(**overrides)`; a value of None
means "not given". The product's defaults live here and nowhere else: the CLI flags show
them, `serve`'s flags replace them for the server (`with_overrides`), and a request's own
fields replace those.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from edge.engine.engine import GenerationParams
from edge.engine.sampler import SamplingParams

# llama.cpp's defaults for a chat: mildly creative, with the usual filters on.
DEFAULT_SAMPLING = SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1)
DEFAULT_MAX_TOKENS = 256        # terminal interfaces; the HTTP APIs default to "the rest of the context"
DEFAULT_MAX_QUEUE = 8           # requests waiting for a slot beyond the running ones; more get "busy" (HTTP 429)
DEFAULT_REQUEST_SECONDS = 300.0 # a request's time in the queue + generating (serve --request-timeout; 0 = no limit)
DEFAULT_PORT = 8080             # serve's HTTP port (OpenAI API, chat page)
OLLAMA_PORT = 11434             # Ollama's own port, where its clients look first
DEFAULT_TOOL_LOOP_GUARD = True  # a tool call answered in this turn is not generated again (engine.tool_guard)
DEFAULT_CLOCK_LAST = True       # Home Assistant's leading clock line read last, so its prompt keeps a prefix (engine/clock_line.py)
DEFAULT_SPOKEN_TOKENS = 64      # Wyoming: a reply ends at the first sentence end past this many tokens
DEFAULT_PAGE_MAX_TOKENS = 1024  # the chat page's reply budget when its Max tokens field is empty
DEFAULT_CTX = 8192              # tokens one sequence may reach (Home Assistant's num_ctx; its prompt for a 100-entity home is ~4,700)
# KV memory all sequences share (engine/kv_pool.py): one may grow to DEFAULT_CTX while the
# others stay short. Sized for a 4 GB Pi with the 1B int4 model under the unit's MemoryHigh=2G:
# 0.6 GiB of packed weights + 0.46 GiB of runtime (measured) + 768 MiB of KV = 1.8 GiB. It holds
# 12,288 tokens of the 1B model (64 KiB/token at f32): one full 8k context and 4k beside it, or
# a 100-entity Home Assistant prompt (4,641) and 7.6k more. 0 = KV_MEMORY_SHARE of the memory
# available at start.
DEFAULT_KV_POOL_MB = 768
DEFAULT_PROMPT_CACHE_MB = 1024  # serve: KV of long prompts on disk, across restarts
DEFAULT_SPECULATE = True        # prompt-lookup drafts: same output; 1.1-1.7x on grounded replies, ~1x on novel text (README)
# End a reply caught in an exact loop (engine/repetition.py) as "length": on for the terminal
# interfaces (chat, run, the serial console), where a person waits; off for the HTTP APIs,
# whose clients get exactly what they asked for (serve --stop-loops on turns it on there).
TERMINAL_STOP_LOOPS = True
DEFAULT_THREADS = "auto"        # 1 thread or all cores, whichever runs faster now (edge/model/thread_policy.py, docs/SPEED.md)
DEFAULT_PARALLEL = 4            # serve's slots: 4 streams decode at ~3x one stream's total (README, Speed)
WATCHDOG_STALL_SECONDS = 60.0   # serve: work pending this long with no step or admission = wedged (/health 503, no watchdog ping)
# serve: models loaded at once (the served default one included). Two: on a 4 GB Pi the default
# Llama 3.2 1B int4 and one more model of its size fit beside the OS; a 3B int4 takes most of
# the memory alone (docs/MODELS.md), and loading checks the available memory as well.
DEFAULT_MAX_LOADED_MODELS = 2
DEFAULT_KEEP_ALIVE = "5m"       # serve: another model stays loaded this long after its last request (Ollama's default)

SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
REQUEST_FIELDS = SAMPLING_FIELDS | {"max_tokens", "stop", "speculate", "stop_loops"}
PER_REQUEST_FIELDS = frozenset({"constraint", "logprobs", "special_text"})   # no defaults: one request's own


@dataclass(frozen=True)
class RequestDefaults:
    max_tokens: int | None = DEFAULT_MAX_TOKENS     # None: until the context is full
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = field(default_factory=lambda: DEFAULT_SAMPLING)
    speculate: bool = DEFAULT_SPECULATE
    stop_loops: bool = False                        # see TERMINAL_STOP_LOOPS

    def with_overrides(self, **overrides) -> RequestDefaults:
        """New defaults (e.g. from `serve`'s flags); raises ValueError like `build`."""
        p = self.build(**overrides)
        return RequestDefaults(max_tokens=p.max_tokens, stop=tuple(p.stop), sampling=p.sampling,
                               speculate=p.speculate, stop_loops=p.stop_loops)

    def build(self, **overrides) -> GenerationParams:
        """GenerationParams from these defaults and the given fields (None = not given).
        Raises ValueError naming the field for a value the engine cannot run."""
        unknown = set(overrides) - REQUEST_FIELDS - PER_REQUEST_FIELDS
        if unknown:
            raise TypeError(f"unknown request field(s): {', '.join(sorted(unknown))}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("seed") == -1:             # llama.cpp's "random", even over a default seed
            given["seed"] = None
        sampling = dataclasses.replace(self.sampling, **{k: given[k] for k in SAMPLING_FIELDS & given.keys()})
        stop = given.get("stop", list(self.stop))
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
            raise ValueError("stop must be a string or a list of strings")
        speculate = given.get("speculate", self.speculate)
        stop_loops = given.get("stop_loops", self.stop_loops)
        for name, flag in (("speculate", speculate), ("stop_loops", stop_loops)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        return GenerationParams(max_tokens=given.get("max_tokens", self.max_tokens), stop=list(stop),
                                sampling=sampling, speculate=speculate, stop_loops=stop_loops, **{k: given[k] for k in PER_REQUEST_FIELDS & given.keys()})


def prompt_messages(prompt: str, system: str | None = None) -> list[dict]:
    """A prompt and an optional system prompt as chat messages (every interface that takes them)."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]

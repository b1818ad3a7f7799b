"""No request can hurt another: a request that cannot start never keeps a slot, and one that
fails while generating (its grammar, its sampler, its own rows of the model pass) ends alone
while the others produce exactly the tokens they produce on their own. A failure of the shared
model pass fails the batch, and the engine answers the next requests as a fresh one would."""
from __future__ import annotations

import threading

import httpx
import ollama
import pytest
from openai import OpenAI

from edge.api.ollama_api import create_ollama_app
from edge.engine import constraint
from edge.engine.constraint import Grammar, GrammarFailed
from edge.engine.engine import Engine, GenerationParams, RequestFailed, SequenceFailed
from edge.engine.sampler import SamplingParams
from edge.launch.scheduling import start_scheduler
from edge.model.bundle import Bundle
from tests.http_server import endless_engine, ready_state, running

PROMPTS = [[5, 17, 33, 2, 9, 40, 41], [7, 7, 100], list(range(1, 80)), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
SEEDED = [GenerationParams(max_tokens=20, sampling=SamplingParams(temperature=1.0, seed=s)) for s in (1, 2, 3)]


def tokens(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def alone(engine: Engine, prompt, params) -> list[int]:
    engine.reset()
    return tokens(list(engine.generate(prompt, params)))


def read(job) -> tuple[list[int], object]:
    """(tokens, the last event or the exception that ended the stream)."""
    got = []
    try:
        for ev in job.events():
            got.append(ev)
    except Exception as e:
        return tokens(got), e
    return tokens(got), got[-1]


@pytest.fixture
def tiny4(tiny_bundle) -> Engine:
    return endless_engine(tiny_bundle, 128, backend="numpy", parallel=4)


# --- admission -------------------------------------------------------------------------------

def test_requests_that_cannot_start_never_keep_a_slot(tiny4):
    """An empty stop string (StopMatcher refuses it), slipped past request validation, four
    times on four slots: each request gets its error, every slot is free, and the next
    request runs."""
    scheduler = start_scheduler(tiny4, stall_seconds=30)
    bad = []
    for _ in range(4):
        p = GenerationParams(max_tokens=3)
        p.stop = [""]                                 # what a request could once carry into the engine
        bad.append(scheduler.submit(PROMPTS[0], p))
    for job in bad:
        _, end = read(job)
        assert isinstance(end, ValueError) and "stop strings must be non-empty" in str(end)
    assert tiny4.free_slots() == 4
    toks, last = read(scheduler.submit(PROMPTS[1], GenerationParams(max_tokens=3)))
    assert len(toks) == 3 and last.finish_reason == "length" and scheduler.healthy()


def test_a_failure_after_the_slot_is_claimed_gives_it_back(tiny4, monkeypatch):
    def broken(slot, ids):
        raise OSError("injected: the prompt cache's disk went away")
    monkeypatch.setattr(tiny4.slot_pool, "restore_prefix", broken)
    for _ in range(6):                                # more than the slots
        with pytest.raises(OSError, match="injected"):
            tiny4.start(PROMPTS[0], GenerationParams(max_tokens=2), wait=False)
    assert tiny4.free_slots() == 4
    monkeypatch.undo()
    assert len(tokens(tiny4.generate(PROMPTS[0], GenerationParams(max_tokens=2)))) == 2


def test_an_empty_stop_string_is_a_400_and_four_of_them_freeze_nothing(tiny_bundle):
    """Four Ollama requests with options.stop [""] at once (= the slots), through the official
    client: each a 400 in Ollama's shape; then both APIs and /health still answer."""
    engine = endless_engine(tiny_bundle, 128, backend="numpy", parallel=4)
    state = ready_state(engine)
    state.scheduler.stall_seconds = 30
    with running(state, make_app=create_ollama_app) as ollama_base, running(state) as openai_base:
        client = ollama.Client(host=ollama_base, timeout=60)
        errors = []

        def ask():
            try:
                client.generate(model=engine.name, prompt="w1 w2 w3", raw=True, options={"stop": [""], "num_predict": 4})
            except ollama.ResponseError as e:
                errors.append(e)
        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [e.status_code for e in errors] == [400] * 4 and all("stop" in e.error for e in errors)
        assert engine.free_slots() == 4
        health = httpx.get(f"{openai_base}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        reply = client.generate(model=engine.name, prompt="w1 w2 w3", raw=True, options={"num_predict": 4})
        assert reply.done and reply.eval_count == 4
        api = OpenAI(base_url=f"{openai_base}/v1", api_key="x", max_retries=0, timeout=60)
        done = api.completions.create(model=engine.name, prompt="w1 w2", max_tokens=4)
        assert done.usage.completion_tokens == 4
        with pytest.raises(Exception) as e:            # the OpenAI path refuses it too
            api.completions.create(model=engine.name, prompt="w1 w2", max_tokens=4, stop=[""])
        assert getattr(e.value, "status_code", None) == 400


# --- failures while generating ----------------------------------------------------------------

class FaultyGrammars:
    """Matchers that allow everything and fail on their `fail_at`-th token."""

    def __init__(self, fail_at: int):
        self.fail_at = fail_at

    def matcher(self, grammar):
        return FaultyMatcher(self.fail_at)


class FaultyMatcher:
    stopped = False

    def __init__(self, fail_at: int):
        self.fail_at, self.seen = fail_at, 0

    def apply(self, logits):
        return logits

    def advance(self, token):
        self.seen += 1
        if self.seen == self.fail_at:
            raise GrammarFailed("constrained decoding failed: injected fault")


def run_beside(engine: Engine, odd: GenerationParams, odd_prompt=PROMPTS[3]):
    """The three seeded requests alone, then the same three beside `odd` through the
    scheduler; returns (alone, beside, odd's result, the largest batch a step ran)."""
    want = [alone(engine, p, q) for p, q in zip(PROMPTS, SEEDED)]
    engine.reset()
    scheduler = start_scheduler(engine)
    sizes = []
    real = engine.step
    engine.step = lambda seqs: sizes.append(len(seqs)) or real(seqs)
    jobs = [scheduler.submit(p, q) for p, q in zip(PROMPTS, SEEDED)]
    odd_job = scheduler.submit(odd_prompt, odd)
    got = [read(j) for j in jobs]
    odd_result = read(odd_job)
    engine.step = real
    return want, got, odd_result, max(sizes)


def test_a_failing_grammar_ends_its_own_request_alone(tiny4):
    tiny4._grammars = FaultyGrammars(fail_at=6)
    odd = GenerationParams(max_tokens=30, constraint=Grammar("injected", origin="test"))
    want, got, (odd_tokens, odd_end), batch = run_beside(tiny4, odd)
    assert batch == 4                                       # it really ran beside them
    assert [g[0] for g in got] == want and all(g[1].finish_reason == "length" for g in got)
    assert isinstance(odd_end, SequenceFailed) and "injected fault" in str(odd_end)
    assert len(odd_tokens) == 5                              # what it produced before the fault
    assert tiny4.free_slots() == 4


def test_a_failure_in_one_sequences_rows_of_the_pass_ends_it_alone(tiny4):
    """The batched pass raises whenever the victim's rows are in it (e.g. its K/V broken):
    the pass runs again per sequence, the victim gets the error, the others their logits."""
    victim = PROMPTS[3]
    real = tiny4.model.forward_batch

    def forward_batch(items, **kw):
        for new, cache in items:
            if (list(cache.tokens) + list(new))[:len(victim)] == victim and cache.length > len(victim) + 3:
                raise FloatingPointError("injected: this sequence's rows are broken")
        return real(items, **kw)
    tiny4.model.forward_batch = forward_batch
    want, got, (odd_tokens, odd_end), batch = run_beside(tiny4, GenerationParams(max_tokens=30), victim)
    assert batch == 4
    assert [g[0] for g in got] == want and all(g[1].finish_reason == "length" for g in got)
    assert isinstance(odd_end, SequenceFailed) and "rows are broken" in str(odd_end) and len(odd_tokens) == 5
    assert not isinstance(odd_end, RequestFailed)          # not the request's fault: a server error
    assert tiny4.free_slots() == 4


def test_a_broken_shared_pass_fails_the_batch_and_the_engine_recovers(tiny4):
    want = [alone(tiny4, p, q) for p, q in zip(PROMPTS, SEEDED)]
    tiny4.reset()
    real = tiny4.model.forward_batch
    calls = {"n": 0}

    def forward_batch(items, **kw):
        calls["n"] += 1
        if calls["n"] > 8:                                   # broken for everyone from the 9th pass on
            raise MemoryError("injected: the pass itself fails")
        return real(items, **kw)
    tiny4.model.forward_batch = forward_batch
    scheduler = start_scheduler(tiny4)
    jobs = [scheduler.submit(p, q) for p, q in zip(PROMPTS, SEEDED)]
    ends = [read(j)[1] for j in jobs]
    assert all(isinstance(e, MemoryError) for e in ends)
    assert tiny4.free_slots() == 4
    tiny4.model.forward_batch = real                          # the fault is gone: answers as before
    again = [scheduler.submit(p, q) for p, q in zip(PROMPTS, SEEDED)]   # each lands on its old prefix
    assert [read(j)[0] for j in again] == want


def test_an_llguidance_failure_mid_answer_ends_that_request_alone(smol_bundle, monkeypatch):
    """A real grammar failure: llguidance refusing a step that exceeds its limits (here a
    tight row limit, as a hostile recursive schema exceeds the defaults), beside three
    seeded streams of the real model."""
    engine = Engine(Bundle.open(smol_bundle), max_ctx=256, parallel=4)
    monkeypatch.setattr(constraint, "GRAMMAR_LIMITS", {"max_items_in_row": 5, "verbose_errors": False})
    nested = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "array", "items": {
        "type": "array", "items": {"type": "integer"}}}}}, "required": ["a"]}
    grammar = Grammar.json_schema(nested, origin="response_format.json_schema.schema")
    engine.check_grammar(grammar)                          # compiles, and its first mask is fine
    prompts = [engine.encode_chat([{"role": "user", "content": q}])
               for q in ("Name a colour.", "Count to five.", "Say hello.", "Give me JSON.")]
    want = [alone(engine, p, q) for p, q in zip(prompts, SEEDED)]
    engine.reset()
    scheduler = start_scheduler(engine)
    jobs = [scheduler.submit(p, q) for p, q in zip(prompts, SEEDED)]
    odd = scheduler.submit(prompts[3], GenerationParams(max_tokens=40, constraint=grammar))
    assert [read(j)[0] for j in jobs] == want
    _, end = read(odd)
    assert isinstance(end, SequenceFailed) and "max is 5" in str(end) and "<state>" not in str(end)
    assert isinstance(end, RequestFailed)                  # the request's own grammar: a client error
    assert engine.free_slots() == 4


# --- schemas nested too deep ------------------------------------------------------------------

def nested(depth: int) -> dict:
    """A schema whose objects nest `depth` levels deep (`depth // 2` properties in properties)."""
    schema = {"type": "string"}
    for _ in range(depth // 2):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def test_a_schema_nested_900_deep_is_a_clear_error(tiny_bundle):
    from edge.engine.constraint import ConstraintError, closed
    from edge.engine.tool_calls import ToolError, parse_tools, response_grammar
    deep = nested(900)
    with pytest.raises(ConstraintError, match="more than 64 levels deep"):
        closed(deep)
    with pytest.raises(ToolError, match="more than 64 levels deep") as e:
        parse_tools([{"type": "function", "function": {"name": "f", "parameters": deep}}])
    assert e.value.param == "tools[0].function.parameters"
    with pytest.raises(ToolError, match="more than 64 levels deep"):
        response_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": deep, "strict": True}})
    closed(nested(20))                                     # a deep but real schema is fine


def test_deep_tool_parameters_and_format_are_400_on_both_apis(smol_bundle):
    engine = Engine(Bundle.open(smol_bundle), max_ctx=256)
    state = ready_state(engine)
    deep = nested(900)
    with running(state, make_app=create_ollama_app) as ollama_base, running(state) as openai_base:
        client = ollama.Client(host=ollama_base, timeout=60)
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model=engine.name, messages=[{"role": "user", "content": "hi"}], format=deep)
        assert e.value.status_code == 400 and "levels deep" in e.value.error
        # the official client rebuilds tool schemas into its own flat model: raw JSON, as a hostile client sends it
        r = httpx.post(f"{ollama_base}/api/chat", timeout=60, json={
            "model": engine.name, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]})
        assert r.status_code == 400 and "levels deep" in r.json()["error"], r.text
        r = httpx.post(f"{openai_base}/v1/chat/completions", timeout=60, json={
            "model": engine.name, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]})
        assert r.status_code == 400 and "levels deep" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "tools[0].function.parameters"


def test_an_empty_stop_string_on_the_serial_console_is_an_error_and_it_still_answers(tiny_bundle):
    """One slot, JSON lines: the request that once froze the console for good."""
    from tests.serial_terminal import Terminal, jsonl, make_console, request
    engine = endless_engine(tiny_bundle, 256, backend="numpy")
    term = Terminal()
    console = make_console(engine, start_scheduler(engine), term.path, mode="jsonl").start()
    try:
        assert jsonl(term)["ready"]
        for _ in range(3):
            (event,) = request(term, {"id": 1, "prompt": "w1 w2", "stop": [""]})
            assert event["error"]["code"] == "bad_request" and "stop" in event["error"]["message"], event
        assert request(term, {"prompt": "w1", "max_tokens": 2})[-1]["done"]
        assert engine.free_slots() == 1
    finally:
        console.stop()
        term.close()


def test_a_grammar_failing_mid_answer_is_a_clear_client_error_on_both_apis(smol_bundle, monkeypatch):
    """Non-streaming: 400 naming the failure (OpenAI and Ollama shapes); streaming: an error
    event in the stream; a plain request beside it is answered in full."""
    engine = Engine(Bundle.open(smol_bundle), max_ctx=256, parallel=2)
    monkeypatch.setattr(constraint, "GRAMMAR_LIMITS", {"max_items_in_row": 5, "verbose_errors": False})
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "array", "items": {
        "type": "array", "items": {"type": "integer"}}}}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    state = ready_state(engine)
    question = [{"role": "user", "content": "Give me JSON."}]
    with running(state, make_app=create_ollama_app) as ollama_base, running(state) as openai_base:
        api = OpenAI(base_url=f"{openai_base}/v1", api_key="x", max_retries=0, timeout=120)
        with pytest.raises(Exception) as e:
            api.chat.completions.create(model=engine.name, messages=question, max_tokens=30, response_format=fmt)
        assert getattr(e.value, "status_code", None) == 400
        assert "constrained decoding failed" in str(e.value) and "max is 5" in str(e.value)
        plain = api.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                            temperature=0)
        assert plain.usage.completion_tokens == 8 or plain.choices[0].finish_reason == "stop"
        chunks = []
        with pytest.raises(Exception) as e:               # the client raises on the stream's error event
            for chunk in api.chat.completions.create(model=engine.name, messages=question, max_tokens=30,
                                                     response_format=fmt, stream=True):
                chunks.append(chunk)
        assert "constrained decoding failed" in str(e.value)
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=ollama_base, timeout=120).chat(model=engine.name, messages=question, format=schema)
        assert e.value.status_code == 400 and "constrained decoding failed" in e.value.error
    assert engine.free_slots() == 2

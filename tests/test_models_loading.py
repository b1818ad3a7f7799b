"""Loading installed models by name in a running server, through the official `ollama` and
`openai` clients: a request for another installed model loads it, the least recently used
idle model is unloaded at --max-loaded-models, keep_alive as Ollama defines it (0 unloads
after the request, an empty prompt with 0 unloads at once, negative keeps it), and a model
asked to unload while it answers finishes every request first."""
from __future__ import annotations

import shutil
import threading
from datetime import datetime, timedelta, timezone

import httpx
import ollama
import openai
import pytest

from edge.api.ollama_api import FOREVER_AT, create_ollama_app
from edge.api.runtime import ServerConfig, ServerState
from edge.engine.sampler import SamplingParams
from edge.launch.scheduling import start_scheduler
from edge.launch import model_store
from edge.launch.loaded_models import LoadedModels, model_key
from edge.launch.request import RequestDefaults
from tests.http_server import endless_engine, running

HI = [{"role": "user", "content": "w1 w2"}]
CTX = 128


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_bundle):
    """Two more installed models (copies of the tiny bundle), one with an Ollama-style alias."""
    monkeypatch.setenv("EDGE_LLM_HOME", str(tmp_path / "home"))
    for name in ("other-f32", "third-f32"):
        shutil.copytree(tiny_bundle, model_store.bundles_dir() / name)
    model_store.set_alias("helper:1b", "other-f32")
    return model_store.bundles_dir()


class Server:
    """The served tiny model and a registry that loads the others as endless engines (every
    reply runs to its token limit); `gone(name)` is set when a model has been unloaded."""

    def __init__(self, tiny_bundle, max_loaded: int):
        engine = endless_engine(tiny_bundle, CTX)
        self.state = ServerState(engine.name, ServerConfig(
            defaults=RequestDefaults(max_tokens=None, sampling=SamplingParams())))
        self.models = LoadedModels(self.open, max_loaded, keep_alive=300.0)
        self.unloaded: dict[str, threading.Event] = {}
        self.models.listeners.append(self.seen)
        self.state.set_ready(engine, start_scheduler(engine), self.models)
        self.default = engine.name

    @staticmethod
    def open(key):
        engine = endless_engine(key, CTX)
        return engine, start_scheduler(engine)

    def seen(self, what, entry):
        if what == "unloaded":
            self.gone(entry.name).set()

    def gone(self, name) -> threading.Event:
        return self.unloaded.setdefault(name, threading.Event())

    def entry(self, name):
        return self.models.get(model_key(model_store.bundles_dir() / name))


@pytest.fixture
def clients(home, tiny_bundle, request):
    server = Server(tiny_bundle, getattr(request, "param", 2))
    with running(server.state, make_app=create_ollama_app) as ollama_base, running(server.state) as openai_base:
        yield (server, ollama.Client(host=ollama_base, timeout=120),
               openai.OpenAI(base_url=f"{openai_base}/v1", api_key="x", max_retries=0, timeout=120), ollama_base)


def loaded(client) -> dict[str, str]:
    return {m.model: m.expires_at for m in client.ps().models}


def when(expires_at) -> datetime:
    return expires_at if isinstance(expires_at, datetime) else datetime.fromisoformat(expires_at.replace("Z", "+00:00"))


def test_another_model_loads_by_name_and_the_least_recently_used_goes_at_the_budget(clients):
    server, client, api, _ = clients
    reply = client.chat(model="helper:1b", messages=HI, options={"num_predict": 3})          # by an alias
    assert reply.eval_count == 3 and reply.done_reason == "length"
    ps = loaded(client)
    assert set(ps) == {"other-f32:latest", f"{server.default}:latest"}
    assert when(ps[f"{server.default}:latest"]) == when(FOREVER_AT)      # the served model stays
    now = datetime.now(timezone.utc)
    assert now + timedelta(minutes=4) < when(ps["other-f32:latest"]) <= now + timedelta(minutes=5, seconds=1)
    sizes = {m.model: m.size for m in client.ps().models}
    assert sizes["other-f32:latest"] > server.entry("other-f32").engine.kv_cache_bytes > 0

    # the budget (2) is reached: the idle other model goes, not the served one
    done = api.chat.completions.create(model="third-f32", messages=HI, max_tokens=4)
    assert done.model == "third-f32" and done.usage.completion_tokens == 4
    assert server.gone("other-f32").wait(30)
    assert set(loaded(client)) == {"third-f32:latest", f"{server.default}:latest"}
    assert server.state.models.get(model_key(model_store.bundles_dir() / "other-f32")) is None
    # the served model answers as before; a request with no name at all is the served one
    assert api.completions.create(model=server.default, prompt="w1", max_tokens=2).usage.completion_tokens == 2
    r = httpx.post(f"{api.base_url}chat/completions", json={"messages": HI, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == server.default
    assert [m.id for m in api.models.list().data] == [server.default, "third-f32"]


def test_keep_alive(clients):
    server, client, _, base = clients
    reply = client.generate(model="other-f32", prompt="w1", options={"num_predict": 2}, keep_alive=0)
    assert reply.eval_count == 2                              # answered, then unloaded
    assert server.gone("other-f32").wait(30) and set(loaded(client)) == {f"{server.default}:latest"}

    client.generate(model="other-f32", prompt="w1", options={"num_predict": 2}, keep_alive=-1)
    assert when(loaded(client)["other-f32:latest"]) == when(FOREVER_AT)
    client.chat(model="other-f32", messages=HI, options={"num_predict": 2}, keep_alive="10m")
    now = datetime.now(timezone.utc)
    assert now + timedelta(minutes=9) < when(loaded(client)["other-f32:latest"]) <= now + timedelta(minutes=10, seconds=1)

    # an empty prompt (or no messages) with keep_alive 0: unloaded at once, as `ollama stop` asks
    stopped = client.generate(model="helper:1b", prompt="", keep_alive=0)
    assert stopped.done and stopped.done_reason == "unload" and stopped.response == ""
    assert server.gone("other-f32").is_set() and "other-f32:latest" not in loaded(client)
    assert client.chat(model="helper:1b", messages=[], keep_alive=0).done_reason == "unload"   # not loaded: nothing to do
    # an empty prompt without it loads the model (Ollama's preload)
    assert client.generate(model="third-f32", prompt="").done_reason == "load"
    assert "third-f32:latest" in loaded(client)

    for bad in ("soon", "5 minutes", True):
        r = httpx.post(f"{base}/api/generate", json={"model": "third-f32", "prompt": "w1", "keep_alive": bad}, timeout=60)
        assert r.status_code == 400 and "keep_alive" in r.json()["error"], r.text
    with pytest.raises(ollama.ResponseError) as e:            # unknown names: 404, loaded or not
        client.generate(model="mistral", prompt="", keep_alive=0)
    assert e.value.status_code == 404 and "does not exist here" in e.value.error


@pytest.mark.parametrize("clients", [3], indirect=True)
def test_a_model_asked_to_unload_finishes_its_requests_first(clients):
    server, client, api, _ = clients
    client.generate(model="other-f32", prompt="w1", options={"num_predict": 1})
    started, gate, queued = threading.Event(), threading.Event(), threading.Event()

    def hold(job, event):                  # runs in the model's engine thread
        started.set()
        assert gate.wait(60)
    scheduler = server.entry("other-f32").scheduler
    scheduler.listeners.append(hold)
    admit = scheduler.admit

    def admitted():                        # a request has taken its place in the model's queue
        ticket = admit()
        queued.set()
        return ticket
    scheduler.admit = admitted
    results = {}

    def stream():
        parts = list(client.chat(model="other-f32", messages=HI, options={"num_predict": 12}, stream=True))
        results["stream"] = ("".join(p.message.content for p in parts), parts[-1].eval_count, parts[-1].done_reason)

    def whole():
        results["whole"] = api.completions.create(model="helper:1b", prompt="w3 w4", max_tokens=7)

    first = threading.Thread(target=stream)
    first.start()
    assert started.wait(60)                # generating, held mid-reply
    stopped = client.generate(model="other-f32", prompt="", keep_alive=0)    # edge-llm stop / ollama stop
    assert stopped.done_reason == "unload"
    queued.clear()
    second = threading.Thread(target=whole)          # another request for it meanwhile: answered, not refused
    second.start()
    assert queued.wait(60)
    assert "other-f32:latest" in loaded(client) and not server.gone("other-f32").is_set()
    gate.set()
    first.join(60)
    second.join(60)
    assert results["stream"][1:] == (12, "length") and results["stream"][0]
    assert results["whole"].usage.completion_tokens == 7 and results["whole"].choices[0].finish_reason == "length"
    assert server.gone("other-f32").wait(30) and "other-f32:latest" not in loaded(client)

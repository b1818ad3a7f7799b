"""Models by name in the HTTP APIs, through the official clients: aliases of the loaded model,
an unknown name is a 404 in each API's shape, another installed model is loaded by its name
or alias, Ollama's /api/pull streams a pull from a local server in the Hub's layout, /api/ps
and `edge-llm ps` show what is loaded, `edge-llm stop` unloads."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import ollama
import openai
import pytest

from edge.api.ollama_api import create_ollama_app
from edge.api.openai_api import create_app
from edge.launch import model_store
from tests.fake_hub import FakeHub, Repo, serving
from tests.http_server import ready_state, running
from tests.test_http_api import tiny  # noqa: F401 fixture
from tests.tiny_llama import write_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent
HI = [{"role": "user", "content": "w1 w2"}]


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_bundle):
    """A model store holding one other installed model, and llama3.2 as an alias of the loaded one."""
    monkeypatch.setenv("EDGE_LLM_HOME", str(tmp_path / "home"))
    shutil.copytree(tiny_bundle, model_store.bundles_dir() / "other-f32")
    model_store.alias_table().set("llama3.2", tiny_bundle.name)
    model_store.set_alias("helper:1b", "other-f32")
    return tmp_path / "home"


@pytest.fixture
def servers(home, tiny):
    state = ready_state(tiny)
    with running(state, make_app=create_ollama_app) as ollama_base, running(state) as openai_base:
        yield ollama.Client(host=ollama_base), openai.OpenAI(base_url=f"{openai_base}/v1", api_key="x"), ollama_base


def test_ollama_names(servers, tiny):
    client, _, _ = servers
    for name in ("llama3.2", "llama3.2:latest", "LLAMA3.2", tiny.name, "tiny:latest"):
        reply = client.chat(model=name, messages=HI, options={"num_predict": 2})
        assert reply.done, name
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="mistral", messages=HI)
    assert e.value.status_code == 404 and "model 'mistral' does not exist here" in e.value.error
    assert client.show("llama3.2").details.quantization_level == tiny.bundle.quant
    assert client.show("helper:1b").details.quantization_level == "f32"      # shown without loading it
    assert [m.model for m in client.ps().models] == [f"{tiny.name}:latest"]
    reply = client.generate(model="helper:1b", prompt="w1", options={"num_predict": 2})     # installed: loaded
    assert reply.done and reply.eval_count <= 2
    assert [m.model for m in client.ps().models] == ["other-f32:latest", f"{tiny.name}:latest"]   # by its installed name
    tags = [m.model for m in client.list().models]
    assert tags[0] == f"{tiny.name}:latest" and "other-f32:latest" in tags


def test_openai_names(servers, tiny):
    _, api, _ = servers
    assert api.chat.completions.create(model="llama3.2:latest", messages=HI, max_tokens=2).choices
    assert api.models.retrieve("llama3.2").id == tiny.name
    for name in ("mistral", "gpt-4o", "x"):            # a name it does not run: OpenAI's 404, not the loaded model
        with pytest.raises(openai.NotFoundError) as e:
            api.chat.completions.create(model=name, messages=HI, max_tokens=2)
        err = e.value.body
        assert err["code"] == "model_not_found" and err["param"] == "model" and f"model '{name}' does not exist" \
            in err["message"] and err["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="mistral", prompt="w1", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        api.responses.create(model="mistral", input="w1")
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("mistral")
    assert api.completions.create(model="helper:1b", prompt="w1", max_tokens=2).usage.completion_tokens <= 2
    assert api.chat.completions.create(model="other-f32", messages=HI, max_tokens=2).choices


def test_pull_over_the_ollama_api(servers, tmp_path, monkeypatch):
    client, _, _ = servers
    src = tmp_path / "tiny-hf"
    write_tiny_llama(src, seed=3)
    hub = FakeHub()
    hub.repos["someone/Tiny"] = Repo.from_dir(src, licence="mit")
    with serving(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)   # other test modules set it for transformers
        parts = list(client.pull("hf.co/someone/Tiny", stream=True))
        statuses = [p.status for p in parts]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
        assert "verifying sha256 digest" in statuses
        sized = [p for p in parts if p.total]
        assert sized and sized[-1].completed == sized[-1].total == sum(len(d) for n, d in hub.repos["someone/Tiny"].files.items()
                                                                       if n in hub.served)
        assert any(p.digest and p.digest.startswith("sha256:") for p in parts)
        # installed now, under the name it was pulled by, and loaded by that name
        assert model_store.alias_table().lookup("hf.co/someone/Tiny") == "tiny-int8"
        assert client.chat(model="hf.co/someone/Tiny", messages=HI, options={"num_predict": 2}).done
        # an installed name: success at once; not a repository: 404; a gated one: the error line
        assert client.pull("llama3.2", stream=False).status == "success"
        with pytest.raises(ollama.ResponseError) as e:
            client.pull("mistral", stream=False)
        assert e.value.status_code == 404 and "not a Hugging Face repository" in e.value.error
        hub.repos["meta-llama/Gated"] = Repo.from_dir(src, gated=True)
        with pytest.raises(ollama.ResponseError) as e:
            list(client.pull("meta-llama/Gated", stream=True))
        assert "gated" in e.value.error and f"{url}/meta-llama/Gated" in e.value.error


def test_cli_ps_and_stop(servers, tiny):
    _, _, base = servers

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edge.cli", *args, "--host", base], capture_output=True,
                              text=True, cwd=REPO_ROOT, timeout=300, env={"PYTHONPATH": str(REPO_ROOT),
                                                                          "PATH": "/usr/bin:/bin"})
    r = cli("ps")
    assert r.returncode == 0 and f"{tiny.name}:latest" in r.stdout and tiny.bundle.quant in r.stdout
    r = cli("stop", "helper:1b")
    assert r.returncode == 0 and "helper:1b is not loaded" in r.stdout
    r = cli("stop", "llama3.2")                    # the served model, asked by an alias: unloaded
    assert r.returncode == 0 and "stopped llama3.2" in r.stdout, r.stderr
    assert cli("ps").stdout.splitlines() == ["NAME  SIZE  QUANT  UNTIL"]
    r = cli("stop", "mistral")
    assert r.returncode == 1 and "does not exist here" in r.stderr
    client = ollama.Client(host=base)             # a request loads it again
    assert client.chat(model="llama3.2", messages=HI, options={"num_predict": 2}).done
    r = cli("ps")
    assert f"{tiny.name}:latest" in r.stdout and "Forever" in r.stdout

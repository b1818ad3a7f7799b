"""`edge-llm pull` against a local server in the Hub's URL layout (tests/fake_hub.py):
a GGUF repository's file chosen by quant tag, a safetensors repository, resume after a cut,
gated repositories (401/403), a wrong checksum, a full disk; and aliases / show by name."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge.launch import model_store, pull
from tests.fake_hub import FakeHub, Repo, serving
from tests.tiny_llama import TINY_CONFIG, write_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_LLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))      # no login cache of the machine's
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)   # other test modules set it for transformers
    from huggingface_hub import constants     # read at import: point the login cache here too
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-hf")
    write_tiny_llama(d)
    (d / "LICENSE").write_text("Tiny licence: do as you like.\n")
    (d / "README.md").write_text("# a tiny model\n")
    (d / "pytorch_model.bin").write_bytes(b"not read by edge-llm" * 100)   # must not be fetched
    return d


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, llama3_tokenizer_json) -> Path:
    """A tiny Llama with Llama 3's vocabulary as an F16 GGUF (the benchmark's GGUF writer)."""
    from bench.compare_llamacpp import write_f16_gguf
    d = tmp_path_factory.mktemp("tiny-gguf")
    write_tiny_llama(d / "hf", tokenizer_json=llama3_tokenizer_json, vocab_size=128256)
    from safetensors import safe_open
    with safe_open(d / "hf" / "model.safetensors", framework="numpy") as f:
        names = list(f.keys())
    cfg = json.loads((d / "hf" / "config.json").read_text())    # the keys the GGUF writer reads
    cfg.update(rope_theta=TINY_CONFIG["rope_theta"],
               rope_scaling={**TINY_CONFIG["rope_scaling"], "original_max_position_embeddings": 8192},
               head_dim=TINY_CONFIG["head_dim"])
    (d / "hf" / "config.json").write_text(json.dumps(cfg))
    (d / "hf" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "model.safetensors" for n in names}}))
    return write_f16_gguf(d / "hf", d / "Tiny-F16.gguf", llama3_tokenizer_json, "Tiny", "1M")


@pytest.fixture
def hub(monkeypatch):
    h = FakeHub()
    with serving(h) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        yield h


def gguf_repo(tiny_gguf: Path, **kw) -> Repo:
    data = tiny_gguf.read_bytes()
    return Repo({"README.md": b"# GGUFs\n", "tiny-F16.gguf": data, "tiny-Q8_0.gguf": data,
                 "tiny-Q4_K_M.gguf": data, "LICENSE.txt": b"the licence\n"}, licence="apache-2.0", **kw)


def events():
    got = []
    return got, got.append


# --- choosing -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,repo,tag,rev", [
    ("bartowski/Llama-3.2-1B-Instruct-GGUF", "bartowski/Llama-3.2-1B-Instruct-GGUF", None, None),
    ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q8_0", "bartowski/Llama-3.2-1B-Instruct-GGUF", "Q8_0", None),
    ("https://huggingface.co/o/n:q4_k_m@v1.0", "o/n", "q4_k_m", "v1.0"),
    ("o/n@0123abc", "o/n", None, "0123abc"),
    ("o/n:latest", "o/n", None, None),
])
def test_parse_spec(text, repo, tag, rev):
    assert pull.parse_spec(text) == pull.PullSpec(repo, tag, rev)


@pytest.mark.parametrize("bad", ["llama3.2", "o/n:", "o/n@", "/n", "a/b/c"])
def test_parse_spec_refuses(bad):
    with pytest.raises(pull.PullError, match="OWNER/NAME"):
        pull.parse_spec(bad)


NAMES = ["Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Llama-3.2-1B-Instruct-Q4_K_S.gguf", "Llama-3.2-1B-Instruct-Q8_0.gguf",
         "Llama-3.2-1B-Instruct-Q4_0.gguf", "Llama-3.2-1B-Instruct-f16.gguf", "mmproj-Q8_0.gguf",
         "Q6_K/Llama-3.2-1B-Instruct-Q6_K-00001-of-00002.gguf", "README.md"]


@pytest.mark.parametrize("tag,want", [(None, "Llama-3.2-1B-Instruct-Q4_K_M.gguf"),
                                      ("q8_0", "Llama-3.2-1B-Instruct-Q8_0.gguf"),
                                      ("Q4_K_S", "Llama-3.2-1B-Instruct-Q4_K_S.gguf"),
                                      ("F16", "Llama-3.2-1B-Instruct-f16.gguf")])
def test_choose_gguf_by_tag(tag, want):
    assert pull.choose_gguf(NAMES, tag) == want


def test_choose_gguf_defaults_without_q4_k_m():
    assert pull.choose_gguf(["m-Q8_0.gguf", "m-Q4_0.gguf"], None) == "m-Q4_0.gguf"
    assert pull.choose_gguf(["m-Q5_K_M.gguf", "m-Q6_K.gguf"], None) == "m-Q5_K_M.gguf"


def test_choose_gguf_unknown_and_split_tags():
    with pytest.raises(pull.PullError, match="no GGUF file with quant Q3_K_L.*Q4_K_M.*Q8_0"):
        pull.choose_gguf(NAMES, "Q3_K_L")
    with pytest.raises(pull.PullError, match="split"):
        pull.choose_gguf(NAMES, "Q6_K")


# --- pulling --------------------------------------------------------------------------------

def test_pull_gguf_by_quant_tag(home, hub, tiny_gguf):
    hub.repos["someone/Tiny-GGUF"] = gguf_repo(tiny_gguf)
    got, emit = events()
    dest = pull.pull("hf.co/someone/Tiny-GGUF:Q8_0", quant="f16", emit=emit, log=lambda m: None)
    assert dest.name == "tiny-q8_0-f16" and model_store.is_current(dest)
    # only the chosen file (and the licence) crossed the wire
    assert set(hub.served) == {"tiny-Q8_0.gguf", "LICENSE.txt"}
    # Ollama's status sequence, with byte counts that end at the total
    statuses = [e.status for e in got]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses and "converting to f16" in statuses
    last = [e for e in got if e.total][-1]
    assert last.completed == last.total == tiny_gguf.stat().st_size + len(b"the licence\n")
    assert any(e.digest == f"sha256:{hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()}" for e in got)
    # the names it was asked by lead to it
    for name in ("someone/Tiny-GGUF:Q8_0", "hf.co/someone/Tiny-GGUF:q8_0"):
        assert model_store.resolve(name, log=lambda m: None) == dest
    src = json.loads((dest / model_store.SOURCE_STAMP).read_text())
    assert src["pulled"]["commit"] == hub.repos["someone/Tiny-GGUF"].commit
    assert src["pulled"]["licence"] == "apache-2.0"
    # nothing half-written is left
    assert not list(home.rglob("*.part"))


def test_pull_safetensors_fetches_only_what_is_read(home, hub, tiny_hf):
    hub.repos["org/Tiny"] = Repo.from_dir(tiny_hf, licence="mit")
    dest = pull.pull("org/Tiny", quant="f16", log=lambda m: None)
    assert dest.name == "tiny-f16"
    assert "pytorch_model.bin" not in hub.served and "README.md" not in hub.served
    assert {"config.json", "tokenizer.json", "model.safetensors", "LICENSE"} <= set(hub.served)
    # the API answered the revision asked for
    hub.repos["org/Tiny"].commit = "f" * 40
    with pytest.raises(pull.PullError, match="no revision 'v9'"):
        pull.pull("org/Tiny@v9", quant="f16", log=lambda m: None)


def test_resume_after_a_cut(home, hub, tiny_gguf):
    hub.repos["someone/Tiny-GGUF"] = gguf_repo(tiny_gguf)
    size = tiny_gguf.stat().st_size
    hub.cut["tiny-Q4_K_M.gguf"] = cut = size * 2 // 3     # then a 503 to the client's immediate retry
    with pytest.raises(pull.PullError, match="pull again to resume"):
        pull.pull("someone/Tiny-GGUF", quant="f16", log=lambda m: None)
    parts = list(home.rglob("*.gguf.part"))
    assert len(parts) == 1
    kept = parts[0].stat().st_size              # whole chunks of what arrived before the cut
    assert 0 < kept <= cut
    assert not model_store.bundles_dir().exists() or not any(model_store.bundles_dir().iterdir())
    hub.served.clear()
    hub.requests.clear()
    got, emit = events()
    dest = pull.pull("someone/Tiny-GGUF", quant="f16", emit=emit, log=lambda m: None)
    assert model_store.is_current(dest)
    ranges = [h.get("Range") for m, p, h in hub.requests if m == "GET" and p.endswith("tiny-Q4_K_M.gguf")]
    assert ranges == [f"bytes={kept}-"]
    assert hub.served["tiny-Q4_K_M.gguf"] == size - kept          # the rest only
    first = [e for e in got if e.total][0]
    assert first.completed == kept                                # progress starts where it stopped
    assert not list(home.rglob("*.part"))


@pytest.mark.parametrize("token,status", [(None, 401), ("hf_not_granted", 403)])
def test_gated_repository(home, hub, tiny_gguf, monkeypatch, token, status):
    hub.repos["meta-llama/Gated-GGUF"] = gguf_repo(tiny_gguf, gated=True, granted_tokens={"hf_granted"})
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(pull.PullError) as e:
        pull.pull("meta-llama/Gated-GGUF", log=lambda m: None)
    msg = str(e.value)
    assert f"gated model ({status})" in msg and f"{hub_url()}/meta-llama/Gated-GGUF" in msg
    assert ("no token was found" in msg) == (token is None)
    assert not list(home.rglob("*.part"))


def test_gated_repository_with_a_granted_token(home, hub, tiny_hf, monkeypatch):
    hub.repos["meta-llama/Gated"] = Repo.from_dir(tiny_hf, gated=True, granted_tokens={"hf_granted"})
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    assert model_store.is_current(pull.pull("meta-llama/Gated", quant="f16", log=lambda m: None))


def test_token_from_the_login_cache(home, hub, tiny_hf):
    hub.repos["meta-llama/Gated"] = Repo.from_dir(tiny_hf, gated=True, granted_tokens={"hf_cached"})
    from huggingface_hub import constants
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text("hf_cached")
    assert model_store.is_current(pull.pull("meta-llama/Gated", quant="f16", log=lambda m: None))


def hub_url() -> str:
    return os.environ["HF_ENDPOINT"]


def test_unknown_repository(home, hub):
    with pytest.raises(pull.PullError, match="no repository nobody/nothing on .*HF_TOKEN"):
        pull.pull("nobody/nothing", log=lambda m: None)


def test_unreachable_hub(home, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(pull.PullError, match="cannot reach http://127.0.0.1:9"):
        pull.pull("someone/Tiny", log=lambda m: None)


def test_wrong_sha256_is_removed(home, hub, tiny_gguf):
    hub.repos["someone/Tiny-GGUF"] = gguf_repo(tiny_gguf)
    hub.corrupt.add("tiny-Q4_K_M.gguf")
    with pytest.raises(pull.PullError, match="checksum mismatch"):
        pull.pull("someone/Tiny-GGUF", quant="f16", log=lambda m: None)
    assert not [p for p in home.rglob("*") if p.name.startswith("tiny-Q4_K_M.gguf")]
    assert not model_store.bundles_dir().exists() or not any(model_store.bundles_dir().iterdir())


def test_not_enough_space_is_said_before_downloading(home, hub, tiny_gguf, monkeypatch):
    import shutil
    hub.repos["someone/Tiny-GGUF"] = gguf_repo(tiny_gguf)
    real = shutil.disk_usage
    monkeypatch.setattr(pull.shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    with pytest.raises(pull.PullError, match="not enough disk space.*10 MB are free"):
        pull.pull("someone/Tiny-GGUF", quant="f16", log=lambda m: None)
    assert not hub.served


class _FillsUp:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b):
        if self.f.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_midway_leaves_nothing(home, hub, tiny_gguf, monkeypatch):
    hub.repos["someone/Tiny-GGUF"] = gguf_repo(tiny_gguf)
    monkeypatch.setattr(pull, "_open_part", lambda p: _FillsUp(open(p, "ab"), 100_000))
    with pytest.raises(pull.PullError, match="disk filled up while writing tiny-Q4_K_M.gguf"):
        pull.pull("someone/Tiny-GGUF", quant="f16", log=lambda m: None)
    assert not list(home.rglob("*.part"))
    assert not model_store.bundles_dir().exists() or not any(model_store.bundles_dir().iterdir())


# --- names ------------------------------------------------------------------------------------

def test_aliases_show_and_rm_through_the_cli(home, hub, tiny_hf):
    hub.repos["someone/Tiny"] = Repo.from_dir(tiny_hf, licence="mit")

    def cli(*args, ok=True):
        r = subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True,
                           cwd=REPO_ROOT, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        assert (r.returncode == 0) == ok, r.stderr
        return r

    r = cli("pull", "someone/Tiny", "--quant", "f16")
    assert r.stdout.strip() == "tiny-f16"
    assert "verifying sha256 digest" in r.stderr and "success" in r.stderr
    assert cli("alias", "llama3.2:latest", "tiny-f16").stdout.strip() == "llama3.2:latest -> tiny-f16"
    assert model_store.resolve("llama3.2", log=lambda m: None).name == "tiny-f16"
    assert model_store.resolve("LLAMA3.2:latest", log=lambda m: None).name == "tiny-f16"
    assert model_store.resolve("hf.co/someone/Tiny", log=lambda m: None).name == "tiny-f16"
    r = cli("alias", "other", "no-such-model", ok=False)
    assert "no installed model of that name" in r.stderr
    cli("alias", "llama3.2", "tiny-f16")                        # the same target again: fine
    assert "llama3.2\ttiny-f16" in cli("alias").stdout
    show = json.loads(cli("show", "llama3.2", "--json").stdout)
    assert show["name"] == "tiny-f16" and show["quant"] == "f16"
    assert show["licence"] == "mit" and show["licence_text"] == "Tiny licence: do as you like.\n"
    assert show["pulled_from"].startswith("someone/Tiny@") and "llama3.2" in show["aliases"]
    assert show["parameters"]["hidden_size"] == 64 and show["size"] > 0
    assert "quant                  f16" in cli("show", "llama3.2").stdout
    cli("rm", "tiny-f16")
    assert model_store.alias_table().load() == {}
    r = cli("show", "llama3.2", ok=False)
    assert "llama3.2" in r.stderr


def test_ps_and_stop_need_a_server(home):
    r = subprocess.run([sys.executable, "-m", "edge.cli", "ps", "--host", "127.0.0.1:9"], capture_output=True,
                       text=True, cwd=REPO_ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert r.returncode == 1 and "no edge-llm server at http://127.0.0.1:9" in r.stderr

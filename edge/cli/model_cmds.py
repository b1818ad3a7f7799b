"""`edge-llm pull` (a model from the Hugging Face Hub), `alias` (another name for an installed
model), `show` (what an installed model is), `ps` and `stop` (what a running server has
loaded, asked over its Ollama API)."""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

from convert.quantize import SCHEMES
from edge.launch import model_store
from edge.launch.request import OLLAMA_PORT


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _clock(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressLine:
    """One line on stderr, redrawn on a terminal, one line per status otherwise."""

    def __init__(self, out=sys.stderr):
        self.out, self.tty, self.last_status = out, out.isatty(), None

    def __call__(self, ev) -> None:
        if ev.total:
            line = (f"{ev.status[:40]:40s} {_mb(ev.completed or 0):>9s} / {_mb(ev.total)}"
                    f"  {(_mb(ev.rate) + '/s') if ev.rate else '':>11s}  ETA {_clock(ev.eta)}")
            if self.tty:
                self.out.write("\r" + line + "\x1b[K")
                self.out.flush()
                return
            if ev.status == self.last_status and ev.completed != ev.total:
                return
        else:
            line = ev.status
            if self.tty:
                self.out.write("\n")
        self.last_status = ev.status
        self.out.write(line + ("" if self.tty and ev.total else "\n"))
        self.out.flush()


def json_lines(ev) -> None:
    """`pull --json`: one event a line on stdout (the server relays them as Ollama's)."""
    d = {"status": ev.status, "digest": ev.digest, "total": ev.total, "completed": ev.completed,
         "rate": ev.rate, "eta": ev.eta, **ev.extra}
    print(json.dumps({k: v for k, v in d.items() if v is not None}), flush=True)


def cmd_pull(a) -> int:
    from edge.launch.pull import pull
    dest = pull(a.spec, quant=a.quant, emit=json_lines if a.json else ProgressLine(),
                log=lambda m: print(m, file=sys.stderr), keep_download=not a.no_keep)
    if a.json:
        return 0
    names = model_store.alias_table().of(dest.name)
    print(dest.name)
    print(f"installed {dest.name}" + (f" (also: {', '.join(names)})" if names else "")
          + f"; run it with: edge-llm run --model {dest.name} 'Hello'", file=sys.stderr)
    return 0


def cmd_alias(a) -> int:
    if a.rm:
        target = model_store.alias_table().remove(a.alias)
        print(f"removed alias {a.alias} (of {target})")
        return 0
    if a.alias is None:
        table = model_store.alias_table().load()
        for k, v in table.items():
            print(f"{k}\t{v}")
        if not table:
            print("no aliases (edge-llm alias NAME MODEL makes one)", file=sys.stderr)
        return 0
    if a.target is None:
        raise ValueError("give the installed model the alias names: edge-llm alias NAME MODEL")
    target = model_store.set_alias(a.alias, a.target, replace=a.force)
    print(f"{a.alias} -> {target}")
    return 0


def describe(name: str) -> dict:
    """What `show` prints, for an installed model by name or alias."""
    from edge.model.bundle import MANIFEST, read_json
    path = model_store.resolve(name, log=lambda m: print(m, file=sys.stderr))
    m = read_json(path / MANIFEST)
    src = read_json(path / model_store.SOURCE_STAMP)
    pulled = src.get("pulled", {})
    cfg = m.get("config", {})
    licence_text = None
    for f in pulled.get("licence_files", []):
        p = path / f".{f}"
        if p.exists():
            licence_text = p.read_text(encoding="utf-8", errors="replace")
            break
    return {
        "name": path.name, "model": m.get("name"), "path": str(path), "aliases": model_store.alias_table().of(path.name),
        "quant": m.get("quant"), "size": model_store._du(path),
        "parameters": {k: cfg.get(k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                               "intermediate_size", "vocab_size", "max_position_embeddings",
                                               "tie_word_embeddings") if k in cfg},
        "parameter_count": _param_count(cfg),
        "source": src.get("source") or m.get("source"),
        "pulled_from": (f"{pulled['repo']}" + (f":{pulled['tag']}" if pulled.get("tag") else "")
                        + f"@{pulled['commit']}") if pulled else None,
        "licence": pulled.get("licence"), "licence_text": licence_text,
        "template": m.get("chat_template"),
    }


def _param_count(cfg: dict) -> int | None:
    try:
        from edge.model.config import ModelConfig
        return ModelConfig.from_dict(cfg).parameter_count
    except Exception:               # an older manifest's config: the count is only informative
        return None


def cmd_show(a) -> int:
    d = describe(a.name)
    if a.json:
        print(json.dumps(d, indent=1))
        return 0
    if a.template:
        print(d["template"] or "")
        return 0
    if a.license:
        print(d["licence_text"] or d["licence"] or "no licence recorded")
        return 0
    n = d["parameter_count"]
    rows = [("name", d["name"]), ("model", d["model"]), ("aliases", ", ".join(d["aliases"]) or "-"),
            ("quant", d["quant"]), ("size", _mb(d["size"])),
            ("parameters", f"{n / 1e9:.2f}B" if n and n >= 1e9 else f"{n / 1e6:.0f}M" if n else "?"),
            *[(f"  {k}", str(v)) for k, v in d["parameters"].items()],
            ("source", d["source"]), ("pulled from", d["pulled_from"] or "-"), ("licence", d["licence"] or "-"),
            ("template", f"{len(d['template'])} characters (edge-llm show {a.name} --template)"
             if d["template"] else "none")]
    for k, v in rows:
        print(f"{k:22s} {v}")
    return 0


def server_url(host: str | None) -> str:
    h = host or os.environ.get("OLLAMA_HOST") or f"127.0.0.1:{OLLAMA_PORT}"
    return (h if "://" in h else f"http://{h}").rstrip("/")


def _call(url: str, body: dict | None = None, timeout: float = 30) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except (ValueError, AttributeError):
            pass
        raise RuntimeError(f"{url}: {e.code} {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"no edge-llm server at {url} ({getattr(e, 'reason', e)}); "
                              "start one with edge-llm serve, or give --host") from None
    return json.loads(text.strip().splitlines()[-1]) if text.strip() else {}


def _until(expires_at: str | None) -> str:
    """Ollama's UNTIL column: "Forever", "4 minutes from now", "Stopping..."."""
    from datetime import datetime, timezone
    if not expires_at:
        return "?"
    try:
        t = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return expires_at
    if t.year >= 9999:
        return "Forever"
    left = (t - datetime.now(timezone.utc)).total_seconds()
    if left <= 0:
        return "Stopping..."
    for unit, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= size:
            n = round(left / size)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "Less than a second from now"


def cmd_ps(a) -> int:
    models = _call(server_url(a.host) + "/api/ps").get("models", [])
    rows = [("NAME", "SIZE", "QUANT", "UNTIL")]
    for m in models:
        rows.append((m.get("name", "?"), _mb(m.get("size", 0)), m.get("details", {}).get("quantization_level", "?"),
                     _until(m.get("expires_at"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_stop(a) -> int:
    """As `ollama stop`: a generate request with an empty prompt and keep_alive 0 (the server
    unloads the model now, or once its running requests end), then a look at /api/ps."""
    base = server_url(a.host)
    before = {m.get("name") for m in _call(base + "/api/ps").get("models", [])}
    reply = _call(base + "/api/generate", {"model": a.name, "prompt": "", "keep_alive": 0, "stream": False})
    tag = reply.get("model", a.name)
    tag = tag if ":" in tag else f"{tag}:latest"
    if tag not in before:
        print(f"{a.name} is not loaded")
        return 0
    if tag in {m.get("name") for m in _call(base + "/api/ps").get("models", [])}:
        print(f"{a.name} unloads when its running requests end")
        return 0
    print(f"stopped {a.name}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pull", help="download a model from the Hugging Face Hub and install it",
                       description="Download REPO (a GGUF repository: the file of quant QUANT, Q4_K_M by default; a "
                       "safetensors repository: the weights, config and tokenizer) and convert it into the model "
                       "store. Resumes a cut download; checks the Hub's sha256. Token: HF_TOKEN or `hf auth login`.")
    p.add_argument("spec", metavar="REPO[:QUANT][@REVISION]",
                   help="e.g. bartowski/Llama-3.2-1B-Instruct-GGUF:Q8_0, meta-llama/Llama-3.2-1B-Instruct, "
                        "hf.co/REPO:QUANT")
    p.add_argument("--quant", default=None, choices=SCHEMES,
                   help="edge-llm's weight format for the converted model (default: by the model's size)")
    p.add_argument("--no-keep", action="store_true",
                   help="delete the downloaded checkpoint after converting it (saves its size on disk; "
                        "a later bundle format change then needs a new pull)")
    p.add_argument("--json", action="store_true",
                   help="progress as JSON lines on stdout (status, digest, total, completed, rate, eta)")
    p.set_defaults(func=cmd_pull)

    al = sub.add_parser("alias", help="give an installed model another name (e.g. llama3.2:latest); "
                        "no arguments: list the aliases")
    al.add_argument("alias", nargs="?", default=None, help="the new name")
    al.add_argument("target", nargs="?", default=None, help="an installed model (edge-llm models lists them)")
    al.add_argument("--rm", action="store_true", help="remove the alias")
    al.add_argument("--force", action="store_true", help="point an existing alias elsewhere")
    al.set_defaults(func=cmd_alias)

    s = sub.add_parser("show", help="an installed model's quant, size, parameters, licence and chat template")
    s.add_argument("name", help="an installed model's name or alias")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--template", action="store_true", help="print only the chat template")
    g.add_argument("--license", action="store_true", help="print only the licence")
    g.add_argument("--json", action="store_true", help="everything as JSON")
    s.set_defaults(func=cmd_show)

    for name, func, text in (("ps", cmd_ps, "the models a running server has loaded (its /api/ps)"),
                             ("stop", cmd_stop, "unload a model from a running server (keep_alive 0)")):
        c = sub.add_parser(name, help=text)
        if name == "stop":
            c.add_argument("name", help="the loaded model's name")
        c.add_argument("--host", default=None,
                       help=f"the server's Ollama API, HOST:PORT or URL (default: $OLLAMA_HOST or 127.0.0.1:{OLLAMA_PORT})")
        c.set_defaults(func=func)

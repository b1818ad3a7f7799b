"""Home Assistant's Assist traffic replayed against a running `edge-llm serve`, over the Ollama
API (what HA's Ollama integration sends) and over Wyoming (HA's Wyoming conversation agent).

    python -m bench.assist --url http://127.0.0.1:8080 --ollama http://127.0.0.1:11434 \
        [--wyoming 127.0.0.1:10400] [--entities 10,50,100] [--later MINUTES] [--json]

The request shapes follow Home Assistant 2025.4's Ollama integration and `helpers/llm.py`:
the system prompt is the date/time line, the default instructions, the Assist API prompt
(tool usage, "not able to start timers", the YAML overview of exposed entities, ~16 tokens
each) and the Assist intent tools; `options.num_ctx` 8192 and `keep_alive` -1 as HA sends
them, plus `num_predict` (--num-predict, default 128; HA sends none) to bound a run's length. HA 2025.x puts the time line first ("time first"); newer releases put it last when no
GetDateTime tool is offered ("time last"); both orders are replayed. For each home size and
order: a new conversation (a command, the tool call, its result and the spoken answer), a
follow-up turn a minute later, then a second new conversation of the same home. Each home
size and order is replayed as a home of its own (other devices first, another time of day),
so one home's rows reuse nothing of another's.

Reported per request: prompt tokens (context used), tokens reused (the server's
`edge_llm_cached_prompt_tokens_total` before and after, so run it alone against the
server), seconds to the first chunk (content or tool call) and in total. Over Wyoming the
question is the transcript and the first chunk is the first `handled-chunk`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from datetime import datetime, timedelta

import httpx

INSTRUCTIONS = ("You are a voice assistant for Home Assistant.\nAnswer questions about the world truthfully.\n"
                "Answer in plain text. Keep it simple and to the point.\n")
TOOL_USAGE = ("When controlling Home Assistant always call the intent tools. Use HassTurnOn to lock and "
              "HassTurnOff to unlock a lock. When controlling a device, prefer passing just name and domain. "
              "When controlling an area, prefer passing just area name and domain.")
ALL_OF_TYPE = ("When a user asks to turn on all devices of a specific type, ask user to specify an area, "
               "unless there is only one device of that type.")
NO_TIMERS = "This device is not able to start timers."
OVERVIEW = "An overview of the areas and the devices in this smart home:"
AREAS = ["Kitchen", "Living Room", "Bedroom", "Hall", "Office", "Bathroom", "Garage", "Garden"]
KINDS = [("light", "Light", "off"), ("switch", "Socket", "on"), ("cover", "Blind", "open"),
         ("sensor", "Temperature", "21.5"), ("fan", "Fan", "off"), ("lock", "Door Lock", "locked"),
         ("media_player", "Speaker", "idle"), ("climate", "Thermostat", "heat")]
DOMAINS = sorted({d for d, _, _ in KINDS})


def _target(extra: dict | None = None) -> dict:
    props = {"name": {"type": "string"}, "area": {"type": "string"}, "floor": {"type": "string"},
             "domain": {"type": "array", "items": {"type": "string", "enum": DOMAINS}},
             "device_class": {"type": "array", "items": {"type": "string",
                                                          "enum": ["outlet", "switch", "blind", "door", "garage"]}}}
    return {"type": "object", "properties": {**props, **(extra or {})}, "required": []}


def _tool(name: str, description: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS = [
    _tool("HassTurnOn", "Turns on/opens/presses a device or entity", _target()),
    _tool("HassTurnOff", "Turns off/closes a device or entity", _target()),
    _tool("HassSetPosition", "Sets the position of a device or entity",
          _target({"position": {"type": "integer", "minimum": 0, "maximum": 100}})),
    _tool("HassLightSet", "Sets the brightness or color of a light",
          _target({"brightness": {"type": "integer", "minimum": 0, "maximum": 100},
                   "color": {"type": "string"}, "temperature": {"type": "integer", "minimum": 0}})),
    _tool("HassClimateSetTemperature", "Sets the desired temperature of a climate device or entity",
          {"type": "object", "properties": {"temperature": {"type": "number"}, "area": {"type": "string"},
                                            "name": {"type": "string"}}, "required": ["temperature"]}),
    _tool("HassMediaPause", "Pauses a media player", _target()),
    _tool("HassMediaUnpause", "Resumes a media player", _target()),
    _tool("HassMediaNext", "Skips a media player to the next item", _target()),
    _tool("HassSetVolume", "Sets the volume of a media device",
          _target({"volume_level": {"type": "integer", "minimum": 0, "maximum": 100}})),
    _tool("HassListAddItem", "Add item to a todo list",
          {"type": "object", "properties": {"item": {"type": "string"}, "name": {"type": "string"}},
           "required": ["item", "name"]}),
]


def entities(n: int, home: int = 0) -> list[dict]:
    """n exposed entities; homes with another `home` number list other devices first, so two
    homes replayed against one server share no prefix of their entity lists."""
    out = []
    for i in range(n):
        domain, label, state = KINDS[(i + home) % len(KINDS)]
        area = AREAS[(i // len(KINDS)) % len(AREAS)]
        out.append({"names": f"{area} {label}" + (f" {i // 64 + 1}" if i >= 64 else ""), "domain": domain,
                    "state": state, "areas": area})
    return out


def _yaml(items: list[dict]) -> str:
    """HA's yaml_util.dump of the entity list (block style, one key per line)."""
    lines = []
    for e in items:
        for j, (k, v) in enumerate(e.items()):
            v = f"'{v}'" if re.fullmatch(r"[\d.]+|on|off|yes|no", str(v)) else v
            lines.append(("- " if j == 0 else "  ") + f"{k}: {v}")
    return "\n".join(lines) + "\n"


def system_prompt(n: int, clock: datetime, time_first: bool, home: int = 0) -> str:
    when = f"Current time is {clock:%H:%M:%S}. Today's date is {clock:%Y-%m-%d}.\n"
    api = "\n".join([TOOL_USAGE, ALL_OF_TYPE, NO_TIMERS, OVERVIEW, _yaml(entities(n, home))])
    return (when + INSTRUCTIONS + api) if time_first else (INSTRUCTIONS + api + "\n" + when)


def conversation(n: int, clock: datetime, time_first: bool, question: str, home: int = 0) -> list[dict]:
    return [{"role": "system", "content": system_prompt(n, clock, time_first, home)},
            {"role": "user", "content": question}]


# --- the replay ------------------------------------------------------------------------

def cached_total(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    m = re.search(r"^edge_llm_cached_prompt_tokens_total (\d+)", text, re.M)
    return int(m.group(1)) if m else 0


NUM_PREDICT = 128


def ollama_turn(client, url: str, model: str, messages: list[dict]) -> dict:
    """One streamed /api/chat as HA sends it; the reply's message joins `messages`."""
    before, t0, first, content, calls, last = cached_total(url), time.perf_counter(), None, "", [], None
    for part in client.chat(model=model, messages=messages, tools=TOOLS, stream=True, keep_alive=-1,
                            options={"num_ctx": 8192, "num_predict": NUM_PREDICT}):
        msg = part.message
        if first is None and (msg.content or msg.tool_calls):
            first = time.perf_counter() - t0
        content += msg.content or ""
        calls += list(msg.tool_calls or [])
        last = part
    total = time.perf_counter() - t0
    reply = {"role": "assistant", "content": content}
    if calls:
        reply["tool_calls"] = [{"function": {"name": c.function.name, "arguments": dict(c.function.arguments)}}
                               for c in calls]
    messages.append(reply)
    return {"prompt": last.prompt_eval_count, "reused": cached_total(url) - before, "first": first, "total": total,
            "calls": [c.function.name for c in calls]}


START = datetime(2025, 4, 15, 18, 2, 11)
HOMES = [(10, True), (10, False), (50, True), (50, False), (100, True), (100, False)]


def home_number(n: int, time_first: bool) -> int:
    """Which home a size and order stand for, the same in every run (so a replay after a
    restart meets the homes the prompt cache stored): the standard six differ in the first
    device listed and in the time of day."""
    return HOMES.index((n, time_first)) if (n, time_first) in HOMES else n % len(KINDS)


def replay_ollama(url: str, ollama_url: str, model: str, n: int, time_first: bool, home: int = 0,
                  later: float = 0.0) -> list[dict]:
    """One home's conversations; `later` minutes shift every clock (a replay after a restart
    is a later time of the day, as it would be in a real home)."""
    import ollama
    client = ollama.Client(host=ollama_url, timeout=3600)
    clock, rows = START + timedelta(minutes=later), []
    for label in ("new conversation", "second conversation"):
        msgs = conversation(n, clock, time_first, "Turn on the kitchen light.", home)
        r = ollama_turn(client, url, model, msgs)
        rows.append({"turn": f"{label}: command", **r})
        if msgs[-1].get("tool_calls"):
            msgs.append({"role": "tool", "content": json.dumps({"success": True, "targets": ["Kitchen Light"]}),
                         "tool_name": msgs[-1]["tool_calls"][0]["function"]["name"]})
            rows.append({"turn": f"{label}: tool result", **ollama_turn(client, url, model, msgs)})
        if label == "new conversation":
            clock += timedelta(seconds=61)
            msgs[0] = {"role": "system", "content": system_prompt(n, clock, time_first, home)}
            msgs.append({"role": "user", "content": "Is the garage door locked?"})
            rows.append({"turn": "follow-up", **ollama_turn(client, url, model, msgs)})
        clock += timedelta(minutes=5)
    return rows


def replay_wyoming(url: str, address: str, n: int) -> list[dict]:
    from wyoming.asr import Transcript
    from wyoming.client import AsyncTcpClient
    host, _, port = address.rpartition(":")

    async def turn(text: str, cid: str) -> dict:
        before, t0, first = cached_total(url), time.perf_counter(), None
        async with AsyncTcpClient(host, int(port)) as client:
            await client.write_event(Transcript(text=text, language="en", context={"conversation_id": cid}).event())
            while (ev := await client.read_event()) is not None:
                if first is None and ev.type == "handled-chunk":
                    first = time.perf_counter() - t0
                if ev.type in ("handled-stop", "not-handled", "error"):
                    break
        return {"prompt": None, "reused": cached_total(url) - before, "first": first,
                "total": time.perf_counter() - t0, "calls": [], "end": ev.type if ev else "closed"}

    stamp = int(time.time())
    return [{"turn": "new conversation", **asyncio.run(turn("Turn on the kitchen light.", f"a{stamp}"))},
            {"turn": "follow-up", **asyncio.run(turn("And the hall light?", f"a{stamp}"))},
            {"turn": "second conversation", **asyncio.run(turn("What time is it?", f"b{stamp}"))}]


def _fmt(x, digits=2) -> str:
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the OpenAI port (for /metrics)")
    p.add_argument("--ollama", default="http://127.0.0.1:11434")
    p.add_argument("--wyoming", default=None, help="HOST:PORT of the Wyoming service (default: skip)")
    p.add_argument("--entities", default="10,50,100")
    p.add_argument("--orders", default="first,last", help="the time line's place in the system prompt")
    p.add_argument("--num-predict", type=int, default=NUM_PREDICT, help="options.num_predict of each request")
    p.add_argument("--later", type=float, default=0.0,
                   help="minutes to shift every clock by: replaying after a server restart with --later 60 makes the "
                        "first row the first conversation after the restart (the prompt cache's case)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    globals()["NUM_PREDICT"] = a.num_predict
    model = httpx.get(f"{a.ollama}/api/tags", timeout=30).json()["models"][0]["name"]
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        if not a.json:
            print(f"| {row['path']} | {row['entities']} | {row['order']} | {row['turn']} | {_fmt(row['prompt'])} | "
                  f"{_fmt(row['reused'])} | {_fmt(row['first'])} | {_fmt(row['total'])} | "
                  f"{','.join(row['calls']) or '-'} |", flush=True)
    if not a.json:
        print("| path | entities | order | turn | prompt tokens | reused | first chunk s | total s | calls |")
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for n in [int(x) for x in a.entities.split(",")]:
        for time_first in [o == "first" for o in a.orders.split(",")]:
            home = home_number(n, time_first)       # each its own home: no prefix shared between them
            for r in replay_ollama(a.url, a.ollama, model, n, time_first, home, a.later + 7 * home):
                report({"path": "ollama", "entities": n, "order": "time first" if time_first else "time last", **r})
    if a.wyoming:
        for r in replay_wyoming(a.url, a.wyoming, 0):
            report({"path": "wyoming", "entities": "-", "order": "-", **r})
    if a.json:
        print(json.dumps(rows, indent=1))

if __name__ == "__main__":
    main()

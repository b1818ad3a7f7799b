"""`edge-llm chat` through a real pseudo-terminal (pexpect): bracketed paste, \"\"\" blocks,
arrow-key history, /help, /context, /stats, /set, /save and /load, Ctrl-C keeping the partial
reply, replies wrapped at word boundaries, keys typed during a reply held for the next prompt,
and a context that fills and keeps the newest turns. The tiny random model runs through
tests/chat_helper.py, which slows it down and takes away its end-of-sequence token."""
from __future__ import annotations

import json
import os
import re
import sys
import time

import pexpect

from edge.launch import kv_bytes_per_token, max_context
from edge.model.bundle import Bundle
from edge.model.forward import PREFILL_CHUNK

READY = "\x1b\\[\\?2004h"           # prompt_toolkit turns bracketed paste on for every prompt
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


def plain(text: str) -> str:
    return ANSI.sub("", text)


class Chat:
    def __init__(self, bundle, tmp_path, *args, delay: float = 0.0, dimensions=(50, 250)):
        env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm",
               "EDGE_LLM_HOME": str(tmp_path / "home")}
        self.p = pexpect.spawn(sys.executable, ["-m", "tests.chat_helper", str(delay), "chat", "-m", str(bundle),
                                                "--temperature", "0", *args],
                               env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
                               dimensions=dimensions, encoding="utf-8", timeout=60)
        self.banner = self.wait()

    def wait(self) -> str:
        self.p.expect(READY)
        return plain(self.p.before)

    def say(self, text: str) -> str:
        """Type a line, return what came back before the next prompt."""
        self.p.send(text + "\r")
        return self.wait()

    def context(self) -> str:
        return self.say("/context")

    def close(self):
        self.p.sendeof()
        self.p.expect(pexpect.EOF)
        self.p.close()
        assert self.p.exitstatus == 0


def user_lines(context: str) -> list[str]:
    return re.findall(r"^\s+\d+ user: (.*)$", context, re.M)


def test_paste_quotes_history_help_context(tiny_bundle, tmp_path):
    chat = Chat(tiny_bundle, tmp_path, "-n", "6", "--ctx", "256")
    assert "context 256 tokens" in chat.banner
    help_text = chat.say("/help")
    for cmd in ("/help", "/context", "/stats", "/reset", "/system", "/exit", '"""', "Ctrl-C"):
        assert cmd in help_text
    assert chat.context().count("user:") == 0                 # /help went nowhere near the model

    # a bracketed paste of three lines is one message, sent with one Enter
    chat.p.send("\x1b[200~w1 w2\nw3\nw4 w5\x1b[201~")
    out = chat.say("")
    assert out.count("[cut at 6 tokens") == 1
    ctx = chat.context()
    assert user_lines(ctx) == ["w1 w2 w3 w4 w5"] and "1 turn(s)" in ctx

    # a """ block is one message too
    chat.p.send('"""\r')
    chat.wait()
    chat.p.send("w6\r")
    chat.wait()
    assert chat.say('w7 w8"""').count("[cut at 6 tokens") == 1
    assert user_lines(chat.context()) == ["w1 w2 w3 w4 w5", "w6 w7 w8"]

    # up arrow: the last line was /context, the one before it the whole """ block
    chat.p.send("\x1b[A\x1b[A")
    chat.say("")
    assert user_lines(chat.context()) == ["w1 w2 w3 w4 w5", "w6 w7 w8", "w6 w7 w8"]
    stats = chat.say("/stats")
    assert re.search(r"generated 6 tok", stats) and "context: " in stats
    assert "unknown command /nope" in chat.say("/nope")
    chat.say("/reset")
    assert "(no reply yet)" in chat.say("/stats") and "context: 0/256" in chat.say("/stats")
    chat.close()


def test_ctrl_c_keeps_the_partial_reply_and_stats_stay_current(tiny_bundle, tmp_path):
    chat = Chat(tiny_bundle, tmp_path, "-n", "200", "--ctx", "512", delay=0.03)
    chat.p.send("w1 w2 w3\r")
    time.sleep(0.6)                                      # ~20 tokens at 30 ms
    chat.p.send("\x03")
    chat.p.expect_exact("[interrupted]")
    chat.wait()
    stats = chat.say("/stats")
    generated = int(re.search(r"generated (\d+) tok", stats).group(1))
    assert 3 <= generated < 200                         # the figures of the interrupted reply
    ctx = chat.context()
    assert re.search(r"2 assistant: (w\d+ ?)+.* \[interrupted\]", ctx), ctx

    # the next question is asked with the partial reply in the history
    chat.p.send("w4 w5\r")
    time.sleep(0.3)
    chat.p.send("\x03")                                  # (stop this one too, to be quick)
    chat.p.expect_exact("[interrupted]")
    chat.wait()
    stats = chat.say("/stats")
    prompt, cached = map(int, re.search(r"prompt (\d+) tok \((\d+) cached\)", stats).groups())
    assert prompt > generated + 6                            # the partial reply's tokens were in the prompt
    assert cached % PREFILL_CHUNK == 0 and cached < prompt   # reuse is by whole prefill chunks
    assert user_lines(chat.context()) == ["w1 w2 w3", "w4 w5"]
    chat.close()


def test_full_context_drops_the_oldest_turns_and_keeps_the_system_prompt(tiny_bundle, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("w50 w51 w52\n")
    chat = Chat(tiny_bundle, tmp_path, "-n", "12", "--ctx", "128", "-p", "w99 w98", "-f", str(book))
    questions = [f"w{10 * i} w{10 * i + 1}" for i in range(1, 9)]
    notices = []
    for q in questions:
        out = chat.say(q)
        assert out.count("[cut at 12 tokens") == 1
        notices += re.findall(r"\(context full: dropped the (\d+) oldest message\(s\)", out)
    assert notices and all(n == "2" for n in notices)
    ctx = chat.context()
    kept = user_lines(ctx)
    assert kept == questions[-len(kept):] and 1 < len(kept) < len(questions)     # the newest, in order
    assert "system (always kept): w99 w98" in ctx
    used, total = map(int, re.search(r"context: (\d+)/(\d+) tokens", ctx).groups())
    assert total == 128 and used < total         # (every reply above got its 12 tokens: room was made first)
    chat.close()


def test_the_file_goes_before_the_first_question(tiny_bundle, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("w50 w51\nw52\n")
    chat = Chat(tiny_bundle, tmp_path, "-n", "4", "-f", str(book))
    chat.say("w1")
    chat.say("w2")
    assert user_lines(chat.context()) == ["w50 w51 w52 w1", "w2"]
    chat.close()


def test_ctx_0_is_the_model_maximum_bounded_by_memory(tiny_bundle, tmp_path):
    cfg = Bundle.open(tiny_bundle).config
    assert max_context(cfg, None) == cfg.max_position_embeddings
    assert max_context(cfg, 1 << 40) == cfg.max_position_embeddings
    per_token = kv_bytes_per_token(cfg)
    assert max_context(cfg, 200 * per_token) == 100          # half the memory for the KV cache
    chat = Chat(tiny_bundle, tmp_path, "--ctx", "0")
    assert f"context: {cfg.max_position_embeddings} tokens (model maximum {cfg.max_position_embeddings}; KV cache" \
        in chat.banner
    assert f"context {cfg.max_position_embeddings} tokens" in chat.banner
    chat.close()


def test_chat_reads_plain_lines_when_stdin_is_not_a_terminal(tiny_bundle, tmp_path):
    import subprocess
    done = subprocess.run([sys.executable, "-m", "edge.cli", "chat", "-m", str(tiny_bundle), "-n", "3",
                           "--temperature", "0"], input='w1\n"""\nw2\nw3"""\n/context\n', capture_output=True,
                          text=True, timeout=120, env={**os.environ, "EDGE_LLM_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    assert user_lines(done.stdout) == ["w1", "w2 w3"]


def test_replies_wrap_at_word_boundaries_and_keys_typed_meanwhile_wait(tiny_bundle, tmp_path):
    chat = Chat(tiny_bundle, tmp_path, "-n", "40", delay=0.05, dimensions=(24, 40))
    chat.p.send("w1 w2 w3\r")
    chat.p.expect(r"\n *w\d+")                  # the reply has begun
    chat.p.send("/context\r")                    # typed while it streams
    reply = chat.wait()
    lines = [line for line in reply.split("\n") if line.strip()]
    words = [w for line in lines for w in line.split()]
    assert "/context" not in reply                                   # not echoed into the reply
    assert len([w for w in words if re.fullmatch(r"w\d+", w)]) >= 30
    assert len(lines) >= 4 and all(len(line) <= 39 for line in lines), lines     # wrapped to the 40 columns
    for line in lines[1:-2]:
        assert re.fullmatch(r"(w\d+ ?)+", line), line                # whole words on every line
    assert "[cut at 40 tokens" in " ".join(lines)

    # what was typed arrived at the next prompt, whole, and ran
    context = chat.wait()
    assert user_lines(context) == ["w1 w2 w3"] and "1 turn(s)" in context
    chat.close()


def test_set_save_and_load(tiny_bundle, tmp_path):
    chat = Chat(tiny_bundle, tmp_path, "-n", "5", "--ctx", "256")
    assert "temperature 0.0, max_tokens 5, system (none)" in chat.say("/set")
    assert "(temperature = 0.3)" in chat.say("/set temperature 0.3")
    assert "not changed: temperature must be >= 0" in chat.say("/set temperature -1")
    assert "not changed" in chat.say("/set max_tokens 0")
    assert "/set knows temperature, max_tokens and system" in chat.say("/set top_k 3")
    assert "(max_tokens = 3)" in chat.say("/set max_tokens 3")
    assert "temperature 0.3, max_tokens 3" in chat.say("/set")
    assert "[cut at 3 tokens" in chat.say("w1 w2")
    assert "(system prompt set; conversation cleared)" in chat.say("/set system w90 w91")
    assert user_lines(chat.context()) == []
    chat.say("w1 w2")
    chat.say("w3")
    saved = tmp_path / "talk.json"
    assert f"(saved 5 message(s) to {saved})" in chat.say(f"/save {saved}")
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages if m["role"] != "assistant"] == ["w90 w91", "w1 w2", "w3"]
    assert all(re.fullmatch(r" ?(w\d+ ?)+", m["content"]) for m in messages if m["role"] == "assistant")
    assert all(set(m) == {"role", "content"} for m in messages)        # OpenAI's messages shape

    chat.say("/reset")
    chat.say("/system")
    loaded = chat.say(f"/load {saved}")
    assert f"(loaded 4 message(s) and the system prompt from {saved}; context " in loaded
    ctx = chat.context()
    assert user_lines(ctx) == ["w1 w2", "w3"] and "system (always kept): w90 w91" in ctx
    chat.say("w4")                                                  # the conversation goes on
    assert user_lines(chat.context()) == ["w1 w2", "w3", "w4"]

    # an OpenAI request body's messages load too; what is not a conversation is refused
    body = tmp_path / "request.json"
    body.write_text(json.dumps({"model": "x", "messages": [{"role": "user", "content": "w5"},
                                                           {"role": "assistant", "content": "w6"}]}))
    assert "(loaded 2 message(s) from" in chat.say(f"/load {body}")
    assert user_lines(chat.context()) == ["w5"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"role": "robot", "content": "x"}]))
    assert "not loaded" in chat.say(f"/load {bad}") and "message 1: expected" in chat.say(f"/load {bad}")
    assert "not loaded: No such file" in chat.say(f"/load {tmp_path / 'missing.json'}")
    assert user_lines(chat.context()) == ["w5"]                     # a failed load changes nothing
    chat.close()

"""How often a model falls into an exact loop on everyday prompts, and where the loop guard
(edge/engine/repetition.py) would stop it.

For each prompt and seed the reply is generated with the product's default sampling and the
guard off, up to --max-tokens; the guard is then replayed over the same sampled tokens (the
same seed gives the same tokens) and says where it would have ended the reply. A guard that
fires on a reply without an exact loop would show here as a false positive.

    python bench/loop_guard.py BUNDLE [--max-tokens 500]
"""
from __future__ import annotations

import argparse

import edge.engine.engine as engine_module
from edge.engine.engine import Engine
from edge.engine.repetition import LoopGuard
from edge.launch.request import RequestDefaults
from edge.model.bundle import Bundle

PROMPTS = {"Give me a list of fruit.": 6, "Write a Python function that reverses a string.": 3,
           "Tell me a short story about a robot.": 3}          # prompt: seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--max-tokens", type=int, default=500)
    a = ap.parse_args()
    engine = Engine(Bundle.open(a.bundle), max_ctx=2048)
    sampled: list[int] = []
    take = engine_module.Sequence.take

    def recording_take(self, logits):       # every sampled token, also those that give no text yet
        events = take(self, logits)
        sampled.append(self.sampled)
        return events
    engine_module.Sequence.take = recording_take
    print("| prompt | seed | tokens | finish | guard stops at | period | tail |")
    print("|---|---|---|---|---|---|---|")
    for prompt, seeds in PROMPTS.items():
        ids = engine.encode_chat([{"role": "user", "content": prompt}])
        for seed in range(seeds):
            sampled.clear()
            events = list(engine.generate(ids, RequestDefaults(max_tokens=a.max_tokens).build(seed=seed)))
            guard = LoopGuard()
            at = next((i + 1 for i, t in enumerate(sampled) if guard.feed(t)), None)
            tail = "".join(e.text for e in events)[-40:].replace("\n", " ").replace("|", "/")
            print(f"| {prompt} | {seed} | {events[-1].usage.completion_tokens} | {events[-1].finish_reason} | "
                  f"{at or '-'} | {guard.period or '-'} | {tail} |", flush=True)


if __name__ == "__main__":
    main()

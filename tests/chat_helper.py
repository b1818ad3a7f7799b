"""`edge-llm` with a model as slow as a big one on a Pi (and, for the tiny random model, no
end-of-sequence token), for the terminal chat tests: replies last long enough to interrupt.

    python -m tests.chat_helper SECONDS_PER_TOKEN chat -m BUNDLE ...
"""
from __future__ import annotations

import sys
import time

from edge.cli.main import main
from edge.engine import engine as engine_module


def slow_down(seconds: float) -> None:
    step = engine_module.Engine.step

    def slow(self, seqs):
        self.eos_ids = frozenset()
        if seconds:
            time.sleep(seconds)
        return step(self, seqs)
    engine_module.Engine.step = slow


if __name__ == "__main__":
    slow_down(float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))

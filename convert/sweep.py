"""One pass over the layers that makes every transformed weight once and calibrates on it.

For layer i, in order:
  1. read and rotate its weights (once per conversion);
  2. smoothing (convert/smoothing.py): run the layer over the smoothing tokens' hidden states
     with those weights, search each group's scales on its inputs, fold them in;
  3. GPTQ (convert/gptq.py): run the layer, smoothed, over the GPTQ tokens' hidden states and
     keep each group's inputs for its Hessian;
  4. hand the smoothed weights and the inputs to the graph writer, which asks for them in
     this same order (`Sweep` is its weights accessor and its `Hessians`).

Each stream of hidden states flows layer to layer once. The two streams are kept apart, as
two separate passes would have them: smoothing's searches the weights before its own scales
(as `Smoothing.fit`), GPTQ's runs the weights that are quantized (as `Hessians.collect`). In
float the smoothed stream equals the unsmoothed one (smoothing is exact), but not to the
last bit, so one stream for both would change the bundle; the smoothing stream costs 512
tokens of forward pass against GPTQ's 4096. The bundle is bit for bit the one that separate
passes write.

The pass runs on a thread of its own (convert/prefetch.py), making layer i+1 while the writer
rounds layer i, and starts layer i+2 only once the writer has taken i+1: memory holds two
layers' weights and inputs at most (about 1.4 GB on the 3B shape). The head's table is read,
rotated and smoothed once, when the writer reaches the final norm; a large one (`tables`,
convert/table.py) by blocks of rows as the writer quantizes them, never whole in float32.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator

import numpy as np

from convert import workers
from convert.calibration import GROUPS, HiddenStates
from convert.prefetch import Prefetch
from edge.model.config import ModelConfig
from edge.model.numpy_model import layer_weights

LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")


class Sweep:
    """The weights accessor and the GPTQ inputs of a conversion, made in one pass.

    get: the rotated (or plain) weights of an untied checkpoint. rows: "embed" answered with
    the calibration tokens' rows (convert/reuse.CalibrationRows). smooth_segments /
    gptq_segments: the calibration tokens of each step, or None to skip it. tables: "lm_head"
    (and "embed") as convert.table.Table, transformed as `get` would, read by blocks of rows."""

    def __init__(self, get: Callable[[str], np.ndarray], rows: Callable[[str], np.ndarray], cfg: ModelConfig,
                 scheme: str, head_scheme: str, smooth_segments: list[np.ndarray] | None,
                 gptq_segments: list[np.ndarray] | None, down_rotation: np.ndarray | None = None,
                 tables: dict | None = None):
        from convert.smoothing import Smoothing
        self._get, self.cfg, self.scheme, self.head_scheme = get, cfg, scheme, head_scheme
        self._tables = tables or {}
        self.down_rotation = down_rotation
        self.smoothing = Smoothing({}, {}, cfg) if smooth_segments else None
        self.importance = self.smoothing.importance if self.smoothing else {}
        self.made: dict[str, int] = {}                 # name -> times made (tests count them)
        self._rows, self._smooth_segments, self._gptq_segments = rows, smooth_segments, gptq_segments
        self.n_tokens = sum(len(s) for s in gptq_segments) if gptq_segments else 0
        self._layer: dict[str, np.ndarray] = {}       # the writer's current layer: name -> tensor
        self._inputs: dict[str, np.ndarray] = {}      # group -> GPTQ inputs not yet taken
        self._next = 0                                 # the next layer to take from the pass
        self._head: dict | None = None
        self._turn = threading.Semaphore(1)            # the pass makes a layer only when its turn comes
        self._closed = False
        self._pass: Prefetch | None = None             # started when the writer first asks
        self.hessians = None
        if gptq_segments:
            from convert.gptq import Hessians
            groups = {f"layers.{i}.{g}" for i in range(cfg.num_layers) for g in GROUPS} | {"head"}
            self.hessians = Hessians(_Inputs(self), groups, self.n_tokens)

    # --- the pass (its own thread) --------------------------------------------------------
    def _made(self, name: str) -> np.ndarray:
        self.made[name] = self.made.get(name, 0) + 1
        return self._get(name)

    def _layers(self) -> Iterator[tuple[dict, dict]]:
        cfg = self.cfg
        smooth = HiddenStates(self._rows("embed"), cfg, self._smooth_segments, self.down_rotation) \
            if self.smoothing else None
        gptq = HiddenStates(self._rows("embed"), cfg, self._gptq_segments, self.down_rotation) \
            if self._gptq_segments else None
        for i in range(cfg.num_layers):
            self._turn.acquire()
            if self._closed:
                return
            p = f"layers.{i}."
            names = [p + n for n in LAYER_TENSORS]
            w = dict(zip(names, workers.map_ordered(self._made, names)))     # read and rotated on the workers
            if smooth is not None:
                seen = smooth.layer(i, layer_weights(w.__getitem__, i))
                for group in GROUPS:
                    self.smoothing.fit_group(p + group, seen.pop(group), w.__getitem__, self.scheme,
                                             self.head_scheme, self.down_rotation)
                del seen
                smoothed = self.smoothing.weights(w.pop)
                w = {p + n: smoothed(p + n) for n in LAYER_TENSORS}
            inputs = {}
            if gptq is not None:
                inputs = {p + g: x for g, x in gptq.layer(i, layer_weights(w.__getitem__, i)).items()}
            yield w, inputs
            del w, inputs
        self._turn.acquire()
        if not self._closed:
            yield {}, {"smooth": smooth, "gptq": gptq}

    # --- the writer's side ----------------------------------------------------------------
    def _take(self) -> None:
        """The next layer (or the head's streams) from the pass."""
        if self._pass is None:
            self._pass = Prefetch(self._layers(), ahead=1, name="edge-llm-calibration")
        tensors, inputs = next(self._pass)
        if self._next == self.cfg.num_layers:
            self._head = inputs
        else:
            self._layer, self._inputs = tensors, inputs
        self._next += 1
        self._turn.release()                          # the pass may start the layer after

    def __call__(self, name: str) -> np.ndarray:
        if name.startswith("layers."):
            self._reach(name)
            if name not in self._layer:
                raise KeyError(f"{name} was handed to the writer already, or its layer is behind")
            return self._layer.pop(name)
        if name in ("final_norm", "lm_head"):
            self._head_step()
            return self._head.pop(name)
        if name == "embed":
            return self._made("embed")
        raise KeyError(name)

    def _reach(self, name: str) -> None:
        """Run the pass up to the layer `name` ("layers.I...") belongs to."""
        i = int(name.split(".")[1])
        while self._next <= i:
            self._take()

    def _head_step(self) -> None:
        """The final norm, the lm_head (read, rotated and smoothed once) and its GPTQ inputs."""
        while self._next <= self.cfg.num_layers:
            self._take()
        if "lm_head" in self._head or "done" in self._head:
            return
        streams = self._head
        if self.hessians is not None:
            self.hessians.release()                  # the last layer's factor: the table comes next
        table = self._tables.get("lm_head")
        head = self._made("lm_head") if table is None else table
        if table is not None:
            self.made["lm_head"] = self.made.get("lm_head", 0) + 1
        final_norm = self._made("final_norm")
        if self.smoothing is not None:
            x = streams["smooth"].head(final_norm)
            self.smoothing.fit_group("head", x, lambda n: head, self.scheme, self.head_scheme, self.down_rotation)
            del x
            smoothed = self.smoothing.weights({"final_norm": final_norm, "lm_head": head}.pop)
            final_norm = smoothed("final_norm")
            head = smoothed("lm_head") if table is None else table.then(self._smooth_head_rows)
        if streams["gptq"] is not None:
            self._inputs = {"head": streams["gptq"].head(final_norm)}
        self._head = {"final_norm": final_norm, "lm_head": head, "done": True}

    def _smooth_head_rows(self, rows: np.ndarray) -> np.ndarray:
        """What `Smoothing.weights` does to the lm_head, on a block of its rows."""
        rows *= self.smoothing.scales["head"][None, :]
        return rows

    def take_inputs(self, group: str) -> np.ndarray:
        if group == "head":
            self._head_step()
        elif group.startswith("layers."):
            self._reach(group)
        if group not in self._inputs:
            raise KeyError(f"no calibration inputs (left) for {group!r}")
        return self._inputs.pop(group)

    def close(self) -> None:
        self._layer, self._inputs, self._head = {}, {}, None
        self._closed = True
        self._turn.release()                          # a pass waiting for its turn can see the stop
        if self._pass is not None:
            self._pass.close()

    def __enter__(self) -> "Sweep":
        return self

    def __exit__(self, *exc) -> None:
        if self.hessians is not None:
            self.hessians.close()
        else:
            self.close()


class _Inputs:
    """`Hessians`' source of (group, inputs), in the writer's order, from the sweep."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep
        self._order = iter([f"layers.{i}.{g}" for i in range(sweep.cfg.num_layers) for g in GROUPS] + ["head"])

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, np.ndarray]:
        group = next(self._order)
        return group, self.sweep.take_inputs(group)

    def close(self) -> None:
        self.sweep.close()

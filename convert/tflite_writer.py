"""A small .tflite writer for edge-llm's graphs, without TensorFlow.

It writes the flatbuffer with the schema module that ships inside ai-edge-litert (object API)
and the `flatbuffers` package. Scope is what the decode loop's graphs need: float32
activations of shape [T, width] with a dynamic T (`shape_signature=[-1, width]`, so one
subgraph serves decode T=1 and prefill chunks through `resize_tensor_input`), constant
weights in f32/f16/int8/int4/int4-blockwise, and the ops FULLY_CONNECTED (hybrid: float in/out,
quantized weights, int8 activations quantized on the fly by XNNPACK), ADD, MUL, LOGISTIC,
MEAN, RSQRT, SPLIT, DEQUANTIZE (f16 weights).

File layout: the flatbuffer first, then every constant buffer stored outside it
(`Buffer.offset/size`, offsets from the start of the file). That keeps the flatbuffer far
below its 2 GB limit whatever the model size, and lets each large buffer start on a 16 KB
boundary (`ALIGN_LARGE`): the Pi 5 kernel runs 16 KB pages, so a weight never shares a page
with its neighbour and maps cleanly. Small buffers are 64-byte aligned (SIMD loads).

Constant data is spilled to a temporary file as it is added, so building a 1B model keeps
only metadata in memory (the caller may drop each weight once it is added). A live
`QuantizedWeight` object used in several subgraphs is stored once.

Usage:
    mb = ModelBuilder()
    g = mb.subgraph("decode")
    x = g.input("x", 64)
    g.output("y", g.fully_connected(g.rms_norm(x, norm_w, 1e-5), qw))
    data = mb.finish()          # or mb.write(path)
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as fb

from convert.quantize import QuantizedWeight, quantize

ALIGN_LARGE = 16384          # Pi 5 page size
ALIGN_SMALL = 64
LARGE_BUFFER = 16384         # buffers at least this big get page alignment
_PLACEHOLDER_OFFSET = 1 << 40  # nonzero so the field is always serialised (fixed-size pack)

_TYPES = {np.dtype(np.float32): fb.TensorType.FLOAT32, np.dtype(np.float16): fb.TensorType.FLOAT16,
          np.dtype(np.int8): fb.TensorType.INT8, np.dtype(np.int32): fb.TensorType.INT32}
_OP = fb.BuiltinOperator


@dataclass(frozen=True)
class Act:
    """A float32 activation tensor [T, width] (T dynamic) inside one subgraph."""
    index: int
    width: int


class ModelBuilder:
    """Collects buffers, operator codes and subgraphs; one subgraph per named signature."""

    def __init__(self, description: str = "edge-llm"):
        self._description = description
        self._spill = tempfile.TemporaryFile()
        self._spill_size = 0
        self._buffers: list[tuple[int, int]] = []   # (offset in spill, size); index = buffer - 1
        self._opcodes: dict[tuple[int, int], int] = {}
        self._weights: dict[int, tuple[int, int | None]] = {}   # id(weight) -> buffers
        self._graphs: list[GraphBuilder] = []

    def subgraph(self, signature: str) -> "GraphBuilder":
        """A new subgraph exposed as SignatureDef `signature`."""
        g = GraphBuilder(self, signature)
        self._graphs.append(g)
        return g

    def buffer(self, data: np.ndarray) -> int:
        """Append constant bytes to the data section; returns the model-level buffer index.

        Index 0 is the schema's empty buffer, so the first stored buffer is 1.
        """
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        align = ALIGN_LARGE if raw.nbytes >= LARGE_BUFFER else ALIGN_SMALL
        offset = -self._spill_size % align + self._spill_size
        self._spill.seek(offset)
        self._spill.write(raw.data)
        self._spill_size = offset + raw.nbytes
        self._buffers.append((offset, raw.nbytes))
        return len(self._buffers)

    def weight_buffers(self, w: QuantizedWeight) -> tuple[int, int | None]:
        """(data buffer, blockwise-scale buffer or None), shared by every use of `w`."""
        key = id(w)
        if key not in self._weights:
            scales = self.buffer(w.scales) if w.block_size else None
            self._weights[key] = (self.buffer(w.data), scales)
            weakref.finalize(w, self._weights.pop, key, None)   # ids are reused after GC
        return self._weights[key]

    def opcode(self, op: int, version: int = 1) -> int:
        key = (op, version)
        if key not in self._opcodes:
            self._opcodes[key] = len(self._opcodes)
        return self._opcodes[key]

    def write(self, path: str | os.PathLike) -> int:
        """Write the model file; returns its size in bytes. Afterwards `buffer_span` says where
        in it each buffer landed."""
        head, data_start = self._pack()
        self._data_start = data_start
        with open(path, "wb") as f:
            f.write(head)
            f.write(b"\0" * (data_start - len(head)))
            self._spill.seek(0)
            shutil.copyfileobj(self._spill, f, 1 << 24)
            return f.tell()

    def buffer_span(self, index: int) -> tuple[int, int]:
        """(offset from the start of the written file, size) of buffer `index`."""
        offset, size = self._buffers[index - 1]
        return self._data_start + offset, size

    def finish(self) -> bytes:
        """The whole model file as bytes (convenient for small graphs and tests)."""
        head, data_start = self._pack()
        self._spill.seek(0)
        return head + b"\0" * (data_start - len(head)) + self._spill.read()

    def _pack(self) -> tuple[bytes, int]:
        """Serialise twice: first to learn the flatbuffer's size, then with real offsets.

        Buffer offsets are fixed-width uint64 fields and are always present (never the default
        0), so the second pack has exactly the first one's size.
        """
        head = self._serialise(_PLACEHOLDER_OFFSET)
        data_start = -len(head) % ALIGN_LARGE + len(head)
        final = self._serialise(data_start)
        assert len(final) == len(head), "flatbuffer size changed between passes"
        return final, data_start

    def _serialise(self, data_start: int) -> bytes:
        model = fb.ModelT()
        model.version = 3
        model.description = self._description
        model.operatorCodes = [_opcode(op, v) for (op, v) in self._opcodes]
        model.buffers = [fb.BufferT()] + [_external(data_start + off, n) for off, n in self._buffers]
        model.subgraphs = [g.subgraph_t() for g in self._graphs]
        model.signatureDefs = [g.signature_t(i) for i, g in enumerate(self._graphs)]
        b = flatbuffers.Builder(1 << 16)
        b.Finish(model.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def _fb(cls, **fields):
    """A flatbuffer object (one of the schema's *T classes) with these fields set."""
    obj = cls()
    for name, value in fields.items():
        setattr(obj, name, value)
    return obj


def _opcode(op: int, version: int) -> fb.OperatorCodeT:
    return _fb(fb.OperatorCodeT, builtinCode=op, deprecatedBuiltinCode=min(op, 127), version=version)


def _external(offset: int, size: int) -> fb.BufferT:
    return _fb(fb.BufferT, offset=offset, size=size)


class GraphBuilder:
    """Builds one subgraph of [T, width] float32 activations; see the module docstring."""

    def __init__(self, model: ModelBuilder, signature: str):
        self._model = model
        self.signature = signature
        self._tensors: list[fb.TensorT] = []
        self._ops: list[fb.OperatorT] = []
        self._inputs: list[tuple[str, int]] = []
        self._outputs: list[tuple[str, int]] = []
        self._consts: dict[tuple, int] = {}

    # -- graph inputs and outputs -------------------------------------------------------
    def input(self, name: str, width: int) -> Act:
        """A float32 input [T, width]; T is dynamic (resize before invoking)."""
        act = self._act(width, name)
        self._inputs.append((name, act.index))
        return act

    def output(self, name: str, t: Act) -> None:
        self._outputs.append((name, t.index))

    # -- ops ----------------------------------------------------------------------------
    def fully_connected(self, x: Act, w: QuantizedWeight, name: str | None = None) -> Act:
        """y[T, N] = x[T, K] @ W[N, K]^T with W stored as `w` (hybrid FC for int schemes)."""
        n, k = w.shape
        if x.width != k:
            raise ValueError(f"FC input width {x.width} != weight K {k}")
        wt = self._weight(w)
        opts = fb.FullyConnectedOptionsT()
        opts.keepNumDims = False       # 2D in, 2D out: [T, K] -> [T, N]
        opts.asymmetricQuantizeInputs = w.scheme not in ("f32", "f16")
        version = 1 if w.scheme in ("f32", "f16") else 12
        out = self._act(n, name)
        self._op(_OP.FULLY_CONNECTED, [x.index, wt, -1], [out.index],
                 fb.BuiltinOptions.FullyConnectedOptions, opts, version)
        return out

    def rotate_blocks(self, x: Act, h: np.ndarray) -> Act:
        """x [T, W] with every block of B = h.shape[0] channels multiplied by h (f32).

        One FC with the [B, B] weight: FULLY_CONNECTED flattens its input to rows of B, so
        the output is x as [T*W/B, B] rows; the next FC flattens it back to [T, W]."""
        b = h.shape[0]
        if x.width % b:
            raise ValueError(f"width {x.width} is not a multiple of the block {b}")
        wt = self._weight(quantize(np.ascontiguousarray(h.T), "f32"))
        opts = fb.FullyConnectedOptionsT()
        opts.keepNumDims = False
        out = self._tensor([x.width // b, b], fb.TensorType.FLOAT32, f"t{len(self._tensors)}",
                           signature=[-1, b])
        self._op(_OP.FULLY_CONNECTED, [x.index, wt, -1], [out], fb.BuiltinOptions.FullyConnectedOptions, opts)
        return Act(out, x.width)

    def add(self, a: Act, b: Act | int) -> Act:
        return self._binary(_OP.ADD, fb.BuiltinOptions.AddOptions, fb.AddOptionsT(), a, b)

    def mul(self, a: Act, b: Act | int) -> Act:
        """Elementwise a * b; `b` may be a constant tensor index (broadcast over T)."""
        return self._binary(_OP.MUL, fb.BuiltinOptions.MulOptions, fb.MulOptionsT(), a, b)

    def _unary(self, op: int, x: Act) -> Act:
        out = self._act(x.width)
        self._op(op, [x.index], [out.index])
        return out

    def logistic(self, x: Act) -> Act:
        return self._unary(_OP.LOGISTIC, x)

    def silu(self, x: Act) -> Act:
        """x * sigmoid(x): XNNPACK fuses nothing here, but both ops stay in its node."""
        return self.mul(x, self.logistic(x))

    def rsqrt(self, x: Act) -> Act:
        return self._unary(_OP.RSQRT, x)

    def mean_last(self, x: Act) -> Act:
        """Mean over the last axis, keeping it: [T, W] -> [T, 1]."""
        opts = fb.ReducerOptionsT()
        opts.keepDims = True
        out = self._act(1)
        axis = self.constant(np.array([1], np.int32), "axis_last")
        self._op(_OP.MEAN, [x.index, axis], [out.index], fb.BuiltinOptions.ReducerOptions, opts)
        return out

    def rms_norm(self, x: Act, weight: np.ndarray, eps: float) -> Act:
        """x * rsqrt(mean(x^2) + eps) * weight, all float32 (Llama's RMSNorm)."""
        ms = self.mean_last(self.mul(x, x))
        inv = self.rsqrt(self.add(ms, self.constant(np.array([eps], np.float32), "eps")))
        return self.mul(self.mul(x, inv), self.constant(np.asarray(weight, np.float32)))

    def split(self, x: Act, parts: int) -> list[Act]:
        """Split [T, W] into `parts` equal [T, W/parts] pieces along the last axis."""
        if x.width % parts:
            raise ValueError(f"cannot split width {x.width} into {parts}")
        opts = fb.SplitOptionsT()
        opts.numSplits = parts
        outs = [self._act(x.width // parts) for _ in range(parts)]
        axis = self.constant(np.array(1, np.int32), "axis_1")
        self._op(_OP.SPLIT, [axis, x.index], [o.index for o in outs],
                 fb.BuiltinOptions.SplitOptions, opts)
        return outs

    # -- constants ----------------------------------------------------------------------
    def constant(self, value: np.ndarray, name: str | None = None) -> int:
        """A constant tensor (f32/f16/int8/int32), deduplicated by content within the graph."""
        value = np.ascontiguousarray(value)
        key = (value.dtype.str, value.shape, value.tobytes()) if value.nbytes <= 64 else None
        if key in self._consts:
            return self._consts[key]
        idx = self._tensor(list(value.shape), _TYPES[value.dtype], name or "const",
                           self._model.buffer(value))
        if key is not None:
            self._consts[key] = idx
        return idx

    def _weight(self, w: QuantizedWeight) -> int:
        """The FC weight tensor: quantized in place, or f16 behind a DEQUANTIZE op."""
        data_buf, scale_buf = self._model.weight_buffers(w)
        shape = list(w.shape)
        if w.scheme in ("f32", "f16"):
            idx = self._tensor(shape, _TYPES[w.data.dtype], "w", data_buf)
            if w.scheme == "f32":
                return idx
            out = self._tensor(shape, fb.TensorType.FLOAT32, "w_f32")
            self._op(_OP.DEQUANTIZE, [idx], [out], version=3)
            return out
        q = fb.QuantizationParametersT()
        q.quantizedDimension = 0
        if w.block_size:
            details = fb.BlockwiseQuantizationT()
            details.scales = self._tensor(list(w.scales.shape), fb.TensorType.FLOAT16,
                                          "w_scales", scale_buf)
            details.zeroPoints, details.blockSize = -1, w.block_size
            q.detailsType, q.details = fb.QuantizationDetails.BlockwiseQuantization, details
        else:
            q.scale = w.scales.astype(np.float32)          # numpy: packed without a Python loop
            q.zeroPoint = np.zeros(w.shape[0], np.int64)
        wtype = fb.TensorType.INT8 if w.scheme == "int8" else fb.TensorType.INT4
        return self._tensor(shape, wtype, "w", data_buf, q)

    # -- plumbing -----------------------------------------------------------------------
    def _binary(self, op: int, opt_type: int, opts, a: Act, b: Act | int) -> Act:
        b_idx = b.index if isinstance(b, Act) else b
        width = max(a.width, b.width) if isinstance(b, Act) else a.width
        out = self._act(width)
        self._op(op, [a.index, b_idx], [out.index], opt_type, opts)
        return out

    def _act(self, width: int, name: str | None = None) -> Act:
        idx = self._tensor([1, width], fb.TensorType.FLOAT32, name or f"t{len(self._tensors)}",
                           signature=[-1, width])
        return Act(idx, width)

    def _tensor(self, shape, ttype, name, buffer=0, quant=None, signature=None) -> int:
        t = fb.TensorT()
        t.shape, t.type, t.buffer, t.name = shape, ttype, buffer, name
        t.quantization, t.shapeSignature = quant, signature
        self._tensors.append(t)
        return len(self._tensors) - 1

    def _op(self, op, inputs, outputs, opt_type=0, opts=None, version=1) -> None:
        o = fb.OperatorT()
        o.opcodeIndex = self._model.opcode(op, version)
        o.inputs, o.outputs = inputs, outputs
        o.builtinOptionsType, o.builtinOptions = opt_type, opts
        self._ops.append(o)

    def subgraph_t(self) -> fb.SubGraphT:
        sg = fb.SubGraphT()
        sg.tensors, sg.operators, sg.name = self._tensors, self._ops, self.signature
        sg.inputs = [i for _, i in self._inputs]
        sg.outputs = [i for _, i in self._outputs]
        return sg

    def signature_t(self, subgraph_index: int) -> fb.SignatureDefT:
        return _fb(fb.SignatureDefT, signatureKey=self.signature, subgraphIndex=subgraph_index,
                   inputs=[_tensor_map(n, i) for n, i in self._inputs],
                   outputs=[_tensor_map(n, i) for n, i in self._outputs])


def _tensor_map(name: str, index: int) -> fb.TensorMapT:
    return _fb(fb.TensorMapT, name=name, tensorIndex=index)

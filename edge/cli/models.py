"""`edge-llm models` (the converted bundles, their sizes and sources, and the default) and
`edge-llm rm NAME` (a converted bundle with its XNNPACK cache, and caches that belong to no
bundle)."""
from __future__ import annotations

import sys

from convert.quantize import DEFAULT_QUANT
from edge.launch import model_store


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def cmd_models(a) -> int:
    models = model_store.stored_models()
    default = model_store.bundles_dir() / f"{model_store.DEFAULT_NAME}-{DEFAULT_QUANT}"
    rows = [("", "NAME", "MODEL", "QUANT", "SIZE", "SOURCE")]
    for s in models:
        rows.append(("*" if s.path == default else "", s.id, s.name, s.quant, _mb(s.size), s.source))
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    else:
        print(f"no converted models in {model_store.bundles_dir()}")
    print()
    if any(s.path == default for s in models):
        print(f"* the default model (used without --model): {default.name}")
    else:
        print(f"the default model, {default.name}, is not converted yet: the first run without --model "
              "fetches and converts it")
    caches = model_store.caches_dir()
    orphans = model_store.orphan_caches()
    total = model_store._du(caches)
    line = f"XNNPACK weight caches: {_mb(total)} in {caches}"
    if orphans:
        line += (f"; {len(orphans)} belong to no bundle ({_mb(sum(model_store._du(d) for d in orphans))}): "
                 "edge-llm rm --orphans")
    print(line)
    print("--model takes a NAME (or a unique beginning of one), a bundle, a checkpoint directory or a GGUF file")
    return 0


def cmd_rm(a) -> int:
    if not a.names and not a.orphans:
        raise ValueError("name a model to remove (edge-llm models lists them), or pass --orphans")
    for name in a.names:
        path, size, shared = model_store.remove(name)
        model_store.alias_table().drop_target(path.name)
        print(f"removed {path.name} ({_mb(size)})")
        if shared is not None:
            print(f"kept its XNNPACK cache {shared.name}: another bundle has the same graph", file=sys.stderr)
    freed = model_store.prune_caches()
    if freed or a.orphans:
        print(f"removed XNNPACK caches that belonged to no bundle ({_mb(freed)})", file=sys.stderr)
    return 0


def register(sub) -> None:
    m = sub.add_parser("models", aliases=["list", "ls"],
                       help="list the converted models (name, quant, size, source) and the default",
                       description="List the converted models in the model store (name, model, quant, size, "
                       "source), which one is the default, and the XNNPACK weight caches' disk use.")
    m.set_defaults(func=cmd_models)
    r = sub.add_parser("rm", help="remove converted models by name, with their XNNPACK caches",
                       description="Remove converted models from the model store by name, each with its own "
                       "XNNPACK weight cache; caches that belong to no bundle go too. Nothing of another "
                       "model is touched.")
    r.add_argument("names", nargs="*", metavar="NAME", help="a converted model's name, as edge-llm models lists it")
    r.add_argument("--orphans", action="store_true",
                   help="only remove the XNNPACK caches that belong to no bundle (rm always does this too)")
    r.set_defaults(func=cmd_rm)

"""Read a Hugging Face Llama checkpoint directory into a `Checkpoint`.

Needs config.json, model.safetensors (or model-*.safetensors + index) and tokenizer.json;
tokenizer_config.json / chat_template.jinja give the chat template, generation_config.json
the eos ids. LlamaForCausalLM only (Llama 3.x, SmolLM2, ...).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from convert.checkpoint import Checkpoint, CheckpointError
from convert.safetensors_file import SafetensorsFile
from edge.model.config import ModelConfig, RopeScaling

_HF_NAMES = {
    "attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj",
}


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.exists():
        if required:
            raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint needs it)")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _refuse_unimplemented(path: Path, c: dict) -> None:
    """Config fields that change the math and that the model does not implement: refused by name
    rather than silently ignored (transformers' defaults are the accepted values)."""
    if c.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act {c['hidden_act']!r} is not supported (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            raise CheckpointError(f"{path}: {flag}: true is not supported (biased projections are not implemented)")


def rope_scaling_from_hf(path: Path, c: dict) -> RopeScaling | None:
    """`rope_parameters` (transformers 5) or `rope_scaling` (older files, `type` or `rope_type`),
    read the way transformers' standardize_rope_params and _compute_*_parameters read them."""
    params = c.get("rope_parameters") or {}
    field = "rope_parameters"
    if not params.get("rope_type", params.get("type")):
        params, field = c.get("rope_scaling") or {}, "rope_scaling"
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{path}: {field} per layer type is not supported")
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"{path}: partial_rotary_factor {partial} is not supported")
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling(float(params["factor"]), float(params["low_freq_factor"]),
                           float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    if kind == "linear":
        return RopeScaling(factor=float(params["factor"]), rope_type="linear")
    if kind == "yarn":
        max_pos = int(c.get("max_position_embeddings", 2048))
        orig = int(c.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos)
        factor = float(params["factor"]) if params.get("factor") is not None else max_pos / orig
        attention = params.get("attention_factor")
        if attention is None:
            mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
            attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                         if mscale and mscale_all_dim else _yarn_mscale(factor))
        return RopeScaling(factor=factor, original_max_position_embeddings=orig, rope_type="yarn",
                           beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                           attention_factor=float(attention), truncate=bool(params.get("truncate", True)))
    raise CheckpointError(f"{path}: {field} rope type {kind!r} is not supported (only llama3, linear, yarn)")


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _model_config(path: Path, c: dict, gen: dict) -> ModelConfig:
    arch = c.get("architectures") or [c.get("model_type")]
    if c.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise CheckpointError(f"{path}: architecture {arch} is not supported (only LlamaForCausalLM)")
    _refuse_unimplemented(path, c)
    try:
        scaling = rope_scaling_from_hf(path, c)
        heads = int(c["num_attention_heads"])
        theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        return ModelConfig(
            vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            rope_theta=float(theta), rope_scaling=scaling, rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(_as_list(gen.get("eos_token_id")) + _as_list(c.get("eos_token_id")))),
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: config.json lacks {e.args[0]!r}") from e


def _shards(root: Path) -> list[SafetensorsFile]:
    single = root / "model.safetensors"
    index = root / "model.safetensors.index.json"
    if single.exists():
        return [SafetensorsFile(single)]
    if index.exists():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [f for f in files if not (root / f).exists()]
        if missing or not files:
            raise CheckpointError(f"{index}: shard(s) missing: {', '.join(missing) or 'none listed'}")
        return [SafetensorsFile(root / f) for f in files]
    raise CheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json")


def _chat_template(root: Path, tok_cfg: dict) -> str | None:
    jinja = root / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):   # named templates: take "default"
        t = next((x["template"] for x in t if x.get("name") == "default"), None)
    return t


def _token_text(x) -> str | None:
    return x.get("content") if isinstance(x, dict) else x


def read_hf(root: Path) -> Checkpoint:
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    cfg = _model_config(root / "config.json", _read_json(root / "config.json"),
                        _read_json(root / "generation_config.json", required=False))
    tok_path = root / "tokenizer.json"
    if not tok_path.exists():
        raise CheckpointError(f"{tok_path}: missing (convert needs the Hugging Face tokenizer.json)")
    tok_cfg = _read_json(root / "tokenizer_config.json", required=False)

    loaders, row_loaders, stored, unused = {}, {}, {}, []
    for shard in _shards(root):
        for hf_name in shard.names():
            name = _canonical(hf_name)
            if name:
                loaders[name] = (lambda s=shard, n=hf_name: s.load(n))
                row_loaders[name] = (lambda lo, hi, s=shard, n=hf_name: s.load(n, (lo, hi)))
                stored[name] = f"{hf_name} in {shard.path.name}"
            elif not hf_name.endswith(_DERIVED):
                unused.append((str(shard.path), hf_name))
    if unused:
        unused.sort()
        listed = f"tensor {unused[0][1]!r} is" if len(unused) == 1 else \
            f"tensor {unused[0][1]!r} (and {len(unused) - 1} more) are"
        raise CheckpointError(f"{unused[0][0]}: {listed} not used by the Llama model we run (refusing rather than ignoring)")
    if cfg.tie_word_embeddings:
        loaders.pop("lm_head", None)
    ckpt = Checkpoint(
        config=cfg, source=str(root), loaders=loaders, tokenizer_json=tok_path.read_text(encoding="utf-8"),
        chat_template=_chat_template(root, tok_cfg),
        special_tokens={k: _token_text(tok_cfg[k]) for k in ("bos_token", "eos_token") if tok_cfg.get(k)},
        add_bos=bool(tok_cfg.get("add_bos_token", cfg.bos_token_id is not None)),
        stored_names=stored, row_loaders=row_loaders,
    )
    ckpt.validate()
    return ckpt


# buffers some exporters save that the model recomputes from the config
_DERIVED = (".rotary_emb.inv_freq",)


def _canonical(hf_name: str) -> str | None:
    fixed = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")   # model.layers.{i}.{module...}.weight
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        module = ".".join(parts[3:-1])
        for short, hf in _HF_NAMES.items():
            if hf == module:
                return f"layers.{parts[2]}.{short}"
    return None

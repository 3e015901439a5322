"""Tensor name -> (layer, block, matrix type, expert), with architecture tables kept as data.

Each family is a list of rules `(regex, block, matrix, split)` tried in order; the first match
wins, then the shared fallback rules. A `split` names how a fused tensor is cut into parts
(`_split`), each part a set of row segments of the (optionally transposed) stored matrix.
A split `experts/<inner>` is a fused 3-D expert tensor [E, ...]: one part per leading index
(`Part.index`, `expert` set), each slice cut by `<inner>` (empty: whole, `conv1d`: stored
(in, out), `halves`/`t_halves`: gate then up, `interleaved`/`t_interleaved`: gate/up alternating).
Any other tensor of 3 or more dimensions is analysed per leading index, never flattened whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (regex searched in the name, block, matrix, split or None)
Rule = tuple[str, str, str, "str | None"]

_LLAMA: list[Rule] = [  # also Mistral, Qwen2/3, Gemma, Mixtral, Qwen-MoE
    # transformers-5 fused experts (Mixtral, Qwen-MoE, OLMoE, DeepSeek in memory): [E, 2I, H], [E, H, I]
    (r"experts\.gate_up_proj$", "mlp", "gate_up", "experts/halves"),
    (r"experts\.down_proj$", "mlp", "down", "experts/"),
    (r"embed_tokens\.weight$", "embed", "embed", None),
    (r"lm_head\.weight$", "head", "lm_head", None),
    (r"self_attn\.q_proj\.weight$", "attn", "q", None),
    (r"self_attn\.k_proj\.weight$", "attn", "k", None),
    (r"self_attn\.v_proj\.weight$", "attn", "v", None),
    (r"self_attn\.o_proj\.weight$", "attn", "o", None),
    (r"(mlp|feed_forward|shared_expert|experts\.\d+)\.gate_proj\.weight$", "mlp", "gate", None),
    (r"(mlp|feed_forward|shared_expert|experts\.\d+)\.up_proj\.weight$", "mlp", "up", None),
    (r"(mlp|feed_forward|shared_expert|experts\.\d+)\.down_proj\.weight$", "mlp", "down", None),
    (r"experts\.\d+\.w1\.weight$", "mlp", "gate", None),
    (r"experts\.\d+\.w3\.weight$", "mlp", "up", None),
    (r"experts\.\d+\.w2\.weight$", "mlp", "down", None),
    (r"(block_sparse_moe|mlp)\.gate\.weight$", "mlp", "other", None),  # MoE router
    (r"shared_expert_gate\.weight$", "mlp", "other", None),
]
_GPT_OSS: list[Rule] = [  # experts stored (in, out): gate_up [E, H, 2I] with gate/up interleaved
    (r"experts\.gate_up_proj$", "mlp", "gate_up", "experts/t_interleaved"),
    (r"experts\.gate_up_proj_bias$", "mlp", "bias", "experts/interleaved"),
    (r"experts\.down_proj$", "mlp", "down", "experts/conv1d"),
    (r"experts\.down_proj_bias$", "mlp", "bias", "experts/"),
    (r"mlp\.router\.weight$", "mlp", "other", None),  # MoE router
    *_LLAMA,
]
_LLAMA4: list[Rule] = [  # experts stored (in, out): gate_up [E, H, 2I] as [gate | up]
    (r"experts\.gate_up_proj$", "mlp", "gate_up", "experts/t_halves"),
    (r"experts\.down_proj$", "mlp", "down", "experts/conv1d"),
    (r"feed_forward\.router\.weight$", "mlp", "other", None),  # MoE router
    *_LLAMA,
]
_GPT2: list[Rule] = [  # Conv1D weights are stored (in, out): transposed to (out, in)
    (r"wte\.weight$", "embed", "embed", None),
    (r"wpe\.weight$", "embed", "embed", None),
    (r"lm_head\.weight$", "head", "lm_head", None),
    (r"attn\.c_attn\.weight$", "attn", "qkv", "gpt2_qkv"),
    (r"attn\.c_attn\.bias$", "attn", "bias", "thirds"),
    (r"attn\.c_proj\.weight$", "attn", "o", "conv1d"),
    (r"mlp\.c_fc\.weight$", "mlp", "up", "conv1d"),
    (r"mlp\.c_proj\.weight$", "mlp", "down", "conv1d"),
]
_NEOX: list[Rule] = [  # GPT-NeoX / Pythia: fused qkv interleaved per head
    (r"embed_in\.weight$", "embed", "embed", None),
    (r"embed_out\.weight$", "head", "lm_head", None),
    (r"attention\.query_key_value\.weight$", "attn", "qkv", "neox_qkv"),
    (r"attention\.query_key_value\.bias$", "attn", "bias", "neox_qkv"),
    (r"attention\.dense\.weight$", "attn", "o", None),
    (r"mlp\.dense_h_to_4h\.weight$", "mlp", "up", None),
    (r"mlp\.dense_4h_to_h\.weight$", "mlp", "down", None),
]
_PHI3: list[Rule] = [
    (r"embed_tokens\.weight$", "embed", "embed", None),
    (r"lm_head\.weight$", "head", "lm_head", None),
    (r"self_attn\.qkv_proj\.weight$", "attn", "qkv", "phi3_qkv"),
    (r"self_attn\.o_proj\.weight$", "attn", "o", None),
    (r"mlp\.gate_up_proj\.weight$", "mlp", "gate_up", "halves"),
    (r"mlp\.down_proj\.weight$", "mlp", "down", None),
]
_BERT: list[Rule] = [  # BERT / MiniLM
    (r"embeddings\.(word|position|token_type)_embeddings\.weight$", "embed", "embed", None),
    (r"attention\.self\.query\.weight$", "attn", "q", None),
    (r"attention\.self\.key\.weight$", "attn", "k", None),
    (r"attention\.self\.value\.weight$", "attn", "v", None),
    (r"attention\.output\.dense\.weight$", "attn", "o", None),
    (r"intermediate\.dense\.weight$", "mlp", "up", None),
    (r"layer\.\d+\.output\.dense\.weight$", "mlp", "down", None),
    (r"pooler\.dense\.weight$", "head", "other", None),
]
_FALLBACK: list[Rule] = [
    (r"(norm|ln_\w+|LayerNorm|layernorm)\.(weight|bias)$", "norm", "norm", None),
    (r"ln_f\.(weight|bias)$", "norm", "norm", None),
    (r"\.bias$", "", "bias", None),  # block "" = guess from the name
]

FAMILIES: dict[str, list[Rule]] = {
    "llama": _LLAMA,
    "gpt_oss": _GPT_OSS,
    "llama4": _LLAMA4,
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
    "phi3": _PHI3,
    "bert": _BERT,
    "generic": [],
}

# config.json model_type -> family
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "gemma3_text": "llama",
    "mixtral": "llama",
    "qwen2_moe": "llama",
    "qwen3_moe": "llama",
    "olmoe": "llama",
    "deepseek_v3": "llama",
    "gpt_oss": "gpt_oss",
    "llama4": "llama4",
    "llama4_text": "llama4",
    "olmo": "llama",
    "olmo2": "llama",
    "smollm3": "llama",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "phi3": "phi3",
    "bert": "bert",
}
# name fragment -> family, used when there is no config.json (first hit wins)
NAME_HINTS = [
    ("experts.gate_up_proj_bias", "gpt_oss"),
    ("feed_forward.experts.gate_up_proj", "llama4"),
    ("gpt_neox.", "gpt_neox"),
    ("query_key_value", "gpt_neox"),
    ("attn.c_attn", "gpt2"),
    ("qkv_proj", "phi3"),
    ("attention.self.query", "bert"),
    ("self_attn.q_proj", "llama"),
]

_BLOCK_GUESS = [
    (r"attn|attention", "attn"),
    (r"mlp|ffn|feed_forward|intermediate|experts|\.output\.", "mlp"),
    (r"embed|wte|wpe", "embed"),
    (r"lm_head|embed_out|pooler", "head"),
]
_LAYER = re.compile(r"\.(?:layers|h|layer|blocks|block)\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Part:
    """One analysed matrix: a stored tensor, or a slice of a fused one."""

    name: str  # display name, e.g. 'transformer.h.0.attn.c_attn.weight[q]'
    source: str  # stored tensor name
    layer: int | None
    block: str
    matrix: str
    expert: int | None
    transpose: bool  # view the stored 2-D tensor as (out, in)
    segments: tuple[tuple[int, int], ...] | None  # row ranges of the (transposed) matrix; None = all
    heads: int | None  # attention heads along rows (q/k/v) or columns (o)
    index: int | None = None  # leading index of a stored 3-D+ tensor (an expert): analyse tensor[index]
    stride: tuple[int, int] | None = None  # (offset, step): rows offset::step of the (transposed) matrix


@dataclass(frozen=True)
class Layout:
    """What the fused splits need from config.json."""

    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None

    @classmethod
    def from_config(cls, config: dict) -> Layout:
        heads = config.get("num_attention_heads") or config.get("n_head")
        kv = config.get("num_key_value_heads") or heads
        hidden = config.get("hidden_size") or config.get("n_embd")
        head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
        return cls(heads, kv, head_dim)


def detect_family(config: dict, names: list[str]) -> str:
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    for fragment, family in NAME_HINTS:
        if any(fragment in n for n in names):
            return family
    return "generic"


def _rows(*segments):
    return tuple(segments)


def _split(kind: str, shape: tuple[int, ...], layout: Layout):
    """[(suffix, matrix, transpose, segments, heads[, stride])] for a fused tensor; [] if unsplittable."""
    transposed = kind in ("gpt2_qkv", "conv1d", "t_halves", "t_interleaved")
    if transposed and len(shape) != 2 or not shape:
        return []
    rows = shape[1] if transposed else shape[0]
    if kind == "conv1d":
        return [("", None, True, None, None)]
    if kind in ("t_halves", "t_interleaved", "interleaved"):  # gate/up as [gate | up] or alternating rows
        if rows % 2:
            return []
        t, n = kind != "interleaved", rows // 2
        if kind == "t_halves":
            return [("[gate]", "gate", t, _rows((0, n)), None), ("[up]", "up", t, _rows((n, rows)), None)]
        return [("[gate]", "gate", t, None, None, (0, 2)), ("[up]", "up", t, None, None, (1, 2))]
    if kind in ("gpt2_qkv", "thirds"):
        if rows % 3:
            return []
        n = rows // 3
        transpose = kind == "gpt2_qkv"
        return [
            (
                f"[{m}]",
                m if transpose else "bias",
                transpose,
                _rows((i * n, (i + 1) * n)),
                layout.heads if transpose else None,
            )
            for i, m in enumerate("qkv")
        ]
    if kind == "halves":
        if rows % 2:
            return []
        n = rows // 2
        return [("[gate]", "gate", False, _rows((0, n)), None), ("[up]", "up", False, _rows((n, rows)), None)]
    if kind == "phi3_qkv":
        h, kv, d = layout.heads, layout.kv_heads, layout.head_dim
        if not (h and kv and d) or (h + 2 * kv) * d != rows:
            if rows % 3:
                return []
            h = kv = None
            d = rows // 3
            q, k = d, d
        else:
            q, k = h * d, kv * d
        weight = len(shape) == 2
        return [
            (f"[{m}]", m if weight else "bias", False, _rows(seg), hh if weight else None)
            for m, seg, hh in (("q", (0, q), h), ("k", (q, q + k), kv), ("v", (q + k, rows), kv))
        ]
    if kind == "neox_qkv":
        h = layout.heads
        if not h or rows % (3 * h):
            return []
        d = rows // (3 * h)
        weight = len(shape) == 2
        return [
            (
                f"[{m}]",
                m if weight else "bias",
                False,
                tuple((head * 3 * d + i * d, head * 3 * d + (i + 1) * d) for head in range(h)),
                h if weight else None,
            )
            for i, m in enumerate("qkv")
        ]
    raise KeyError(kind)


def _guess_block(name: str) -> str:
    return next((block for pattern, block in _BLOCK_GUESS if re.search(pattern, name)), "other")


def _heads_for(matrix: str, layout: Layout) -> int | None:
    return {"q": layout.heads, "o": layout.heads, "k": layout.kv_heads, "v": layout.kv_heads}.get(matrix)


def parts_of(name: str, shape: tuple[int, ...], family: str, layout: Layout) -> list[Part]:
    """The matrices one stored tensor contributes (usually one; fused tensors give several)."""
    layer_match, expert_match = _LAYER.search("." + name), _EXPERT.search("." + name)
    layer = int(layer_match.group(1)) if layer_match else None
    expert = int(expert_match.group(1)) if expert_match else None
    for pattern, block, matrix, split in FAMILIES[family] + _FALLBACK:  # noqa: B007 (used after break)
        if re.search(pattern, name):
            break
    else:
        block, matrix, split = "", "other", None
    block = block or _guess_block(name)
    if split and split.startswith("experts/") or len(shape) >= 3:
        return _per_index(name, shape, layer, block, matrix, split, layout)
    pieces = _split(split, shape, layout) if split else []
    if not pieces:  # not fused, or a fused tensor we cannot split safely: keep it whole
        whole = (
            matrix
            if matrix in ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "bias")
            else "other"
        )
        heads = _heads_for(whole, layout) if len(shape) == 2 else None
        return [Part(name, name, layer, block, whole, expert, False, None, heads)]
    return [
        Part(
            name + suffix,
            name,
            layer,
            block,
            sub or matrix,
            expert,
            transpose,
            segments,
            heads if heads is not None else (_heads_for(sub or matrix, layout) if len(shape) == 2 else None),
        )
        for suffix, sub, transpose, segments, heads in pieces
    ]


_KNOWN = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "bias")


def _per_index(name, shape, layer, block, matrix, split, layout) -> list[Part]:
    """A stored [E, ...] tensor as one part (or one set of split parts) per leading index: fused
    experts are cut by their rule's inner split; anything else of 3+ dimensions is kept per index."""
    experts = bool(split and split.startswith("experts/")) and len(shape) >= 2
    inner = split.partition("/")[2] if experts else ""
    if not experts and len(shape) < 3:  # an experts rule on a tensor of the wrong rank: keep it whole
        return [
            Part(name, name, layer, block, matrix if matrix in _KNOWN else "other", None, False, None, None)
        ]
    pieces = _split(inner, shape[1:], layout) if inner else []
    if not pieces:
        pieces = [("", None, False, None, None)]
    whole = matrix if matrix in _KNOWN else "other"
    return [
        Part(
            f"{name}[{i}]{piece[0]}",
            name,
            layer,
            block,
            "bias" if matrix == "bias" else (piece[1] or whole),
            i if experts or "experts" in name else None,
            piece[2],
            piece[3],
            None,
            i,
            piece[5] if len(piece) > 5 else None,
        )
        for i in range(shape[0])
        for piece in pieces
    ]

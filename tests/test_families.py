"""Architecture tables: every tensor of real transformers checkpoints maps to a layer, block and
canonical matrix type."""

from __future__ import annotations

import pytest
import torch
from conftest import build, save
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from deltalens.worker.checkpoint import open_checkpoint
from deltalens.worker.contract import BLOCKS, MATRIX_TYPES
from deltalens.worker.families import Layout, detect_family, parts_of

MOE = {
    "mixtral": lambda: MixtralForCausalLM(
        MixtralConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=3,
            num_experts_per_tok=2,
        )
    ),
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=3,
            num_experts_per_tok=2,
        )
    ),
}
EXPECTED = {  # family, {matrix types that must appear}
    "llama": ("llama", {"q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm"}),
    "gpt2": ("gpt2", {"q", "k", "v", "o", "up", "down", "embed", "norm", "bias"}),
    "qwen2": ("llama", {"q", "k", "v", "o", "gate", "up", "down", "embed", "norm", "bias"}),
    "neox": ("gpt_neox", {"q", "k", "v", "o", "up", "down", "embed", "lm_head", "norm", "bias"}),
    "phi3": ("phi3", {"q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm"}),
    "mixtral": ("llama", {"q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "other"}),
    "qwen2_moe": (
        "llama",
        {"q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "other", "bias"},
    ),
}


def _mapped(kind, tmp_path, use_config=True):
    if kind in MOE:
        torch.manual_seed(0)
        model = MOE[kind]()
        model.save_pretrained(tmp_path / kind)
        path = tmp_path / kind
    else:
        path = save(build(kind), kind, tmp_path / kind)
    ckpt = open_checkpoint(path)
    config = ckpt.config if use_config else {}
    family = detect_family(config, ckpt.names())
    layout = Layout.from_config(config)
    return family, [p for n in ckpt.names() for p in parts_of(n, ckpt.meta(n).shape, family, layout)], ckpt


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_every_tensor_maps_to_a_canonical_type(tmp_path, kind):
    family, parts, ckpt = _mapped(kind, tmp_path)
    want_family, want_types = EXPECTED[kind]
    assert family == want_family
    assert {p.matrix for p in parts} == want_types
    for p in parts:
        assert p.matrix in MATRIX_TYPES and p.block in BLOCKS, p
        if p.matrix == "other":
            assert "gate" in p.source, p  # only MoE routers are "other"
        if ".layers." in p.source or ".h." in p.source or ".layer." in p.source:
            assert p.layer is not None, p
        if p.matrix in ("q", "k", "v", "o", "gate", "up", "down"):
            assert p.block in ("attn", "mlp"), p
    if kind in MOE:
        experts = {(p.layer, p.expert, p.matrix) for p in parts if p.expert is not None}
        assert experts == {
            (layer, e, m) for layer in (0, 1) for e in range(3) for m in ("gate", "up", "down")
        }


def test_names_alone_identify_the_family(tmp_path):
    for kind in ("gpt2", "neox", "phi3", "llama"):
        family, parts, _ = _mapped(kind, tmp_path, use_config=False)
        assert family == EXPECTED[kind][0]


def test_unknown_names_still_work():
    parts = parts_of("encoder.blocks.7.mixer.conv.weight", (4, 4, 3), "generic", Layout())
    # a 3-D tensor is analysed per leading index (issue 12), never flattened into one matrix
    assert [(p.layer, p.block, p.matrix, p.index) for p in parts] == [
        (7, "other", "other", i) for i in range(4)
    ]
    assert parts_of("weird", (3,), "generic", Layout())[0].matrix == "other"

from __future__ import annotations

import re

import pytest
import torch

from dora_analysis.readers.names import (
    NameParts,
    as_rows,
    canonical_name,
    is_default_analysed,
    layer_index,
    match_names,
    module_name,
    name_layout,
    row_layout,
    split_name,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("module._orig_mod.encoder.layer.0.weight", "encoder.layer.0.weight"),
        ("base_model.model.model.layers.3.self_attn.q_proj.weight", "layers.3.self_attn.q_proj.weight"),
        ("encoder.layer.0.weight", "encoder.layer.0.weight"),
    ],
)
def test_canonical_name(name: str, expected: str) -> None:
    assert canonical_name(name) == expected


@pytest.mark.parametrize(
    ("name", "stack", "layer", "module"),
    [
        ("encoder.layer.3.attention.self.query.weight", "encoder", 3, "attention.self.query"),
        ("bert.encoder.layer.11.intermediate.dense.weight", "encoder", 11, "intermediate.dense"),
        ("model.layers.0.mlp.gate_proj.weight", "model", 0, "mlp.gate_proj"),
        ("transformer.h.2.attn.c_attn.weight", "model", 2, "attn.c_attn"),
        ("classifier.weight", "model", None, "classifier"),
        ("model.encoder.layers.3.self_attn.q_proj.weight", "encoder", 3, "self_attn.q_proj"),
        ("model.decoder.layers.3.self_attn.q_proj.weight", "decoder", 3, "self_attn.q_proj"),
        ("model.decoder.layers.3.encoder_attn.q_proj.weight", "decoder", 3, "encoder_attn.q_proj"),
        ("decoder.block.1.layer.1.EncDecAttention.q.weight", "decoder", 1, "EncDecAttention.q"),
        ("encoder.block.1.layer.0.SelfAttention.q.weight", "encoder", 1, "SelfAttention.q"),
        ("vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision.encoder", 0, "self_attn.q_proj"),
        ("text_model.encoder.layers.0.self_attn.q_proj.weight", "text.encoder", 0, "self_attn.q_proj"),
        ("model.layers.1.mlp.experts.3.w1.weight", "model", 1, "mlp.experts.3.w1"),
        ("model.decoder.embed_tokens.weight", "decoder", None, "embed_tokens"),
        ("classifier.0.weight", "model", None, "classifier.0"),
    ],
)
def test_stack_layer_and_module(name: str, stack: str, layer: int | None, module: str) -> None:
    assert split_name(name) == NameParts(stack, layer, module)
    assert layer_index(name) == layer and module_name(name) == module


def test_name_layout_says_when_the_name_is_a_guess() -> None:
    assert name_layout("transformer.h.0.attn.c_attn.weight", (32, 96)) == ("transposed", True)
    assert name_layout("embed_out.weight", (100, 32)) == ("embedding", True)
    assert name_layout("model.embed_tokens.weight", (100, 32)) == ("embedding", False)
    assert name_layout("model.layers.0.self_attn.q_proj.weight", (32, 32)) == ("linear", False)


def test_row_layouts_follow_peft_conventions() -> None:
    assert row_layout("encoder.layer.0.attention.self.query.weight", (8, 4)) == "linear"
    assert row_layout("embeddings.word_embeddings.weight", (100, 8)) == "embedding"
    assert row_layout("model.embed_tokens.weight", (100, 8)) == "embedding"
    assert row_layout("transformer.h.0.mlp.c_fc.weight", (8, 32)) == "transposed"
    assert row_layout("conv.weight", (8, 3, 3, 3)) == "conv"
    assert row_layout("encoder.layer.0.output.LayerNorm.weight", (8,)) is None

    conv = torch.arange(8 * 3 * 2 * 2).reshape(8, 3, 2, 2)
    assert as_rows(conv, "conv").shape == (8, 12)
    assert torch.equal(as_rows(conv, "conv")[5], conv[5].flatten())
    embedding = torch.arange(12).reshape(4, 3)  # 4 tokens, dim 3 -> one row per dim
    assert torch.equal(as_rows(embedding, "embedding"), embedding.T)


def test_default_selection_is_linear_weights() -> None:
    assert is_default_analysed("encoder.layer.0.attention.self.query.weight", (8, 8))
    assert not is_default_analysed("encoder.layer.0.attention.self.query.bias", (8,))
    assert not is_default_analysed("embeddings.word_embeddings.weight", (100, 8))
    assert not is_default_analysed("embeddings.position_ids", (1, 512))


def test_match_names_across_wrappers_and_architecture_prefix() -> None:
    base = [
        "embeddings.word_embeddings.weight",
        "encoder.layer.0.attention.self.query.weight",
        "pooler.dense.weight",
    ]
    tuned = [
        "module.bert.embeddings.word_embeddings.weight",
        "module.bert.encoder.layer.0.attention.self.query.weight",
        "module.classifier.weight",
    ]
    match = match_names(base, tuned)
    assert match.pairs == [
        ("embeddings.word_embeddings.weight", "module.bert.embeddings.word_embeddings.weight"),
        (
            "encoder.layer.0.attention.self.query.weight",
            "module.bert.encoder.layer.0.attention.self.query.weight",
        ),
    ]
    assert match.base_only == ["pooler.dense.weight"]
    assert match.tuned_only == ["module.classifier.weight"]


def test_match_names_when_the_base_has_the_longer_names() -> None:
    match = match_names(["model.layers.0.q.weight", "lm_head.weight"], ["layers.0.q.weight"])
    assert match.pairs == [("model.layers.0.q.weight", "layers.0.q.weight")]
    assert match.base_only == ["lm_head.weight"] and match.tuned_only == []


# The name rules as regular expressions, as they were written before they became string tests: the
# reference the faster tests must agree with on every name.
_EMBEDDING_REFERENCE = re.compile(
    r"(^|\.)(embed\w*|\w*embeddings?|wte|wpe|shared|relative_attention_bias)(\.|$)"
)
_TRANSPOSED_REFERENCE = re.compile(r"(^|\.)(c_attn|q_attn|c_proj|c_fc)\.weight$")


def _reference_layout(name: str) -> str:
    if _EMBEDDING_REFERENCE.search(name):
        return "embedding"
    return "transposed" if _TRANSPOSED_REFERENCE.search(name) else "linear"


def test_layout_string_tests_agree_with_the_regular_expressions() -> None:
    leaves = [
        "c_attn",
        "q_attn",
        "c_proj",
        "c_fc",
        "xc_attn",
        "c_attnx",
        "c_fc2",
        "embed_tokens",
        "wte",
        "shared",
        "word_embeddings",
        "relative_attention_bias",
        "q_proj",
        "dense",
        "sharedx",
        "lm_head",
    ]
    ends = ["weight", "bias", "weight.extra", "weights", ""]
    names = []
    for leaf in leaves:
        for end in ends:
            for prefix in ("", "transformer.h.0.attn.", "model.", "x"):
                names.append(f"{prefix}{leaf}.{end}".rstrip("."))
    names += ["c_attn.weight", ".c_attn.weight", "a..c_fc.weight", "c_proj.weight\n", "embed", "wte\n.weight"]
    for name in names:
        assert row_layout(name, (4, 4)) == _reference_layout(name), name


def test_a_superscript_digit_is_not_a_block_index() -> None:
    # str.isdigit() holds for "²" but int() refuses it: such a part is part of the module path
    assert split_name("model.layers.².mlp.weight") == NameParts("model", None, "layers.².mlp")
    assert split_name("model.layers.٣.mlp.weight") == NameParts("model", 3, "mlp")  # an Arabic-Indic 3

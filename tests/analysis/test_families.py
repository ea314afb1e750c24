"""Every model family, built tiny from its transformers config: layouts from the model, stack/layer/module
names, FT perturbations and PEFT adapters, all against a float64 NumPy reference that knows the true
layout from the module types of the instantiated model (never from names)."""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dora_analysis.analysis.comparison import compare
from dora_analysis.analysis.planning import LayoutWarning

# family -> (config class, config fields, model class, PEFT target modules)
FAMILIES = {
    "bert": (
        "BertConfig",
        dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, vocab_size=50),
        "BertModel",
        ["query", "value"],
    ),
    "gpt2": ("GPT2Config", dict(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16), "GPT2LMHeadModel", ["c_attn"]),
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        dict(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16, multi_query=True),
        "GPTBigCodeForCausalLM",
        ["c_attn"],
    ),
    "llama": (
        "LlamaConfig",
        dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=50),
        "LlamaForCausalLM",
        ["q_proj", "v_proj"],
    ),
    "qwen2": (
        "Qwen2Config",
        dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=50),
        "Qwen2ForCausalLM",
        ["q_proj", "v_proj"],
    ),
    "mistral": (
        "MistralConfig",
        dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=50),
        "MistralForCausalLM",
        ["q_proj", "v_proj"],
    ),
    "bart": (
        "BartConfig",
        dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=24, decoder_ffn_dim=24, vocab_size=50, max_position_embeddings=16),
        "BartModel",
        ["q_proj", "v_proj"],
    ),
    "t5": (
        "T5Config",
        dict(d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2, vocab_size=50),
        "T5Model",
        ["q", "v"],
    ),
    "clip": (
        "CLIPConfig",
        dict(
            text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=50, max_position_embeddings=16),
            vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                               image_size=8, patch_size=4),
            projection_dim=8,
        ),
        "CLIPModel",
        ["q_proj", "v_proj"],
    ),
}  # fmt: skip

# ViT has its own test below: transformers 5 saves it under its old names
# (encoder.layer.0.attention.attention.query) while its modules, and so PEFT adapters, are named
# layers.0.attention.q_proj.

# Stacks and modules a family must keep apart (a BART or T5 series never pools them).
SEPARATE = {
    "bart": {
        ("encoder", "self_attn.q_proj"),
        ("decoder", "self_attn.q_proj"),
        ("decoder", "encoder_attn.q_proj"),
    },
    "t5": {("encoder", "SelfAttention.q"), ("decoder", "SelfAttention.q"), ("decoder", "EncDecAttention.q")},
    "clip": {("text.encoder", "self_attn.q_proj"), ("vision.encoder", "self_attn.q_proj")},
    "llama": {("model", "self_attn.q_proj")},
}


def _build(family: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    config_class, fields, model_class, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**fields)
    return getattr(transformers, model_class)(config).eval()


def _true_rows(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, bool]]:
    """``{weight name: (module, transposed)}`` of every Linear and Conv1D, from the module types."""
    from transformers.pytorch_utils import Conv1D

    found, seen = {}, set()
    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            found[f"{path}.weight"] = (module, isinstance(module, Conv1D))
    return found


def _rows64(weight: torch.Tensor, transposed: bool) -> np.ndarray:
    w = weight.detach().double().numpy()
    return w.T if transposed else w


def _reference(w0: np.ndarray, w1: np.ndarray) -> tuple[float, float, int]:
    """ΔM, ΔD (paper Eq. 3, 4) and the number of rows, in float64 NumPy on rows = output units."""
    m0, m1 = np.linalg.norm(w0, axis=1), np.linalg.norm(w1, axis=1)
    cos = np.einsum("ij,ij->i", w0, w1) / (m0 * m1)
    return float(np.mean(np.abs(m1 - m0))), float(np.mean(1 - cos)), w0.shape[0]


def _check(frame, base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], *, rel: float) -> None:
    assert set(frame["tensor"]) == set(base) & set(tuned)
    for row in frame.itertuples():
        dm, dd, rows = _reference(base[row.tensor], tuned[row.tensor])
        assert row.rows == rows, row.tensor
        assert row.delta_magnitude == pytest.approx(dm, rel=rel, abs=1e-12), row.tensor
        assert row.delta_direction == pytest.approx(dd, rel=rel, abs=1e-12), row.tensor


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_layouts_names_ft_and_adapters(family: str, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = _build(family)
    model.save_pretrained(tmp_path / "base")
    saved = set(_saved_names(tmp_path / "base"))
    truth = {n: v for n, v in _true_rows(model).items() if n in saved}
    base = {n: _rows64(m.weight, t) for n, (m, t) in truth.items()}

    # A PEFT DoRA (odd families: LoRA) adapter, against PEFT's own merge_and_unload.
    use_dora = list(FAMILIES).index(family) % 2 == 0
    targets = FAMILIES[family][3]
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(
            r=2, lora_alpha=4, target_modules=targets, use_dora=use_dora, fan_in_fan_out=family == "gpt2"
        ),
    )
    generator = _move_adapter(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_model = peft_model.merge_and_unload()
    merged = {n: _rows64(m.weight, t) for n, (m, t) in _true_rows(merged_model).items() if n in truth}

    # FT 1: every output unit scaled by its own factor: magnitude moves, direction does not.
    scales = {}
    with torch.no_grad():
        for name, (module, transposed) in truth.items():
            k = module.weight.shape[1] if transposed else module.weight.shape[0]
            s = 1 + torch.rand(k, generator=generator)
            scales[name] = s
            module.weight.mul_(s[None, :] if transposed else s[:, None])
    model.save_pretrained(tmp_path / "scaled")
    scaled = {n: _rows64(m.weight, t) for n, (m, t) in truth.items()}
    # FT 2: a random perturbation.
    with torch.no_grad():
        for module, _ in truth.values():
            module.weight.add_(0.05 * torch.randn(module.weight.shape, generator=generator))
    model.save_pretrained(tmp_path / "noisy")
    noisy = {n: _rows64(m.weight, t) for n, (m, t) in truth.items()}

    with warnings.catch_warnings():
        warnings.simplefilter("error", LayoutWarning)  # a config is beside: nothing is guessed
        frame = compare(tmp_path / "base", tmp_path / "scaled")
        noisy_frame = compare(tmp_path / "base", tmp_path / "noisy")
        adapter_frame = compare(tmp_path / "base", tmp_path / "adapter")

    # layouts decided by the model's module types
    assert set(frame["layout_source"]) == {"config"}
    expected_layout = {n: ("transposed" if t else "linear") for n, (_, t) in truth.items()}
    assert dict(zip(frame["tensor"], frame["layout"], strict=True)) == expected_layout
    # row scaling: ΔD = 0 over exactly the output units of every weight
    assert (frame["delta_direction"].abs() < 1e-12).all(), frame[["tensor", "delta_direction"]]
    _check(frame, base, scaled, rel=1e-6)
    _check(noisy_frame, base, noisy, rel=1e-6)
    # the adapter equals PEFT's merge_and_unload (within 1e-5) and the float64 reference
    adapted = {n: merged[n] for n in adapter_frame["tensor"]}
    assert set(adapted) and all(
        any(f".{t}." in n or n.endswith(f".{t}.weight") for t in targets) for n in adapted
    )
    _check(adapter_frame, base, adapted, rel=1e-5)

    # stack/layer/module never pool different matrices; layer is a nullable integer
    assert str(frame["layer"].dtype) == "Int64"
    keys = list(zip(frame["stack"], frame["layer"].astype(object), frame["module"], strict=True))
    assert len(set(keys)) == len(keys)
    assert SEPARATE.get(family, set()) <= set(zip(frame["stack"], frame["module"], strict=True))


def _move_adapter(peft_model: torch.nn.Module) -> torch.Generator:
    """Move every LoRA factor (and DoRA magnitude) off its initial value; returns the generator, for more."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=generator))
            elif "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return generator


def _saved_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_gpt2_names_without_a_config_are_said_to_be_guesses_and_layout_overrides(tmp_path: Path) -> None:
    """GPTBigCode's c_attn is a Linear: in a bare file the name rule guesses Conv1D, says so, and
    ``layout="linear"`` gives the right answer."""
    model = _build("gpt_bigcode")
    model.save_pretrained(tmp_path / "base")
    saved = set(_saved_names(tmp_path / "base"))
    truth = {n: v for n, v in _true_rows(model).items() if n in saved}
    base = {n: _rows64(m.weight, t) for n, (m, t) in truth.items()}
    with torch.no_grad():
        for module, _ in truth.values():
            module.weight.mul_(1 + torch.rand(module.weight.shape[0])[:, None])  # Linear rows
    model.save_pretrained(tmp_path / "tuned")
    for name in ("base", "tuned"):
        shutil.copy(tmp_path / name / "model.safetensors", tmp_path / f"{name}.safetensors")
    with pytest.warns(LayoutWarning, match=r"layout guessed from the name, e\.g\. .*c_attn"):
        guessed = compare(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    c_attn = guessed[guessed["module"] == "attn.c_attn"]
    assert set(c_attn["layout_source"]) == {"name-ambiguous"}
    assert (c_attn["delta_direction"] > 1e-3).all()  # the wrong layout shows as a direction change
    assert guessed.attrs["layout_ambiguous"] and guessed.attrs["layout_rule"].startswith("name")
    forced = compare(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", layout="linear")
    assert set(forced["layout_source"]) == {"override"}
    assert (forced["delta_direction"].abs() < 1e-12).all()
    assert set(forced["rows"]) >= {64}  # c_attn: 32 + 2 x 16 output units (multi-query)
    tuned = {n: _rows64(m.weight, t) for n, (m, t) in truth.items()}
    _check(forced, base, tuned, rel=1e-6)


def test_per_row_output_matches_float64_rows(tmp_path: Path) -> None:
    model = _build("bart")
    model.save_pretrained(tmp_path / "base")
    truth = _true_rows(model)
    saved = set(_saved_names(tmp_path / "base"))
    base = {n: _rows64(m.weight, t) for n, (m, t) in truth.items() if n in saved}
    with torch.no_grad():
        for module, _ in truth.values():
            module.weight.add_(0.05 * torch.randn(module.weight.shape))
            module.weight[0].zero_()  # a zero row has no direction: NaN, as in the summary's exclusion
    model.save_pretrained(tmp_path / "tuned")
    tuned = {n: _rows64(m.weight, t) for n, (m, t) in truth.items() if n in saved}
    rows = compare(tmp_path / "base", tmp_path / "tuned", per_row=True)
    summary = compare(tmp_path / "base", tmp_path / "tuned")
    assert list(rows["tensor"].drop_duplicates()) == list(summary["tensor"])  # same order
    assert str(rows["layer"].dtype) == "Int64"
    for tensor, group in rows.groupby("tensor", sort=False):
        w0, w1 = base[tensor], tuned[tensor]
        m0, m1 = np.linalg.norm(w0, axis=1), np.linalg.norm(w1, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):  # row 0 is zero: no direction
            one_minus_cos = 1 - np.einsum("ij,ij->i", w0, w1) / (m0 * m1)
        assert list(group["row"]) == list(range(w0.shape[0]))
        np.testing.assert_allclose(group["base_magnitude"], m0, rtol=1e-9)
        # the update w - a is formed in float32 (exact only for close values): 1e-6 as everywhere
        np.testing.assert_allclose(group["tuned_magnitude"], m1, rtol=1e-6, atol=1e-12)
        assert np.isnan(group["delta_magnitude"].iloc[0]) and np.isnan(group["delta_direction"].iloc[0])
        np.testing.assert_allclose(group["delta_magnitude"].iloc[1:], np.abs(m1 - m0)[1:], rtol=1e-6)
        np.testing.assert_allclose(group["delta_direction"].iloc[1:], one_minus_cos[1:], rtol=1e-6)
        summary_row = summary[summary["tensor"] == tensor].iloc[0]
        assert summary_row.delta_direction == pytest.approx(group["delta_direction"].mean(), rel=1e-9)
        assert set(group["stack"]) == {summary_row.stack} and set(group["module"]) == {summary_row.module}


@pytest.mark.parametrize(
    ("config_class", "fields", "model_class"),
    [
        ("GPTNeoXConfig", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                               vocab_size=50, tie_word_embeddings=False), "GPTNeoXForCausalLM"),
        ("ViTConfig", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                           image_size=8, patch_size=4), "ViTModel"),
    ],
)  # fmt: skip
def test_families_saved_under_older_names_still_get_the_models_layout(
    config_class: str, fields: dict, model_class: str, tmp_path: Path
) -> None:
    """transformers 5 saves GPT-NeoX's output Linear as ``embed_out`` (an embedding-like name) and ViT
    as ``encoder.layer.0.attention.attention.query``: the model's own renamings find their modules."""
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields)).eval()
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(1 + torch.rand(module.weight.shape[0])[:, None])
    model.save_pretrained(tmp_path / "tuned")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayoutWarning)
        frame = compare(
            tmp_path / "base", tmp_path / "tuned", include=r"(embed_out|query|value|dense)\.weight$"
        )
    assert (
        len(frame) >= 3 and set(frame["layout_source"]) == {"config"} and set(frame["layout"]) == {"linear"}
    )
    assert (frame["delta_direction"].abs() < 1e-12).all()
    if model_class == "GPTNeoXForCausalLM":
        assert frame.set_index("tensor").loc["embed_out.weight", "rows"] == 50  # vocabulary rows


@pytest.mark.parametrize("use_dora", [True, False])
def test_vit_adapter_named_after_the_loaded_modules_finds_its_stored_base(
    use_dora: bool, tmp_path: Path
) -> None:
    """A PEFT adapter on transformers 5's ViT names ``layers.0.attention.q_proj``; the base stores
    ``encoder.layer.0.attention.attention.query``. The model's own renamings pair them, and the adapter
    equals PEFT's ``merge_and_unload`` (saved, under the stored names) and the float64 reference."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        image_size=8,
        patch_size=4,
    )
    model = transformers.ViTModel(config).eval()
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=use_dora)
    )
    _move_adapter(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayoutWarning)
        frame = compare(tmp_path / "base", tmp_path / "adapter")
    expected = {
        f"encoder.layer.{i}.attention.attention.{m}.weight" for i in range(2) for m in ("query", "value")
    }
    assert set(frame["tensor"]) == expected and set(frame["layout"]) == {"linear"}
    base = {n: t.double().numpy() for n, t in load_file(tmp_path / "base" / "model.safetensors").items()}
    merged = {n: t.double().numpy() for n, t in load_file(tmp_path / "merged" / "model.safetensors").items()}
    assert set(expected) <= set(merged)  # PEFT's merge, saved under the stored names
    _check(frame, {n: base[n] for n in expected}, {n: merged[n] for n in expected}, rel=1e-5)

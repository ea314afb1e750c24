"""Builders of tiny models, checkpoints and PEFT adapters shared by the tests (no downloads)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

__all__ = [
    "tiny_bert_config",
    "save_tiny_encoder",
    "tiny_gpt2_config",
    "save_tiny_bert",
    "make_peft_adapter",
    "save_bin_folder",
    "file_digests",
]


def tiny_bert_config(**overrides):
    """A 2-layer BERT with hidden size 32; ``overrides`` replace any field (e.g. ``num_labels=3``)."""
    from transformers import BertConfig

    fields = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return BertConfig(**{**fields, **overrides})


def save_tiny_encoder(folder: Path, seed: int = 0) -> Path:
    """A tiny BertModel saved as a Hugging Face folder with the real MiniLM tokenizer (vocab 30522)."""
    from transformers import AutoTokenizer, BertModel

    from dora_analysis.training import default_model_path

    torch.manual_seed(seed)
    BertModel(tiny_bert_config(vocab_size=30522)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True).save_pretrained(folder)
    return folder


def tiny_gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )


def save_tiny_bert(
    folder: Path, *, classifier: bool = False, seed: int = 0, **save_kwargs
) -> dict[str, torch.Tensor]:
    """Save a tiny (classifier) BERT with ``save_pretrained(folder, **save_kwargs)``; return its state dict."""
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cls = BertForSequenceClassification if classifier else BertModel
    model = cls(tiny_bert_config()).eval()
    model.save_pretrained(folder, **save_kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_peft_adapter(
    base_dir: Path,
    adapter_dir: Path,
    *,
    model: str = "bert-cls",
    seed: int = 0,
    **lora_kwargs,
) -> dict[str, torch.Tensor]:
    """Save a base model to ``base_dir`` and a perturbed PEFT adapter on it to ``adapter_dir``.

    ``model``: ``"bert"``, ``"bert-cls"`` (BertForSequenceClassification) or ``"gpt2"``. Every adapter
    parameter (lora_A, lora_B, magnitude, modules_to_save copies) is moved away from its initial
    value. Returns PEFT's ``merge_and_unload()`` state dict, the reference for merged weights.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, BertModel, GPT2LMHeadModel

    torch.manual_seed(seed)
    cls, config = {
        "bert": (BertModel, tiny_bert_config),
        "bert-cls": (BertForSequenceClassification, tiny_bert_config),
        "gpt2": (GPT2LMHeadModel, tiny_gpt2_config),
    }[model]
    base = cls(config()).eval()
    base.save_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(**lora_kwargs))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=generator))
            elif "lora_" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def save_bin_folder(folder: Path, state: dict[str, torch.Tensor], shards: int = 1) -> None:
    """Write ``state`` as an old-style folder: ``pytorch_model.bin``, or ``shards`` files plus
    ``pytorch_model.bin.index.json`` (transformers 5 no longer writes these itself)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, folder / file)
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def file_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (or of ``root`` itself), to prove inputs are unchanged."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

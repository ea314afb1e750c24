"""Series to analyse in tests: synthetic frames, and tiny runs laid out as our trainer and PEFT write them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tiny_models import tiny_bert_config


def synthetic_series(seed: int = 0, slopes=None) -> pd.DataFrame:
    """A series like analyze_series returns: 3 methods x 2 modules x 4 steps x 6 layers."""
    slopes = slopes or {"ft": -0.6, "lora": 2.0, "dora": -0.3}
    rng = np.random.default_rng(seed)
    rows = []
    for method, slope in slopes.items():
        for module in ("query", "value"):
            for step in (10, 20, 30, 40):
                for layer in range(6):
                    x = 0.01 * step / 10 + 0.002 * layer + rng.normal(0, 0.003)
                    rows.append(
                        {
                            "method": method,
                            "module": module,
                            "step": step,
                            "layer": layer,
                            "tensor": f"encoder.layer.{layer}.attention.self.{module}.weight",
                            "delta_direction": x,
                            "delta_magnitude": 0.5 + slope * x + rng.normal(0, 0.004),
                        }
                    )
    return pd.DataFrame(rows)


BART_MODULES = (
    ("encoder", "self_attn.q_proj"),
    ("decoder", "self_attn.q_proj"),
    ("decoder", "encoder_attn.q_proj"),
)


def bart_like_series(seed: int = 0, slopes=None, layers: int = 3, steps=(10, 20, 30)) -> pd.DataFrame:
    """A series like analyze_series returns for a BART-like encoder-decoder, one run per method.

    Columns ``run``, ``method``, ``stack``, ``step``, ``layer`` (nullable Int64), ``module``: the same
    module name (``self_attn.q_proj``) in the encoder and the decoder, plus the decoder's cross-attention.
    Each (stack, module) has its own level and slope, so pooling them would mix different clouds.
    """
    slopes = slopes or {"ft": -0.6, "lora": 2.0, "dora": -0.3}
    rng = np.random.default_rng(seed)
    rows = []
    for method, slope in slopes.items():
        for k, (stack, module) in enumerate(BART_MODULES):
            for step in steps:
                for layer in range(layers):
                    x = (k + 1) * 0.01 * step / 10 + 0.002 * layer + rng.normal(0, 0.003)
                    prefix = f"model.{stack}.layers.{layer}"
                    rows.append(
                        {
                            "run": f"{method}-run",
                            "method": method,
                            "stack": stack,
                            "step": step,
                            "layer": layer,
                            "module": module,
                            "tensor": f"{prefix}.{module}.weight",
                            "delta_direction": x,
                            "delta_magnitude": 0.5 + 0.5 * k + (1 - k) * slope * x + rng.normal(0, 0.004),
                        }
                    )
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    df["step"] = df["step"].astype("Int64")
    return df


STEPS = (10, 20, 30)


def tiny_config():
    return tiny_bert_config(num_labels=3)


def _state(step: int, accuracy: float) -> dict:
    history = [{"step": 0, "eval_accuracy": 0.3, "eval_loss": 1.1}]
    for s in range(5, step + 1, 5):
        history.append({"step": s, "loss": 1.2 - s / 100, "epoch": s / 10})
        if s % 10 == 0:
            history.append({"step": s, "eval_accuracy": accuracy - (step - s) / 100, "eval_loss": 0.9})
    return {"global_step": step, "log_history": history}


def make_runs(root: Path, methods=("ft", "lora", "dora"), steps=STEPS, run_json: bool = True):
    """A tiny base encoder and, per method, a run folder of checkpoint-<step>/ folders like the trainer's.

    FT checkpoints are full classifier weights; LoRA/DoRA ones are real PEFT adapter folders
    (query/value adapted, classifier in modules_to_save). Returns ``(base_dir, runs, merged)`` where
    ``merged[(method, step)]`` is the encoder state dict PEFT/transformers give for that checkpoint.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    base_dir = root / "base"
    encoder = BertModel(tiny_config(), add_pooling_layer=True).eval()
    encoder.save_pretrained(base_dir)
    runs, merged = {}, {}
    for k, method in enumerate(methods):
        run = root / "runs" / method
        run.mkdir(parents=True)
        if run_json:
            (run / "run.json").write_text(json.dumps({"method": method, "base_model": str(base_dir)}))
        for step in steps:
            torch.manual_seed(k)
            model = BertForSequenceClassification(tiny_config()).eval()
            model.bert.load_state_dict(encoder.state_dict())
            generator = torch.Generator().manual_seed(100 * k + step)
            folder = run / f"checkpoint-{step}"
            if method == "ft":
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(step / 1000 * torch.randn(p.shape, generator=generator))
                model.save_pretrained(folder)
                state = model.state_dict()
            else:
                config = LoraConfig(
                    r=4,
                    lora_alpha=8,
                    target_modules=["query", "value"],
                    use_dora=method == "dora",
                    modules_to_save=["classifier"],
                )
                peft_model = get_peft_model(model, config)
                with torch.no_grad():
                    for name, p in peft_model.named_parameters():
                        if "lora_magnitude_vector" in name:
                            p.mul_(1 + step / 100 * torch.rand(p.shape, generator=generator))
                        elif "lora_" in name:
                            p.add_(step / 100 * torch.randn(p.shape, generator=generator))
                peft_model.save_pretrained(folder)
                state = peft_model.merge_and_unload().state_dict()
            (folder / "trainer_state.json").write_text(json.dumps(_state(step, 0.5 + k / 10 + step / 100)))
            merged[(method, step)] = {n.removeprefix("bert."): v.detach().clone() for n, v in state.items()}
        runs[method] = run
    return base_dir, runs, merged


def correlation_table(r: dict) -> pd.DataFrame:
    """A correlation table (as ``correlations`` returns) with one query row per method and r ± 0.1."""
    rows = [
        {
            "method": m,
            "module": "query",
            "n": 24,
            "steps": 4,
            "layers": 6,
            "r": v,
            "r_low": v - 0.1,
            "r_high": v + 0.1,
            "slope": v,
            "intercept": 0.0,
            "r_within_step": v,
            "r_within_layer": v,
        }
        for m, v in r.items()
    ]
    return pd.DataFrame(rows)

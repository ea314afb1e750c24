"""Save and load LoRA/DoRA adapters in PEFT's on-disk format (``adapter_config.json`` + safetensors).

On disk (peft 0.21, adapter name stripped), relative to the model that PEFT wraps:
``base_model.model.<module>.lora_A.weight`` ``(r, in)``, ``...lora_B.weight`` ``(out, r)``,
``...lora_magnitude_vector`` ``(out,)`` (DoRA) and ``base_model.model.<module>.<param>`` for the
fully trained ``modules_to_save``. ``PeftModel.from_pretrained(base, folder)`` loads what
:func:`save_adapter` writes; :func:`load_adapter` loads what PEFT's ``save_pretrained`` writes.

``task_type`` is written as None by default: ``from_pretrained`` then builds the generic ``PeftModel``,
whose forward passes everything to the base model, and a trained head travels as ``modules_to_save``.
(With ``task_type="SEQ_CLS"`` PEFT adds ``classifier``/``score`` to ``modules_to_save`` itself; an
untrained head then loads as a copy of the base's, so outputs still agree.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dora_analysis.adapters.dora import DoRALinear
from dora_analysis.adapters.inject import (
    MODULES_TO_SAVE_ATTR,
    adapter_modules,
    inject_adapters,
    matches_target,
    plain_modules,
)
from dora_analysis.atomic import fsync, temporary_name
from dora_analysis.errors import InputError
from dora_analysis.readers.adapter_config import AdapterConfig, pattern_value, read_adapter_config

__all__ = ["save_adapter", "load_adapter", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_UNSUPPORTED = {  # config fields whose non-empty values change what gets wrapped or computed
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "lora_bias": "a trained LoRA bias",
    "layers_to_transform": "layers_to_transform",
    "target_parameters": "target_parameters",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QALoRA",
}


# ----------------------------------------------------------------------------------------- saving


def _one_value(values: list, what: str, folder: Path) -> object:
    distinct = set(values)
    if len(distinct) != 1:
        raise InputError.of(
            folder, f"one PEFT adapter holds one {what}; the model mixes {sorted(map(str, distinct))}"
        )
    return values[0]


def _target_modules(model: nn.Module, wrapped: list[str], keep: list[str]) -> list[str]:
    """Short names (``query``) when PEFT's suffix rule selects exactly ``wrapped``; else the full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    selected = {
        n
        for n, _ in plain_modules(model)
        if n and matches_target(n, short) and not any(_in_module_to_save(n, k) for k in keep)
    }
    return short if selected == set(wrapped) else list(wrapped)


def _in_module_to_save(name: str, module_to_save: str) -> bool:
    """PEFT never wraps inside a modules_to_save entry (its regex ``(^|.*\\.)m($|\\..*)``)."""
    return re.match(rf"(^|.*\.){re.escape(module_to_save)}($|\..*)", name) is not None


def _write_adapter_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write the weights and the config into a temporary folder, then rename it to ``folder`` once.

    Where ``folder`` already holds other files (a rename cannot replace a non-empty folder), the
    config is the commit mark: the old config goes first, the new weights next, the new config last,
    so a crash leaves no config (not an adapter) or a matching pair, never new weights with an old
    config.
    """
    from safetensors.torch import save_file

    staging = folder.parent / temporary_name()
    os.mkdir(staging, 0o777)  # the umask applies, as for a plain mkdir
    try:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            fsync(staging / name)
        if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
            os.replace(staging, folder)  # one rename: both files appear together
        else:
            (folder / CONFIG_NAME).unlink(missing_ok=True)
            os.replace(staging / WEIGHTS_NAME, folder / WEIGHTS_NAME)
            fsync(folder, folder=True)
            os.replace(staging / CONFIG_NAME, folder / CONFIG_NAME)
            fsync(folder, folder=True)
        fsync(folder.parent, folder=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    *,
    task_type: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s adapters to ``folder`` in PEFT's format, atomically; returns the folder.

    Args:
        model: a model with :class:`LoRALinear` / :class:`DoRALinear` modules (all of one kind, one
            rsLoRA setting and one dropout); different ranks/alphas become ``rank_pattern`` /
            ``alpha_pattern``. Magnitude-only DoRA modules are written as rank 1 with ``A = B = 0``.
        folder: created if needed; existing adapter files are refused unless ``overwrite``.
        base_model_name_or_path: recorded in the config for PEFT.
        task_type: PEFT's task type to record (default None, see the module docstring).
    """

    folder = Path(folder)
    wrappers = adapter_modules(model)
    if not wrappers:
        raise InputError.of(folder, "the model holds no LoRALinear/DoRALinear modules to save")
    if folder.exists() and not folder.is_dir():
        raise InputError.of(folder, "exists and is not a folder")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if (folder / name).exists() and not overwrite:
            raise InputError.of(folder / name, "exists already; pass overwrite=True to replace it")
    keep = list(getattr(model, MODULES_TO_SAVE_ATTR, []))
    use_dora = _one_value(
        [isinstance(m, DoRALinear) for m in wrappers.values()], "method (LoRA or DoRA)", folder
    )
    use_rslora = _one_value([m.rslora for m in wrappers.values()], "rsLoRA setting", folder)
    dropout = _one_value([m.dropout for m in wrappers.values()], "dropout", folder)
    ranks = {n: max(m.r, 1) for n, m in wrappers.items()}
    alphas = {n: m.alpha for n, m in wrappers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]

    tensors = _adapter_tensors(model, wrappers, keep, use_dora)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_dora": use_dora,
        "use_rslora": use_rslora,
        "target_modules": _target_modules(model, list(wrappers), keep),
        "modules_to_save": keep or None,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "revision": None,
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    _write_adapter_folder(folder, tensors, config)
    return folder


def _adapter_tensors(
    model: nn.Module, wrappers: dict[str, nn.Module], keep: list[str], use_dora: bool
) -> dict[str, torch.Tensor]:
    """PEFT's state dict: every wrapper's ``lora_A``/``lora_B`` (and DoRA magnitude), then the
    ``keep`` modules' own tensors. Magnitude-only DoRA modules get a zero rank-1 update."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in wrappers.items():
        key = f"{_PREFIX}{name}."
        if module.lora_A is None:  # magnitude-only: a rank-1 update that is exactly zero
            lora_A = module.magnitude.new_zeros(1, module.in_features)
            lora_B = module.magnitude.new_zeros(module.out_features, 1)
        else:
            lora_A, lora_B = module.lora_A, module.lora_B
        tensors[key + "lora_A.weight"] = lora_A.detach().contiguous()
        tensors[key + "lora_B.weight"] = lora_B.detach().contiguous()
        if use_dora:
            tensors[key + "lora_magnitude_vector"] = module.magnitude.detach().contiguous()
    for name in keep:
        for pname, value in model.get_submodule(name).state_dict().items():
            tensors[f"{_PREFIX}{name}.{pname}"] = value.detach().contiguous()
    return tensors


# ---------------------------------------------------------------------------------------- loading


def _peft_selects(name: str, config: AdapterConfig, keep: list[str]) -> bool:
    """PEFT's ``check_target_module_exists`` for the options we support."""
    exclude = config.exclude_modules
    if exclude and matches_target(name, exclude):
        return False
    if any(_in_module_to_save(name, k) for k in config.modules_to_save):
        return False
    return matches_target(name, config.target_modules)


def _read_config(folder: Path) -> AdapterConfig:
    """The adapter's config (read by the readers' one parser), refused where the layers cannot load it."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise InputError.of(folder, f"no {CONFIG_NAME}: not a PEFT adapter folder")
    config = read_adapter_config(path, require_rank=False)
    if config.peft_type != "LORA":
        raise InputError.of(path, f"peft_type is {config.peft_type!r}; only LORA (LoRA/DoRA) adapters load")
    values = {**config.options, "fan_in_fan_out": config.fan_in_fan_out, "lora_bias": config.lora_bias}
    for field_name, what in _UNSUPPORTED.items():
        if values.get(field_name):
            raise InputError.of(path, f"{what} ({field_name}={values[field_name]!r}) is not supported")
    targets = config.target_modules
    if not targets or targets == "all-linear":
        raise InputError.of(path, f"target_modules={targets!r} is not supported; name the modules")
    return config


def _tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapter file's tensors, one at a time."""
    path = folder / WEIGHTS_NAME
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
        return
    legacy = folder / _LEGACY_WEIGHTS_NAME
    if not legacy.is_file():
        raise InputError.of(folder, f"neither {WEIGHTS_NAME} nor {_LEGACY_WEIGHTS_NAME} found")
    try:
        state = torch.load(legacy, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal becomes a user error
        raise InputError.of(legacy, f"cannot be read as plain weights ({type(exc).__name__})") from None
    yield from state.items()


def _copy_into(target: torch.Tensor, value: torch.Tensor, path: Path, key: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise InputError.of(
            path, f"shape {tuple(value.shape)}, the model expects {tuple(target.shape)}", tensor=key
        )
    with torch.no_grad():
        target.copy_(value)


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Wrap the modules a PEFT adapter folder names, load its weights; returns the wrapped names.

    ``model`` is a plain model (modified in place): the modules its config selects (``target_modules``,
    ``exclude_modules``, ``modules_to_save``, with per-module ``rank_pattern`` / ``alpha_pattern``,
    ``use_dora``, ``use_rslora``) are wrapped as :func:`inject_adapters` does, and every adapter tensor
    must find its place (missing, unexpected or misshapen tensors are errors).
    """
    folder = Path(folder)
    config = _read_config(folder)
    path = folder / CONFIG_NAME
    modules = [(n, m) for n, m in plain_modules(model) if n]
    keep_patterns = config.modules_to_save
    keep = [n for n, _ in modules if any(n.endswith(p) for p in keep_patterns)]  # PEFT's rule for these
    selected = [n for n, _ in modules if _peft_selects(n, config, keep)]
    if not selected:
        raise InputError.of(path, f"target_modules {config.target_modules!r} match no module of the model")
    r = 8 if config.r is None else config.r  # PEFT's LoraConfig defaults
    alpha = 8 if config.lora_alpha is None else config.lora_alpha
    rank_of = {n: pattern_value(config.rank_pattern, n, r) for n in selected}
    alpha_of = {n: pattern_value(config.alpha_pattern, n, alpha) for n in selected}
    exact = "|".join(re.escape(n) for n in selected)
    wrapped = inject_adapters(
        model,
        method="dora" if config.use_dora else "lora",
        targets=exact,
        r=r,
        alpha=alpha,
        dropout=config.lora_dropout,
        rslora=config.use_rslora,
        modules_to_save=keep,
        rank_of=rank_of,
        alpha_of=alpha_of,
    )
    wrappers = adapter_modules(model)
    expected = {f"{n}.lora_A.weight" for n in wrapped} | {f"{n}.lora_B.weight" for n in wrapped}
    if config.use_dora:
        expected |= {f"{n}.lora_magnitude_vector" for n in wrapped}
    slots = {
        n + "." + k: v for n in keep for k, v in model.get_submodule(n).state_dict(keep_vars=True).items()
    }
    weights_path = folder / WEIGHTS_NAME
    for key, value in _tensors(folder):
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        if name.endswith(".lora_magnitude_vector.weight"):  # older PEFT spelling
            name = name[: -len(".weight")]
        module_name, _, leaf = name.rpartition(".")
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            module_name, _, leaf = name[: -len(".weight")].rpartition(".")
        if name in expected:
            module = wrappers[module_name]
            target = module.magnitude if leaf == "lora_magnitude_vector" else getattr(module, leaf)
            _copy_into(target, value, weights_path, key)
            expected.discard(name)
        elif name in slots:
            _copy_into(slots[name], value, weights_path, key)
        else:
            raise InputError.of(weights_path, "no module of the model takes this tensor", tensor=key)
    if expected:
        missing = sorted(expected)
        raise InputError.of(
            weights_path, f"missing {len(missing)} adapter tensor(s)", tensor=_PREFIX + missing[0]
        )
    return wrapped

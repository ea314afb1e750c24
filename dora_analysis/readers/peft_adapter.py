"""A PEFT LoRA/DoRA adapter folder merged over a base checkpoint.

On disk (peft 0.21, adapter name stripped): ``base_model.model.<module>.lora_A.weight`` ``(r, in)``,
``...lora_B.weight`` ``(out, r)``, ``...lora_magnitude_vector`` ``(out,)`` (DoRA), ``...lora_B.bias``
(``lora_bias``), ``...lora_embedding_A`` ``(r, num_embeddings)`` / ``lora_embedding_B`` ``(dim, r)`` for
embeddings, and whole tensors for ``modules_to_save`` (``<module>.weight``, or older
``<module>.modules_to_save.<adapter>.weight``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dora_analysis.errors import InputError
from dora_analysis.readers._common import short_repr
from dora_analysis.readers.adapter_config import AdapterConfig, read_adapter_config
from dora_analysis.readers.base import CheckpointReader
from dora_analysis.readers.files import open_weight_file
from dora_analysis.readers.json_file import MAX_CONFIG_BYTES, read_json
from dora_analysis.readers.layout import model_names
from dora_analysis.readers.merged import BiasTarget, Entry, MergedReader, MergeTarget, StoredCopy
from dora_analysis.readers.names import match_names
from dora_analysis.readers.peft_targets import check_targets

__all__ = [
    "ADAPTER_FILES",
    "adapter_weights_file",
    "parse_adapter_keys",
    "AdapterModule",
    "open_peft_adapter",
    "refuse_base_rewriting",
]

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

_ROLE = re.compile(
    r"^(?P<module>.+)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector(?:\.weight)?"
    r"|lora_embedding_A|lora_embedding_B)$"
)
_SAVED_COPY = re.compile(r"^(?P<module>.+)\.modules_to_save\.[^.]+\.(?P<param>[^.]+)$")


@dataclass
class AdapterModule:
    """The stored keys of one adapted module (``None`` where absent)."""

    lora_A: str | None = None
    lora_B: str | None = None
    lora_bias: str | None = None
    magnitude: str | None = None
    embedding: bool = False  # lora_embedding_A/B: PEFT treats the embedding as fan-in-fan-out


def adapter_weights_file(folder: Path) -> Path:
    """``adapter_model.safetensors`` (preferred) or ``adapter_model.bin`` in ``folder``."""
    for name in ADAPTER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise InputError.of(
        folder, "adapter folder has adapter_config.json but no adapter_model.safetensors or adapter_model.bin"
    )


def parse_adapter_keys(source: Path, keys: list[str]) -> tuple[dict[str, AdapterModule], dict[str, str]]:
    """Split adapter keys into ``{module path: AdapterModule}`` and ``{tensor name: key}`` of whole copies.

    Module paths and copy names are the keys without ``base_model.model.`` (the path PEFT matched).
    """
    modules: dict[str, AdapterModule] = {}
    copies: dict[str, str] = {}
    for key in keys:
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if ".original_module." in name:
            continue  # PEFT's untouched original beside a modules_to_save copy
        found = _ROLE.match(name)
        if found:
            mod = modules.setdefault(found["module"], AdapterModule())
            role = found["role"]
            if role == "lora_A.weight" or role == "lora_embedding_A":
                mod.lora_A, mod.embedding = key, mod.embedding or role == "lora_embedding_A"
            elif role == "lora_B.weight" or role == "lora_embedding_B":
                mod.lora_B, mod.embedding = key, mod.embedding or role == "lora_embedding_B"
            elif role == "lora_B.bias":
                mod.lora_bias = key
            else:
                mod.magnitude = key
            continue
        if ".lora_" in name or name.startswith("lora_"):
            raise InputError.of(
                source,
                "unsupported adapter tensor (not a LoRA/DoRA factor of a Linear, Conv, Conv1D or Embedding)",
                tensor=key,
            )
        saved = _SAVED_COPY.match(name)
        copies[f"{saved['module']}.{saved['param']}" if saved else name] = key
    for path, mod in modules.items():
        if mod.lora_A is None or mod.lora_B is None:
            raise InputError.of(source, "adapter module has only one of lora_A and lora_B", tensor=path)
    return modules, copies


def open_peft_adapter(folder: Path, base: CheckpointReader, *, owned: list[CheckpointReader]) -> MergedReader:
    """A partial reader of the adapter's merged weights, named as in ``base``.

    ``owned`` readers (e.g. a base this function's caller opened) are closed with the result.
    """
    config = read_adapter_config(folder / "adapter_config.json")
    refuse_base_rewriting(config)
    factors = open_weight_file(adapter_weights_file(folder))
    try:
        entries = _entries(config, factors, base)
        return MergedReader(folder, entries, partial=True, owned=[factors, *owned])
    except BaseException:
        factors.close()
        raise


def refuse_base_rewriting(config: AdapterConfig) -> None:
    """Refuse an adapter whose initialisation rewrote its base (PiSSA, OLoRA, ...) and was not converted.

    PEFT re-runs such an initialisation on the base each time it loads the adapter (exactly for
    ``pissa``/``olora``, randomly for ``pissa_niter_*``, not at all without CorDA's or LoRA-GA's data),
    so the fine-tuned weights are only well defined once converted to a plain LoRA adapter.
    """
    if config.rewrites_base:
        raise InputError.of(
            config.path,
            f"init_lora_weights {short_repr(config.init_lora_weights, 24)} rewrote the base, so base + "
            "factors is not the tuned model; convert it: save_pretrained(out, "
            "path_initial_model_for_weight_conversion=<initial adapter>)",
        )


def _entries(config: AdapterConfig, factors: CheckpointReader, base: CheckpointReader) -> dict[str, Entry]:
    modules, copies = parse_adapter_keys(factors.source, factors.names())
    if not modules and not copies:
        raise InputError.of(factors.source, "adapter file holds no LoRA factors")
    check_targets(config, factors.source, list(modules))
    for path, mod in modules.items():
        if config.use_dora and mod.magnitude is None:
            raise InputError.of(
                factors.source, "use_dora is set but the module has no lora_magnitude_vector", tensor=path
            )
        if not config.use_dora:
            mod.magnitude = None  # PEFT builds plain LoRA layers then and never loads a stray magnitude
    wanted: dict[str, tuple[str, str]] = {}  # adapter-side tensor name -> (kind, module path or copy name)
    for path, mod in modules.items():
        wanted[f"{path}.weight"] = ("weight", path)
        if mod.lora_bias is not None:
            wanted[f"{path}.bias"] = ("bias", path)
    for name in copies:
        wanted.setdefault(name, ("copy", name))
    matched = match_names(base.names(), list(wanted))
    base_name_of = {tuned: base_name for base_name, tuned in matched.pairs}
    unmatched = [n for n, (kind, _) in wanted.items() if kind != "copy" and n not in base_name_of]
    # PEFT names modules as the model loads them; some families (ViT) are stored under older names
    loaded = model_names(base.source, base.names()) if unmatched else {}
    if loaded:
        base_name_of.update(
            {tuned: loaded[name] for name, tuned in match_names(list(loaded), unmatched).pairs}
        )
    entries: dict[str, Entry] = {}
    for tuned_name, (kind, path) in wanted.items():
        base_name = base_name_of.get(tuned_name)
        if kind == "copy":
            entries[base_name or tuned_name] = StoredCopy(factors, copies[path])
            continue
        mod = modules[path]
        if base_name is None:
            raise InputError.of(
                factors.source,
                f"adapter module has no base weight: {base.source} has no tensor matching {tuned_name!r}",
                tensor=mod.lora_A,
            )
        a_shape = factors.shape(mod.lora_A)
        rank = a_shape[0] if a_shape else 0
        scale = config.scale(path, rank)
        if kind == "bias":
            assert mod.lora_bias is not None
            entries[base_name] = BiasTarget(base, base_name, factors, mod.lora_bias, scale)
        else:
            transposed = mod.embedding or _fan_in_fan_out(config, factors, mod, base, base_name)
            entries[base_name] = MergeTarget(
                base,
                base_name,
                factors,
                mod.lora_A,
                mod.lora_B,
                mod.magnitude,
                scale,
                fan_in_fan_out=transposed,
            )
    order = {n: i for i, n in enumerate(base.names())}
    return dict(sorted(entries.items(), key=lambda item: order.get(item[0], len(order))))


def _fan_in_fan_out(
    config: AdapterConfig,
    factors: CheckpointReader,
    mod: AdapterModule,
    base: CheckpointReader,
    base_name: str,
) -> bool:
    """Whether the base weight is stored ``(in, out)`` (a transformers ``Conv1D``), as PEFT decides it.

    PEFT ignores the config's ``fan_in_fan_out`` and follows the module type: forced off for an
    ``nn.Linear`` (``(out, in)``), forced on for a ``Conv1D`` (``(in, out)``). The module type is not in
    the weights, so: the shapes decide when the matrix is not square; a square one follows the base
    model's ``config.json`` (``model_type`` of the GPT-2 family, whose blocks are ``Conv1D``); without
    one, a ``fan_in_fan_out: true`` on a square matrix is refused as ambiguous, and false is read as
    ``nn.Linear``. Conv weights (more than 2-D) never use it.
    """
    base_shape = tuple(base.shape(base_name))
    if len(base_shape) != 2:
        return False
    a_shape, b_shape = tuple(factors.shape(mod.lora_A)), tuple(factors.shape(mod.lora_B))
    if len(a_shape) != 2 or len(b_shape) != 2:
        return config.fan_in_fan_out  # the fit check at opening names the problem
    out_in, in_out = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
    if out_in != in_out:
        if base_shape == out_in:
            return False
        if base_shape == in_out:
            return True
        return config.fan_in_fan_out  # does not fit either way: the fit check says so
    conv1d = _is_conv1d(base, base_name)
    if conv1d is not None:
        return conv1d
    if config.fan_in_fan_out:
        raise InputError.of(
            config.path,
            f"fan_in_fan_out is true but nothing tells whether base weight {base_name} {list(base_shape)} "
            "is a Conv1D (in, out) or an nn.Linear (out, in), where PEFT ignores the flag; pass the base "
            "model folder with its config.json",
        )
    return False


_CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
_CONV1D_MODULES = re.compile(r"(^|\.)(c_attn|q_attn|c_proj|c_fc)\.weight$")


def _is_conv1d(base: CheckpointReader, base_name: str) -> bool | None:
    """True/False from the base's ``config.json`` (``model_type``), None when there is none."""
    folder = base.source if base.source.is_dir() else base.source.parent
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    config = read_json(config_file, "model config", max_bytes=MAX_CONFIG_BYTES)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        return None
    return model_type in _CONV1D_MODEL_TYPES and bool(_CONV1D_MODULES.search(base_name))

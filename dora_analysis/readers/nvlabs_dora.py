"""The NVlabs DoRA layout (the paper's code): ``<module>.weight_m_wdecomp.weight`` beside LoRA factors.

Keys: ``<module>.lora_A.weight`` ``(r, in)``, ``<module>.lora_B.weight`` ``(out, r)`` and the magnitude
``<module>.weight_m_wdecomp.weight`` ``(out, 1)``; a module with a magnitude but no factors is
magnitude-only (the code's ``Wdecompose``). The scale is ``lora_alpha / r`` (no rsLoRA there).

``r`` is read from ``lora_A``'s rows. ``lora_alpha`` is not stored in the weights, so it comes from,
in order: the ``lora_alpha`` argument, then an ``adapter_config.json`` beside the file (the NVlabs
PEFT fork writes one, ``peft_type`` "DORA"); the code's defaults are not assumed. A file that also
holds ``<module>.weight`` (a full state dict) is merged with its own ``W0``; otherwise each module's
``W0`` comes from the base checkpoint.
"""

from __future__ import annotations

import re

from dora_analysis.errors import InputError
from dora_analysis.readers.adapter_config import read_adapter_config
from dora_analysis.readers.base import CheckpointReader
from dora_analysis.readers.lora_scale import lora_scale
from dora_analysis.readers.merged import Entry, MergedReader, MergeTarget, StoredCopy
from dora_analysis.readers.names import match_names

__all__ = ["MAGNITUDE_SUFFIX", "has_nvlabs_keys", "open_nvlabs_dora"]

MAGNITUDE_SUFFIX = ".weight_m_wdecomp.weight"
_ROLE = re.compile(r"^(?P<module>.+)\.(?P<role>lora_A\.weight|lora_B\.weight|weight_m_wdecomp\.weight)$")


def has_nvlabs_keys(names: list[str]) -> bool:
    """True when any tensor is an NVlabs DoRA magnitude."""
    if MAGNITUDE_SUFFIX + "\n" not in "\n".join(names) + "\n":  # one C-speed scan: no name ends so
        return False
    return any(n.endswith(MAGNITUDE_SUFFIX) for n in names)


def open_nvlabs_dora(
    factors: CheckpointReader,
    base: CheckpointReader | None,
    *,
    lora_alpha: float | None = None,
    owned: list[CheckpointReader],
) -> MergedReader:
    """A reader of the merged weights in ``factors`` (an open state-dict reader it takes ownership of).

    Raises :class:`InputError` when ``lora_alpha`` is needed but unknown, or a module's ``W0`` is in
    neither the file nor ``base``.
    """
    try:
        return _open(factors, base, lora_alpha, owned)
    except BaseException:
        factors.close()
        raise


def _open(
    factors: CheckpointReader,
    base: CheckpointReader | None,
    lora_alpha: float | None,
    owned: list[CheckpointReader],
) -> MergedReader:
    source = factors.source
    config_file = (source if source.is_dir() else source.parent) / "adapter_config.json"
    config = read_adapter_config(config_file, require_rank=False) if config_file.is_file() else None
    if lora_alpha is None and config is not None:
        lora_alpha = config.lora_alpha
    fan_in_fan_out = bool(config and config.fan_in_fan_out)
    modules, rest = _modules_of(factors.names())
    in_file = set(rest)
    need_base = [m for m in modules if f"{m}.weight" not in in_file]
    base_name_of = _base_names(source, base, need_base)
    entries: dict[str, Entry] = {}
    for module, roles in modules.items():
        a, b, m = roles.get("lora_A"), roles.get("lora_B"), roles.get("weight_m_wdecomp")
        scale = _module_scale(factors, module, a, b, lora_alpha, config, config_file)
        weight_key = f"{module}.weight"
        if weight_key in in_file:
            entries[weight_key] = MergeTarget(factors, weight_key, factors, a, b, m, scale, fan_in_fan_out)
            continue
        base_name = base_name_of.get(weight_key)
        if base_name is None or base is None:
            raise InputError.of(
                source,
                f"module has no base weight: {getattr(base, 'source', None)} has no tensor matching {weight_key!r}",
                tensor=a or m,
            )
        entries[base_name] = MergeTarget(base, base_name, factors, a, b, m, scale, fan_in_fan_out)
    targets_in_file = {k for k in entries if k in in_file and isinstance(entries[k], MergeTarget)}
    ordered: dict[str, Entry] = {}
    for name in rest:  # the file's own order; weights of adapted modules merged in place
        ordered[name] = entries[name] if name in targets_in_file else StoredCopy(factors, name)
    for name, entry in entries.items():
        ordered.setdefault(name, entry)
    return MergedReader(source, ordered, partial=bool(need_base), owned=[factors, *owned])


def _modules_of(names: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``({module: {role: name}}, the other names)``: the factor tensors grouped by their module."""
    modules: dict[str, dict[str, str]] = {}
    rest: list[str] = []
    for name in names:
        found = _ROLE.match(name)
        if found:
            modules.setdefault(found["module"], {})[found["role"].split(".")[0]] = name
        else:
            rest.append(name)
    return modules, rest


def _base_names(source, base: CheckpointReader | None, need_base: list[str]) -> dict[str, str]:
    """``{module weight name: the base's name}`` for the modules whose weight is not in the file."""
    if not need_base:
        return {}
    if base is None:
        raise InputError.of(
            source,
            f"holds DoRA/LoRA factors without their base weights (e.g. {need_base[0]}.weight): pass the base checkpoint",
        )
    pairs = match_names(base.names(), [f"{m}.weight" for m in need_base]).pairs
    return {tuned: base_name for base_name, tuned in pairs}


def _module_scale(factors, module: str, a, b, lora_alpha, config, config_file) -> float:
    """The update's scale ``lora_alpha / r`` of one module (0 for a magnitude-only module).

    Raises:
        InputError: one factor without the other, no ``lora_alpha``, a ``lora_A`` that is not
            ``(r, in)``, or an ``adapter_config.json`` whose ``r`` disagrees with it.
    """
    source = factors.source
    if (a is None) != (b is None):
        raise InputError.of(source, "module has only one of lora_A and lora_B", tensor=module)
    if a is None:
        return 0.0
    if lora_alpha is None:
        raise InputError.of(
            source,
            "NVlabs DoRA layout: lora_alpha is not stored in the weights; pass lora_alpha "
            "(scale = lora_alpha / r) or put an adapter_config.json with 'lora_alpha' beside the file",
        )
    a_shape = tuple(factors.shape(a))
    if len(a_shape) != 2 or a_shape[0] == 0:
        raise InputError.of(
            source, f"lora_A has shape {list(a_shape)}; expected (r, in) with r >= 1", tensor=a
        )
    rank = a_shape[0]
    if config is not None and config.r is not None and config.r != rank:
        raise InputError.of(
            source, f"{config_file.name} says r={config.r} but lora_A has {rank} rows", tensor=a
        )
    return lora_scale(lora_alpha, rank)  # the NVlabs code has no rsLoRA

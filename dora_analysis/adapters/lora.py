"""LoRALinear: a frozen ``nn.Linear`` plus a trainable low-rank update, ``y = W0 x + s B A x + bias``.

Conventions (as PEFT's ``lora.Linear``): ``W0`` is the base weight ``(out, in)``; ``A`` ``(r, in)`` is
kaiming-uniform initialised (``a = sqrt(5)``), ``B`` ``(out, r)`` starts at zero, so a freshly wrapped
layer computes exactly what the base did; ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); dropout,
when active, applies to the adapter's input only.

``lora_A`` and ``lora_B`` are plain ``nn.Parameter`` tensors (not ``nn.Linear`` modules); the adapter
parameters are float32 when the base weight is float16/bfloat16 (as PEFT's ``autocast_adapter_dtype``).
Under ``torch.autocast`` the adapter's products run in the autocast dtype, as every other Linear's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dora_analysis.readers.lora_scale import lora_scale  # the one scale rule, re-exported here

__all__ = [
    "AUTOCAST_DEVICES",
    "LoRALinear",
    "WrappedLinear",
    "adapter_dtype",
    "check_base",
    "init_lora_factors",
    "lora_scale",
]

#: The device types ``torch.autocast`` supports: only these are asked whether autocast is on.
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla")


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapter parameters stay float32 over 16-bit base weights (their updates are tiny)."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def init_lora_factors(base: nn.Linear, r: int) -> tuple[nn.Parameter, nn.Parameter]:
    """``A`` ``(r, in)`` kaiming-uniform with ``a = sqrt(5)`` as PEFT, ``B`` ``(out, r)`` zeros."""
    dtype, device = adapter_dtype(base.weight.dtype), base.weight.device
    lora_A = torch.empty(r, base.in_features, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    lora_B = torch.zeros(base.out_features, r, dtype=dtype, device=device)
    return nn.Parameter(lora_A), nn.Parameter(lora_B)


def check_base(base: nn.Module, r: int, min_r: int) -> None:
    """Every adapter wraps an ``nn.Linear`` with a rank of at least ``min_r`` (DoRA allows 0).

    Raises:
        TypeError: ``base`` is not an ``nn.Linear``. ValueError: ``r < min_r``.
    """
    if not isinstance(base, nn.Linear):
        raise TypeError(f"expected an nn.Linear to wrap, got {type(base).__name__}")
    if r < min_r:
        raise ValueError(f"r must be >= {min_r}, got {r}")


class WrappedLinear(nn.Module):
    """What every adapter wrapper passes through from its frozen ``base`` ``nn.Linear``."""

    base: nn.Linear

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (for code that reads ``.weight.dtype`` or ``.weight.device``)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


class LoRALinear(WrappedLinear):
    """``y = W0 x + s B A dropout(x) + bias`` around a frozen ``nn.Linear``.

    Args:
        base: the layer to adapt; its weight and bias are frozen (``requires_grad = False``).
        r: the rank (>= 1). alpha: the scale numerator. dropout: probability on the adapter input.
        rslora: ``s = alpha / sqrt(r)`` instead of ``alpha / r``.

    Attributes: ``base``, ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``, ``r``, ``alpha``, ``scale``,
    ``dropout``, ``rslora``, ``merged``.

    Input ``(..., in)``, output ``(..., out)``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        check_base(base, r, min_r=1)
        base.requires_grad_(False)
        self.base = base
        self.r, self.alpha, self.dropout, self.rslora = r, alpha, float(dropout), rslora
        self.scale = lora_scale(alpha, r, rslora)
        self.lora_A, self.lora_B = init_lora_factors(base, r)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` ``(out, in)`` in the adapter dtype."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        x2 = x.reshape(-1, self.in_features)
        autocast_on = x.device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type)
        cast = autocast_on and x2.dtype != torch.float64  # what autocast casts (float64 it leaves)
        # Cast once, as autocast would: otherwise each product casts (and saves) its own 16-bit copy.
        x_base = x2.to(torch.get_autocast_dtype(x.device.type)) if cast else x2
        result = F.linear(
            x_base, self.base.weight, self.base.bias
        )  # (N, out), bit-identical to the base layer
        x_adapter = x_base
        if self.dropout > 0 and self.training:
            x_adapter = F.dropout(x2, self.dropout, training=True)  # on the input, then cast (as PEFT)
            x_adapter = x_adapter.to(x_base.dtype) if cast else x_adapter
        # Under autocast F.linear picks the compute dtype itself; otherwise the factors' dtype.
        down = F.linear(x_adapter if autocast_on else x_adapter.to(self.lora_A.dtype), self.lora_A)  # (N, r)
        if not autocast_on and result.dtype == down.dtype:
            # Fold the update into the base output in place: no extra (N, out) tensors. Safe for
            # autograd: neither the base matmul nor addmm_ saves ``result``.
            result.addmm_(down, self.lora_B.t(), alpha=self.scale)
        else:
            result = result + (F.linear(down, self.lora_B) * self.scale).to(result.dtype)
        if x.dim() == 2:
            return result
        # Not a view (as matmul does): FSDP2 drops its pre-backward hook when an in-place op follows a
        # returned view. Safe, since nothing else holds ``result``.
        return torch.ops.aten._unsafe_view(result, (*x.shape[:-1], self.out_features))

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """``A`` kaiming-uniform, ``B = 0`` (the fresh layer), e.g. after a model built on the meta
        device got its real base weights. Refuses while the base layer is still on meta."""
        still_meta = [n for n, t in self.base.named_parameters() if t.is_meta]
        if still_meta:
            raise RuntimeError(
                f"reset_adapter_parameters: base.{', base.'.join(still_meta)} still on the meta device; "
                "load the base weights first (e.g. to_empty() + load_state_dict())"
            )
        lora_A, lora_B = init_lora_factors(self.base, self.r)
        self.lora_A = nn.Parameter(lora_A.detach(), requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(lora_B.detach(), requires_grad=self.lora_B.requires_grad)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The effective weight ``W0 + s B A`` ``(out, in)`` in the base dtype."""
        weight = self.base.weight
        if self.merged:
            return weight.detach().clone()
        return (weight.to(self.lora_A.dtype) + self.delta_weight()).to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (no inference overhead); :meth:`unmerge` undoes it."""
        if not self.merged:
            self.base.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to float rounding)."""
        if self.merged:
            weight = self.base.weight
            weight.copy_((weight.to(self.lora_A.dtype) - self.delta_weight()).to(weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}, rslora={self.rslora}"

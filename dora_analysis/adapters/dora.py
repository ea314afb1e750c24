"""DoRALinear: the DoRA layer (paper Eq. 5), ``y = g * (W0 x + s B A x) + bias``, ``g = m / ||W0 + s B A||_c``.

``||.||_c`` is one norm per output unit, i.e. per row of ``nn.Linear.weight`` ``(out, in)``. The
magnitude ``m`` ``(out,)`` starts at ``||W0||_c``, ``B`` at zero, so a fresh layer is the base layer.
The bias is never scaled. By default the norm is a constant for autograd (paper section 4.3).

Speed and memory (see ``benchmarks/bench_layer.py``):

- the norm never materialises ``B @ A`` ``(out, in)``: ``||W0_j + s(BA)_j||^2 = ||W0_j||^2
  + 2s B_j.(W0 A^T)_j + s^2 B_j (A A^T) B_j^T`` with ``||W0_j||^2`` cached (W0 is frozen) and the
  small ``(out, r)`` / ``(r, r)`` pieces summed in float64; the rare rows that the update nearly
  cancels (norm^2 < 1/4 of ||W0_j||^2, where ``W0 A^T``'s float32 rounding would show) are redone densely;
- without active dropout, one autograd function computes ``W0 x + s B A x`` into the base output in
  place and scales it in place; backward recovers ``dL/dg`` from the output; no second base matmul
  and no ``(N, out)`` tensor besides the output.

With dropout active in training it computes PEFT's formula
``y = W0 x + bias + (g - 1) W0 x~ + g s B A x~``, ``x~ = dropout(x)``, as PEFT does.
``r = 0`` is the magnitude-only mode (paper Table 6): ``lora_A`` / ``lora_B`` are None, only ``m`` trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dora_analysis.adapters.lora import (
    WrappedLinear,
    _check_base,
    adapter_dtype,
    init_lora_factors,
    lora_scale,
)

__all__ = ["DoRALinear", "factored_weight_norm", "dense_weight_norm", "row_norm_sq"]

_CANCELLATION = 0.25  # ||W0_j + s(BA)_j||^2 below this fraction of ||W0_j||^2: recompute row j densely
_CHUNK_BYTES = 8 << 20  # temporary of the (N, out) reduction in backward; few, large steps parallelise well


def factored_weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scale: float,
    weight_sq: torch.Tensor,
) -> torch.Tensor:
    """``||W0 + s B A||_c`` ``(out,)`` float32, without forming ``B @ A``.

    Args:
        weight: ``W0`` ``(out, in)``, any float dtype. lora_A: ``(r, in)``. lora_B: ``(out, r)``.
        weight_sq: ``||W0_j||^2`` ``(out,)`` float64 (computed once, see :func:`row_norm_sq`).

    Differentiable in ``lora_A`` and ``lora_B`` (used when the norm is not detached).
    """
    sq = weight_sq
    if lora_A is not None and lora_B is not None and lora_A.shape[0] > 0:
        w_a = F.linear(weight.to(lora_A.dtype), lora_A)  # (out, r) = W0 A^T, the one (out x in x r) product
        a64, b64 = lora_A.double(), lora_B.double()
        gram = a64 @ a64.T  # (r, r)
        cross = (b64 * w_a.double()).sum(1)  # (out,)
        quad = ((b64 @ gram) * b64).sum(1)  # (out,)
        sq = sq + (2.0 * scale) * cross + (scale * scale) * quad
        # Rows the update nearly cancels lose W0 A^T's float32 rounding to the subtraction: redo those
        # few rows densely in float64 (fine-tuning updates never come near; the check costs (out,)).
        bad = (sq < _CANCELLATION * weight_sq).nonzero().flatten()
        if bad.numel():
            rows = weight[bad].double() + scale * (b64[bad] @ a64)  # (k, in)
            sq = sq.index_put((bad,), rows.square().sum(1))
    return sq.clamp_min(0).sqrt().float()


def dense_weight_norm(
    weight: torch.Tensor, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``||W0 + s B A||_c`` ``(out,)`` float32 the direct way (forms ``(out, in)``): the reference."""
    full = weight.float()
    if lora_A is not None and lora_B is not None:
        full = full + scale * (lora_B.float() @ lora_A.float())
    return torch.linalg.vector_norm(full, dim=1)


def row_norm_sq(weight: torch.Tensor) -> torch.Tensor:
    """``||W0_j||^2`` ``(out,)`` accumulated in float64."""
    return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=torch.float64).square()


def _shifted_dot(dy: torch.Tensor, y: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``sum_n dy[n, j] * (y[n, j] - shift[j])`` ``(out,)`` for ``(N, out)`` inputs, in row chunks."""
    chunk = max(1, _CHUNK_BYTES // (y.shape[1] * y.element_size()))
    total = torch.zeros(y.shape[1], dtype=y.dtype, device=y.device)
    buf = torch.empty(min(chunk, y.shape[0]), y.shape[1], dtype=y.dtype, device=y.device)
    for start in range(0, y.shape[0], chunk):
        rows = min(chunk, y.shape[0] - start)
        part = buf[:rows]
        if shift is None:
            torch.mul(y[start : start + rows], dy[start : start + rows], out=part)
        else:
            torch.sub(y[start : start + rows], shift, out=part).mul_(dy[start : start + rows])
        total += part.sum(0)
    return total


class _DoRAFunction(torch.autograd.Function):
    """``y = g * z + (1 - g) * bias`` with ``z = W0 x + bias + s B A x``: equals ``g (W0 x + s B A x) + bias``.

    Writing the bias that way keeps ``z`` bit-identical to the base layer's output, so at ``g = 1``,
    ``B = 0`` the layer reproduces the base exactly. ``y`` overwrites ``z`` in place; backward gets
    ``dL/dg = sum_n dy (z - bias) = sum_n dy (y - bias) / g`` back from ``y`` (rows with ``g = 0``
    recompute their ``z``). Saves ``x``, ``A x`` ``(N, r)`` and ``y``; no ``(N, out)`` tensor besides ``y``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, g, scale):
        out_features, in_features = weight.shape
        x2 = x.reshape(-1, in_features)
        y = F.linear(x2, weight, bias)  # (N, out), as the base layer computes it
        down = None
        if lora_A is not None:
            down = x2 @ lora_A.t()  # (N, r)
            y.addmm_(down, lora_B.t(), alpha=scale)
        if bias is None:
            y.mul_(g)
        else:
            torch.addcmul(bias * (1 - g), y, g, out=y)  # one pass, in place
        ctx.save_for_backward(x, weight, bias, lora_A, lora_B, g, down, y)
        ctx.scale = scale
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, lora_A, lora_B, g, down, y = ctx.saved_tensors
        s = ctx.scale
        out_features, in_features = weight.shape
        dy2 = dy.reshape(-1, out_features)
        x2 = x.reshape(-1, in_features)
        n = dy2.shape[0]
        need = ctx.needs_input_grad
        dx = dweight = dbias = dA = dB = dg = None

        if need[5]:  # dL/dg = sum_n dy * (z - bias)
            dg = _shifted_dot(dy2, y, bias) / g
            zero = (g == 0).nonzero().flatten()
            if zero.numel():  # y holds no z there: recompute those columns of z - bias
                z_rows = x2 @ weight[zero].t()
                if lora_A is not None:
                    z_rows.addmm_(down, lora_B[zero].t(), alpha=s)
                dg[zero] = (dy2[:, zero] * z_rows).sum(0)
        if need[2]:
            dbias = dy2.sum(0)
        # dL/dz = dy * g. Scale whichever is smaller: the (N, out) gradient or the (out, in) weight.
        scale_weight = n > in_features
        dz = None if scale_weight else dy2 * g
        if need[0]:
            dx = dy2 @ (weight * g[:, None]) if scale_weight else dz @ weight
        if need[1]:
            dweight = (dz if dz is not None else dy2 * g).t() @ x2
        if lora_A is not None and (need[0] or need[3] or need[4]):
            up = dy2 @ (lora_B * g[:, None]) if scale_weight else dz @ lora_B  # (N, r) = dz B
            if need[0]:
                dx.addmm_(up, lora_A, alpha=s)
            if need[3]:
                dA = s * (up.t() @ x2)  # (r, in)
            if need[4]:
                dB = s * (dy2.t() @ down) * g[:, None]  # (out, r)
        if dx is not None:
            dx = dx.view(x.shape)
        return dx, dweight, dbias, dA, dB, dg, None


class DoRALinear(WrappedLinear):
    """DoRA around a frozen ``nn.Linear``: ``y = m / ||W0 + s B A||_c * (W0 x + s B A x) + bias``.

    Args:
        base: the layer to adapt (frozen). r: the rank; 0 gives the magnitude-only mode.
        alpha: scale numerator, ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: probability on the adapter input (PEFT's formula, see the module docstring).
        detach_norm: treat the norm as a constant for autograd (paper section 4.3); False keeps its gradient.

    Attributes: ``base``, ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)`` (plain ``nn.Parameter``; None
    when ``r == 0``), ``magnitude`` ``(out,)``, ``r``, ``alpha``, ``scale``, ``dropout``, ``rslora``,
    ``detach_norm``, ``merged``. Input ``(..., in)``, output ``(..., out)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        detach_norm: bool = True,
    ):
        super().__init__()
        _check_base(base, r, min_r=0)
        base.requires_grad_(False)
        self.base = base
        self.r, self.alpha, self.dropout, self.rslora = r, alpha, float(dropout), rslora
        self.detach_norm = detach_norm
        self.scale = lora_scale(alpha, r, rslora)
        if r > 0:
            self.lora_A, self.lora_B = init_lora_factors(base, r)
        else:
            self.lora_A, self.lora_B = None, None
        self._weight_sq: tuple[tuple, torch.Tensor] | None = None
        self._merge_norm: torch.Tensor | None = None
        self.merged = False
        with torch.no_grad():  # the same computation as the forward's norm with B = 0: g is exactly 1
            m = factored_weight_norm(base.weight, None, None, 0.0, self.weight_sq())
        self.magnitude = nn.Parameter(m.to(adapter_dtype(base.weight.dtype)))

    def weight_sq(self) -> torch.Tensor:
        """``||W0_j||^2`` ``(out,)`` float64, recomputed only when the base weight changes."""
        w = self.base.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if self._weight_sq is None or self._weight_sq[0] != key:
            self._weight_sq = (key, row_norm_sq(w))
        return self._weight_sq[1]

    def weight_norm(self) -> torch.Tensor:
        """``||W0 + s B A||_c`` ``(out,)`` float32; carries A/B gradients unless ``detach_norm``."""
        weight = self.base.weight
        if self.merged:
            raise RuntimeError("weight_norm() of a merged DoRALinear: unmerge() first")
        if self.detach_norm or not torch.is_grad_enabled():
            with torch.no_grad():
                return factored_weight_norm(weight, self.lora_A, self.lora_B, self.scale, self.weight_sq())
        return factored_weight_norm(weight, self.lora_A, self.lora_B, self.scale, self.weight_sq())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base.weight, self.base.bias
        if self.merged:
            return F.linear(x, weight, bias)
        g = self.magnitude / self.weight_norm()  # (out,)
        dropout_on = self.dropout > 0 and self.training
        params = [p for p in (self.lora_A, self.lora_B) if p is not None]
        if not dropout_on and all(p.dtype == x.dtype for p in [weight, *params]):
            return _DoRAFunction.apply(x, weight, bias, self.lora_A, self.lora_B, g.to(x.dtype), self.scale)
        # General path (dropout, mixed dtypes), PEFT's arrangement: result + (g-1) W0 x~ + g s B A x~.
        result = F.linear(x, weight, bias)
        if dropout_on:
            x = F.dropout(x, self.dropout, training=True)
            base_term = F.linear(x, weight)
        else:
            base_term = result if bias is None else result - bias
        dtype = self.magnitude.dtype
        extra = (g - 1) * base_term.to(dtype)
        if self.lora_A is not None:
            down = F.linear(x.to(dtype), self.lora_A)
            extra = extra + g * F.linear(down, self.lora_B) * self.scale
        return (result + extra).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` ``(out, in)`` float32 (zeros in the magnitude-only mode)."""
        if self.lora_A is None:
            return torch.zeros(
                self.base.weight.shape, dtype=self.magnitude.dtype, device=self.magnitude.device
            )
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The effective weight ``m * (W0 + sBA) / ||W0 + sBA||_c`` ``(out, in)`` in the base dtype."""
        weight = self.base.weight
        if self.merged:
            return weight.detach().clone()
        g = self.magnitude / self.weight_norm()
        full = weight.to(self.magnitude.dtype) + self.delta_weight()
        return (g[:, None] * full).to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Replace the base weight by :meth:`merged_weight`; :meth:`unmerge` restores it."""
        if not self.merged:
            self._merge_norm = self.weight_norm()
            self.base.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``W0 = W' / g - s B A`` (exact up to float rounding; needs every ``m_j != 0``)."""
        if self.merged:
            weight = self.base.weight
            g = self.magnitude / self._merge_norm
            restored = weight.to(self.magnitude.dtype) / g[:, None] - self.delta_weight()
            weight.copy_(restored.to(weight.dtype))
            self.merged, self._merge_norm = False, None

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}, "
            f"rslora={self.rslora}, detach_norm={self.detach_norm}"
        )

"""DoRALinear: the DoRA layer (paper Eq. 5), ``y = g * (W0 x + s B A x) + bias``, ``g = m / ||W0 + s B A||_c``.

``||.||_c`` is one norm per output unit, i.e. per row of ``nn.Linear.weight`` ``(out, in)``. The
magnitude ``m`` ``(out,)`` starts at ``||W0||_c``, ``B`` at zero, so a fresh layer is the base layer.
The bias is never scaled. By default the norm is a constant for autograd (paper section 4.3).

Speed and memory (see ``benchmarks/bench_layer.py``):

- the norm never materialises ``B @ A`` ``(out, in)``: ``||W0_j + s(BA)_j||^2 = ||W0_j||^2
  + 2s B_j.(W0 A^T)_j + s^2 B_j (A A^T) B_j^T`` with ``||W0_j||^2`` cached (W0 is frozen) and the
  small ``(out, r)`` / ``(r, r)`` pieces summed in float64; the rare rows that the update nearly
  cancels (norm^2 < 1/4 of ||W0_j||^2, where ``W0 A^T``'s float32 rounding would show) are redone densely;
- without active dropout, one autograd function computes ``z = W0 x + s B A x`` (the update folded
  into the base product in place), saves it and returns a new tensor ``y = g z + bias`` (never a view
  of a saved tensor, so in-place ops after the layer are safe); backward gets ``dL/dg = sum_n dy z``
  from ``z`` exactly, with no second base matmul. At ``g = 1``, ``B = 0`` the output is the base
  layer's up to where the bias is added (bitwise on most shapes; the GEMM may add it before the last
  partial sums).

Mixed precision: under ``torch.autocast`` (or with 16-bit inputs) the products run in the compute
dtype, while the norm, ``g`` and ``dL/dg`` stay float32 (the magnitude and the factors are float32
parameters over 16-bit bases, as PEFT keeps them). No host synchronisation on accelerators: the few
cancelled rows of the norm are found with a fixed-size ``topk`` and masks there (``.nonzero()`` only
on the CPU, where it costs no sync).

Inference: with gradients off and the module in eval mode, ``g`` is cached until one of ``W0``, ``A``,
``B``, ``m`` changes (their ``_version`` and storage are the key; edits through ``.data`` bypass versions:
call :meth:`DoRALinear.clear_norm_cache` after those). A DoRA module sharded with FSDP2 never caches
(FSDP re-gathers parameters without bumping versions).

With dropout active in training it computes PEFT's formula
``y = W0 x + bias + (g - 1) W0 x~ + g s B A x~``, ``x~ = dropout(x)``, as PEFT does.
``r = 0`` is the magnitude-only mode (paper Table 6): ``lora_A`` / ``lora_B`` are None, only ``m`` trains.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from dora_analysis.adapters.lora import (
    AUTOCAST_DEVICES,
    WrappedLinear,
    adapter_dtype,
    check_base,
    init_lora_factors,
    lora_scale,
)

__all__ = ["DoRALinear", "factored_weight_norm", "dense_weight_norm", "row_norm_sq", "compute_dtype"]

_CANCELLATION = 0.25  # ||W0_j + s(BA)_j||^2 below this fraction of ||W0_j||^2: recompute row j densely
_CHUNK_BYTES = 8 << 20  # temporary of the (N, out) reduction in backward; few, large steps parallelise well
_MAX_REDONE = 32  # off the CPU: how many of the most cancelled rows are always recomputed densely


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

    Differentiable in ``lora_A`` and ``lora_B`` (used when the norm is not detached). Autocast is off
    inside: the norm is float32/float64 whatever the surrounding precision.
    """
    with torch.autocast(weight.device.type, enabled=False) if _autocast_known(weight) else nullcontext():
        sq = weight_sq
        if lora_A is not None and lora_B is not None and lora_A.shape[0] > 0:
            w_a = _weight_times_a(weight, lora_A)  # (out, r) = W0 A^T, the one (out x in x r) product
            a64, b64 = lora_A.double(), lora_B.double()
            gram = a64 @ a64.T  # (r, r)
            cross = (b64 * w_a.double()).sum(1)  # (out,)
            quad = ((b64 @ gram) * b64).sum(1)  # (out,)
            sq = sq + (2.0 * scale) * cross + (scale * scale) * quad
            # Rows the update nearly cancels lose W0 A^T's float32 rounding to the subtraction: redo those
            # few rows densely in float64 (fine-tuning updates never come near; the check costs (out,)).
            sq = _redo_cancelled_rows(sq, weight_sq, weight, a64, b64, scale)
        return sq.clamp_min(0).sqrt().float()


def _autocast_known(tensor: torch.Tensor) -> bool:
    return tensor.device.type in AUTOCAST_DEVICES


def _weight_times_a(weight: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """``W0 A^T`` ``(out, r)`` in ``lora_A``'s dtype; a 16-bit ``W0`` is converted in row blocks
    (at most ``_CHUNK_BYTES`` of float32 at a time), never as one full float32 copy."""
    if weight.dtype == lora_A.dtype:
        return F.linear(weight, lora_A)
    rows = max(1, _CHUNK_BYTES // (weight.shape[1] * lora_A.element_size()))
    if rows >= weight.shape[0]:
        return F.linear(weight.to(lora_A.dtype), lora_A)
    parts = [F.linear(block.to(lora_A.dtype), lora_A) for block in weight.split(rows)]
    return torch.cat(parts)


def _redo_cancelled_rows(
    sq, weight_sq, weight, a64, b64, scale: float, sync_free: bool | None = None
) -> torch.Tensor:
    """Replace ``sq`` on rows with ``sq < _CANCELLATION * ||W0_j||^2`` by the dense float64 value.

    On the CPU the rows are found with ``nonzero`` (exact, every such row). Elsewhere, and while
    compiling, a fixed number (``_MAX_REDONE``) of the most cancelled rows is recomputed and kept
    where the mask says so: no data-dependent shapes, no host synchronisation (``sync_free`` forces
    either way).
    """
    bad = sq < _CANCELLATION * weight_sq
    if sync_free is None:
        sync_free = weight.device.type != "cpu" or torch.compiler.is_compiling()
    if not sync_free:
        rows = bad.nonzero().flatten()
        if rows.numel():
            dense = weight[rows].double() + scale * (b64[rows] @ a64)  # (k, in)
            sq = sq.index_put((rows,), dense.square().sum(1))
        return sq
    k = min(_MAX_REDONE, sq.shape[0])
    rows = torch.topk(sq / weight_sq.clamp_min(torch.finfo(torch.float64).tiny), k, largest=False).indices
    dense = (weight[rows].double() + scale * (b64[rows] @ a64)).square().sum(1)  # (k,)
    return sq.index_put((rows,), torch.where(bad[rows], dense, sq[rows]))


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


def _column_dot(dy: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``sum_n dy[n, j] * z[n, j]`` ``(out,)`` for ``(N, out)`` inputs, in row chunks, accumulated in
    float32 at least (16-bit ``dy`` / ``z`` are widened chunk by chunk)."""
    acc = torch.promote_types(z.dtype, torch.float32)
    chunk = max(1, _CHUNK_BYTES // (z.shape[1] * torch.finfo(acc).bits // 8))
    total = torch.zeros(z.shape[1], dtype=acc, device=z.device)
    buf = torch.empty(min(chunk, z.shape[0]), z.shape[1], dtype=acc, device=z.device)
    for start in range(0, z.shape[0], chunk):
        rows = min(chunk, z.shape[0] - start)
        part = buf[:rows]
        if z.dtype == acc and dy.dtype == acc:
            torch.mul(z[start : start + rows], dy[start : start + rows], out=part)
        else:
            part.copy_(z[start : start + rows]).mul_(dy[start : start + rows])
        total += part.sum(0)
    return total


def _scaled_product(x, weight, lora_A, lora_B, g, scale: float):
    """``z = W0 x + s B A x`` ``(..., out)``, ``A x`` ``(..., r)`` (or None) and ``g`` in ``z``'s dtype."""
    z = F.linear(x, weight)
    down = None
    if lora_A is not None:
        down = F.linear(x, lora_A)  # (..., r)
        z.view(-1, z.shape[-1]).addmm_(down.view(-1, down.shape[-1]), lora_B.t(), alpha=scale)
    return z, down, g.to(z.dtype)


class _DoRAFunction(torch.autograd.Function):
    """``(..., in) -> (..., out)``: ``y = g * z + bias`` with ``z = W0 x + s B A x``.

    ``z`` is saved and ``y`` is a new tensor (never a view of a saved one: in-place ops on the output
    are safe). Backward: ``dL/dg = sum_n dy z`` accumulated in float32, exact however small ``g`` and
    however large the bias (nothing is recovered by subtracting the bias or dividing by ``g``).
    Saves ``x``, ``A x`` ``(N, r)`` and ``z``: one ``(N, out)`` tensor besides the output.

    ``x``, ``weight``, ``bias``, ``lora_A``, ``lora_B`` arrive in one compute dtype; ``g`` is float32
    (or float64) and its gradient is returned in that dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, g, scale):
        z, down, gc = _scaled_product(x, weight, lora_A, lora_B, g, scale)
        y = z * gc if bias is None else torch.addcmul(bias, z, gc)
        ctx.save_for_backward(x, weight, bias, lora_A, lora_B, gc, down, z)
        ctx.scale, ctx.g_dtype = scale, g.dtype
        return y  # a new tensor, not a view: in-place ops on it (and FSDP2's hooks) are safe

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, lora_A, lora_B, g, down, z = ctx.saved_tensors
        s = ctx.scale
        out_features, in_features = weight.shape
        dy2, z = dy.reshape(-1, out_features), z.view(-1, out_features)
        x2 = x.reshape(-1, in_features)
        down = None if down is None else down.view(-1, down.shape[-1])
        n = dy2.shape[0]
        need = ctx.needs_input_grad
        dx = dweight = dbias = dA = dB = dg = None

        if need[5]:  # dL/dg = sum_n dy * z, float32 accumulation
            dg = _column_dot(dy2, z).to(ctx.g_dtype)
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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the products run in: autocast's for ``x``'s device when it is on, else ``x``'s."""
    device = x.device.type
    if _autocast_known(x) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _inference(x, weight, bias, lora_A, lora_B, g, scale: float) -> torch.Tensor:
    """``(..., in) -> (..., out)`` without autograd, at LoRA's cost: the base output with its bias
    (as LoRA computes it), scaled in one in-place pass to ``g y + (1 - g) bias``, then the update
    with ``g`` folded into the small ``B`` ``(out, r)``."""
    y = F.linear(x, weight, bias)
    gc = g.to(y.dtype)
    if bias is None:
        y.mul_(gc)
    else:
        torch.addcmul(bias * (1 - gc), y, gc, out=y)
    if lora_A is not None:
        down = F.linear(x, lora_A)
        y.view(-1, y.shape[-1]).addmm_(down.view(-1, down.shape[-1]), (lora_B * gc[:, None]).t(), alpha=scale)
    return y


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
        check_base(base, r, min_r=0)
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
        self._g_cache: tuple[tuple, torch.Tensor] | None = None
        self._merge_norm: torch.Tensor | None = None
        self.merged = False
        self.cache_norm = True  # eval-mode, no-grad forwards reuse g until a parameter changes
        if base.weight.is_meta:  # initialise after the weights load: reset_adapter_parameters()
            m = torch.empty(base.out_features, dtype=adapter_dtype(base.weight.dtype), device="meta")
        else:
            with torch.no_grad():  # the same computation as the forward's norm with B = 0: g is exactly 1
                m = factored_weight_norm(base.weight, None, None, 0.0, self.weight_sq())
        self.magnitude = nn.Parameter(m.to(adapter_dtype(base.weight.dtype)))

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """``A`` kaiming-uniform, ``B = 0``, ``m = ||W0||_c``: the fresh layer, e.g. after a model built on
        the meta device got its real base weights. Refuses while ``W0`` (or anything here) is on meta."""
        still_meta = [n for n, t in self.base.named_parameters() if t.is_meta]
        if still_meta:
            raise RuntimeError(
                f"reset_adapter_parameters: base.{', base.'.join(still_meta)} still on the meta device; "
                "load the base weights first (e.g. to_empty() + load_state_dict())"
            )
        device = self.base.weight.device
        dtype = adapter_dtype(self.base.weight.dtype)
        if self.r > 0:
            lora_A, lora_B = init_lora_factors(self.base, self.r)  # on the base's device and dtype
            self.lora_A = nn.Parameter(lora_A.detach(), requires_grad=self._trainable("lora_A"))
            self.lora_B = nn.Parameter(lora_B.detach(), requires_grad=self._trainable("lora_B"))
        self.clear_norm_cache()
        m = factored_weight_norm(self.base.weight, None, None, 0.0, self.weight_sq())
        self.magnitude = nn.Parameter(
            m.to(device=device, dtype=dtype), requires_grad=self._trainable("magnitude")
        )

    def _trainable(self, name: str) -> bool:
        current = getattr(self, name, None)
        return True if current is None else current.requires_grad

    def clear_norm_cache(self) -> None:
        """Forget the cached ``||W0||^2`` and eval-mode ``g`` (needed only after edits through ``.data``)."""
        self._weight_sq = None
        self._g_cache = None

    def weight_sq(self) -> torch.Tensor:
        """``||W0_j||^2`` ``(out,)`` float64, recomputed only when the base weight changes."""
        w = self.base.weight
        if torch.compiler.is_compiling():  # storage and versions are not traceable: one pass over W0
            return row_norm_sq(w)
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

    def _parameter_key(self) -> tuple:
        tensors = [t for t in (self.base.weight, self.lora_A, self.lora_B, self.magnitude) if t is not None]
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors) + (self.scale,)

    def _caching(self) -> bool:
        if not self.cache_norm or self.training or torch.is_grad_enabled():
            return False
        if torch.compiler.is_compiling():  # versions are not traced: recompute inside compiled graphs
            return False
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # a torch built without distributed support
            return True
        return not isinstance(self, FSDPModule)

    def magnitude_scale(self) -> torch.Tensor:
        """``g = m / ||W0 + s B A||_c`` ``(out,)`` float32 (cached in eval mode without gradients)."""
        if not self._caching():
            self._g_cache = None
            return self.magnitude / self.weight_norm()
        key = self._parameter_key()
        if self._g_cache is None or self._g_cache[0] != key:
            self._g_cache = (key, self.magnitude / self.weight_norm())
        return self._g_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base.weight, self.base.bias
        if self.merged:
            return F.linear(x, weight, bias)
        g = self.magnitude_scale()  # (out,) float32
        if self.dropout > 0 and self.training:
            return self._forward_dropout(x, g)
        dtype = compute_dtype(x)
        factors = [None if p is None else p.to(dtype) for p in (self.lora_A, self.lora_B)]
        args = (x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), *factors)
        if torch.is_grad_enabled():
            return _DoRAFunction.apply(*args, g, self.scale)
        return _inference(*args, g, self.scale)  # no autograd record: the output is scaled in place

    def _forward_dropout(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """PEFT's arrangement with dropout on the adapter input: result + (g-1) W0 x~ + g s B A x~."""
        weight, bias = self.base.weight, self.base.bias
        result = F.linear(x, weight, bias)
        x = F.dropout(x, self.dropout, training=True)
        dtype = compute_dtype(x)
        autocast_on = dtype != x.dtype
        if autocast_on:  # cast once for both products, not once each
            x = x.to(dtype)
        extra = (g - 1) * F.linear(x, weight).to(g.dtype)
        if self.lora_A is not None:
            same = autocast_on or x.dtype == self.lora_A.dtype  # else the factors' dtype, as before
            down = F.linear(x if same else x.to(self.lora_A.dtype), self.lora_A)
            extra = extra + g * F.linear(down, self.lora_B).to(g.dtype) * self.scale
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
        g = self.magnitude_scale()
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

"""The PLoRA layer: R one-rank pairs on a frozen linear weight, with Select-N-Fold.

A layer knows only its own math. It keeps

* ``plora_A`` (R x d_in) and ``plora_B`` (d_out x R): the current values of all R
  pairs, as float32 buffers whatever the base's dtype (they are the "global" values a
  client starts from, and what it uploads);
* ``active_A`` (r x d_in) and ``active_B`` (d_out x r): the selected pairs, the only
  trainable tensors, float32 masters, so an optimizer holds state for r pairs only;
* optionally a fixed ``base_offset`` added under the pairs (FLoRA's merged updates).

The unselected pairs are folded in one of two ways (``fold``):

* ``"branch"``: they stay a frozen low-rank branch, computed in the same batched product
  as the active pairs: ``base(x) + s [B_fold | B_act] ([A_fold; A_act] x)``, the columns
  put back in pair order, so the layer's output is bit-for-bit the same whatever the
  selection. No d_out x d_in memory, and the base weight is never touched, so it works
  on half-precision and quantized (bitsandbytes) bases.
* ``"merge"``: they are added into the base weight, ``W0 + s sum_{j folded} b_j a_j^T``,
  rebuilt from a pristine copy of W0 every time (never cumulative, so restoring is
  bit-exact). The copy lives on the CPU (off the accelerator) and only while something
  is folded: one extra d_out x d_in per adapted layer, the price of a forward pass with
  no extra product. Needs a float base weight.

Mixed precision: the adapter math runs in float32 on the float32 masters (float64 on a float64 base); the input is
cast up and the adapter's output cast to the base output's dtype (the explicit
equivalent of autocast, and the same on every device).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]


def _dims(base: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, transposed): Conv1D stores its weight as (d_in, d_out)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if Conv1D and isinstance(base, Conv1D):
        d_in, d_out = base.weight.shape
        return d_in, d_out, True
    raise TypeError(
        f"PLoRA can wrap torch.nn.Linear or transformers Conv1D, not {type(base).__name__}"
    )


@torch.no_grad()
def init_pairs_A_(A: torch.Tensor, init_a: str = "kaiming_uniform",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """LoRA's random init of the a_j (the rows of an R x d_in ``A``), in place.

    ``generator`` makes the draw reproducible (FLoRA's fresh per-round adapters).
    """
    if init_a == "kaiming_uniform":
        return nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return nn.init.normal_(A, std=1.0 / A.shape[0], generator=generator)


FOLD_MODES = ("branch", "merge")
MASTER_DTYPE = torch.float32  # the pairs' values are trained, kept and uploaded in this dtype


def master_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32, or float64 on a float64 base (the exactness tests run in double precision)."""
    return torch.float64 if weight.dtype == torch.float64 else MASTER_DTYPE


def is_float_weight(weight: torch.Tensor) -> bool:
    """A plain float weight a fold can be merged into (bitsandbytes' packed 4/8-bit weights are not)."""
    return type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point()


class PLoRALayer(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 init_a: str = "kaiming_uniform", fold: str = "branch") -> None:
        super().__init__()
        self.d_in, self.d_out, self.transposed = _dims(base)
        if fold not in FOLD_MODES:
            raise ValueError(f"fold must be one of {FOLD_MODES}, got {fold!r}")
        if fold == "merge" and not is_float_weight(base.weight):
            raise ValueError(f"fold='merge' adds pairs into the base weight, which this {type(base).__name__} "
                             "stores quantized; use fold='branch' on a quantized base")
        self.fold = fold
        self.base_layer = base
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        dev, self.master_dtype = base.weight.device, master_dtype(base.weight)
        self.register_buffer("plora_A", torch.zeros(rank, self.d_in, dtype=self.master_dtype, device=dev))
        self.register_buffer("plora_B", torch.zeros(self.d_out, rank, dtype=self.master_dtype, device=dev))
        self.reset_pairs(init_a)
        # fold="merge": pristine W0 on the CPU, kept only while something is folded into the base weight
        self.base_weight0: torch.Tensor | None = None
        # fold="branch": the frozen folded pairs, (R - r) x d_in and d_out x (R - r)
        self.register_buffer("folded_A", None, persistent=False)
        self.register_buffer("folded_B", None, persistent=False)
        self.register_buffer("pair_order", None, persistent=False)
        # a fixed delta (d_out x d_in) under the pairs, e.g. FLoRA's merged updates; W0 stays pristine
        self.register_buffer("base_offset", None, persistent=False)
        self.register_buffer("active_idx", torch.arange(rank), persistent=False)
        self.active_A = nn.Parameter(self.plora_A.clone())
        self.active_B = nn.Parameter(self.plora_B.clone())

    # ------------------------------------------------------------------ init
    def reset_pairs(self, init_a: str = "kaiming_uniform") -> None:
        """LoRA's init: a_j random, b_j = 0, so the adapter starts as the identity.

        Drawn on the CPU from torch's global RNG, then moved: a run seeded the same way starts from the
        same pairs on any device (CUDA's RNG would draw other numbers).
        """
        A = torch.empty(self.plora_A.shape, dtype=self.plora_A.dtype)
        init_pairs_A_(A, init_a)
        with torch.no_grad():
            self.plora_A.copy_(A)
            self.plora_B.zero_()

    # ------------------------------------------------------------- the pairs
    @torch.no_grad()
    def sync(self) -> None:
        """Write the trained active pairs back into the full (R-pair) tensors."""
        idx = self.active_idx
        self.plora_A[idx] = self.active_A.detach().to(self.plora_A.dtype)
        self.plora_B[:, idx] = self.active_B.detach().to(self.plora_B.dtype)

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current (A, B) of all R pairs, trained values included."""
        self.sync()
        return self.plora_A, self.plora_B

    @torch.no_grad()
    def set_pairs(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Load all R pairs and re-apply the current selection with the new values."""
        if tuple(A.shape) != (self.rank, self.d_in) or tuple(B.shape) != (self.d_out, self.rank):
            raise ValueError(
                f"PLoRA pairs must be A {(self.rank, self.d_in)} and B {(self.d_out, self.rank)}, "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        self.plora_A.copy_(A)  # to this layer's device and float32
        self.plora_B.copy_(B)
        self._select(self.active_idx)  # no sync: the new values win over the old active ones

    # ------------------------------------------------------- Select-N-Fold
    @torch.no_grad()
    def select(self, indices) -> None:
        """Fold every unselected pair into the base weight; make the selected ones trainable.

        The folded weight is rebuilt from the pristine W0 every time, so any
        sequence of selections restores W0 bit-exactly once all pairs are selected.
        """
        self.sync()
        self._select(indices)

    @torch.no_grad()
    def _select(self, indices) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.plora_A.device).flatten()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.rank or idx.unique().numel() != idx.numel()):
            raise ValueError(f"selected indices must be distinct and in [0, {self.rank}), got {idx.tolist()}")
        folded = torch.ones(self.rank, dtype=torch.bool, device=idx.device)
        folded[idx] = False
        if self.fold == "branch":
            has = bool(folded.any())
            self.folded_A = self.plora_A[folded].clone() if has else None
            self.folded_B = self.plora_B[:, folded].clone() if has else None
            # [folded; active] back in pair order: the batched product is then the same whatever the selection
            self.pair_order = torch.argsort(torch.cat([folded.nonzero().flatten(), idx])) if has else None
        else:
            self._merge(folded)
        self.active_idx = idx
        self.active_A = nn.Parameter(self.plora_A[idx].clone())
        self.active_B = nn.Parameter(self.plora_B[:, idx].clone())

    def _merge(self, folded: torch.Tensor) -> None:
        """fold="merge": base weight = W0 (+ offset) + s * sum of the folded pairs, from the pristine W0."""
        delta = self.scale * (self.plora_B[:, folded] @ self.plora_A[folded]) if folded.any() else None
        if self.base_offset is not None:
            delta = self.base_offset if delta is None else delta + self.base_offset
        weight = self.base_layer.weight
        if self.base_weight0 is None and delta is not None:
            self.base_weight0 = weight.detach().to("cpu", copy=True)
        if self.base_weight0 is not None:
            w0 = self.base_weight0.to(weight.device)
            if delta is not None:
                d = (delta.T if self.transposed else delta).to(weight.device)
                weight.data.copy_((w0.to(d.dtype) + d).to(w0.dtype))
            else:
                weight.data.copy_(w0)
                self.base_weight0 = None

    @torch.no_grad()
    def set_base_offset(self, delta: torch.Tensor | None) -> None:
        """Add a fixed ``delta`` (d_out x d_in) under the pairs; ``None`` removes it. FLoRA uses it for the
        updates merged in earlier rounds.

        fold="merge": the base weight becomes W0 + delta + (folded pairs), rebuilt from the pristine W0 like
        every fold, so removing the offset restores W0 bit-exactly. fold="branch": the weight is untouched and
        the delta is one more float32 term of the forward pass (dense: FLoRA's merged updates have no low rank).
        """
        if delta is not None:
            if tuple(delta.shape) != (self.d_out, self.d_in):
                raise ValueError(f"base offset must be {(self.d_out, self.d_in)}, got {tuple(delta.shape)}")
            delta = delta.detach().to(self.plora_A.device, self.master_dtype).clone()
        self.sync()
        self.base_offset = delta
        self._select(self.active_idx)

    @property
    def folded_count(self) -> int:
        return self.rank - int(self.active_idx.numel())

    def pristine_weight(self) -> torch.Tensor:
        """W0 (with nothing folded in), whatever the current selection."""
        w = self.base_weight0 if self.base_weight0 is not None else self.base_layer.weight
        return w.detach()

    # -------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        A, B = self.active_A, self.active_B
        h = self.dropout(x).to(self.master_dtype)
        low = None
        if self.folded_A is not None:  # fold="branch": the frozen pairs see x without dropout, as a merge would
            if isinstance(self.dropout, nn.Identity) or not self.training:  # one batched product, in pair order
                A = torch.cat([self.folded_A, A])[self.pair_order]
                B = torch.cat([self.folded_B, B], dim=1)[:, self.pair_order]
            else:
                low = F.linear(F.linear(x.to(self.master_dtype), self.folded_A), self.folded_B)
        if A.shape[0]:
            part = F.linear(F.linear(h, A), B)
            low = part if low is None else low + part
        adapter = None if low is None else low * self.scale
        if self.fold == "branch" and self.base_offset is not None:  # merged into the weight under "merge"
            offset = F.linear(x.to(self.master_dtype), self.base_offset)
            adapter = offset if adapter is None else adapter + offset
        return out if adapter is None else out + adapter.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, "
                f"active={int(self.active_idx.numel())}, scale={self.scale:g}")

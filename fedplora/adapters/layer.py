"""The PLoRA layer: R one-rank pairs on a frozen linear weight, with Select-N-Fold.

A layer knows only its own math. It keeps

* ``plora_A`` (R x d_in) and ``plora_B`` (d_out x R): the current values of all R
  pairs, as buffers (they are the "global" values a client starts from);
* ``active_A`` (r x d_in) and ``active_B`` (d_out x r): the selected pairs, the only
  trainable tensors, so an optimizer holds state for r pairs only;
* the pristine base weight ``W0``, from which every fold is rebuilt (never
  cumulative, so restoring is bit-exact);
* optionally a fixed ``base_offset`` added under the pairs (FLoRA's merged updates).

Forward: ``base(x) + s * B_act (A_act dropout(x))`` -- one batched low-rank product,
where the base weight is ``W0 (+ offset) + s * sum_{j not selected} b_j a_j^T``.
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


class PLoRALayer(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 init_a: str = "kaiming_uniform") -> None:
        super().__init__()
        self.d_in, self.d_out, self.transposed = _dims(base)
        self.base_layer = base
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.register_buffer("plora_A", torch.zeros(rank, self.d_in, dtype=w.dtype, device=w.device))
        self.register_buffer("plora_B", torch.zeros(self.d_out, rank, dtype=w.dtype, device=w.device))
        self.reset_pairs(init_a)
        # pristine W0, kept only while something is folded into the base weight
        self.register_buffer("base_weight0", None, persistent=False)
        # a fixed delta (d_out x d_in) under the pairs, e.g. FLoRA's merged updates; W0 stays pristine
        self.register_buffer("base_offset", None, persistent=False)
        self.register_buffer("active_idx", torch.arange(rank), persistent=False)
        self.active_A = nn.Parameter(self.plora_A.clone())
        self.active_B = nn.Parameter(self.plora_B.clone())

    # ------------------------------------------------------------------ init
    def reset_pairs(self, init_a: str = "kaiming_uniform") -> None:
        """LoRA's init: a_j random, b_j = 0, so the adapter starts as the identity."""
        init_pairs_A_(self.plora_A, init_a)
        with torch.no_grad():
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
        self.plora_A.copy_(A)
        self.plora_B.copy_(B)
        self._select(self.active_idx)  # no sync: the new values win over the old active ones

    # ------------------------------------------------------- Select-N-Fold
    def _set_base_weight(self, weight: torch.Tensor) -> None:
        self.base_layer.weight.data.copy_(weight)

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
        delta = self.scale * (self.plora_B[:, folded] @ self.plora_A[folded]) if folded.any() else None
        if self.base_offset is not None:
            delta = self.base_offset if delta is None else delta + self.base_offset
        if self.base_weight0 is None and delta is not None:
            self.base_weight0 = self.base_layer.weight.detach().clone()
        if self.base_weight0 is not None:
            w0 = self.base_weight0
            if delta is not None:
                self._set_base_weight(w0 + (delta.T if self.transposed else delta).to(w0.dtype))
            else:
                self._set_base_weight(w0)
                self.base_weight0 = None
        self.active_idx = idx
        dev, dt = self.plora_A.device, self.plora_A.dtype
        self.active_A = nn.Parameter(self.plora_A[idx].clone().to(dev, dt))
        self.active_B = nn.Parameter(self.plora_B[:, idx].clone().to(dev, dt))

    @torch.no_grad()
    def set_base_offset(self, delta: torch.Tensor | None) -> None:
        """Add a fixed ``delta`` (d_out x d_in) to the frozen weight, under the pairs; ``None`` removes it.

        The base weight becomes W0 + delta + (folded pairs), rebuilt from the pristine
        W0 like every fold, so removing the offset restores W0 bit-exactly. FLoRA
        uses it for the updates merged in earlier rounds.
        """
        if delta is not None:
            if tuple(delta.shape) != (self.d_out, self.d_in):
                raise ValueError(f"base offset must be {(self.d_out, self.d_in)}, got {tuple(delta.shape)}")
            delta = delta.detach().to(self.plora_A.device).clone()
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
        if self.active_A.shape[0] == 0:
            return out
        h = self.dropout(x).to(self.active_A.dtype)
        low = F.linear(F.linear(h, self.active_A), self.active_B)
        return out + (low * self.scale).to(out.dtype)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, "
                f"active={int(self.active_idx.numel())}, scale={self.scale:g}")

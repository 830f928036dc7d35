"""KV caches for incremental decoding with the attention kernels (one layer, one head group).

``MultilevelKVCache`` keeps the keys of a global level and all values, but the keys of a blocked
level only for the current block of that level (evicted when the block ends): MLR attention's
cache shrinks towards r_0 / W of standard attention's keys. ``WindowKVCache`` keeps the last
``window`` keys and values. ``kv_cache_bytes_per_token`` is the analytic average for reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .attention_plan import kv_floats
from .attention_regions import check_levels
from .errors import SpecError


class MultilevelKVCache:
    """Incremental decoding state of causal ``multilevel_attention`` for one layer.

    Keys of a global level (block size None) and all values are kept; keys of a blocked level are
    kept only for the current block of that level and evicted when the block ends. ``step`` appends
    position t and returns row t of the full forward. Buffers are preallocated for ``max_len``
    positions; ``nbytes`` counts the entries held, not the capacity.
    """

    def __init__(
        self,
        widths: Sequence[int],
        block_sizes: Sequence[int | None],
        batch: int,
        heads: int,
        dv: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        max_len: int = 2048,
        mean: bool = False,
    ) -> None:
        check_levels(widths, block_sizes)
        self.mean = mean  # mean_over_shared_levels: divide by the shared levels of width > 0
        self.widths, self.block_sizes = tuple(widths), tuple(block_sizes)
        self.starts = [sum(widths[:l]) for l in range(len(widths))]
        self.max_len, self.length = max_len, 0
        caps = [max_len if bs is None else min(bs, max_len) for bs in block_sizes]
        self.keys = [
            torch.empty(batch, heads, cap, w, dtype=dtype, device=device)  # (B, H, cap, w_l)
            for cap, w in zip(caps, widths, strict=True)
        ]
        self.values = torch.empty(batch, heads, max_len, dv, dtype=dtype, device=device)

    def step(self, q_t: Tensor, k_t: Tensor, v_t: Tensor) -> Tensor:
        """q_t, k_t (B, H, 1, W), v_t (B, H, 1, Dv) at the next position -> (B, H, 1, Dv)."""
        t = self.length
        if t >= self.max_len:
            raise SpecError(f"the cache holds max_len={self.max_len} positions, got one more")
        B, H = q_t.shape[:2]
        self.values[:, :, t] = v_t[:, :, 0]
        scores = q_t.new_zeros(B, H, 1, t + 1)  # (B, H, 1, t + 1)
        shared = q_t.new_zeros(t + 1)  # levels each key shares with position t
        for l, (w, bs) in enumerate(zip(self.widths, self.block_sizes, strict=True)):
            if w == 0:
                continue
            feats = slice(self.starts[l], self.starts[l] + w)
            start = 0 if bs is None else t - t % bs  # first position of the current block
            self.keys[l][:, :, t - start] = k_t[:, :, 0, feats]  # overwrites the previous block
            held = self.keys[l][:, :, : t - start + 1]  # (B, H, t - start + 1, w)
            scores[..., start:] += q_t[..., feats] @ held.transpose(-1, -2)
            shared[start:] += 1
        if self.mean:
            scores = scores / shared.clamp(min=1)
        self.length = t + 1
        return torch.softmax(scores, dim=-1) @ self.values[:, :, : t + 1]

    def nbytes(self) -> int:
        """Bytes of the keys and values held now."""
        B, H = self.values.shape[:2]
        per_head = (
            kv_cache_bytes_per_token(
                self.widths, self.block_sizes, self.values.shape[-1], self.length, 1
            )
            * self.length
        )
        return round(per_head) * B * H * self.values.element_size()


def kv_cache_bytes_per_token(
    widths: Sequence[int],
    block_sizes: Sequence[int | None],
    dv: int,
    T: int,
    dtype_bytes: int = 4,
) -> float:
    """Bytes per token per head that ``MultilevelKVCache`` holds after T tokens (0 for T = 0).

    Global levels keep all T keys and every value is kept; a blocked level keeps the keys of its
    current block, ``(T - 1) % bs + 1`` of them. For T a multiple of every block size this is the
    bound ``(r_0 T + sum_l r_l bs_l + dv T) / T`` of the reference notes.
    """
    return kv_floats(widths, block_sizes, dv, T) * dtype_bytes / T if T > 0 else 0.0


class WindowKVCache:
    """Incremental decoding state of causal ``window_attention``: the last ``window`` keys and
    values, in a ring buffer."""

    def __init__(
        self,
        batch: int,
        heads: int,
        width: int,
        dv: int,
        window: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.window, self.length = window, 0
        self.keys = torch.empty(batch, heads, window, width, dtype=dtype, device=device)
        self.values = torch.empty(batch, heads, window, dv, dtype=dtype, device=device)

    def step(self, q_t: Tensor, k_t: Tensor, v_t: Tensor) -> Tensor:
        """q_t, k_t (B, H, 1, W), v_t (B, H, 1, Dv) at the next position -> (B, H, 1, Dv)."""
        slot = self.length % self.window
        self.keys[:, :, slot] = k_t[:, :, 0]
        self.values[:, :, slot] = v_t[:, :, 0]
        self.length += 1
        n = min(self.length, self.window)  # softmax does not care about the ring order
        scores = q_t @ self.keys[:, :, :n].transpose(-1, -2)  # (B, H, 1, n)
        return torch.softmax(scores, dim=-1) @ self.values[:, :, :n]

    def nbytes(self) -> int:
        """Bytes of the keys and values held now."""
        n = min(self.length, self.window)
        B, H, _, W = self.keys.shape
        return n * B * H * (W + self.values.shape[-1]) * self.keys.element_size()


__all__ = ["MultilevelKVCache", "WindowKVCache", "kv_cache_bytes_per_token"]

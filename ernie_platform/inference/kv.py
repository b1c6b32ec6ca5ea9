"""The KV slot pool: one `KVCache` of [max_batch_size, max_seq_len] whose rows are lent to running sequences, plus
the token budget that admission is checked against.

Every running sequence holds one row and reserves `prompt_len + max_tokens` tokens of the budget until it finishes
(the most its row can ever hold), so an admitted sequence can never run out of KV. Rows are handed out lowest first,
so a decode step only has to run over rows [0, highest busy row] and slots [0, longest length].
"""

from __future__ import annotations

import heapq

import torch

from ernie_platform.models.cache import KVCache

KV = list[tuple[torch.Tensor, torch.Tensor]]


class KVPool:
    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_seq_len: int, budget_tokens: int):
        self.cache = KVCache.for_model(model, max_batch_size, max_seq_len)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.budget_tokens = budget_tokens
        self.used_tokens = 0
        self._free = list(range(max_batch_size))  # a heap: lowest row first
        self._reserved: dict[int, int] = {}  # row -> reserved tokens

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def fits(self, rows: int, tokens_each: int) -> bool:
        return rows <= len(self._free) and self.used_tokens + rows * tokens_each <= self.budget_tokens

    def allocate(self, rows: int, tokens_each: int) -> list[int]:
        if not self.fits(rows, tokens_each):
            raise RuntimeError(f"KVPool: cannot allocate {rows} rows x {tokens_each} tokens")
        out = [heapq.heappop(self._free) for _ in range(rows)]
        for r in out:
            self._reserved[r] = tokens_each
        self.used_tokens += rows * tokens_each
        self.cache.reset_rows(out)
        return out

    def release(self, row: int) -> None:
        self.used_tokens -= self._reserved.pop(row)
        self.cache.reset_rows([row])
        heapq.heappush(self._free, row)

    def cached_tokens(self) -> int:
        return int(self.cache.lengths_B.sum())

    def write(self, row: int, kv: KV) -> None:
        self.cache.write_row(row, kv)

    def decode_view(self, rows: list[int]) -> KVCache:
        """A view over rows [0, max(rows)] with room for one more token than the longest of them."""
        hi = max(rows) + 1
        slots = min(int(self.cache.lengths_B[:hi].max()) + 1, self.max_seq_len)
        return self.cache.view(0, hi, slots)


def kv_to_cpu(kv: KV) -> KV:
    """Compact CPU copies: a view into a batch's prefill cache would pickle (and travel) with the whole batch's
    storage, even when it is contiguous."""

    def copy(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t.detach())

    return [(copy(k), copy(v)) for k, v in kv]


def check_kv(kv: KV, cache: KVCache, prompt_len: int) -> None:
    """A transferred KV must match this model's layers/heads/head width and cover exactly the prompt."""
    layers, heads, dh = len(cache.k_LBHSD), cache.k_LBHSD[0].shape[1], cache.k_LBHSD[0].shape[3]
    if len(kv) != layers:
        raise ValueError(f"PrefillResult.kv has {len(kv)} layers, this engine's model has {layers}")
    for i, (k, v) in enumerate(kv):
        want = (heads, prompt_len, dh)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(
                f"PrefillResult.kv layer {i}: k {tuple(k.shape)} / v {tuple(v.shape)}, expected {want} "
                f"(kv heads, prompt tokens, head dim)"
            )

"""KV cache for incremental decoding of a batch of sequences of different lengths.

Each row b keeps its own length `lengths_B[b]`; its keys sit at slots [0, lengths_B[b]) with the row's own positions
(0, 1, ...), so a row decodes exactly as it would alone, whatever the other rows' lengths. New tokens are
right-padded: `attention_mask` [B, T] marks which of the T new tokens of each row are real.

Shape legend: L layers, B rows, H kv heads, S cache slots, Dh head width.
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k_LBHSD = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_LBHSD = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_seq_len = max_seq_len
        # Set by the model at the start of a forward: slots the new tokens go to, and how many are real.
        self._new_slots_BT: Optional[torch.Tensor] = None
        self._new_counts_B: Optional[torch.Tensor] = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_seq_len: int) -> KVCache:
        args = model.args
        p = next(model.parameters())
        return cls(
            args.num_hidden_layers,
            batch_size,
            args.num_key_value_heads,
            args.resolved_head_dim,
            max_seq_len,
            dtype=p.dtype,
            device=p.device,
        )

    @property
    def batch_size(self) -> int:
        return self.lengths_B.shape[0]

    def begin(self, new_mask_BT: torch.Tensor) -> torch.Tensor:
        """Reserve slots for the new tokens; returns their positions [B, T] (each row continues its own count)."""
        b, t = new_mask_BT.shape
        if b != self.batch_size:
            raise ValueError(f"KVCache: batch of {b} rows does not match the cache's {self.batch_size} rows")
        counts_B = new_mask_BT.sum(-1).long()
        # All T slots are written (padding too), so every row needs room for T more.
        if int(self.lengths_B.max()) + t > self.max_seq_len:
            raise ValueError(
                f"KVCache: {int(self.lengths_B.max())} cached + {t} new tokens exceed max_seq_len={self.max_seq_len}"
            )
        self._new_slots_BT = self.lengths_B.unsqueeze(1) + torch.arange(t, device=self.lengths_B.device)
        self._new_counts_B = counts_B
        return self._new_slots_BT

    def update(self, layer_idx: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values of one layer; return this layer's whole cache (all S slots)."""
        slots_BT = self._new_slots_BT
        idx = slots_BT[:, None, :, None].expand(-1, k_BHTD.shape[1], -1, k_BHTD.shape[-1])
        self.k_LBHSD[layer_idx].scatter_(2, idx, k_BHTD.to(self.k_LBHSD[layer_idx].dtype))
        self.v_LBHSD[layer_idx].scatter_(2, idx, v_BHTD.to(self.v_LBHSD[layer_idx].dtype))
        return self.k_LBHSD[layer_idx], self.v_LBHSD[layer_idx]

    def attention_mask(self, query_slots_BT: torch.Tensor) -> torch.Tensor:
        """Boolean [B, 1, T, S]: query at slot q sees slots ≤ q that hold real tokens (old or new)."""
        s = torch.arange(self.max_seq_len, device=query_slots_BT.device)
        valid_BS = s.unsqueeze(0) < (self.lengths_B + self._new_counts_B).unsqueeze(1)
        causal_BTS = s.view(1, 1, -1) <= query_slots_BT.unsqueeze(-1)
        # A padding query still sees its own slot so its (unused) output stays finite.
        own_BTS = s.view(1, 1, -1) == query_slots_BT.unsqueeze(-1)
        return ((causal_BTS & valid_BS.unsqueeze(1)) | own_BTS).unsqueeze(1)

    def end(self) -> None:
        self.lengths_B += self._new_counts_B
        self._new_slots_BT = None
        self._new_counts_B = None

    # ---- slot-pool helpers (serving engine): reuse rows, export/import one sequence's KV ---------------------------
    def reset_rows(self, rows: list[int]) -> None:
        """Mark rows empty (length 0); their stale keys are never attended to and are overwritten on reuse."""
        if rows:
            self.lengths_B[torch.as_tensor(rows, dtype=torch.long, device=self.lengths_B.device)] = 0

    def write_row(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]], length: Optional[int] = None) -> None:
        """Load one sequence's KV (per layer (k [H, P, Dh], v), any device/dtype) into row `row`, replacing it."""
        if len(kv) != len(self.k_LBHSD):
            raise ValueError(f"KVCache.write_row: {len(kv)} layers given, the cache has {len(self.k_LBHSD)}")
        n = kv[0][0].shape[1] if length is None else length
        if n > self.max_seq_len:
            raise ValueError(f"KVCache.write_row: {n} tokens exceed max_seq_len={self.max_seq_len}")
        for (k, v), k_dst, v_dst in zip(kv, self.k_LBHSD, self.v_LBHSD):
            if k.shape[0] != k_dst.shape[1] or k.shape[2] != k_dst.shape[3] or k.shape[1] < n or v.shape != k.shape:
                raise ValueError(
                    f"KVCache.write_row: k/v of shape {tuple(k.shape)}/{tuple(v.shape)} do not fit "
                    f"[{k_dst.shape[1]}, {n}, {k_dst.shape[3]}]"
                )
            k_dst[row, :, :n] = k[:, :n].to(device=k_dst.device, dtype=k_dst.dtype)
            v_dst[row, :, :n] = v[:, :n].to(device=v_dst.device, dtype=v_dst.dtype)
        self.lengths_B[row] = n

    def view(self, start: int, stop: int, num_slots: Optional[int] = None) -> KVCache:
        """A cache over rows [start, stop) and the first `num_slots` slots that shares this one's storage (writes and
        length updates go through), so a decode step can skip idle rows and unused slots."""
        num_slots = self.max_seq_len if num_slots is None else num_slots
        if not (0 <= start < stop <= self.batch_size and 0 < num_slots <= self.max_seq_len):
            raise ValueError(f"KVCache.view: rows [{start}, {stop}) / {num_slots} slots outside {self.batch_size} rows")
        out = KVCache.__new__(KVCache)
        out.k_LBHSD = [k[start:stop, :, :num_slots] for k in self.k_LBHSD]
        out.v_LBHSD = [v[start:stop, :, :num_slots] for v in self.v_LBHSD]
        out.lengths_B = self.lengths_B[start:stop]
        out.max_seq_len = num_slots
        out._new_slots_BT = None
        out._new_counts_B = None
        return out

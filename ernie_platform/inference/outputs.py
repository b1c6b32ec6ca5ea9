"""What the engine hands out: streamed token events, whole completions, and prefill results for PD transfer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ernie_platform.inference.sampling import SamplingParams


@dataclass
class TokenEvent:
    token_id: int
    text: str  # newly complete text ("" while a multi-byte char or a possible stop string is pending)
    logprob: Optional[float] = None  # log_softmax of the raw (temperature-1) logits at the chosen token
    top_logprobs: Optional[dict[str, float]] = None  # token text -> logprob, best first
    finish_reason: Optional[str] = None  # None, "stop" (EOS or stop string), "length"
    index: int = 0  # which of the request's n choices


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token's text (see `token_text`)
    logprob: float
    top_logprobs: dict[str, float]


@dataclass
class Completion:
    """One finished choice of a request."""

    prompt_tokens: int
    output_ids: list[int]  # every generated token, including the final EOS / the tokens of a stop string
    text: str  # EOS and special tokens excluded; truncated right before a stop string
    finish_reason: str  # "stop" or "length"
    logprobs: Optional[list[TokenLogprob]] = None  # one per output id when params.logprobs is not None
    index: int = 0
    request_id: str = ""


@dataclass
class MMInputs:
    """The images of one VL prompt, ready for the model (CPU tensors: it travels through the object store). The
    prompt's token ids already hold the expanded image placeholders (`models.vl.prompt.build_mm_inputs`)."""

    pixel_values: torch.Tensor  # [patches, C·patch²] from ErnieImageProcessor
    image_grid_thw: torch.Tensor  # [images, 3]
    mm_token_type_ids: list[int]  # per prompt token: 1 on image placeholders (3D positions)
    moe_mm_token_type_ids: list[int]  # per prompt token: 1 on image START/placeholders/END (vision experts)

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])


@dataclass
class PrefillResult:
    """Output of `Engine.prefill`: plain CPU tensors and Python data, so it pickles (Ray object store)."""

    prompt_ids: list[int]
    first: TokenEvent  # first generated token of choice 0 (sampled with the request's params/seed)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k [H, P, Dh], v [H, P, Dh]) of the P prompt tokens
    sampler_state: Any  # list (one per choice) of {"rng", "detok", "first", "output_ids", "logprobs"}
    params: SamplingParams
    rope_delta: int = 0  # VL prompts with images: position offset of the tokens after the prompt (3D RoPE)

    @property
    def firsts(self) -> list[TokenEvent]:
        """The first event of every choice (n of them)."""
        return [s["first"] for s in self.sampler_state]

    @property
    def kv_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)

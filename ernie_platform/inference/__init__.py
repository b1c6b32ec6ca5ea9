"""Inference engine for ERNIE 4.5 text and VL models: continuous batching over a KV slot pool with a token budget,
sampling, incremental detokenization and prefill/decode disaggregation (see docs/inference.md)."""

from ernie_platform.inference.async_engine import AsyncEngine
from ernie_platform.inference.detokenize import IncrementalDetokenizer
from ernie_platform.inference.engine import Engine
from ernie_platform.inference.outputs import Completion, MMInputs, PrefillResult, TokenEvent, TokenLogprob
from ernie_platform.inference.sampling import SamplingParams

__all__ = [
    "AsyncEngine",
    "Completion",
    "Engine",
    "IncrementalDetokenizer",
    "MMInputs",
    "PrefillResult",
    "SamplingParams",
    "TokenEvent",
    "TokenLogprob",
]

"""Inference: the engine over the MLA latent KV cache, and sampling."""

from .cache import LatentCache
from .engine import Engine
from .sampling import SamplingParams, apply_penalties, filter_logits, sample

__all__ = ["Engine", "LatentCache", "SamplingParams", "apply_penalties", "filter_logits", "sample"]

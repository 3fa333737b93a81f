"""Inference: sampling (and, to come, the engine with the latent KV cache)."""

from .sampling import SamplingParams, apply_penalties, filter_logits, sample

__all__ = ["SamplingParams", "apply_penalties", "filter_logits", "sample"]

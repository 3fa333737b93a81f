"""Reinforcement learning with verifiable rewards: GRPO (`leanseek rl`)."""

from .grpo import advantages, grpo_loss

__all__ = ["advantages", "grpo_loss"]

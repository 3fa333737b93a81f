"""Training: the DeepSeek-V3 losses and load-balancing rules a trainer calls."""

from .balance import expert_load, max_violation, sequence_balance_loss, update_correction_bias
from .losses import LossTerms, cross_entropy, training_loss

__all__ = ["LossTerms", "cross_entropy", "expert_load", "max_violation", "sequence_balance_loss", "training_loss",
           "update_correction_bias"]

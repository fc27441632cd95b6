"""Loss functions: pure functions of tensors, shared by the methods that train on them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Target id that contributes no loss (prompt tokens, padding), as in PyTorch and Hugging Face."""


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in nats over targets that are not IGNORE_INDEX.

    `logits` (B, T, V) are already aligned with `labels` (B, T): logits[:, t] predict labels[:, t].
    Computed in fp32 whatever the logits' dtype: bf16 log-softmax over a large vocabulary is not
    accurate enough for a loss.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def bits_per_byte(loss_sum_nats: float, num_bytes: int) -> float:
    """Convert a summed loss in nats to bits per UTF-8 byte, comparable across tokenizers."""
    return loss_sum_nats / max(num_bytes, 1) / torch.log(torch.tensor(2.0)).item()


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log-probability of each target under softmax(`logits` / temperature) (B, T, V), 0
    where the target is IGNORE_INDEX; aligned like `token_cross_entropy`, in fp32 for the same
    reason. RL scores samples drawn at a temperature under the same temperature (as TRL's
    `selective_log_softmax`).

    Computed as minus the per-token cross-entropy (PyTorch's fused kernel), so sequence
    log-probabilities for DPO and RL cost what the SFT loss costs.
    """
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    flat = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")
    return -flat.view(labels.shape)

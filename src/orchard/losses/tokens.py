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


LOGITS_PER_CHUNK = {"cpu": 2**21, "cuda": 2**26}
"""How many logits `linear_token_cross_entropy` and `linear_token_log_probs` compute at a time, by
device (rows of a chunk = this / vocabulary size): on the CPU 8 MiB of fp32 (256 rows of an 8k
vocabulary; a step of the 13.8M benchmark model is ~5% faster than with 1,024 rows); on a GPU 256
MiB, so that a 152k vocabulary still takes ~440 rows a chunk rather than a kernel launch per few
rows. Other devices take the CPU's."""


def _rows_per_chunk(weight: torch.Tensor) -> int:
    return max(1, LOGITS_PER_CHUNK.get(weight.device.type, LOGITS_PER_CHUNK["cpu"]) // weight.size(0))


def _target_rows(labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The indices of the rows with a target and their targets, followed by filler rows (row 0,
    target 0, to be ignored) up to a multiple of an eighth of a chunk of `step` rows (at most all the
    rows), and how many are real. The buffers of every batch then take one of a few sizes, which the
    CPU's allocator reuses: a size that changes with each batch's count of targets fragments glibc's
    heap (a compiled LoRA run grew ~60 MiB a step, benchmarks/finetune_methods.py). The filler costs
    at most an eighth of a chunk of logits."""
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    count = len(rows)
    quantum = max(1, step // 8)
    filler = min(-(-count // quantum) * quantum, len(labels)) - count
    rows = torch.cat([rows, rows.new_zeros(filler)])
    targets = labels[rows]
    targets[count:] = 0
    return rows, targets, count


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of softmax(hidden @ weight.T) without the (N, V) logits: the rows are
    taken a chunk at a time, and the gradients of hidden and weight are computed in the forward
    pass (as Liger-Kernel's fused linear cross-entropy does), so backward only scales them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
        step = _rows_per_chunk(weight)
        rows, y, count = _target_rows(labels, step)
        h, w = hidden[rows].to(dtype), weight.to(dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(rows), step):
            chunk, target, real = h[start:start + step], y[start:start + step], count - start
            # One pass reads the (n, V) logits in the compute dtype and writes fp32 log-probabilities.
            log_probs = torch.log_softmax(chunk @ w.T, dim=-1, dtype=torch.float32)
            total -= log_probs[:real].gather(1, target[:real, None]).sum()
            # d loss / d logits = softmax - one-hot, written over the log-probabilities in place.
            grad_logits = log_probs.exp_()
            grad_logits[torch.arange(len(target), device=target.device), target] -= 1.0
            grad_logits[real:] = 0.0  # the filler rows
            grad_logits = grad_logits.to(dtype)
            grad_h[start:start + step] = grad_logits @ w
            grad_w += (grad_logits.T @ chunk).float()
        grad_hidden = torch.zeros_like(hidden)
        grad_hidden[rows[:count]] = grad_h[:count].to(hidden.dtype)
        ctx.save_for_backward(grad_hidden, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None


def linear_token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`token_cross_entropy(hidden @ weight.T, labels)` without materialising the (..., V) logits:
    hidden (..., d) and labels (...) aligned as there, weight (V, d) the output projection's. Only
    the rows with a target are computed. The matmuls run in the autocast dtype when autocast is on
    (else hidden's), the softmax and the loss in fp32. Equal to the reference within rounding
    (tested to 1e-5 in fp32, loss and gradients)."""
    device = hidden.device.type
    # Every matmul inside takes inputs already in `dtype`, so an enclosing autocast changes nothing.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.size(-1)), weight, labels.reshape(-1), dtype)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in fp32; untouched (no pass over them) at temperature 1."""
    return logits if temperature == 1.0 else logits.float() / temperature


class _LinearLogProbs(torch.autograd.Function):
    """Per-token log-probabilities of softmax(hidden @ weight.T / temperature) without the (N, V)
    logits: a chunk of rows at a time, forward and again in backward (which needs the gradient of
    each token, unknown in the forward pass)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, dtype, temperature):
        step = _rows_per_chunk(weight)
        rows, y, count = _target_rows(labels, step)
        h, w = hidden[rows].to(dtype), weight.to(dtype)
        values = torch.empty(len(rows), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(rows), step):
            logits = _scaled(h[start:start + step] @ w.T, temperature)
            log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            values[start:start + step] = log_probs.gather(1, y[start:start + step, None]).squeeze(1)
        out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        out[rows[:count]] = values[:count]
        ctx.save_for_backward(hidden, weight, rows, y)
        ctx.dtype, ctx.temperature, ctx.count = dtype, temperature, count
        return out

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, rows, y = ctx.saved_tensors
        dtype, temperature, count = ctx.dtype, ctx.temperature, ctx.count
        h, w = hidden[rows].to(dtype), weight.to(dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        g = grad_output[rows].float()
        g[count:] = 0.0  # the filler rows add nothing
        step = _rows_per_chunk(weight)
        for start in range(0, len(rows), step):
            chunk, target, scale = h[start:start + step], y[start:start + step], g[start:start + step]
            # d log p(target) / d logits = (one-hot - softmax) / temperature, times each token's gradient:
            # one pass reads the logits and writes the softmax, one scales it in place, one casts it.
            grad_logits = torch.softmax(_scaled(chunk @ w.T, temperature), dim=-1, dtype=torch.float32)
            scale = scale / temperature
            grad_logits.mul_(-scale[:, None])
            grad_logits[torch.arange(len(target), device=target.device), target] += scale
            grad_logits = grad_logits.to(dtype)
            grad_h[start:start + step] = grad_logits @ w
            grad_w += (grad_logits.T @ chunk).float()
        grad_hidden = torch.zeros_like(hidden)
        grad_hidden[rows[:count]] = grad_h[:count].to(hidden.dtype)
        return grad_hidden, grad_w.to(weight.dtype), None, None, None


def linear_token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           temperature: float = 1.0) -> torch.Tensor:
    """`token_log_probs(hidden @ weight.T, labels, temperature)` without materialising the logits:
    (...) fp32 log-probabilities, 0 where the target is IGNORE_INDEX. Dtypes as in
    `linear_token_cross_entropy`; equal to the reference within rounding (tested)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    out = _LinearLogProbs.apply(hidden.reshape(-1, hidden.size(-1)), weight, labels.reshape(-1), dtype, temperature)
    return out.view(labels.shape)


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

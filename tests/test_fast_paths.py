"""The fast paths give the reference's numbers: the output projection fused with the loss (no
(N, vocab) logits) equals `token_cross_entropy` of the logits, in loss and gradients, alone and over
20 training steps of a model; fused with the per-token log-probabilities (DPO, RL) it equals
`token_log_probs`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import orchard.losses.tokens
from orchard.losses.tokens import (IGNORE_INDEX, linear_token_cross_entropy, linear_token_log_probs, token_cross_entropy,
                                   token_log_probs)
from orchard.model import CausalLM, ModelConfig


def inputs(seed: int = 0, rows: int = 300, width: int = 48, vocab: int = 1000):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * 0.1
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[::5] = IGNORE_INDEX
    return hidden, weight, labels


def loss_and_grads(function, hidden, weight, labels, autocast: bool = False):
    hidden, weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = function(hidden, weight, labels)
    (loss * 0.5).backward()
    return loss.detach(), hidden.grad, weight.grad


def reference(hidden, weight, labels):
    return token_cross_entropy(F.linear(hidden, weight), labels)


# One chunk (60 filler rows after the 240 targets), and many of 7 rows with a partial last one (5 filler rows).
@pytest.mark.parametrize("chunk", [2**22, 7000])
def test_fused_head_and_loss_equals_the_reference_in_fp32(monkeypatch, chunk):
    monkeypatch.setitem(orchard.losses.tokens.LOGITS_PER_CHUNK, "cpu", chunk)
    hidden, weight, labels = inputs()
    expected, fused = loss_and_grads(reference, hidden, weight, labels), \
        loss_and_grads(linear_token_cross_entropy, hidden, weight, labels)
    assert abs(fused[0] - expected[0]) <= 1e-5 * expected[0]
    for a, b in zip(expected[1:], fused[1:]):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert not fused[1][::5].any()  # rows without a target get no gradient


def test_fused_head_and_loss_under_bf16_autocast_tracks_the_reference():
    hidden, weight, labels = inputs(1)
    expected = loss_and_grads(reference, hidden, weight, labels, autocast=True)
    fused = loss_and_grads(linear_token_cross_entropy, hidden, weight, labels, autocast=True)
    assert fused[0].dtype == torch.float32 and abs(fused[0] - expected[0]) <= 1e-3 * expected[0]
    for a, b in zip(expected[1:], fused[1:]):
        assert (a - b).abs().max() <= 2e-2 * a.abs().max()


def test_fused_head_and_loss_with_no_target_is_zero():
    hidden, weight, labels = inputs(2)
    loss, hidden_grad, weight_grad = loss_and_grads(linear_token_cross_entropy, hidden, weight,
                                                    torch.full_like(labels, IGNORE_INDEX))
    assert loss == 0 and not hidden_grad.any() and not weight_grad.any()


def test_a_model_trains_the_same_through_the_fused_loss_for_20_steps():
    """Two copies of a model, one trained on `model(..., labels=)` (the fused head and loss), the
    other on `token_cross_entropy(model(...).logits)`: fp32 losses within 1e-5 at every one of 20
    AdamW steps, and gradients within 1e-5 (relative to the largest) at the first."""
    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    models = []
    for _ in range(2):
        model = CausalLM(config)
        model.reset_parameters(seed=0)
        models.append(model.train())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in models]
    generator = torch.Generator().manual_seed(0)
    for step in range(20):
        ids = torch.randint(0, 512, (4, 33), generator=generator)
        labels = ids[:, 1:].clone()
        labels[:, :5] = IGNORE_INDEX  # a prompt, as SFT masks it
        fused = models[0](ids[:, :-1], labels=labels)
        assert fused.logits is None
        plain = token_cross_entropy(models[1](ids[:, :-1]).logits, labels)
        assert abs(fused.loss.item() - plain.item()) <= 1e-5 * plain.item(), step
        fused.loss.backward()
        plain.backward()
        if step == 0:
            for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
                assert (a.grad - b.grad).abs().max() <= 1e-5 * b.grad.abs().max(), name
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_and_log_probs_equal_the_reference_in_fp32(monkeypatch, temperature):
    monkeypatch.setitem(orchard.losses.tokens.LOGITS_PER_CHUNK, "cpu", 7000)  # 7 rows a chunk, 5 filler rows
    hidden, weight, labels = inputs(3)
    labels = labels.view(12, 25)
    hidden = hidden.view(12, 25, -1)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(4))  # a gradient per token

    def run(function):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = function(h, w)
        (out * upstream).sum().backward()
        return out.detach(), h.grad, w.grad

    expected = run(lambda h, w: token_log_probs(F.linear(h, w), labels, temperature))
    fused = run(lambda h, w: linear_token_log_probs(h, w, labels, temperature))
    assert fused[0].shape == labels.shape and (fused[0][labels == IGNORE_INDEX] == 0).all()
    for a, b in zip(expected, fused):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def attention_and_grads(function, dtype):
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=generator).to(dtype).requires_grad_(True) for _ in range(3))
    upstream = torch.randn(2, 3, 40, 16, generator=generator).to(dtype)
    out = function(q, k, v)
    out.backward(upstream)
    return [t.float() for t in (out, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matmul_attention_equals_sdpa(dtype, tolerance, masked):
    """The CPU's matmul attention (bf16 training on short rows takes it, model/attention.py), causal
    and under a mask of packed documents with padding: output and the three gradients as SDPA's,
    within 1e-5 in fp32 and 2% in bf16 (relative to the largest value)."""
    from orchard.model.attention import _causal_bias, _MatmulAttention, document_mask

    documents = torch.tensor([[0] * 15 + [1] * 20 + [-1] * 5, [0] * 40])
    mask = document_mask(documents) if masked else None
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf")) if masked else _causal_bias(40, torch.device("cpu"))
    expected = attention_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                   is_causal=not masked), dtype)
    matmul = attention_and_grads(lambda q, k, v: _MatmulAttention.apply(q, k, v, bias), dtype)
    for a, b in zip(expected, matmul):
        assert (a - b).abs().max() <= tolerance * a.abs().max()


def test_bf16_training_on_short_rows_takes_the_matmul_attention(monkeypatch):
    """Eager bf16 training on rows of at most MATMUL_ATTENTION_MAX_LENGTH_EAGER tokens takes the
    matmul kernel, padded or not, and gives SDPA's loss within 1%; longer rows and fp32 keep SDPA."""
    import orchard.model.attention as kernels

    calls = []
    original = kernels._MatmulAttention.apply
    monkeypatch.setattr(kernels._MatmulAttention, "apply", lambda *a: calls.append(a[0].shape) or original(*a))
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = CausalLM(config)
    model.reset_parameters(seed=0)
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    padding = torch.ones(2, 32, dtype=torch.long)
    padding[0, :4] = 0

    def loss(length, attention_mask=None, autocast=True):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return model(ids[:, :length], attention_mask=attention_mask, labels=ids[:, 1:length + 1]).loss

    plain, padded = loss(32), loss(32, padding)
    assert len(calls) == 4  # 2 layers, twice
    monkeypatch.setattr(kernels, "MATMUL_ATTENTION_MAX_LENGTH_EAGER", 16)
    assert abs(loss(32).item() - plain.item()) < 0.01 * plain.item()
    assert abs(loss(32, padding).item() - padded.item()) < 0.01 * padded.item()
    loss(32, autocast=False)
    assert len(calls) == 4


def test_compiled_bf16_training_tracks_eager():
    """`train.compile` (the fused loss and, on the CPU in bf16, the matmul attention, compiled): the
    losses of 4 AdamW steps within 1% of an eager run's, and the first step's gradients within 3%."""
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    runs = []
    for compiled in (False, True):
        torch.compiler.reset()
        model = CausalLM(config)
        model.reset_parameters(seed=0)
        step_model = torch.compile(model) if compiled else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        losses, grads = [], None
        for _ in range(4):
            ids = torch.randint(0, 256, (4, 33), generator=generator)
            with torch.autocast("cpu", torch.bfloat16):
                loss = step_model(ids[:, :-1], labels=ids[:, 1:]).loss / ids[:, 1:].numel()
            loss.backward()
            grads = grads or [p.grad.clone() for p in model.parameters()]
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs.append((losses, grads))
    (eager, eager_grads), (compiled, compiled_grads) = runs
    assert max(abs(a - b) / a for a, b in zip(eager, compiled)) < 0.01, (eager, compiled)
    for a, b in zip(eager_grads, compiled_grads):
        assert (a - b).abs().max() <= 0.03 * a.abs().max()


def test_compiled_blocks_train_batches_of_any_shape_as_eager():
    """Regional compilation (`compiled_blocks`, train.compile for methods whose batches change
    shape): padded batches of four lengths train as eagerly (losses of 4 AdamW steps within 1%, the
    first step's gradients within 3%), with one compilation for every length, and the model runs
    eagerly again once the flag is off."""
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    runs = []
    for compiled in (False, True):
        torch.compiler.reset()
        torch._dynamo.utils.counters.clear()
        model = CausalLM(config)
        model.reset_parameters(seed=0)
        model.compiled_blocks = compiled
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        losses, grads = [], None
        for length in (17, 25, 33, 21):
            ids = torch.randint(0, 256, (4, length + 1), generator=generator)
            mask = torch.ones(4, length, dtype=torch.long)
            mask[0, :5] = 0  # a left-padded row
            labels = ids[:, 1:].masked_fill(mask == 0, IGNORE_INDEX)
            with torch.autocast("cpu", torch.bfloat16):
                loss = model(ids[:, :-1], attention_mask=mask, labels=labels).loss / (labels != IGNORE_INDEX).sum()
            loss.backward()
            grads = grads or [p.grad.clone() for p in model.parameters()]
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs.append((losses, grads, torch._dynamo.utils.counters["stats"]["unique_graphs"]))
    (eager, eager_grads, eager_graphs), (compiled, compiled_grads, compiled_graphs) = runs
    assert eager_graphs == 0 and compiled_graphs == 1
    assert max(abs(a - b) / a for a, b in zip(eager, compiled)) < 0.01, (eager, compiled)
    for a, b in zip(eager_grads, compiled_grads):
        assert (a - b).abs().max() <= 0.03 * a.abs().max()
    model.compiled_blocks = False
    torch._dynamo.utils.counters.clear()
    with torch.autocast("cpu", torch.bfloat16):
        model(ids[:, :-1], labels=labels).loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0

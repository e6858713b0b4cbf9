"""The chunked multi-exit objective against a plain full-logits reference."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from familial.config import FamilyConfig
from familial.model import FamilyModel
from familial.train.losses import (
    IGNORE_INDEX,
    count_targets,
    exit_loss_sum,
    family_loss_sums,
    total_objective,
)

VOCAB = 61


def tiny_family(shared_head: bool = False, seed: int = 0) -> FamilyModel:
    torch.manual_seed(seed)
    config = FamilyConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, exits=[0, 2, 3],
                          shared_head=shared_head, max_position_embeddings=64)
    return FamilyModel(config).double()


def batch(seed: int = 1, size: int = 3, length: int = 10, pad: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (size, length), generator=generator)
    labels = torch.randint(0, VOCAB, (size, length), generator=generator)
    if pad:
        labels[:, -pad:] = IGNORE_INDEX
        labels[0, :2] = IGNORE_INDEX
    return ids, labels


def reference(model, ids, labels, lambdas, distill=None):
    """Full logits per exit, F.cross_entropy (mean over targets), weighted sum."""
    logits = model(ids)
    deepest = model.config.exits[-1]
    total = 0.0
    mask = labels.reshape(-1) != IGNORE_INDEX
    for e, weight in lambdas.items():
        flat = logits[e].reshape(-1, VOCAB)
        total = total + weight * F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX)
        if distill and distill.get(e):
            teacher = F.log_softmax(logits[deepest].detach().reshape(-1, VOCAB)[mask], -1)
            student = F.log_softmax(flat[mask], -1)
            kl = F.kl_div(student, teacher, log_target=True, reduction="sum") / mask.sum()
            total = total + distill[e] * kl
    return total


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shared_head", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_multi_exit_loss_and_gradients_match_full_logits_reference(shared_head, chunk):
    model = tiny_family(shared_head)
    ids, labels = batch(pad=3)
    lambdas = {0: 0.5, 2: 0.8, 3: 1.0}
    distill = {0: 0.3, 2: 0.1}

    expected = reference(model, ids, labels, lambdas, distill)
    expected.backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)

    losses = family_loss_sums(model, ids, labels, lambdas, distill, chunk_size=chunk)
    got = total_objective(losses, count_targets(labels))
    got.backward()

    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    got_grads = grads(model)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-6, msg=name)


def test_float32_loss_matches_reference_to_1e6():
    model = tiny_family().float()
    ids, labels = batch(pad=2, size=4, length=16)
    lambdas = {0: 0.4, 2: 0.7, 3: 1.0}
    expected = reference(model, ids, labels, lambdas)
    got = total_objective(family_loss_sums(model, ids, labels, lambdas, chunk_size=9), count_targets(labels))
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_padding_positions_change_nothing():
    model = tiny_family()
    ids, labels = batch(pad=4)
    losses = family_loss_sums(model, ids, labels)
    assert all(loss.count == count_targets(labels) for loss in losses.values())
    # Changing padded inputs after the last target leaves every exit's sum unchanged.
    ids2 = ids.clone()
    ids2[:, -4:] = (ids2[:, -4:] + 1) % VOCAB
    again = family_loss_sums(model, ids2, labels)
    for e in losses:
        assert again[e].sums.ce.item() == pytest.approx(losses[e].sums.ce.item(), abs=1e-9)


def test_assistant_only_mask_counts_only_masked_targets():
    model = tiny_family()
    ids, labels = batch()
    masked = labels.clone()
    masked[:, :6] = IGNORE_INDEX  # a user turn: no targets
    loss = exit_loss_sum(model(ids, return_hidden=True)[3], model.exit_head(3), masked, 4)
    logits = model(ids)[3]
    expected = F.cross_entropy(logits[:, 6:].reshape(-1, VOCAB), labels[:, 6:].reshape(-1),
                               reduction="sum")
    assert loss.count == 3 * 4
    assert loss.sums.ce.item() == pytest.approx(expected.item(), abs=1e-9)


def test_accumulating_four_micro_batches_equals_one_big_batch():
    # Uneven padding per micro-batch: a mean of means would weight short ones too much.
    ids, labels = batch(seed=5, size=8, length=9)
    for i in range(4):
        labels[2 * i:2 * i + 2, 9 - 2 * i:] = IGNORE_INDEX
    lambdas = {0: 0.3, 2: 0.6, 3: 1.0}

    big = tiny_family()
    total_objective(family_loss_sums(big, ids, labels, lambdas), count_targets(labels)).backward()

    small = tiny_family()
    total = count_targets(labels)
    for i in range(4):
        part = slice(2 * i, 2 * i + 2)
        total_objective(family_loss_sums(small, ids[part], labels[part], lambdas), total).backward()
    for name, grad in grads(big).items():
        torch.testing.assert_close(grads(small)[name], grad, atol=1e-10, rtol=1e-9, msg=name)


def test_non_linear_head_takes_the_checkpointed_path_with_the_same_result():
    model = tiny_family()
    ids, labels = batch(pad=2)
    low_rank = model.factorize("lm_head", 8).double()
    dense = torch.nn.Linear(32, VOCAB, bias=False).double()
    dense.weight.data.copy_(low_rank.dense_weight())
    hidden = model(ids, return_hidden=True)[3].detach()
    first, second = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    got = exit_loss_sum(first, low_rank, labels, 5)
    want = exit_loss_sum(second, dense, labels, 5)
    got.objective.backward()
    want.objective.backward()
    assert got.count == want.count == count_targets(labels)
    assert got.sums.ce.item() == pytest.approx(want.sums.ce.item(), abs=1e-8)
    torch.testing.assert_close(first.grad, second.grad)
    assert low_rank.up.weight.grad is not None and low_rank.down.weight.grad is not None


def test_scaling_inside_the_loss_equals_dividing_after_it():
    ids, labels = batch(pad=2)
    lambdas, distill = {0: 0.5, 2: 0.8, 3: 1.0}, {0: 0.3}
    divided, scaled = tiny_family(), tiny_family()
    total = count_targets(labels)
    total_objective(family_loss_sums(divided, ids, labels, lambdas, distill, chunk_size=7), total).backward()
    losses = family_loss_sums(scaled, ids, labels, lambdas, distill, chunk_size=7, scale=1 / total)
    sum(part.objective for part in losses.values()).backward()
    for name, grad in grads(divided).items():
        torch.testing.assert_close(grads(scaled)[name], grad, atol=1e-12, rtol=1e-10, msg=name)


def _keep(saved: list, tensor: torch.Tensor) -> torch.Tensor:
    saved.append(tensor)
    return tensor


def test_gradients_formed_in_backward_equal_those_formed_in_forward_and_keep_no_head_gradient():
    # A shallow exit recomputes its logits in backward instead of saving a (vocab, hidden)
    # head gradient from forward to backward; the result is the same to rounding.
    model = tiny_family()
    ids, labels = batch(pad=2)
    hidden = model(ids, exits=[0, 3], return_hidden=True)
    head, teacher_head = model.exit_head(0), model.exit_head(3)
    results = {}
    for eager in (True, False):
        rows = hidden[0].detach().requires_grad_()
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_keep, saved), lambda t: t):
            loss = exit_loss_sum(rows, head, labels, 7, hidden[3].detach(), teacher_head, 0.7, 0.3, eager=eager)
        head.weight.grad = None
        loss.objective.backward()
        results[eager] = (loss.objective.detach(), rows.grad, head.weight.grad.clone())
        head_sized = [t for t in saved if t.shape == head.weight.shape and t.data_ptr() != head.weight.data_ptr()
                      and t.data_ptr() != teacher_head.weight.data_ptr()]
        assert bool(head_sized) == eager  # only the eager loss keeps a gradient of the head's size
    for got, want in zip(results[False], results[True]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)

"""Tests of the pure loss functions against hand computations on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tar_lightning.errors import ConfigError
from tar_lightning.losses import (
    causal_lm_loss,
    dpo_loss,
    entropy_position_mask,
    max_entropy_loss,
    mean_entropy,
    negative_ce_loss,
    random_mapping_loss,
    random_mapping_table,
    representation_distance,
    retain_loss,
    sequence_logprobs,
    token_entropy,
)

# --------------------------------------------------------------------------------------------- helpers


def py_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    log_z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - log_z for x in row]


def py_entropy(row: list[float]) -> float:
    return -sum(math.exp(lp) * lp for lp in py_log_softmax(row))


def py_cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def assert_finite_nonzero_grad(t: torch.Tensor) -> None:
    assert t.grad is not None
    assert torch.isfinite(t.grad).all()
    assert t.grad.abs().sum() > 0


# Two sequences of 4 positions over a vocabulary of 3; written out so hand computations can read them.
LOGITS = [
    [[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [3.0, -1.0, 0.2], [0.3, 0.1, -0.4]],
    [[-0.5, 1.5, 2.5], [2.0, 2.0, -2.0], [0.7, 0.0, 0.1], [1.0, 1.0, 1.0]],
]


def logits_tensor(dtype=torch.float32, requires_grad=False) -> torch.Tensor:
    return torch.tensor(LOGITS, dtype=dtype, requires_grad=requires_grad)


# --------------------------------------------------------------------------------------------- CE


def test_causal_lm_loss_matches_hand_computation():
    labels = torch.tensor([[-100, 2, 0, -100], [-100, -100, 1, 2]])
    # Shifted: logits[b, t] predicts labels[b, t + 1]; the labelled pairs are:
    pairs = [(LOGITS[0][0], 2), (LOGITS[0][1], 0), (LOGITS[1][1], 1), (LOGITS[1][2], 2)]
    expected = sum(-py_log_softmax(row)[y] for row, y in pairs) / len(pairs)
    loss = causal_lm_loss(logits_tensor(), labels)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert negative_ce_loss(logits_tensor(), labels).item() == pytest.approx(-expected, rel=1e-6)


def test_causal_lm_loss_equals_cross_entropy_on_manually_shifted_tensors():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    shift_logits = logits[:, :-1, :].reshape(-1, 11)
    shift_labels = labels[:, 1:].reshape(-1)
    expected = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)


def test_causal_lm_loss_equals_hf_model_loss():
    from tar_lightning.models import tiny_llama

    model, tok = tiny_llama()
    model.eval()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, len(tok), (2, 9), generator=g)
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(causal_lm_loss(out.logits, labels), out.loss.float(), rtol=1e-5, atol=1e-6)


def test_causal_lm_loss_all_ignored_is_zero_without_nan():
    logits = logits_tensor(requires_grad=True)
    labels = torch.full((2, 4), -100)
    loss = causal_lm_loss(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() == 0


def test_causal_lm_loss_gradient_flows():
    logits = logits_tensor(requires_grad=True)
    labels = torch.tensor([[0, 1, 2, 0], [1, 2, -100, 0]])
    causal_lm_loss(logits, labels).backward()
    assert_finite_nonzero_grad(logits)
    # The last position predicts nothing, so it gets no gradient.
    assert logits.grad[:, -1].abs().sum() == 0


def test_causal_lm_loss_bf16_close_to_fp32():
    labels = torch.tensor([[0, 1, 2, 0], [1, 2, -100, 0]])
    fp32 = causal_lm_loss(logits_tensor(), labels)
    bf16 = causal_lm_loss(logits_tensor(torch.bfloat16), labels)
    assert bf16.dtype == torch.float32 and bf16.dim() == 0
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


@pytest.mark.parametrize("fn", [causal_lm_loss, negative_ce_loss, sequence_logprobs])
def test_label_shape_mismatch_raises(fn):
    with pytest.raises(ConfigError, match="labels"):
        fn(logits_tensor(), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="logits"):
        fn(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long))


# --------------------------------------------------------------------------------------------- entropy


def test_token_entropy_matches_explicit_loop():
    ent = token_entropy(logits_tensor())
    assert ent.shape == (2, 4) and ent.dtype == torch.float32
    for b in range(2):
        for t in range(4):
            row = LOGITS[b][t]
            probs = [math.exp(x) / sum(math.exp(y) for y in row) for x in row]
            expected = -sum(p * math.log(p) for p in probs)
            assert ent[b, t].item() == pytest.approx(expected, rel=1e-6)
    # Uniform logits give the maximum, log V.
    assert ent[0, 1].item() == pytest.approx(math.log(3), rel=1e-6)


def test_token_entropy_gradient_is_correct():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(token_entropy, (x,))
    # Same gradient as autograd through the naive formula, for a non-uniform upstream gradient.
    weights = torch.randn(2, 3, dtype=torch.float64, generator=g)
    (token_entropy(x) * weights).sum().backward()
    y = x.detach().clone().requires_grad_(True)
    p = y.softmax(-1)
    (-(p * p.log()).sum(-1) * weights).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_token_entropy_double_backward_raises():
    # First-order only (TAR needs no second derivatives); a silent wrong Hessian would be worse than an error.
    x = logits_tensor(requires_grad=True)
    (grad,) = torch.autograd.grad(token_entropy(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_token_entropy_bf16_gradient_has_input_dtype():
    x = logits_tensor(torch.bfloat16, requires_grad=True)
    token_entropy(x).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad.float()).all()


def test_padding_masked_and_unmasked_entropy_differ():
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    selected = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    masked = sum(py_entropy(LOGITS[b][t]) for b, t in selected) / len(selected)
    unmasked = sum(py_entropy(LOGITS[b][t]) for b in range(2) for t in range(4)) / 8

    loss_masked = max_entropy_loss(logits_tensor(), attention_mask=attention_mask)
    loss_all = max_entropy_loss(logits_tensor(), attention_mask=attention_mask, positions="all")
    assert loss_masked.item() == pytest.approx(-masked, rel=1e-6)
    assert loss_all.item() == pytest.approx(-unmasked, rel=1e-6)
    assert abs(loss_masked.item() - loss_all.item()) > 1e-3


def test_attention_positions_without_mask_select_all():
    loss_none = max_entropy_loss(logits_tensor())
    loss_all = max_entropy_loss(logits_tensor(), positions="all")
    torch.testing.assert_close(loss_none, loss_all)


def test_labels_positions_select_only_answer_tokens():
    # Sequence 0 has answer tokens at positions 2 and 3, sequence 1 at position 3: the predicting positions
    # are t = 1, 2 and t = 2.
    labels = torch.tensor([[-100, -100, 1, 0], [-100, -100, -100, 2]])
    mask = entropy_position_mask(labels=labels, positions="labels")
    expected_mask = torch.tensor([[False, True, True, False], [False, False, True, False]])
    assert torch.equal(mask, expected_mask)

    expected = (py_entropy(LOGITS[0][1]) + py_entropy(LOGITS[0][2]) + py_entropy(LOGITS[1][2])) / 3
    loss = max_entropy_loss(logits_tensor(), labels=labels, positions="labels")
    assert loss.item() == pytest.approx(-expected, rel=1e-6)
    assert mean_entropy(logits_tensor(), labels=labels, positions="labels").item() == pytest.approx(
        expected, rel=1e-6
    )


def test_entropy_position_mask_all_and_attention():
    attention_mask = torch.tensor([[1, 0], [1, 1]])
    assert torch.equal(entropy_position_mask(attention_mask), attention_mask.bool())
    assert entropy_position_mask(attention_mask, positions="all").all()
    assert entropy_position_mask(positions="all", shape=(3, 2)).shape == (3, 2)


def test_max_entropy_loss_nothing_selected_is_zero_without_nan():
    logits = logits_tensor(requires_grad=True)
    loss = max_entropy_loss(logits, attention_mask=torch.zeros(2, 4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_max_entropy_loss_gradient_flows_and_step_raises_entropy():
    logits = logits_tensor(requires_grad=True)
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss = max_entropy_loss(logits, attention_mask=attention_mask)
    loss.backward()
    assert_finite_nonzero_grad(logits)
    assert logits.grad[1, 2:].abs().sum() == 0  # padding gets no gradient
    stepped = (logits - 0.1 * logits.grad).detach()
    assert max_entropy_loss(stepped, attention_mask=attention_mask) < loss


def test_mean_entropy_is_detached_positive_mean():
    logits = logits_tensor(requires_grad=True)
    value = mean_entropy(logits)
    assert not value.requires_grad and value.dim() == 0
    assert value.item() == pytest.approx(-max_entropy_loss(logits).item(), rel=1e-6)


def test_max_entropy_loss_bf16_close_to_fp32():
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    fp32 = max_entropy_loss(logits_tensor(), attention_mask)
    bf16 = max_entropy_loss(logits_tensor(torch.bfloat16), attention_mask)
    assert bf16.dtype == torch.float32 and bf16.dim() == 0
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


def test_entropy_bad_arguments_raise():
    with pytest.raises(ConfigError, match="positions"):
        max_entropy_loss(logits_tensor(), positions="padding")
    with pytest.raises(ConfigError, match="labels"):
        max_entropy_loss(logits_tensor(), positions="labels")
    with pytest.raises(ConfigError, match="shape"):
        entropy_position_mask(positions="all")
    with pytest.raises(ConfigError, match="attention_mask"):
        max_entropy_loss(logits_tensor(), attention_mask=torch.ones(2, 3))
    with pytest.raises(ConfigError, match="logits"):
        token_entropy(torch.zeros(4, 3))


# --------------------------------------------------------------------------------------------- DPO


def test_sequence_logprobs_matches_hand_sum():
    labels = torch.tensor([[-100, -100, 1, 0], [-100, 2, 2, -100]])
    expected = [
        py_log_softmax(LOGITS[0][1])[1] + py_log_softmax(LOGITS[0][2])[0],
        py_log_softmax(LOGITS[1][0])[2] + py_log_softmax(LOGITS[1][1])[2],
    ]
    logps = sequence_logprobs(logits_tensor(), labels)
    assert logps.shape == (2,) and logps.dtype == torch.float32
    assert logps.tolist() == pytest.approx(expected, rel=1e-6)
    # A sequence without a labelled token has log-prob 0.
    assert sequence_logprobs(logits_tensor(), torch.full((2, 4), -100)).tolist() == [0.0, 0.0]


def test_sequence_logprobs_bf16_close_and_gradient_flows():
    labels = torch.tensor([[-100, -100, 1, 0], [-100, 2, 2, -100]])
    fp32 = sequence_logprobs(logits_tensor(), labels)
    bf16 = sequence_logprobs(logits_tensor(torch.bfloat16), labels)
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=2e-2)
    logits = logits_tensor(requires_grad=True)
    sequence_logprobs(logits, labels).sum().backward()
    assert_finite_nonzero_grad(logits)


def test_dpo_loss_matches_formula():
    pc, pr = [-1.0, -3.0], [-2.0, -1.0]
    rc, rr = [-1.5, -2.0], [-1.5, -2.0]
    beta = 0.1
    # beta * ((pc - pr) - (rc - rr)) = 0.1 * (1 - 0) = 0.1 and 0.1 * (-2 - 0) = -0.2
    expected = (-math.log(1 / (1 + math.exp(-0.1))) - math.log(1 / (1 + math.exp(0.2)))) / 2
    loss, acc = dpo_loss(torch.tensor(pc), torch.tensor(pr), torch.tensor(rc), torch.tensor(rr), beta=beta)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Rewards: chosen 0.05 > rejected -0.05 (pair 0); chosen -0.1 < rejected 0.1 (pair 1).
    assert acc.item() == pytest.approx(0.5)
    assert not acc.requires_grad


def test_dpo_loss_gradient_only_reaches_policy():
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)
    pr = torch.tensor([-2.0, -1.0], requires_grad=True)
    rc = torch.tensor([-1.5, -2.0], requires_grad=True)
    rr = torch.tensor([-1.5, -2.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr)
    loss.backward()
    assert_finite_nonzero_grad(pc)
    assert_finite_nonzero_grad(pr)
    assert rc.grad is None and rr.grad is None
    # Minimising raises the chosen log-prob and lowers the rejected one.
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_dpo_loss_bf16_close_to_fp32():
    vals = [torch.tensor(v) for v in ([-10.0, -30.0], [-20.0, -12.0], [-11.5, -25.0], [-19.5, -14.0])]
    fp32, _ = dpo_loss(*vals)
    bf16, _ = dpo_loss(*(v.bfloat16() for v in vals))
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_dpo_loss_bad_beta_raises(beta):
    t = torch.zeros(2)
    with pytest.raises(ConfigError, match="beta"):
        dpo_loss(t, t, t, t, beta=beta)


def test_dpo_loss_shape_mismatch_raises():
    with pytest.raises(ConfigError, match="ref_rejected_logps"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(3))


# --------------------------------------------------------------------------------------------- retain

# Two layers, one sequence of 3 positions, hidden size 2.
H = [[[[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]], [[[0.5, 0.5], [1.0, -1.0], [2.0, 0.0]]]]
H_REF = [[[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]], [[[0.5, 0.5], [0.0, -1.0], [0.0, 2.0]]]]


def hidden(values, dtype=torch.float32, requires_grad=False):
    return tuple(torch.tensor(layer, dtype=dtype, requires_grad=requires_grad) for layer in values)


def py_distances(squared: bool) -> list[list[float]]:
    """Per-layer, per-position distances of H vs H_REF."""
    out = []
    for layer, ref_layer in zip(H, H_REF, strict=True):
        row = []
        for vec, ref in zip(layer[0], ref_layer[0], strict=True):
            sq = sum((a - b) ** 2 for a, b in zip(vec, ref, strict=True))
            row.append(sq if squared else math.sqrt(sq))
        out.append(row)
    return out


@pytest.mark.parametrize("squared", [False, True])
def test_representation_distance_matches_hand_computation(squared):
    d = py_distances(squared)  # layer 0: [2, 0, 5] (squared [4, 0, 25]); layer 1: [0, 1, 2*sqrt 2] ...
    expected_all = sum(sum(row) / 3 for row in d) / 2
    expected_masked = sum((row[0] + row[1]) / 2 for row in d) / 2
    dist = representation_distance(hidden(H), hidden(H_REF), squared=squared)
    assert dist.dim() == 0
    assert dist.item() == pytest.approx(expected_all, rel=1e-6)
    masked = representation_distance(hidden(H), hidden(H_REF), torch.tensor([[1, 1, 0]]), squared=squared)
    assert masked.item() == pytest.approx(expected_masked, rel=1e-6)


def test_squared_and_unsquared_distance_differ():
    assert py_distances(False)[0] == [2.0, 0.0, 5.0]
    plain = representation_distance(hidden(H), hidden(H_REF)).item()
    squared = representation_distance(hidden(H), hidden(H_REF), squared=True).item()
    assert squared > plain + 1.0


def test_representation_distance_gradient_and_detached_reference():
    hs = hidden(H, requires_grad=True)
    refs = hidden(H_REF, requires_grad=True)
    representation_distance(hs, refs, torch.tensor([[1, 1, 0]])).backward()
    assert_finite_nonzero_grad(hs[0])
    assert hs[0].grad[0, 2].abs().sum() == 0  # masked position
    assert all(r.grad is None for r in refs)


def test_representation_distance_zero_gap_has_finite_gradient():
    # At the start of TAR the model equals its reference, so h == h_ref exactly.
    hs = hidden(H, requires_grad=True)
    dist = representation_distance(hs, hidden(H))
    dist.backward()
    assert dist.item() == 0.0
    assert all(torch.isfinite(h.grad).all() for h in hs)


def test_representation_distance_bf16_close_to_fp32():
    fp32 = representation_distance(hidden(H), hidden(H_REF))
    bf16 = representation_distance(hidden(H, torch.bfloat16), hidden(H_REF, torch.bfloat16))
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


def test_representation_distance_mismatch_raises_with_both_sides():
    with pytest.raises(ConfigError, match=r"2 tensors.*1"):
        representation_distance(hidden(H), hidden(H_REF)[:1])
    bad_ref = (torch.zeros(1, 3, 2), torch.zeros(1, 3, 4))
    with pytest.raises(ConfigError, match=r"\(1, 3, 2\).*\(1, 3, 4\)"):
        representation_distance(hidden(H), bad_ref)
    with pytest.raises(ConfigError, match="attention_mask"):
        representation_distance(hidden(H), hidden(H_REF), torch.ones(1, 4))


def test_retain_loss_combines_ce_and_representation():
    logits = logits_tensor(requires_grad=True)
    labels = torch.tensor([[0, 1, 2, 0], [1, 2, -100, 0]])
    ce = causal_lm_loss(logits, labels).item()
    rep = sum(sum(row) / 3 for row in py_distances(False)) / 2

    loss, parts = retain_loss(logits, labels, hidden(H), hidden(H_REF), representation_weight=0.5)
    assert loss.item() == pytest.approx(ce + 0.5 * rep, rel=1e-6)
    assert set(parts) == {"ce", "representation"}
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["representation"].item() == pytest.approx(rep, rel=1e-6)
    assert not any(v.requires_grad for v in parts.values())
    loss.backward()
    assert_finite_nonzero_grad(logits)

    plain, plain_parts = retain_loss(logits, labels)
    assert plain.item() == pytest.approx(ce, rel=1e-6) and set(plain_parts) == {"ce"}


def test_retain_loss_bad_arguments_raise():
    labels = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ConfigError, match="representation_weight"):
        retain_loss(logits_tensor(), labels, hidden(H), hidden(H_REF), representation_weight=-1.0)
    with pytest.raises(ConfigError, match="hidden_states"):
        retain_loss(logits_tensor(), labels, None, hidden(H_REF))


# --------------------------------------------------------------------------------------------- random mapping


def test_random_mapping_table_is_reproducible_and_ignores_global_rng():
    torch.manual_seed(0)
    a = random_mapping_table(7, 5, seed=3)
    after_a = torch.rand(1)
    torch.manual_seed(123)
    b = random_mapping_table(7, 5, seed=3)
    torch.manual_seed(0)
    torch.rand(1)  # the table draw must not have advanced the global RNG
    assert torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after_a)
    assert not torch.equal(a, random_mapping_table(7, 5, seed=4))
    assert a.shape == (7, 5) and a.dtype == torch.float32 and not a.requires_grad
    # Roughly standard normal.
    big = random_mapping_table(200, 50)
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1.0) < 0.05
    bf16 = random_mapping_table(7, 5, seed=3, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, a.bfloat16())


def test_random_mapping_loss_matches_hand_computation():
    table = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    input_ids = torch.tensor([[0, 1, 2]])
    layer0 = [[2.0, 0.0], [1.0, 0.0], [-3.0, -3.0]]  # parallel, orthogonal, anti-parallel
    layer1 = [[1.0, 1.0], [1.0, -2.0], [0.5, 2.0]]
    hs = (torch.tensor([layer0]), torch.tensor([layer1]))
    rows = [table[i].tolist() for i in (0, 1, 2)]

    d0 = [1 - abs(py_cos(v, r)) for v, r in zip(layer0, rows, strict=True)]
    d1 = [1 - abs(py_cos(v, r)) for v, r in zip(layer1, rows, strict=True)]
    assert d0 == pytest.approx([0.0, 1.0, 0.0], abs=1e-9)
    expected = (sum(d0) / 3 + sum(d1) / 3) / 2
    assert random_mapping_loss(hs, input_ids, table).item() == pytest.approx(expected, rel=1e-6)

    mask = torch.tensor([[1, 0, 1]])
    expected_masked = ((d0[0] + d0[2]) / 2 + (d1[0] + d1[2]) / 2) / 2
    loss = random_mapping_loss(hs, input_ids, table, attention_mask=mask)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected_masked, rel=1e-6)


def test_random_mapping_antiparallel_vector_gives_zero():
    table = random_mapping_table(5, 4, seed=0)
    input_ids = torch.tensor([[3, 1]])
    h = -2.5 * table[input_ids]
    assert random_mapping_loss((h,), input_ids, table).item() == pytest.approx(0.0, abs=1e-6)


def test_random_mapping_loss_gradient_flows_and_bf16_close():
    table = random_mapping_table(6, 4, seed=1)
    input_ids = torch.tensor([[0, 5, 2], [1, 1, 3]])
    g = torch.Generator().manual_seed(5)
    hs = tuple(torch.randn(2, 3, 4, generator=g, requires_grad=True) for _ in range(3))
    loss = random_mapping_loss(hs, input_ids, table, attention_mask=torch.tensor([[1, 1, 1], [1, 0, 0]]))
    loss.backward()
    for h in hs:
        assert_finite_nonzero_grad(h)
        assert h.grad[1, 1:].abs().sum() == 0
    bf16 = random_mapping_loss(tuple(h.detach().bfloat16() for h in hs), input_ids, table.bfloat16())
    fp32 = random_mapping_loss(tuple(h.detach() for h in hs), input_ids, table)
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2, abs=1e-2)


def test_random_mapping_bad_arguments_raise():
    with pytest.raises(ConfigError, match="vocab_size"):
        random_mapping_table(0, 4)
    with pytest.raises(ConfigError, match="hidden_size"):
        random_mapping_table(4, -1)
    table = random_mapping_table(6, 4)
    input_ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="hidden_states"):
        random_mapping_loss((torch.zeros(1, 3, 5),), input_ids, table)
    with pytest.raises(ConfigError, match="input_ids"):
        random_mapping_loss((torch.zeros(1, 3, 4),), torch.zeros(1, 2, dtype=torch.long), table)

"""TARConfig.entropy_tokens: the max-entropy TR loss over candidate tokens only, where a candidate comes next."""

import copy
import math

import lightning as L
import numpy as np
import pytest
import torch
from conftest import random_bundle
from torch.utils.data import DataLoader

from tar_lightning import AdversaryConfig, ConfigError, TARConfig, TARModule
from tar_lightning.losses import CandidateTokens, entropy_position_mask, max_entropy_loss, mean_entropy
from tar_lightning.models import tiny_llama

CANDIDATES = [5, 9, 17, 23]


def answer_batch(vocab: int, seed: int = 0) -> dict:
    """Random text, labels on a span per row; some labelled next tokens are candidates, some are not."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(30, vocab, (3, 12), generator=g)
    ids[0, 4], ids[0, 5], ids[1, 7], ids[2, 2], ids[2, 9] = 9, 17, 5, 23, 9
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 4:7] = ids[0, 4:7]  # two candidates then a non-candidate
    labels[1, 6:9] = ids[1, 6:9]  # non-candidate, candidate, non-candidate
    labels[2, 2] = ids[2, 2]      # a candidate; ids[2, 9] is one too but not labelled
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hand_restricted_entropy_loss(model, batch, positions: str) -> torch.Tensor:
    """Minus the mean over (b, t) of H(softmax(logits[b, t, CANDIDATES])), written out position by position."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    entropies = []
    B, T = batch["input_ids"].shape
    for b in range(B):
        for t in range(T - 1):
            nxt = int(batch["labels"][b, t + 1])
            if positions == "labels" and nxt == -100:
                continue
            if positions == "attention" and batch["attention_mask"][b, t] == 0:
                continue
            if nxt not in CANDIDATES:
                continue
            z = torch.stack([logits[b, t, i] for i in CANDIDATES])
            p = torch.exp(z - torch.logsumexp(z, 0))
            entropies.append(-sum(p[j] * torch.log(p[j]) for j in range(len(CANDIDATES))))
    assert entropies, "the batch must select some positions"
    return -torch.stack(entropies).mean()


@pytest.mark.parametrize("positions", ["labels", "attention"])
def test_restricted_entropy_and_its_gradient_match_a_hand_computation(positions):
    model, tok = tiny_llama()
    model = model.double()
    reference = copy.deepcopy(model)
    cfg = TARConfig(inner_steps=1, tr_every=1, entropy_positions=positions, entropy_tokens=CANDIDATES)
    module = TARModule(model, cfg, tokenizer=tok)
    batch = answer_batch(len(tok))
    if positions == "attention":  # every attended position is labelled (padding excluded), as in random_bundle
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    loss, entropy = module.tr_loss(batch)
    expected = hand_restricted_entropy_loss(reference, batch, positions)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert 0 < float(entropy) <= math.log(len(CANDIDATES))
    grads = torch.autograd.grad(loss, list(module.model.parameters()))
    hand = torch.autograd.grad(expected, list(reference.parameters()))
    for (name, _), g, h in zip(module.model.named_parameters(), grads, hand, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    # not the full-vocabulary entropy
    full = TARModule(copy.deepcopy(reference), TARConfig(inner_steps=1, tr_every=1, entropy_positions=positions),
                     tokenizer=tok).tr_loss(batch)[0]
    assert abs(float(full.detach()) - float(loss.detach())) > 0.1


def test_a_batch_without_a_candidate_answer_gives_zero_with_a_graph():
    model, tok = tiny_llama()
    module = TARModule(model, TARConfig(inner_steps=1, tr_every=1, entropy_positions="labels",
                                        entropy_tokens=[1, 2]), tokenizer=tok)
    batch = answer_batch(len(tok))
    loss, _ = module.tr_loss(batch)
    assert float(loss) == 0.0 and loss.requires_grad


def _fit(module, batches):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=len(batches),
                        log_every_n_steps=1)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def test_fit_trains_on_the_restricted_entropy():
    """Through trainer.fit the logged TR entropy is the candidates' (at most log 4 nats), not the vocabulary's."""
    model, tok = tiny_llama()
    cfg = TARConfig(inner_steps=2, tr_every=1, entropy_tokens=CANDIDATES,
                    adversaries=[AdversaryConfig(name="sgd", data="forget", optimizer="sgd", lr=0.01)])
    module = TARModule(model, cfg, tokenizer=tok)
    bundle = random_bundle(len(tok), cfg.stream_steps(), batch=2, length=10, seed=3)
    bundle["tr"]["input_ids"][:, :, 4] = CANDIDATES[0]  # a candidate comes next at position 3 of every row
    bundle["tr"]["labels"][:, :, 4] = CANDIDATES[0]
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer = _fit(module, [bundle])
    entropy = float(trainer.callback_metrics["train/entropy_last"])
    assert 0 < entropy <= math.log(len(CANDIDATES)) + 1e-6
    assert math.log(len(tok)) - entropy > 1.0  # the full vocabulary's entropy of a fresh model is near log V
    assert any(not torch.equal(p.detach(), b) for p, b in zip(module.model.parameters(), before, strict=True))


def test_a_token_id_outside_the_vocabulary_is_a_clear_error():
    model, tok = tiny_llama()
    vocab = model.get_output_embeddings().weight.shape[0]
    cfg = TARConfig(inner_steps=1, tr_every=1, entropy_tokens=[3, vocab, vocab + 5])
    module = TARModule(model, cfg, tokenizer=tok)
    before = [p.detach().clone() for p in module.model.parameters()]
    bundle = random_bundle(len(tok), cfg.stream_steps(), batch=2, length=10)
    with pytest.raises(ConfigError, match=rf"TARConfig.entropy_tokens: token ids {vocab}, {vocab + 5} are not in "
                                          "the model's vocabulary"):
        _fit(module, [bundle])  # at fit start, every bad id named
    assert all(torch.equal(p, b) for p, b in zip(module.model.parameters(), before, strict=True))


@pytest.mark.parametrize(
    "value,match",
    [
        ([3], r"TARConfig.entropy_tokens=\[3\]: expected at least 2 token ids .*\(or null: the whole vocabulary\)"),
        ([3, 3], r"each token id once; repeated: \[3\]"),
        ([4, 3, 4, 5, 3], r"repeated: \[3, 4\]"),
        ([1, -2], r"integers >= 0\), got -2"),
        ([1, True], r"entropy_tokens\[1\] must be an integer"),
        ({"a": 1}, "entropy_tokens"),
    ],
)
def test_bad_entropy_tokens_are_clear_errors(value, match):
    with pytest.raises(ConfigError, match=match):
        TARConfig.from_dict({"entropy_tokens": value})


def test_entropy_tokens_need_the_max_entropy_loss():
    with pytest.raises(ConfigError, match="entropy_tokens.*tr_loss is 'neg_ce'"):
        TARConfig.from_dict({"entropy_tokens": [1, 2], "tr_loss": "neg_ce"})


def left_padded_batch(vocab: int) -> dict:
    """A left-padded row whose first real token is a labelled candidate: the padding position before it predicts
    it, so only the attention mask tells that position apart."""
    batch = answer_batch(vocab)
    batch["attention_mask"][1, :3] = 0
    batch["input_ids"][1, :3] = 0
    batch["input_ids"][1, 3] = CANDIDATES[2]
    batch["labels"][1, :] = -100
    batch["labels"][1, 3:5] = batch["input_ids"][1, 3:5]
    return batch


@pytest.mark.parametrize("positions", ["attention", "labels", "all"])
def test_the_position_mask_still_applies_with_candidates(positions):
    """``attention`` leaves out the padding position before the row's first real token; ``labels`` and ``all``
    keep it (its next token is a labelled candidate): the loss must match the hand computation for each."""
    model, tok = tiny_llama()
    model = model.double()
    cfg = TARConfig(inner_steps=1, tr_every=1, entropy_positions=positions, entropy_tokens=CANDIDATES)
    module = TARModule(copy.deepcopy(model), cfg, tokenizer=tok)
    batch = left_padded_batch(len(tok))
    loss, _ = module.tr_loss(batch)
    torch.testing.assert_close(loss, hand_restricted_entropy_loss(model, batch, positions), rtol=1e-10, atol=1e-12)
    if positions == "attention":  # the padding position changes the value when it is counted
        counted = hand_restricted_entropy_loss(model, batch, "all")
        assert abs(float(counted) - float(loss)) > 1e-6


def test_bf16_logits_give_the_fp32_value():
    """A bf16 model: the loss is reduced in fp32, close to the fp32 model's, and its backward runs."""
    model, tok = tiny_llama()
    batch = answer_batch(len(tok))
    cfg = TARConfig(inner_steps=1, tr_every=1, entropy_positions="labels", entropy_tokens=CANDIDATES)
    fp32, _ = TARModule(copy.deepcopy(model), cfg, tokenizer=tok).tr_loss(batch)
    half = TARModule(model.to(torch.bfloat16), cfg, tokenizer=tok)
    bf16, entropy = half.tr_loss(batch)
    assert bf16.dtype == torch.float32 and entropy.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=2e-2)
    bf16.backward()
    head = half.model.get_output_embeddings().weight.grad
    assert head.dtype == torch.bfloat16 and torch.isfinite(head).all() and head[CANDIDATES].abs().sum() > 0


def test_entropy_tokens_add_nothing_to_the_checkpoint():
    """The cached candidate index is not a registered buffer: it would land in every checkpoint (and a checkpoint
    of a plain run would then not load into a restricted one)."""
    model, tok = tiny_llama()
    plain = TARModule(copy.deepcopy(model), TARConfig(inner_steps=1, tr_every=1), tokenizer=tok)
    restricted = TARModule(model, TARConfig(inner_steps=1, tr_every=1, entropy_tokens=CANDIDATES), tokenizer=tok)
    restricted.tr_loss(answer_batch(len(tok)))  # after a TR loss, which built the index on the device
    assert restricted._entropy_tokens._index, "the TR loss must have used the module's cached index"
    assert restricted.state_dict().keys() == plain.state_dict().keys()
    restricted.load_state_dict(plain.state_dict())


def test_the_index_is_built_once_per_device_and_reused(monkeypatch):
    """The module's TR loss builds one index tensor per device, at its first call, and no tensor from the ids at
    any later call (a host-to-device copy per loss is a synchronisation on CUDA); same value as a plain list."""
    import tar_lightning.losses.entropy as entropy_module

    built = []
    real_tensor, real_as_tensor = torch.tensor, torch.as_tensor

    class Counting:  # the module's `torch`, with tensor construction counted
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def tensor(*args, **kwargs):
            built.append("tensor")
            return real_tensor(*args, **kwargs)

        @staticmethod
        def as_tensor(*args, **kwargs):
            built.append("as_tensor")
            return real_as_tensor(*args, **kwargs)

    model, tok = tiny_llama()
    cfg = TARConfig(inner_steps=1, tr_every=1, entropy_positions="labels", entropy_tokens=CANDIDATES)
    module = TARModule(model, cfg, tokenizer=tok)
    batch = answer_batch(len(tok))
    monkeypatch.setattr(entropy_module, "torch", Counting())
    first, _ = module.tr_loss(batch)
    assert built == ["tensor"]  # the index, once
    second, _ = module.tr_loss(answer_batch(len(tok), seed=1))
    third, _ = module.tr_loss(batch)
    assert built == ["tensor"], "a later TR loss built a tensor from the ids again"
    monkeypatch.undo()
    assert list(module._entropy_tokens._index) == [torch.device("cpu")]
    index = module._entropy_tokens.index("cpu")
    assert index.tolist() == CANDIDATES and index.dtype == torch.long
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    torch.testing.assert_close(first, max_entropy_loss(logits, batch["attention_mask"], batch["labels"], "labels",
                                                       tokens=list(CANDIDATES)))
    torch.testing.assert_close(third, first)
    assert float(first.detach()) != float(second.detach())


def test_an_index_first_built_under_inference_mode_still_trains():
    """Lightning validates under inference mode: an index cached there must not poison a later training step."""
    model, tok = tiny_llama()
    module = TARModule(model, TARConfig(inner_steps=1, tr_every=1, entropy_positions="labels",
                                        entropy_tokens=CANDIDATES), tokenizer=tok)
    batch = answer_batch(len(tok))
    with torch.inference_mode():
        module.tr_loss(batch)
    loss, _ = module.tr_loss(batch)
    loss.backward()
    assert module.model.get_output_embeddings().weight.grad[CANDIDATES].abs().sum() > 0


def test_copies_and_pickles_leave_the_cached_index_behind():
    import pickle

    tokens = CandidateTokens([4, 8, 15], name="mine")
    tokens.index("cpu")
    for copied in (copy.deepcopy(tokens), pickle.loads(pickle.dumps(tokens))):
        assert copied.ids == (4, 8, 15) and copied.name == "mine" and copied._index == {}
        assert copied.index("cpu").tolist() == [4, 8, 15]
    assert list(tokens._index) == [torch.device("cpu")]


@pytest.mark.parametrize(
    "tokens,match",
    [
        ([3], r"tokens: expected at least 2 token ids .*got 1"),
        ([], r"tokens: expected at least 2 token ids"),
        ([3, 7, 3], r"tokens: expected each token id once; repeated: \[3\]"),
        ([1, 2.0], r"tokens: expected token ids \(integers >= 0\), got 2.0"),
        ([1, True], r"tokens: expected token ids \(integers >= 0\), got True"),
        ([1, -4], r"got -4"),
        (torch.tensor(3), r"tokens: expected a 1-D integer tensor of token ids, got a 0-D torch.int64 tensor"),
        (torch.tensor([1.0, 2.0]), r"got a 1-D torch.float32 tensor"),
        (torch.tensor([[1, 2]]), r"got a 2-D torch.int64 tensor"),
        (torch.tensor([2, 2]), r"repeated: \[2\]"),
        (torch.tensor([True, False]), r"got a 1-D torch.bool tensor"),
        (np.array([1.0, 2.0]), r"expected a 1-D integer array of token ids, got a 1-D float64 array"),
        (np.array([[1, 2]]), r"got a 2-D int64 array"),
        ([1, np.int64(-3)], r"got np.int64\(-3\)"),
        (list(range(-12, 0)) + [5], r"got -12, -11, -10, -9, -8, -7, -6, -5, -4, -3, ... \(12 in all\)"),
        ("12", r"tokens: expected a list of token ids, got str"),
        ({1, 2}, r"tokens: expected a list of token ids, got set"),
    ],
)
def test_the_loss_functions_refuse_bad_candidate_lists(tokens, match):
    """Called directly (not through TARConfig), every function taking ``tokens=`` checks them the same way."""
    logits = torch.randn(2, 5, 40)
    labels = torch.randint(0, 40, (2, 5))
    for call in (lambda: max_entropy_loss(logits, None, labels, positions="labels", tokens=tokens),
                 lambda: mean_entropy(logits, None, labels, positions="labels", tokens=tokens),
                 lambda: entropy_position_mask(None, labels, "labels", tokens=tokens),
                 lambda: CandidateTokens(tokens)):
        with pytest.raises(ConfigError, match=match):
            call()


def test_a_tensor_an_array_or_a_range_of_ids_gives_the_list_value():
    logits = torch.randn(2, 5, 40, dtype=torch.float64)
    labels = torch.randint(0, 40, (2, 5))
    labels[:, 2] = 7
    from_list = max_entropy_loss(logits, None, labels, positions="labels", tokens=[7, 11, 30])
    from_tensor = max_entropy_loss(logits, None, labels, positions="labels", tokens=torch.tensor([7, 11, 30]))
    from_object = max_entropy_loss(logits, None, labels, positions="labels", tokens=CandidateTokens((7, 11, 30)))
    from_array = max_entropy_loss(logits, None, labels, positions="labels", tokens=np.array([7, 11, 30]))
    from_range = max_entropy_loss(logits, None, labels, positions="labels", tokens=range(7, 31, 23))  # 7, 30
    assert float(from_list) < 0
    for other in (from_tensor, from_object, from_array):
        torch.testing.assert_close(other, from_list, rtol=0, atol=0)
    torch.testing.assert_close(from_range, max_entropy_loss(logits, None, labels, "labels", tokens=[7, 30]))
    assert CandidateTokens([np.int64(7), 11]).ids == (7, 11) and type(CandidateTokens([np.int64(7), 11]).ids[0]) is int


def test_the_check_at_the_first_tr_loss_names_the_config_key():
    """Outside fit (or for a model without get_output_embeddings) the vocabulary is checked at the first TR loss;
    the error still names TARConfig.entropy_tokens, the key the user wrote."""
    model, tok = tiny_llama()
    vocab = model.get_output_embeddings().weight.shape[0]
    module = TARModule(model, TARConfig(inner_steps=1, tr_every=1, entropy_tokens=[2, vocab + 1]), tokenizer=tok)
    with pytest.raises(ConfigError, match=rf"^TARConfig.entropy_tokens: token id {vocab + 1} is not in the model's"):
        module.tr_loss(answer_batch(len(tok)))


def test_the_loss_function_names_every_bad_id_and_needs_labels():
    logits = torch.randn(2, 5, 40)
    labels = torch.full((2, 5), -100)
    with pytest.raises(ConfigError, match="tokens: token ids 40, 41 are not in the model's vocabulary"):
        max_entropy_loss(logits, None, labels, positions="labels", tokens=[1, 40, 41])
    with pytest.raises(ConfigError, match="tokens .*need labels"):
        max_entropy_loss(logits, None, None, positions="attention", tokens=[1, 2])
    with pytest.raises(ConfigError, match="tokens .*need labels"):
        entropy_position_mask(None, None, "all", shape=(2, 5), tokens=[1, 2])

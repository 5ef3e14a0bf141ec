"""Packing, prefix sharing and chunked log-probs change nothing: per-sequence log-probs, the loss and the
gradient of every parameter equal the padded full-logits computation, for DPO, KTO and ORPO batches with
very different lengths and a multi-turn prompt.

In float64, transformers' LlamaRMSNorm still computes in float32 (it casts its input). Forward values stay
identical, but prefix sharing adds the gradients of a shared prompt token BEFORE that float32 backward
(instead of after it), which moves them by ~1e-7 relative. The float64 tests therefore run the norm in
the input dtype (`float64_norm`), so that any layout error shows up far above rounding (tolerance 1e-9);
`test_float32_model_as_shipped` checks the unmodified model in float32 to 1e-5 (relative).
"""

import pytest
import torch

from reinforge.data.collate import PairedCollator, UnpairedCollator
from reinforge.data.packing import PackedCollator
from reinforge.models.forward import SEGMENT_ATTENTION, LogpsModel
from reinforge.training.objectives import DPOObjective, KTOObjective, ORPOObjective

PAD = 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: one thread is faster, and avoids stalls when other processes share the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def float64_norm(monkeypatch):
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


VOCAB = 512  # token ids are renumbered compactly (`_compact`): a 49k-vocabulary head would dominate the run time


def _load(seed, dtype=torch.float64, attn="sdpa"):
    """A random 2-layer Llama (GQA, tied embeddings) with a small vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=PAD, attn_implementation=attn)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def _compact(rows):
    """Renumber the token ids of rows into 3..VOCAB-1, keeping equal ids equal (so shared prompts stay shared)."""
    ids = sorted({t for r in rows for k, v in r.items() if k.endswith("_ids") for t in v})
    assert len(ids) <= VOCAB - 3
    new = {t: i + 3 for i, t in enumerate(ids)}
    return [{k: ([new[t] for t in v] if k.endswith("_ids") else v) for k, v in r.items()} for r in rows]


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    multi_turn = [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven."},
                  {"role": "user", "content": "And one larger than one hundred, please, with a short reason?"}]
    single = [{"role": "user", "content": "Hi"}]
    render = lambda m: _encode(tokenizer, tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False))
    return {"multi": render(multi_turn), "single": render(single), "short": _encode(tokenizer, "Q:"),
            "one": _encode(tokenizer, "x")[:1]}


def _comp(tokenizer, text):
    return _encode(tokenizer, text + "<|im_end|>")


@pytest.fixture(scope="module")
def paired_rows(prompts, tokenizer):
    c = lambda t: _comp(tokenizer, t)
    return _compact([
        {"prompt_ids": prompts["multi"], "chosen_ids": c("101, since it has no divisor but 1 and itself."),
         "rejected_ids": c("100")},
        {"prompt_ids": prompts["short"], "chosen_ids": c("A"), "rejected_ids": c("A long and winding answer that "
                                                                                  "goes on and on for a while.")},
        {"prompt_ids": prompts["one"], "chosen_ids": c("yes"), "rejected_ids": c("no, not at all")},
        {"prompt_ids": prompts["single"], "chosen_ids": c("Hello! How can I help?"), "rejected_ids": c("Go away.")},
    ])


@pytest.fixture(scope="module")
def unpaired_rows(paired_rows):
    # completions of very different lengths; KL sequences pair each prompt with the previous completion
    keys = ("chosen_ids", "rejected_ids", "chosen_ids", "rejected_ids")
    return [{"prompt_ids": r["prompt_ids"], "completion_ids": r[k], "label": i % 2 == 0}
            for i, (r, k) in enumerate(zip(paired_rows, keys))]


# (packing capacity, share prefix): None/False = the padded collator
LAYOUTS = {
    "padded": (None, False),
    "packed-one-row": (10**6, False),
    "packed-rows-of-48": (48, False),
    "shared": (None, True),
    "packed-shared-one-row": (10**6, True),
    "packed-shared-rows-of-64": (64, True),
}


def _collator(kind, layout):
    inner = PairedCollator(PAD) if kind == "paired" else UnpairedCollator(PAD)
    capacity, share = LAYOUTS[layout]
    if capacity is None and not share:
        return inner
    return PackedCollator(inner, PAD, capacity=capacity, share_prefix=share)


def _step(policy, reference, objective, batch, chunked, segment_attention):
    """(policy logps, loss, gradients of every policy parameter) of one objective step."""
    module = LogpsModel(policy, chunk_size=64, chunked=chunked, segment_attention=segment_attention)
    ref_module = LogpsModel(reference, chunk_size=64, chunked=chunked, segment_attention=segment_attention)
    out = module(**batch)
    ref = None
    if objective.needs_reference:
        with torch.no_grad():
            ref = ref_module(**batch)["logps"]
    loss, _ = objective(out, ref, batch)
    grads = torch.autograd.grad(loss, [p for p in policy.parameters()])
    return out, loss.detach(), grads


# every (chunked log-probs, segment attention) combination on every layout
PATHS = [(True, True), (True, False), (False, True), (False, False)]

METHODS = {
    "dpo": ("paired", lambda: DPOObjective(beta=0.1)),
    "kto": ("unpaired", lambda: KTOObjective(beta=0.1)),
    "orpo": ("paired", lambda: ORPOObjective(alpha=0.1)),
}


def _assert_same(got, want, atol, rtol=0.0):
    (out, loss, grads), (out0, loss0, grads0) = got, want
    assert torch.allclose(out["logps"], out0["logps"], atol=atol, rtol=rtol)
    assert torch.allclose(out["token_logps"], out0["token_logps"], atol=atol, rtol=rtol)
    assert torch.equal(out["token_seq"], out0["token_seq"])
    assert torch.allclose(loss, loss0, atol=atol, rtol=rtol)
    for g, g0 in zip(grads, grads0):
        scale = float(g0.abs().max()) if rtol else 1.0
        assert torch.allclose(g, g0, atol=atol * max(scale, 1.0), rtol=rtol)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_layout_and_logprob_path_equals_padded_full_logits(method, paired_rows,
                                                                 unpaired_rows, float64_norm):
    kind, make = METHODS[method]
    rows = paired_rows if kind == "paired" else unpaired_rows
    policy, reference = _load(0), _load(1)
    objective = make()
    want = _step(policy, reference, objective, _collator(kind, "padded")(rows), chunked=False, segment_attention=False)
    assert policy.config._attn_implementation == "sdpa"
    lengths = want[0]["logps"].new_tensor(_collator(kind, "padded")(rows)["n_tokens"].tolist())
    assert float(lengths.max()) >= 5 * float(lengths.min())  # very different lengths
    for layout in LAYOUTS:
        batch = _collator(kind, layout)(rows)
        if LAYOUTS[layout][1]:
            assert "branch_ids" in batch  # some prompt really is shared
        for chunked, segment_attention in PATHS:
            got = _step(policy, reference, objective, batch, chunked, segment_attention)
            assert policy.config._attn_implementation == (SEGMENT_ATTENTION if segment_attention else "sdpa")
            try:
                _assert_same(got, want, atol=1e-9)
            except AssertionError as e:
                raise AssertionError(f"{method} {layout} chunked={chunked} segment={segment_attention}") from e


@pytest.mark.parametrize("layout", ["packed-rows-of-48", "packed-shared-rows-of-64"])
def test_eager_attention_packed_and_shared(layout, paired_rows, float64_norm):
    """Eager attention: packing through transformers' packed position ids, prefix sharing through a 4-D additive mask."""
    policy, reference = _load(0, attn="eager"), _load(1, attn="eager")
    objective = DPOObjective(beta=0.1)
    want = _step(policy, reference, objective, _collator("paired", "padded")(paired_rows), False, True)
    got = _step(policy, reference, objective, _collator("paired", layout)(paired_rows), True, True)
    assert policy.config._attn_implementation == "eager"  # segment attention only replaces sdpa
    _assert_same(got, want, atol=1e-6, rtol=1e-6)  # eager attention takes its softmax in float32


def test_float32_model_as_shipped(paired_rows):
    policy, reference = _load(0, torch.float32), _load(1, torch.float32)
    objective = DPOObjective(beta=0.1)
    want = _step(policy, reference, objective, _collator("paired", "padded")(paired_rows), False, False)
    got = _step(policy, reference, objective, _collator("paired", "packed-shared-one-row")(paired_rows), True, True)
    _assert_same(got, want, atol=1e-5, rtol=1e-5)


def test_segment_attention_is_plain_sdpa_for_ordinary_batches():
    """With the model switched to reinforge_sdpa, padded batches and generation are unchanged."""
    model = _load(0)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, PAD, PAD, PAD]])
    mask = (ids != PAD).long()
    before = model(input_ids=ids, attention_mask=mask).logits
    gen0 = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    LogpsModel(model)
    assert model.config._attn_implementation == SEGMENT_ATTENTION
    after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False), gen0)


def test_token_logps_come_sequence_by_sequence(paired_rows):
    model = _load(0)
    batch = _collator("paired", "packed-shared-one-row")(paired_rows)
    out = LogpsModel(model)(**batch)
    seq = out["token_seq"]
    assert bool((seq[1:] >= seq[:-1]).all())
    assert torch.bincount(seq, minlength=8).tolist() == batch["n_tokens"].tolist()


def test_log_sum_sq_probs_for_wpo(paired_rows, float64_norm):
    """`token_log_sum_sq_probs` = log Σ_v p_v² (by hand from the logits), the same for every layout and path,
    without gradient; the WPO objective's loss and gradients do not depend on the layout either. (LogpsModel
    computes log Σ p² in float32, hence the 1e-5 and 1e-6 tolerances.)"""
    policy, reference = _load(0), _load(1)
    padded = _collator("paired", "padded")(paired_rows)
    full = LogpsModel(policy, chunked=False, segment_attention=False, log_sum_sq=True)(**padded)
    with torch.no_grad():
        logits = policy(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    probs = logits[padded["targets"] != -100].softmax(-1)
    assert torch.allclose(full["token_log_sum_sq_probs"], probs.pow(2).sum(-1).log(), atol=1e-5, rtol=0)
    assert not full["token_log_sum_sq_probs"].requires_grad
    objective = DPOObjective(beta=0.1, use_weighting=True)

    def wpo(batch, chunked):
        module = LogpsModel(policy, chunk_size=7, chunked=chunked, log_sum_sq=True)
        out = module(**batch)
        with torch.no_grad():
            ref = LogpsModel(reference)(**batch)["logps"]
        loss, _ = objective(out, ref, batch)
        return out["token_log_sum_sq_probs"], loss, torch.autograd.grad(loss, list(policy.parameters()))

    lssp0, loss0, grads0 = wpo(padded, False)
    assert torch.equal(lssp0, full["token_log_sum_sq_probs"])
    lssp, loss, grads = wpo(_collator("paired", "packed-shared-one-row")(paired_rows), True)
    assert torch.allclose(lssp, lssp0, atol=1e-5, rtol=0) and torch.allclose(loss, loss0, atol=1e-6, rtol=0)
    for g, g0 in zip(grads, grads0):
        assert torch.allclose(g, g0, atol=1e-6, rtol=0)


def test_reference_forward_keeps_no_activations(paired_rows):
    """The reference runs under no_grad (`models.loading.Reference`), both as a frozen copy and as the
    adapter-disabled policy: its outputs carry no graph."""
    from peft import LoraConfig, get_peft_model

    from reinforge.models.loading import Reference

    batch = _collator("paired", "packed-shared-one-row")(paired_rows)
    frozen = Reference(model=LogpsModel(_load(1)))
    with frozen.active(None) as module:
        out = module(**batch)
    assert out["logps"].grad_fn is None and not out["logps"].requires_grad
    peft_model = get_peft_model(_load(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    policy = LogpsModel(peft_model)
    with Reference(policy=peft_model).active(policy) as module:
        out = module(**batch)
    assert out["logps"].grad_fn is None
    assert policy(**batch)["logps"].grad_fn is not None  # the policy itself does build a graph


def test_gradient_checkpointing_packed_and_shared(paired_rows, float64_norm):
    """With gradient checkpointing the decoder layers are recomputed in backward: the layout kwargs must reach
    the recomputation too (they do: they are arguments of the checkpointed call)."""
    policy, reference = _load(0), _load(1)
    objective = DPOObjective(beta=0.1)
    want = _step(policy, reference, objective, _collator("paired", "padded")(paired_rows), False, False)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    got = _step(policy, reference, objective, _collator("paired", "packed-shared-one-row")(paired_rows), True, True)
    _assert_same(got, want, atol=1e-9)


@pytest.mark.parametrize("layout", ["shared", "packed-shared-one-row", "packed-rows-of-48"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_micro_batches_shared_equal_padded(layout, loss_type, paired_rows, float64_norm):
    """A GRPO rollout (2 prompts × 3 completions of very different lengths, one a multi-turn prompt), cut into
    micro-batches as the online loop does and laid out as `batch_layout` does: per-token log-probs, entropy, the
    clipped-surrogate + k3 loss and every parameter gradient equal those of the padded rows."""
    from reinforge.algorithms.aggregation import aggregate_loss
    from reinforge.algorithms.policy_losses import policy_loss_terms
    from reinforge.data.collate import pad_sequences
    from reinforge.data.packing import relayout
    from reinforge.rollout.prepare import RolloutBatch, per_token

    comps = [r[k] for r in paired_rows for k in ("chosen_ids", "rejected_ids")]
    seqs = [(paired_rows[0]["prompt_ids"] + c, len(paired_rows[0]["prompt_ids"])) for c in comps[:3]]
    seqs += [(paired_rows[3]["prompt_ids"] + c, len(paired_rows[3]["prompt_ids"])) for c in comps[3:6]]
    batch = pad_sequences(seqs, PAD)
    n = batch["n_tokens"]
    T = int(n.max())
    mask = torch.arange(T).unsqueeze(0) < n.unsqueeze(1)
    gen = torch.Generator().manual_seed(3)
    advantages = torch.randn(6, generator=gen, dtype=torch.float64)
    old = torch.randn(6, T, generator=gen, dtype=torch.float64) * 0.3 - 3.0
    ref = old + torch.randn(6, T, generator=gen, dtype=torch.float64) * 0.1
    rollout = RolloutBatch(batch, mask, advantages, old * mask, ref * mask, {}, loss_tokens=float(mask.sum()))
    policy = _load(0)
    module = LogpsModel(policy, chunk_size=16)
    capacity, share = LAYOUTS[layout]

    def run(layout_fn):
        losses, grads = [], None
        for start in (0, 3):  # two micro-batches of 3 completions: one prompt group each
            mb = rollout.micro_batch(start, 3)
            out = module(**layout_fn(mb.batch), temperature=0.8, stats=("entropy",))
            logps = per_token(out, mb.batch["n_tokens"])
            terms = policy_loss_terms(logps, mb.advantages, mb.mask, epsilon_low=0.2, epsilon_high=0.28,
                                        old_per_token_logps=mb.old_logps, beta=0.04, ref_per_token_logps=mb.ref_logps)
            loss = aggregate_loss(terms.per_token_loss, mb.mask, loss_type, num_items_in_batch=rollout.loss_tokens)
            g = torch.autograd.grad(loss, list(policy.parameters()))
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            losses.append((loss.detach(), logps.detach(), per_token(out, mb.batch["n_tokens"], "token_entropy")))
        return losses, grads

    want_losses, want_grads = run(lambda b: b)
    shared_batch = relayout(rollout.micro_batch(0, 3).batch, PAD, capacity, share)
    if share:
        assert "branch_ids" in shared_batch and shared_batch["input_ids"].shape[0] == 1  # one prompt, 3 branches
    got_losses, got_grads = run(lambda b: relayout(b, PAD, capacity, share))
    for (l, lp, e), (l0, lp0, e0) in zip(got_losses, want_losses):
        assert torch.allclose(l, l0, atol=1e-9) and torch.allclose(lp, lp0, atol=1e-9) and torch.allclose(e, e0, atol=1e-9)
    for g, g0 in zip(got_grads, want_grads):
        assert torch.allclose(g, g0, atol=1e-9)

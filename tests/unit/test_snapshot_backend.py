"""SnapshotBackend / SnapshotSync: sampling from a frozen copy of the policy's weights, safe in a background thread.

Tiny random Llama models built on the fly (hidden 32, 2 layers, vocab 100), plain and peft LoRA (B non-zero).
"""

from __future__ import annotations

import threading

import pytest
import torch

from reinforge.rollout.inprocess import cut_at_eos
from reinforge.rollout.snapshot import SnapshotBackend, SnapshotSync
from reinforge.rollout.types import SamplingParams

PAD = 0
PROMPTS = [[5, 17, 33, 8, 41, 9, 12], [3, 61], [70, 22, 90, 14]]  # different lengths: left padding exercised


def tiny_llama(seed: int = 0, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                         pad_token_id=PAD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    return model


def lora_policy(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(params=["full", "lora"])
def policy(request):
    model = lora_policy() if request.param == "lora" else tiny_llama()
    model.train()
    return model


def hf_greedy(model, prompts, max_new_tokens, eos, **kwargs):
    """HF generate(do_sample=False) on the policy, left-padded, cut at the first EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=PAD, **kwargs)
    model.train(was_training)
    return cut_at_eos(out[:, width:].tolist(), eos or [])


def make_backend(policy, eos, dtype=torch.float32, max_batch=64, version=0):
    sync = SnapshotSync(dtype=dtype)
    sync.push(policy, version)
    return SnapshotBackend(sync, PAD, eos, max_batch=max_batch), sync


def pick_eos(policy) -> list[int]:
    """An EOS id the greedy continuation of the first prompt reaches early, so both EOS-cut and truncated rows occur."""
    (row,), _ = hf_greedy(policy, PROMPTS[:1], 12, None)
    return [row[3]]


def policy_logits(policy, prompt, completion):
    """Plain policy forward over prompt + completion: logits predicting each completion token, [len(c), V]."""
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    policy.train(was_training)
    return logits[len(prompt) - 1: len(prompt) + len(completion) - 1]


def test_greedy_matches_hf_generate(policy):
    eos = pick_eos(policy)
    backend, _ = make_backend(policy, eos, max_batch=4)  # 6 sequences: two batches
    expected_ids, expected_trunc = hf_greedy(policy, PROMPTS, 12, eos)
    out = backend.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=12, top_k=1), seed=0)
    assert out.completion_ids == [c for c in expected_ids for _ in range(2)]
    assert out.truncated == [t for t in expected_trunc for _ in range(2)]
    assert any(out.truncated) and not all(out.truncated)
    assert all(len(lp) == len(c) for lp, c in zip(out.logprobs, out.completion_ids))
    assert all(abs(v) < 1e-6 for lp in out.logprobs for v in lp)  # top_k = 1: a point mass
    out.check(6, "snapshot")


def test_repetition_penalty_matches_hf_generate():
    policy = tiny_llama()
    backend, _ = make_backend(policy, [99])
    expected, _ = hf_greedy(policy, PROMPTS, 10, [99], repetition_penalty=1.5)
    out = backend.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=10, top_k=1, repetition_penalty=1.5), seed=0)
    assert out.completion_ids == expected
    assert out.completion_ids != hf_greedy(policy, PROMPTS, 10, [99])[0]  # the penalty changed something


def test_logprobs_are_the_processed_distribution(policy):
    eos = pick_eos(policy)
    backend, _ = make_backend(policy, eos)
    out = backend.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=10, temperature=0.7, top_p=1.0), seed=1)
    out_k = backend.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=10, temperature=0.7, top_k=5), seed=1)
    for i, (ids, lps) in enumerate(zip(out.completion_ids, out.logprobs)):
        logits = policy_logits(policy, PROMPTS[i // 3], ids)
        expected = torch.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-5, rtol=0)
    for i, (ids, lps) in enumerate(zip(out_k.completion_ids, out_k.logprobs)):
        scaled = policy_logits(policy, PROMPTS[i // 3], ids) / 0.7
        top = scaled.topk(5, dim=-1)
        chosen = torch.tensor(ids)[:, None]
        assert (top.indices == chosen).any(-1).all()  # every sampled token is inside the top 5
        expected = scaled.gather(1, chosen).squeeze(1) - torch.logsumexp(top.values, -1)
        torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-5, rtol=0)


def test_seeds_batching_threads_and_global_rng():
    policy = lora_policy()
    backend, _ = make_backend(policy, [99], max_batch=64)
    params = SamplingParams(n=4, max_new_tokens=8, temperature=1.0, top_p=0.95)
    rng = torch.get_rng_state()
    a = backend.generate(PROMPTS, params, seed=7)
    b = backend.generate(PROMPTS, params, seed=7)
    c = backend.generate(PROMPTS, params, seed=8)
    backend.generate(PROMPTS, params, seed=None)
    assert torch.equal(rng, torch.get_rng_state())  # torch's global RNG is neither used nor changed
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    assert a.completion_ids != c.completion_ids
    assert len({tuple(x) for x in a.completion_ids[:4]}) > 1  # the n completions of a prompt differ
    for max_batch in (1, 5):
        other = SnapshotBackend(backend.sync, PAD, [99], max_batch=max_batch).generate(PROMPTS, params, seed=7)
        assert other.completion_ids == a.completion_ids
        for x, y in zip(other.logprobs, a.logprobs):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", backend.generate(PROMPTS, params, seed=7)))
    thread.start()
    thread.join()
    assert result["out"].completion_ids == a.completion_ids and result["out"].logprobs == a.logprobs


def test_new_weights_only_after_push():
    policy = lora_policy()
    policy.train()
    backend, sync = make_backend(policy, [99], version=0)
    params = SamplingParams(n=1, max_new_tokens=8, top_k=1)
    old = backend.generate(PROMPTS, params, seed=0).completion_ids
    assert old == hf_greedy(policy, PROMPTS, 8, [99])[0]
    module, first_param = sync.model, next(sync.model.parameters()).data_ptr()

    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=5.0)
    target = torch.tensor([p + [4] * 6 for p in PROMPTS[:1]])
    loss = -torch.log_softmax(policy(input_ids=target).logits, -1)[0, len(PROMPTS[0]) - 1:-1, 4].mean()
    loss.backward()
    optimizer.step()
    updated = hf_greedy(policy, PROMPTS, 8, [99])[0]
    assert updated != old  # the step changed the greedy continuation

    assert backend.generate(PROMPTS, params, seed=0).completion_ids == old  # still the pushed weights
    sync.push(policy, 1)
    assert sync.version == 1
    assert backend.generate(PROMPTS, params, seed=0).completion_ids == updated
    assert sync.model is module and next(sync.model.parameters()).data_ptr() == first_param  # copied in place


def _module_state(model):
    from peft.tuners.lora import LoraLayer

    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "merged": {k: m.merged for k, m in model.named_modules() if isinstance(m, LoraLayer)},
        "adapters": ((list(model.active_adapters), sorted(model.peft_config))
                     if hasattr(model, "get_base_model") else None),
        "ptrs": {k: p.data_ptr() for k, p in model.named_parameters()},
    }


@pytest.mark.parametrize("kind", ["lora", "full", "full-untied"])
def test_push_never_changes_the_training_module(kind):
    model = {"lora": lora_policy, "full": tiny_llama, "full-untied": lambda: tiny_llama(tie=False)}[kind]()
    model.train()
    before = _module_state(model)
    sync = SnapshotSync()
    sync.push(model, 0)
    sync.push(model, 3)
    after = _module_state(model)
    for key in ("requires_grad", "training", "merged", "adapters", "ptrs"):
        assert before[key] == after[key], key
    assert before["weights"].keys() == after["weights"].keys()
    for k, v in before["weights"].items():
        assert torch.equal(v, after["weights"][k]), k
    snap = sync.model
    assert sync.version == 3 and not snap.training and not any(m.training for m in snap.modules())
    assert not any(p.requires_grad for p in snap.parameters())
    assert not {p.data_ptr() for p in snap.parameters()} & set(after["ptrs"].values())  # its own copy
    tied = snap.lm_head.weight is snap.model.embed_tokens.weight
    assert tied == (kind != "full-untied")


def test_bfloat16_snapshot():
    policy = lora_policy()
    backend, sync = make_backend(policy, [99], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in sync.model.parameters())
    assert sync.model.lm_head.weight is sync.model.model.embed_tokens.weight
    out = backend.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6, temperature=0.7, top_k=20), seed=0)
    assert len(out.completion_ids) == 6
    for lp, c in zip(out.logprobs, out.completion_ids):
        assert len(lp) == len(c) and torch.isfinite(torch.tensor(lp)).all()
    assert all(p.dtype == torch.float32 for p in policy.parameters())


def test_errors():
    backend = SnapshotBackend(SnapshotSync(), PAD, [99])
    assert backend.thread_safe and backend.name == "in-process snapshot" and backend.sync.needed
    with pytest.raises(RuntimeError, match="before the first SnapshotSync.push"):
        backend.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=4), seed=0)
    backend.sync.push(tiny_llama(), 0)
    with pytest.raises(ValueError, match="temperature"):
        backend.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=4, temperature=0.0), seed=0)
    with pytest.raises(ValueError, match="generation kwargs"):
        backend.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=4, extra={"typical_p": 0.9}), seed=0)
    with pytest.raises(ValueError, match="empty"):
        backend.generate([[1], []], SamplingParams(n=1, max_new_tokens=4), seed=0)
    with pytest.raises(RuntimeError, match="ties"):
        backend.sync.push(tiny_llama(tie=False), 1)  # the snapshot is tied; an untied policy does not fit it


def test_draws_follow_the_processed_distribution():
    """First-token frequencies over 4000 seeded completions equal the processed probabilities (temperature 0.8,
    top-k 6): the inverse-CDF draw samples the categorical it reports log-probs of, and never a masked token."""
    model = tiny_llama()
    backend, _ = make_backend(model, eos=[99])
    params = SamplingParams(n=4000, max_new_tokens=1, temperature=0.8, top_k=6)
    out = backend.generate([PROMPTS[1]], params, seed=3)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[1]])).logits[0, -1] / 0.8
    top = torch.topk(logits, 6)
    probs = torch.softmax(top.values, -1)
    counts = torch.bincount(torch.tensor([c[0] for c in out.completion_ids]), minlength=100).double()
    assert counts.sum() == counts[top.indices].sum()  # only the top 6 are drawn
    freq = counts[top.indices] / 4000
    assert torch.allclose(freq, probs.double(), atol=0.025), (freq, probs)  # sd of a frequency ≤ 0.008
    reported = {c[0]: lp[0] for c, lp in zip(out.completion_ids, out.logprobs)}
    for token, p in zip(top.indices.tolist(), probs.tolist()):
        if token in reported:
            assert reported[token] == pytest.approx(torch.log(torch.tensor(p)).item(), abs=1e-5)

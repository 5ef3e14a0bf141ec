"""Chunked LM-head log-probs equal the full-logits path, values and gradients."""

import math

import pytest
import torch

from reinforge.algorithms.logprobs import chunked_token_logps, selective_logps, sequence_sums


def test_selective_logps_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # probs 1/4, 3/4
    assert math.isclose(float(selective_logps(logits, torch.tensor([1]))), math.log(0.75), abs_tol=1e-12)
    assert math.isclose(float(selective_logps(logits, torch.tensor([0]))), math.log(0.25), abs_tol=1e-12)


def test_chunked_equals_full_with_gradients():
    torch.manual_seed(0)
    N, H, V = 37, 8, 50
    h1 = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    h2, w2 = h1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    full = selective_logps(h1 @ w1.T, t)
    chunked = chunked_token_logps(h2, w2, None, t, chunk_size=5)
    assert torch.allclose(full, chunked, atol=1e-12)
    weights = torch.randn(N, dtype=torch.float64)
    (full * weights).sum().backward()
    (chunked * weights).sum().backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-12)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-12)


def test_sequence_sums():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert sequence_sums(v, torch.tensor([0, 1, 0, 2]), 3).tolist() == [4.0, 2.0, 4.0]


def test_logps_model_chunked_equals_full(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from reinforge.data.collate import PairedCollator
    from reinforge.models.forward import LogpsModel

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    rows = [{"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [8, 9]},
            {"prompt_ids": [10, 11], "chosen_ids": [12, 13, 14, 15, 16], "rejected_ids": [17]}]
    batch = PairedCollator(tokenizer.pad_token_id)(rows)
    out_c = LogpsModel(model, chunk_size=3, chunked=True)(**batch)
    g_c = torch.autograd.grad(out_c["logps"].sum(), list(model.parameters()))
    out_f = LogpsModel(model, chunked=False)(**batch)
    g_f = torch.autograd.grad(out_f["logps"].sum(), list(model.parameters()))
    assert torch.allclose(out_c["logps"], out_f["logps"], atol=1e-10)
    for a, b in zip(g_c, g_f):
        assert torch.allclose(a, b, atol=1e-10)
    assert batch["n_tokens"].tolist() == [3, 5, 2, 1]


def test_log_sum_sq_probs_by_hand_and_chunked():
    from reinforge.algorithms.logprobs import token_log_sum_sq_probs

    # logits (0, log 3): p = (1/4, 3/4), Σp² = 1/16 + 9/16 = 10/16
    h = torch.tensor([[1.0]], dtype=torch.float64)
    w = torch.tensor([[0.0], [math.log(3.0)]], dtype=torch.float64)
    assert math.isclose(float(token_log_sum_sq_probs(h, w, None)), math.log(10 / 16), abs_tol=1e-6)
    torch.manual_seed(0)
    h, w = torch.randn(9, 4), torch.randn(30, 4)
    p = torch.softmax(h @ w.T, -1)
    assert torch.allclose(token_log_sum_sq_probs(h, w, None, chunk_size=2), (p ** 2).sum(-1).log(), atol=1e-5)


def test_entropy_by_hand_chunked_and_against_trl():
    from trl.trainer.utils import entropy_from_logits as trl_entropy

    from reinforge.algorithms.logprobs import entropy_from_logits

    # p = (1/4, 3/4): H = −(¼ log ¼ + ¾ log ¾) = 0.5623351446188083 nats; uniform over 5: log 5
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]], dtype=torch.float64)
    want = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert math.isclose(float(entropy_from_logits(logits)[0]), want, abs_tol=1e-12)
    assert math.isclose(float(entropy_from_logits(logits)[1]), math.log(2), abs_tol=1e-12)
    assert math.isclose(float(entropy_from_logits(torch.zeros(1, 5, dtype=torch.float64))), math.log(5), abs_tol=1e-12)
    torch.manual_seed(0)
    N, H, V = 23, 6, 40
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    logps, st = chunked_token_logps(h, w, None, t, chunk_size=4, temperature=0.7,
                                    stats=("entropy", "mean_logits", "is_top1"))
    ent = st["entropy"]
    scaled = (h @ w.T).detach() / 0.7
    assert torch.allclose(ent, trl_entropy(scaled), atol=1e-10)
    assert torch.allclose(st["mean_logits"], scaled.mean(-1), atol=1e-12)
    assert torch.equal(st["is_top1"], (scaled.argmax(-1) == t).double())
    assert torch.allclose(logps, selective_logps(scaled, t), atol=1e-10)
    assert ent.grad_fn is None and logps.grad_fn is not None
    logps.sum().backward()  # the entropy output does not disturb the checkpointed backward
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_logps_model_entropy_chunked_equals_full(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from reinforge.algorithms.logprobs import entropy_from_logits
    from reinforge.data.collate import PairedCollator
    from reinforge.models.forward import LogpsModel

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    rows = [{"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [8, 9]}]
    batch = PairedCollator(tokenizer.pad_token_id)(rows)
    out_c = LogpsModel(model, chunk_size=2)(**batch, temperature=0.9, stats=("entropy",))
    out_f = LogpsModel(model, chunked=False)(**batch, temperature=0.9, stats=("entropy",))
    assert torch.allclose(out_c["token_entropy"], out_f["token_entropy"], atol=1e-10)
    with torch.no_grad():  # by hand from the model's own logits at the scored positions
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits / 0.9
    want = entropy_from_logits(logits[batch["targets"] != -100])
    assert torch.allclose(out_f["token_entropy"], want, atol=1e-10)
    assert "token_entropy" not in LogpsModel(model)(**batch)
    stats = ("entropy", "mean_logits", "is_top1")
    out_c, out_f = LogpsModel(model, chunk_size=2, stats=stats)(**batch), LogpsModel(model, chunked=False, stats=stats)(**batch)
    for k in stats:
        assert torch.allclose(out_c[f"token_{k}"], out_f[f"token_{k}"], atol=1e-10), k


def test_token_stats_by_hand():
    from reinforge.algorithms.logprobs import token_stats

    logits = torch.tensor([[0.0, 2.0, 4.0], [3.0, 0.0, 0.0]])
    st = token_stats(logits, torch.tensor([2, 1]), ("mean_logits", "is_top1"))
    assert st["mean_logits"].tolist() == [2.0, 1.0] and st["is_top1"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown token statistics"):
        token_stats(logits, torch.tensor([0, 0]), ("perplexity",))

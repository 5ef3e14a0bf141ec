"""EBFT strided layout: anchors, positions and the block mask by hand; the parallel log-probs of all blocks equal
(float64, 1e-9) scoring each block as its own causal sequence (context + its generated prefix), and so does the
gradient of the strided loss; the ground-truth positions of the same forward see what the ground truth continuing
the context would."""

import pytest
import torch

from reinforge.algorithms.ebft_strided import (block_layout, block_logps, document_ce, layout_ids, strided_anchors,
                                               strided_policy_loss)


def test_anchors():
    assert strided_anchors(20, 8, 4, 4) == [8, 12, 16]  # 16 + 4 ≤ 20
    assert strided_anchors(19, 8, 4, 4) == [8, 12]
    assert strided_anchors(5, 8, 4, 4) == []
    assert strided_anchors(6, 0, 2, 2) == [1, 3]  # a block needs one token of context


def test_layout_by_hand():
    # L = 5, anchors [2, 3], n = 1, g = 2: blocks b0 (anchor 2) at 5..6, b1 (anchor 3) at 7..8
    lay = block_layout(5, [2, 3], 1, 2)
    assert lay.positions.tolist() == [0, 1, 2, 3, 4, 2, 3, 3, 4]
    assert lay.block_index.tolist() == [[5, 6], [7, 8]]
    assert lay.pred_index.tolist() == [[1, 5], [2, 7]]  # token 0 from the last context token, then its own block
    assert lay.gt_index.tolist() == [[2, 3], [3, 4]]
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0, 0],  # b0 token 0: context x[0:2] and itself
        [1, 1, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 1, 0],  # b1 token 0: context x[0:3]
        [1, 1, 1, 0, 0, 0, 0, 1, 1],
    ]
    assert lay.allowed.long().tolist() == expected
    with pytest.raises(ValueError):
        block_layout(4, [3], 1, 2)  # 3 + 2 > 4: no full ground-truth block


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).double().eval()
    for module in model.modules():  # transformers' RMSNorm computes in float32; keep the whole model in float64
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = _float64_rms_norm(module)
    return model


def _float64_rms_norm(norm):
    def forward(x):
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))

    return forward


def forward(model, ids, layout=None):
    if layout is None:
        return model(input_ids=ids.unsqueeze(0)).logits[0]
    return model(input_ids=ids.unsqueeze(0), attention_mask=layout.allowed[None, None],
                 position_ids=layout.positions.unsqueeze(0)).logits[0]


def test_parallel_logps_and_gradient_equal_per_block_scoring():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    doc = torch.randint(0, 50, (14,), generator=g)
    lay = block_layout(14, strided_anchors(14, 4, 3, 3), 2, 3)  # anchors 4, 7, 10; 6 blocks of 3
    blocks = torch.randint(0, 50, (lay.num_blocks, 3), generator=g)
    adv = torch.randn(lay.num_blocks, generator=g, dtype=torch.float64)

    model.zero_grad()
    logps = block_logps(forward(model, layout_ids(doc, blocks), lay), lay, blocks, temperature=0.7)
    strided_policy_loss(logps, adv).backward()
    parallel_grad = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    per_block, loss = [], 0.0
    for b in range(lay.num_blocks):
        a = int(lay.anchors[b // 2])
        seq = torch.cat([doc[:a], blocks[b]])
        logits = forward(model, seq)[a - 1: a - 1 + 3] / 0.7
        lp = torch.log_softmax(logits, -1).gather(1, blocks[b].unsqueeze(1)).squeeze(1)
        per_block.append(lp)
        loss = loss - (adv[b] * lp).sum() / (lay.num_blocks * 3)
    loss.backward()
    torch.testing.assert_close(logps, torch.stack(per_block), atol=1e-9, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(parallel_grad[n], p.grad, atol=1e-9, rtol=0)


def test_ground_truth_positions_see_the_context_and_their_prefix():
    model = tiny_llama()
    doc = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(2))
    lay = block_layout(12, [5, 8], 2, 3)
    blocks = torch.randint(0, 50, (lay.num_blocks, 3), generator=torch.Generator().manual_seed(3))
    body = model.model
    h = body(input_ids=layout_ids(doc, blocks).unsqueeze(0), attention_mask=lay.allowed[None, None],
             position_ids=lay.positions.unsqueeze(0)).last_hidden_state[0]
    for k, a in enumerate(lay.anchors.tolist()):
        alone = body(input_ids=doc[: a + 3].unsqueeze(0)).last_hidden_state[0, a: a + 3]
        torch.testing.assert_close(h[lay.gt_index[k]], alone, atol=1e-9, rtol=0)
        for s in range(2):  # a generated block's features: context + the block as its own sequence
            b = k * 2 + s
            alone = body(input_ids=torch.cat([doc[:a], blocks[b]]).unsqueeze(0)).last_hidden_state[0, a:]
            torch.testing.assert_close(h[lay.block_index[b]], alone, atol=1e-9, rtol=0)


def test_document_ce_by_hand():
    # uniform logits over V = 4: NLL log 4 per counted token; tokens 1..3 counted except token 2
    logits = torch.zeros(7, 4, dtype=torch.float64)
    doc = torch.tensor([0, 1, 2, 3])
    ce = document_ce(logits, doc, torch.tensor([1, 1, 0, 1]))
    assert ce.item() == pytest.approx(torch.log(torch.tensor(4.0)).item())


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_kv_cached_block_sampler_draws_from_the_layout_distribution(top_p):
    """The sampler's KV-cached steps (document once, then one token of every block per forward) give each drawn
    token the log-prob the full layout forward gives it (float64, 1e-9): the same attention as `block_layout`'s."""
    from transformers import TopPLogitsWarper

    from reinforge.training.strided import sample_blocks

    model = tiny_llama()
    g = torch.Generator().manual_seed(2)
    doc = torch.randint(0, 50, (15,), generator=g)
    lay = block_layout(15, strided_anchors(15, 3, 4, 4), 3, 4)  # anchors 3, 7, 11; 9 blocks of 4
    blocks, logps = sample_blocks(model, doc, lay, 0.7, top_p, torch.Generator().manual_seed(5), pad_token_id=0)
    assert blocks.shape == (9, 4) and not torch.equal(blocks[0], blocks[1])  # samples of one anchor differ
    with torch.no_grad():
        scores = forward(model, layout_ids(doc, blocks), lay)[lay.pred_index.flatten()] / 0.7
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p=top_p)(None, scores)
    expected = torch.log_softmax(scores, -1).gather(1, blocks.reshape(-1, 1)).view(9, 4)
    torch.testing.assert_close(logps, expected, atol=1e-9, rtol=0)
    again, _ = sample_blocks(model, doc, lay, 0.7, top_p, torch.Generator().manual_seed(5), pad_token_id=0)
    assert torch.equal(again, blocks)  # private generator: the same seed draws the same blocks

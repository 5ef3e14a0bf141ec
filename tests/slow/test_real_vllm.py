"""After a sync the vLLM server samples from exactly the trainer's weights (SmolLM2-135M-Instruct, float32):
greedy completions from the server equal greedy `generate()` on the trained policy, token for token, after a
few optimizer steps, for LoRA (runtime adapter loading) and for full fine-tuning (safetensors through the
worker extension). The training must change the greedy completions, so a sync that moved nothing would fail.
LoRA runs first: full-weight sync overwrites the server's base weights."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serving"))
from conftest_vllm import Server  # noqa: E402

from reinforge.config.loader import build_config  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

QUESTIONS = ["What is 2+2?", "Name a colour.", "Tell me a joke.", "What is the capital of France?"]


def config(model_dir, **extra):
    return {"base_model": str(model_dir), "rl": "grpo", "adapter": "lora", "lora_r": 16, "lora_alpha": 32,
            "lora_target_linear": True, "datasets": [{"path": "unused.jsonl"}], "trl": {"reward_funcs": ["accuracy"]}, "micro_batch_size": 8,
            "vllm": {"dtype": "float32", "max_model_len": 1024}, **extra}


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    from conftest import REAL_MODEL_DIR

    s = Server(tmp_path_factory.mktemp("real-server"), config(REAL_MODEL_DIR))
    yield s
    assert s.stop() == 0


def greedy(model, ids, n):
    with torch.no_grad():
        return [model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=n, do_sample=False)[0, len(p):].tolist() for p in ids]


def trained_policy(cfg, tokenizer, steps=3, lr=1e-3):
    from reinforge.models.loading import load_policy

    policy = load_policy(cfg)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    text = tokenizer("The answer is always forty-two. " * 6, return_tensors="pt")
    policy.train()
    for _ in range(steps):
        policy(**text, labels=text["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    return policy.eval()


@pytest.mark.parametrize("adapter", ["lora", None], ids=["lora", "full"])
def test_synced_server_samples_the_trained_weights(real_server, real_model_dir, adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reinforge.rollout.sync import FullWeightSync, LoraFileSync
    from reinforge.rollout.types import SamplingParams
    from reinforge.rollout.vllm import VLLMClient, VLLMServerBackend

    cfg = build_config(config(real_model_dir, adapter=adapter))
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    policy = trained_policy(cfg, tok)
    base = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    n = 24
    want = greedy(policy, ids, n)
    assert want != greedy(base, ids, n), "the training did not change any greedy completion"
    client = VLLMClient(real_server.url)
    client.wait_until_ready()
    (LoraFileSync if adapter else FullWeightSync)(client, tmp_path / "sync").push(policy, 3)
    got = VLLMServerBackend(client).generate(ids, SamplingParams(n=1, max_new_tokens=n, temperature=0.0)).completion_ids
    for g, w in zip(got, want):
        assert g == w[:len(g)] and (len(g) == n or g[-1] == tok.eos_token_id), (g, w)

"""The main job on the real SmolLM2-135M-Instruct: a short DPO LoRA run whose held-out margins rise, then load +
generate with the saved adapter."""

import json

import pytest

from reinforge.cli import main

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_dpo_lora_real_model_short_run(tmp_path, real_model_dir):
    out = tmp_path / "out"
    rc = main(["train", str(ROOT / "examples" / "dpo-smollm2.yaml"), f"base_model={real_model_dir}",
               f"output_dir={out}", "max_steps=12", "warmup_steps=2", "eval_steps=6", "val_set_size=8",
               "sequence_len=256", "micro_batch_size=2", "gradient_accumulation_steps=1", "use_tensorboard=false"])
    assert rc == 0
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    assert len(train) == 12 and abs(train[0]["loss"] - 0.6931) < 1e-3
    evals = [m for m in metrics if "eval_rewards/margins" in m]
    assert [m["step"] for m in evals] == [0, 6, 12]
    margins = [m["eval_rewards/margins"] for m in evals]
    # before training the policy is the reference: margin 0 on the held-out pairs; DPO on the training pairs
    # raises it on pairs it never saw
    assert abs(margins[0]) < 1e-6
    assert margins[1] > margins[0] and margins[2] > margins[0] + 0.02, margins

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(real_model_dir), out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert gen.shape[1] > ids.shape[1] and tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()

"""The main job on the real SmolLM2-135M-Instruct: a short DPO LoRA run, then load + generate."""

import json

import pytest

from reinforge.cli import main

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_dpo_lora_real_model_short_run(tmp_path, real_model_dir):
    out = tmp_path / "out"
    rc = main(["train", str(ROOT / "examples" / "dpo-smollm2.yaml"), f"base_model={real_model_dir}",
               f"output_dir={out}", "max_steps=3", "val_set_size=4", "sequence_len=256", "micro_batch_size=1",
               "gradient_accumulation_steps=1", "use_tensorboard=false"])
    assert rc == 0
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    assert len(train) == 3 and abs(train[0]["loss"] - 0.6931) < 1e-3
    assert "eval_rewards/accuracies" in metrics[-1]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(real_model_dir), out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text

"""The two EBFT examples on the real SmolLM2-135M-Instruct, shortened: structured (GSM8K, the snapshot sampler) and
strided (CPython source); they run, log Axolotl's ebft/* metrics, evaluate their held-out rows and save an adapter that peft loads."""

import json
import math

import pytest

from reinforge.cli import main

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("example, overrides", [
    ("ebft-structured-gsm8k.yaml", ["max_steps=2", "trl.max_completion_length=24"]),
    ("ebft-strided-cpython.yaml", ["max_steps=2", "sequence_len=40"]),
])
def test_ebft_example_real_model_short_run(tmp_path, real_model_dir, monkeypatch, example, overrides):
    monkeypatch.chdir(ROOT)  # the examples' data paths are relative to the checkout
    out = tmp_path / "out"
    assert main(["train", str(ROOT / "examples" / example), f"base_model={real_model_dir}", f"output_dir={out}",
                 "use_tensorboard=false", *overrides]) == 0
    m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in m if "ebft/cfm_loss" in x]
    assert [x["step"] for x in train] == [1, 2]
    for x in train:
        for key in ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward"):
            assert math.isfinite(x[key]), key
    evals = [x for x in m if "eval_ebft/cfm_loss" in x]  # the examples' held-out rows, before and after
    assert [x["step"] for x in evals] == [0, 2] and all(math.isfinite(x["eval_ebft/reward"]) for x in evals)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(real_model_dir), out)

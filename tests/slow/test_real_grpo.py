"""The GSM8K GDPO example on the real SmolLM2-135M-Instruct, shortened: it runs, logs TRL's metrics and the
completions, and saves an adapter that peft loads."""

import json
import math

import pytest

from reinforge.cli import main

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_gdpo_gsm8k_real_model_short_run(tmp_path, real_model_dir):
    out = tmp_path / "out"
    rc = main(["train", str(ROOT / "examples" / "grpo-gsm8k.yaml"), f"base_model={real_model_dir}",
               f"output_dir={out}", "max_steps=2", "trl.max_completion_length=24", "use_tensorboard=false"])
    assert rc == 0
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for fn in ("accuracy", "format_reward"):
            assert 0.0 <= m[f"rewards/{fn}/mean"] <= 1.0
        if m["skipped_zero_adv_batches"] < 2:  # a step whose micro-batches all had zero advantages trains nothing
            assert 0.0 < m["entropy"] < math.log(49152)  # nats, vocabulary 49 152
        assert m["completions/max_length"] <= 24 and m["time/generation"] > 0
        # reward = Σ weights × per-function means (accuracy 1.0, format 0.5; every completion is scorable)
        assert m["reward"] == pytest.approx(m["rewards/accuracy/mean"] + 0.5 * m["rewards/format_reward/mean"], abs=1e-6)
    rows = [json.loads(l) for l in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 8 and {"prompt", "completion", "accuracy", "format_reward", "advantage"} <= set(rows[0])

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(real_model_dir), out)

"""A LoRA DPO run (the main job's shape) that crashes after a checkpoint and is resumed computes what the
uninterrupted run computes: every logged metric after the resume point to 1e-5 and the adapter at the end.

LoRA dropout is on, so the resumed run must restore the RNG states as well as the adapter weights, AdamW's
moments of the LoRA parameters, the scheduler and the data position. The crash is simulated in-process as in
test_resume.py: the objective raises in the first micro-batch of step 5, after checkpoint-4 was written.
"""

import json

import torch
from safetensors.torch import load_file

from reinforge.cli import main

from test_resume import crash_dpo_in_step_5, dpo_config, metrics

LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.2, "lora_target_linear": True,
        "optimizer": "adamw_torch", "learning_rate": 5e-3}
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
        "logps/rejected", "grad_norm", "learning_rate", "epoch", "entropy")


def test_lora_dpo_crash_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir, monkeypatch):
    # 6 pairs, 2 per micro-batch, 2 micro-batches per step, 5 steps, checkpoints after steps 2 and 4
    assert main(["train", str(dpo_config(tmp_path, "full", tiny_model_dir, **LORA))]) == 0
    full = metrics(tmp_path / "full")
    assert [m["step"] for m in full] == [1, 2, 3, 4, 5]

    cfg = crash_dpo_in_step_5(tmp_path, tiny_model_dir, monkeypatch, **LORA)
    out = tmp_path / "resumed"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    ckpt = out / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    # the optimiser state holds AdamW moments for the LoRA parameters only (nothing else is trainable)
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    n_lora = len(load_file(ckpt / "adapter_model.safetensors"))
    assert len(opt["state"]) == n_lora and all("exp_avg_sq" in s for s in opt["state"].values())

    assert main(["train", str(cfg), "resume_from_checkpoint=true"]) == 0
    resumed = metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(full, resumed):
        for key in KEYS:
            assert key in a and key in b, key
            assert abs(a[key] - b[key]) < 1e-5, (key, a, b)
    # the run moves (step 1 has learning rate 0 at the start of the warm-up; steps 2-5 all differ)
    losses = [m["loss"] for m in full]
    assert len({round(x, 6) for x in losses[1:]}) == 4 and losses[-1] < losses[1] and full[-1]["rewards/margins"] > 0

    a, b = load_file(tmp_path / "full" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == n_lora
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # B starts at 0: it was trained

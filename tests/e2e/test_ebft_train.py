"""Structured EBFT end to end through `reinforge train` on a tiny random model: completions generated like GRPO,
rewarded by feature matching against each row's ground truth (LoRA: the adapter-disabled policy is the feature
network; full fine-tuning: a frozen copy), with Axolotl's `ebft:` keys and metric names."""

import json

import pytest
import yaml

from reinforge.cli import main


def setup(tmp_path, monkeypatch, model_dir, **extra):
    monkeypatch.chdir(tmp_path)
    rows = [{"input": f"Write the number {i} in words.", "output": f"The number is {i}; that is all."} for i in range(8)]
    (tmp_path / "code.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"base_model": str(model_dir), "rl": "ebft", "datasets": [{"path": "code.jsonl", "type": "ebft_opencode.transform"}],
           "ebft": {"feature_layers": [0.5, 1.0], "embed_method": "mean_pooling", **extra.pop("ebft", {})},
           "trl": {"num_generations": 4, "max_completion_length": 8, "top_k": 20, "loss_type": "grpo",
                   **extra.pop("trl", {})},
           "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 3, "learning_rate": 1e-2,
           "lr_scheduler": "constant", "output_dir": "out", "use_tensorboard": False, "seed": 3, **extra}
    (tmp_path / "ebft.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "ebft.yaml"


def metrics(tmp_path):
    return [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("adapter", ["lora", None])
@pytest.mark.parametrize("whiten", [False, True])
def test_structured_ebft_trains(tmp_path, monkeypatch, tiny_model_dir, adapter, whiten):
    extra = {"adapter": "lora", "lora_r": 4, "lora_target_linear": True} if adapter else {}
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, ebft={"use_whitening": whiten}, **extra)
    assert main(["train", str(cfg)]) == 0
    m = metrics(tmp_path)
    assert [x["step"] for x in m] == [1, 2, 3]
    for x in m:
        for key in ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "reward", "reward_std",
                    "rewards/feature_matching/mean", "completions/mean_length"):
            assert key in x and x[key] == x[key], key  # present and not NaN
        # reward = α·alignment − β·diversity (both coefficients 1), averaged the same way
        assert x["ebft/reward"] == pytest.approx(x["ebft/alignment"] - x["ebft/diversity"], abs=1e-5)
        assert x["reward"] == pytest.approx(x["ebft/reward"], abs=1e-5)
        if not whiten:  # normalised features: |2 cos| ≤ 2, diversity within [−2, 2], cfm ≤ 4
            assert -2 <= x["ebft/alignment"] <= 2 and -2 <= x["ebft/diversity"] <= 2 and 0 <= x["ebft/cfm_loss"] <= 4
    assert any(x.get("grad_norm", 0) > 0 for x in m)


def test_ebft_config_errors(tmp_path, monkeypatch, tiny_model_dir, capsys):
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, trl={"reward_funcs": ["accuracy"]})
    assert main(["validate", str(cfg)]) != 0
    assert "remove trl.reward_funcs" in capsys.readouterr().err
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, ebft={"embed_methd": "last_token"})
    assert main(["validate", str(cfg)]) != 0
    assert "embed_method" in capsys.readouterr().err  # the closest valid key
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, rl="grpo", trl={"reward_funcs": ["accuracy"]})
    assert main(["validate", str(cfg)]) != 0
    assert "the ebft: section is used only with rl: ebft" in capsys.readouterr().err


def strided_setup(tmp_path, monkeypatch, model_dir, rows, ds_type, **extra):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"base_model": str(model_dir), "rl": "ebft", "datasets": [{"path": "docs.jsonl", "type": ds_type}],
           "ebft": {"mode": "strided", "stride": 4, "context_length": 4, "generate_max_len": 3,
                    "n_samples_per_prompt": 2, "feature_layers": [0.5, 1.0], **extra.pop("ebft", {})},
           "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 3, "learning_rate": 1e-2,
           "lr_scheduler": "constant", "output_dir": "out", "use_tensorboard": False, "seed": 3, "sequence_len": 40,
           **extra}
    (tmp_path / "ebft.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "ebft.yaml"


TEXTS = [{"text": f"def f{i}(x):\n    return x * {i} + {i * i}  # a small function number {i}\n"} for i in range(6)]


@pytest.mark.parametrize("adapter", ["lora", None])
def test_strided_ebft_trains_on_plain_text(tmp_path, monkeypatch, tiny_model_dir, adapter):
    extra = {"adapter": "lora", "lora_r": 4, "lora_target_linear": True} if adapter else {}
    cfg = strided_setup(tmp_path, monkeypatch, tiny_model_dir, TEXTS, "ebft_pretrain.transform",
                        ebft={"ce_coef": 0.03, "use_whitening": adapter is None}, **extra)
    assert main(["train", str(cfg)]) == 0
    m = metrics(tmp_path)
    assert [x["step"] for x in m] == [1, 2, 3]
    for x in m:
        for key in ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "ebft/rl_loss", "ebft/ce_loss",
                    "ebft/num_blocks", "ebft/advantages_std", "ebft/mean_reward", "loss", "grad_norm"):
            assert key in x and x[key] == x[key], key
        assert x["ebft/num_blocks"] >= 2 and x["ebft/ce_loss"] > 0 and x["grad_norm"] > 0
        assert x["loss"] == pytest.approx(x["ebft/rl_loss"] + 0.03 * x["ebft/ce_loss"], rel=1e-4, abs=1e-6)
    saved = "adapter_config.json" if adapter else "model.safetensors"  # the adapter only, or the full model
    assert (tmp_path / "out" / saved).exists() and not (adapter and (tmp_path / "out" / "model.safetensors").exists())


def test_strided_ebft_prompt_completion_rows(tmp_path, monkeypatch, tiny_model_dir):
    rows = [{"input": f"Square {i}:", "output": f"The square of {i} is {i * i}, computed as {i} times {i}."}
            for i in range(4)]
    cfg = strided_setup(tmp_path, monkeypatch, tiny_model_dir, rows, "ebft_strided_structured.transform",
                        ebft={"advantage_estimator": "group_norm"})
    assert main(["train", str(cfg)]) == 0
    assert all(x["ebft/num_blocks"] >= 2 and x["ebft/ce_loss"] == 0.0 for x in metrics(tmp_path))


HELD_OUT = [{"text": f"class C{i}:\n    value = {i * 7}\n    def get(self):\n        return self.value - {i}\n"}
            for i in range(3)]


@pytest.mark.parametrize("learning_rate", [1e-2, 1e-12])
def test_strided_ebft_evaluates_held_out_documents(tmp_path, monkeypatch, tiny_model_dir, learning_rate):
    """Held-out documents (test_datasets) are scored before the first step, every eval_steps and after the last,
    each with the same sampling seed every time: eval_ebft/ce_loss is the policy's plain causal cross-entropy
    (checked against transformers at step 0), and with a learning rate too small to move a float32 weight the last evaluation equals the first."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps(r) for r in HELD_OUT))
    cfg = strided_setup(tmp_path, monkeypatch, tiny_model_dir, TEXTS, "ebft_pretrain.transform",
                        test_datasets=[{"path": "held.jsonl", "type": "ebft_pretrain.transform"}], eval_steps=2,
                        learning_rate=learning_rate)
    assert main(["train", str(cfg)]) == 0
    evals = [x for x in metrics(tmp_path) if "eval_ebft/cfm_loss" in x]
    assert [x["step"] for x in evals] == [0, 2, 3]
    for x in evals:
        for key in ("eval_ebft/alignment", "eval_ebft/diversity", "eval_ebft/reward", "eval_ebft/ce_loss"):
            assert x[key] == x[key], key

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ces = []
    with torch.no_grad():
        for r in HELD_OUT:
            ids = torch.tensor([tok(r["text"], add_special_tokens=False)["input_ids"][:40]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            ces.append(float(-logp.gather(1, ids[0, 1:, None]).mean()))
    assert evals[0]["eval_ebft/ce_loss"] == pytest.approx(sum(ces) / len(ces), rel=1e-5)
    first, last = evals[0], evals[-1]
    if learning_rate < 1e-9:
        assert {k: v for k, v in last.items() if k.startswith("eval_")} == \
            pytest.approx({k: v for k, v in first.items() if k.startswith("eval_")}, rel=1e-6)
    else:
        assert last["eval_ebft/ce_loss"] != pytest.approx(first["eval_ebft/ce_loss"], rel=1e-6)


def test_ebft_structured_evaluates_held_out_prompts(tmp_path, monkeypatch, tiny_model_dir):
    """Structured EBFT evaluates its held-out rows with the feature-matching scorer: eval_ebft/* metrics."""
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, val_set_size=2, eval_steps=2, max_steps=3)
    assert main(["train", str(cfg)]) == 0
    evals = [x for x in metrics(tmp_path) if "eval_ebft/cfm_loss" in x]
    assert [x["step"] for x in evals] == [0, 2, 3]
    for key in ("eval_ebft/alignment", "eval_ebft/diversity", "eval_ebft/reward", "eval_reward",
                "eval_completions/mean_length"):
        assert evals[-1][key] == evals[-1][key], key


def test_structured_ce_coef_adds_the_ground_truth_cross_entropy(tmp_path, monkeypatch, tiny_model_dir):
    """Structured `ce_coef`: each prompt group's prompt + ground truth is one more row of the training batch, and
    ce_coef × its cross-entropy (token mean over the step's ground truths) joins GRPO's loss, weighted by rl_coef.
    With rl_coef 0 and ce_coef 1 the first step is plain SFT on the ground truths: its loss and grad_norm equal the
    token-mean NLL of prompt → ground truth and its gradient, computed here with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"input": "Name a colour.", "output": "Blue is a colour of the sky."},
            {"input": "Name a fruit, please.", "output": "An apple, red and sweet."}]
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, ebft={"ce_coef": 1.0, "rl_coef": 0.0}, max_steps=1,
                max_grad_norm=1e9)
    (tmp_path / "code.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["train", str(cfg)]) == 0
    (m,) = metrics(tmp_path)

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    nll, count = 0.0, 0
    for r in rows:
        p = tok.apply_chat_template([{"role": "user", "content": r["input"]}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False)
        gt = tok(r["output"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + gt])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        nll = nll - logp[len(p) - 1:].gather(1, ids[0, len(p):, None]).sum()
        count += len(gt)
    loss = nll / count
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert m["grad_norm"] == pytest.approx(float(grad_norm), rel=1e-3)
    assert m["ebft/rl_loss"] == m["ebft/rl_loss"] and m["ebft/ce_loss"] > 0


def test_structured_ce_coef_with_grpo_loss(tmp_path, monkeypatch, tiny_model_dir):
    """Both terms together, LoRA, micro-batches smaller than a group (the reference row rides with its group's
    first completion): loss = rl_coef · ebft/rl_loss + ce_coef · ebft/ce_loss (ground truths of equal length)."""
    rows = [{"input": f"Write the number {i} in words.", "output": f"The number is {i}; that is all."} for i in range(8)]
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, ebft={"ce_coef": 0.5, "rl_coef": 2.0}, micro_batch_size=2,
                gradient_accumulation_steps=4, adapter="lora", lora_r=4, lora_target_linear=True)
    (tmp_path / "code.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["train", str(cfg)]) == 0
    m = metrics(tmp_path)
    assert [x["step"] for x in m] == [1, 2, 3]
    for x in m:
        assert x["ebft/ce_loss"] > 0 and x["grad_norm"] > 0
        # half the micro-batches hold a reference row, each weighing its CE by 2 (its share of the rollout's
        # ground-truth tokens is half a micro-batch's expected share): the step mean is ce_coef · ce_loss
        assert x["loss"] == pytest.approx(2.0 * x["ebft/rl_loss"] + 0.5 * x["ebft/ce_loss"], rel=1e-4, abs=1e-6)

"""Trainer-level parity with TRL 1.16 on reinforge's DEFAULT batch layout.

tests/integration/test_trl_parity.py compares reinforge's components on padded batches. Here each side runs
its real first optimiser step: `reinforge.training.dispatch.train` (what `reinforge train` runs) with the
config defaults the shipped examples use — `sample_packing`, `prefix_sharing` and `chunked_logprobs` on, so
every micro-batch is one packed row with each prompt computed once and the LM head applied to completion
positions only — against the TRL trainer's `train()` for one step. Compared: the logged first-step `loss`,
the TRL metrics both sides log (rewards/*, logps/*, logits/*, ...) and `grad_norm` (before clipping), at
initial weights, in float32, to 1e-5 relative, on the tiny model fixture with a second tiny model as the
reference (so that the loss is not the trivial value at policy = reference). Each test also checks that the
batch really is one packed, prefix-shared row, and that both sides train on the same token ids and rows.

Where reinforge differs from TRL on purpose, the test configures reinforge to TRL's behaviour where a key
exists and asserts equality, and asserts the default difference separately and exactly (bco_pair's running
mean; ORPO's NLL over the response only; SimPO's logged nll_loss; the EOS TRL's ORPO/CPO trainers append).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reinforge.algorithms.registry import method
from reinforge.config.loader import build_config
from reinforge.data.collate import PairedCollator
from reinforge.data.packing import build_collator
from reinforge.data.prepare import prepare_data
from reinforge.models.loading import load_tokenizer
from reinforge.training.distributed import BatchPlan
from reinforge.training.dispatch import train
from conftest import DATA_DIR, build_tiny_model
from test_trl_parity import DPO_DATASET, DPO_START, KTO_DATASET, KTO_START, N_ROWS, _causal_lm, _ours, \
    _sharegpt_to_trl

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
RTOL = 1e-5
ATOL = 1e-6
# Summed log-probs of a few hundred tokens (~1e3): float32 resolves them to ~1e-4 absolute only, and the sides
# sum in different orders, so sums (logps/*) are compared relative to their size.
RTOL_SUMS = 1e-6
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")
DPO_METRICS = PAIR_METRICS + ("logits/chosen", "logits/rejected", "mean_token_accuracy", "entropy")


@pytest.fixture(scope="module")
def ref_model_dir(tmp_path_factory) -> Path:
    """A second tiny model with other weights (the reference, or the policy of the KTO test)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-ref-default-layout"), seed=1)


def _base_cfg(tmp_path: Path, **keys) -> dict:
    return {"sequence_len": 4096, "micro_batch_size": N_ROWS, "gradient_accumulation_steps": 1, "max_steps": 1,
            "learning_rate": 1e-5, "lr_scheduler": "linear", "max_grad_norm": 1.0, "logging_steps": 1,
            "use_tensorboard": False,
            "output_dir": str(tmp_path / "reinforge"), "seed": 42, **keys}


def _reinforge_first_step(cfg_dict: dict) -> tuple[dict, list[int], list[dict]]:
    """Run `reinforge train` for one step; returns (step-1 metrics from metrics.jsonl, the row order of the
    first micro-batch, the tokenised train rows). Asserts the default layout is in effect and used."""
    cfg = build_config(cfg_dict)
    assert cfg.sample_packing_value and cfg.prefix_sharing_value and cfg.chunked_logprobs, "not the default layout"
    tokenizer = load_tokenizer(cfg)
    rows = prepare_data(cfg, tokenizer).train
    assert len(rows) == N_ROWS
    order = BatchPlan(len(rows), cfg.micro_batch_size, 0, 1, cfg.seed).global_rows(0)
    batch = build_collator(cfg, method(cfg.rl).data, tokenizer.pad_token_id)([rows[i] for i in order])
    # one packed row, every prompt shared by the sequences that continue it
    assert batch["input_ids"].shape[0] == 1 and "branch_ids" in batch
    assert int((batch["branch_ids"] == 0).sum()) > 0
    train(cfg)
    lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    first = next(m for m in logged if m.get("step") == 1 and "loss" in m)
    return first, order, rows


def _trl_first_step(trainer) -> dict:
    """TRL trainer's logged first step (loss, grad_norm and its metrics)."""
    trainer.train()
    return next(m for m in trainer.state.log_history if "loss" in m)


def _trl_args(cls, tmp_path: Path, **kw):
    return cls(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, fp16=False,
               per_device_train_batch_size=N_ROWS, gradient_accumulation_steps=1, max_steps=1, learning_rate=1e-5,
               lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no",
               gradient_checkpointing=False, seed=42, **kw)


def _assert_metrics(ours: dict, theirs: dict, names, beta: float) -> None:
    """Every metric in `names` equal. rewards/* are β × differences of two float32 sums of size |logps|, so
    they are resolved to ~β·|logps|·1e-7 only (both sides round, in different orders): compared to
    β·max|logps/*|·2e-6 absolute on top of RTOL."""
    scale = max(abs(theirs[k]) for k in ("logps/chosen", "logps/rejected") if k in theirs)
    bad = []
    for name in names:
        tol = {"rel": RTOL_SUMS if name.startswith("logps/") else RTOL,
               "abs": beta * scale * 2e-6 if name.startswith("rewards/") else ATOL}
        if ours[name] != pytest.approx(theirs[name], **tol):
            bad.append(f"{name}: reinforge {ours[name]!r}, TRL {theirs[name]!r}")
    assert not bad, "\n".join(bad)


def _dpo_trainer(policy_dir, ref_dir, tokenizer, tmp_path, order, **trl_kw):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    raw = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[DPO_START:DPO_START + N_ROWS]
    return DPOTrainer(model=_causal_lm(policy_dir), ref_model=_causal_lm(ref_dir),
                      args=_trl_args(DPOConfig, tmp_path, max_length=None, **trl_kw),
                      train_dataset=Dataset.from_list([_sharegpt_to_trl(raw[i]) for i in order]),
                      processing_class=tokenizer)


def _dpo_case(tiny_model_dir, ref_model_dir, tmp_path, rl_keys: dict, trl_kw: dict):
    cfg = _base_cfg(tmp_path, base_model=str(tiny_model_dir), ref_model=str(ref_model_dir), datasets=[DPO_DATASET],
                    **rl_keys)
    ours, order, rows = _reinforge_first_step(cfg)
    tokenizer = load_tokenizer(build_config(cfg))
    trainer = _dpo_trainer(tiny_model_dir, ref_model_dir, tokenizer, tmp_path, order, **trl_kw)
    for i, trl_row in zip(order, trainer.train_dataset):  # the same token ids on both sides
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert rows[i][key] == trl_row[key], key
    return ours, _trl_first_step(trainer)


def test_dpo_sigmoid_default_layout(tiny_model_dir, ref_model_dir, tmp_path):
    ours, theirs = _dpo_case(tiny_model_dir, ref_model_dir, tmp_path, {"rl": "dpo", "rl_beta": 0.1},
                             {"beta": 0.1, "loss_type": ["sigmoid"]})
    assert abs(ours["loss"] - 0.6931) > 1e-3  # a distinct reference: not the trivial log 2
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=RTOL, abs=ATOL)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=RTOL)
    _assert_metrics(ours, theirs, DPO_METRICS, 0.1)
    # the rate the logged step used (linear decay: the next step's would be 0)
    assert ours["learning_rate"] == pytest.approx(theirs["learning_rate"]) == 1e-5


def test_dpo_sigmoid_lora_default_layout(tiny_model_dir, ref_model_dir, tmp_path):
    """The main job's set-up (examples/dpo-smollm2.yaml: LoRA r16 on all linear layers, default layout), with a
    frozen reference of other weights (`ref_model`) so that the loss is not log 2. TRL's DPOTrainer gets the
    PeftModel reinforge's `load_policy` builds after the run's seed (as `reinforge train` does), so both start
    from the same adapter; only the adapter's parameters have gradients."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from reinforge.models.loading import load_policy

    lora = {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_linear": True}
    cfg = _base_cfg(tmp_path, base_model=str(tiny_model_dir), ref_model=str(ref_model_dir), datasets=[DPO_DATASET],
                    rl="dpo", rl_beta=0.1, **lora)
    ours, order, rows = _reinforge_first_step(cfg)
    parsed = build_config(cfg)
    tokenizer = load_tokenizer(parsed)
    torch.manual_seed(parsed.seed)
    policy = load_policy(parsed)
    assert hasattr(policy, "peft_config")
    raw = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[DPO_START:DPO_START + N_ROWS]
    trainer = DPOTrainer(model=policy, ref_model=_causal_lm(ref_model_dir),
                         args=_trl_args(DPOConfig, tmp_path, max_length=None, beta=0.1),
                         train_dataset=Dataset.from_list([_sharegpt_to_trl(raw[i]) for i in order]),
                         processing_class=tokenizer)
    theirs = _trl_first_step(trainer)
    assert abs(ours["loss"] - 0.6931) > 1e-3
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=RTOL, abs=ATOL)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=RTOL)
    _assert_metrics(ours, theirs, DPO_METRICS, 0.1)


def test_ipo_default_layout(tiny_model_dir, ref_model_dir, tmp_path):
    ours, theirs = _dpo_case(tiny_model_dir, ref_model_dir, tmp_path, {"rl": "ipo", "rl_beta": 0.5},
                             {"beta": 0.5, "loss_type": ["ipo"]})
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=RTOL, abs=ATOL)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=RTOL)
    _assert_metrics(ours, theirs, DPO_METRICS, 0.5)


MPO_TYPES, MPO_WEIGHTS = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]  # examples/mpo-smollm2.yaml


def test_mpo_mix_with_trl_bco_shift_default_layout(tiny_model_dir, ref_model_dir, tmp_path):
    """MPO (a weighted mix of sigmoid, bco_pair and sft, TRL's `loss_type` list + `loss_weights`) with
    `dpo_bco_running_mean: false`, i.e. TRL 1.16's bco_pair reward shift δ = 0: equal to TRL."""
    ours, theirs = _dpo_case(
        tiny_model_dir, ref_model_dir, tmp_path,
        {"rl": "dpo", "rl_beta": 0.1, "dpo_loss_type": MPO_TYPES, "dpo_loss_weights": MPO_WEIGHTS,
         "dpo_bco_running_mean": False},
        {"beta": 0.1, "loss_type": MPO_TYPES, "loss_weights": MPO_WEIGHTS})
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=RTOL, abs=ATOL)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=RTOL)
    _assert_metrics(ours, theirs, DPO_METRICS, 0.1)


def test_mpo_default_running_mean_differs_from_trl_by_the_shift(tiny_model_dir, ref_model_dir, tmp_path):
    """The documented difference: by default bco_pair's δ is the running mean of the rewards seen in training
    (the BCO paper, TRL < 1.0); at step 1 that is the mean of this batch's 2B rewards, where TRL 1.16 uses 0.
    The first-step loss is then TRL's plus w_bco · (bco_pair(δ) − bco_pair(0)), computed here from the
    per-pair log-probs; the rewards themselves are unchanged. β = 1 here (the example's 0.1 gives rewards so
    close to 0 that the shift, second order in δ, is ~5e-5)."""
    from reinforge.algorithms import dpo

    beta = 1.0
    rl_keys = {"rl": "dpo", "rl_beta": beta, "dpo_loss_type": MPO_TYPES, "dpo_loss_weights": MPO_WEIGHTS}
    ours, theirs = _dpo_case(tiny_model_dir, ref_model_dir, tmp_path, rl_keys,
                             {"beta": beta, "loss_type": MPO_TYPES, "loss_weights": MPO_WEIGHTS})
    # per-pair log-probs of the same rows (padded components, test_trl_parity's helper)
    cfg = {"base_model": str(tiny_model_dir), "ref_model": str(ref_model_dir), "datasets": [DPO_DATASET],
           "sequence_len": 4096, "micro_batch_size": N_ROWS, **rl_keys}
    out = _ours(cfg, PairedCollator)[3]
    with torch.no_grad():
        ref = _ours({**cfg, "base_model": str(ref_model_dir)}, PairedCollator)[3]["logps"]
    pol = out["logps"].detach().double()
    ref = ref.detach().double()
    B = N_ROWS
    delta = float((beta * (pol - ref)).mean())  # mean of the B chosen and B rejected rewards
    args = (pol[:B], pol[B:], ref[:B], ref[B:], beta)
    shift = MPO_WEIGHTS[1] * float(dpo.bco_pair_loss(*args, delta=delta).mean() - dpo.bco_pair_loss(*args).mean())
    assert abs(shift) > 1e-3  # the difference is real on these rows
    assert ours["loss"] == pytest.approx(theirs["loss"] + shift, rel=RTOL, abs=1e-5)
    assert ours["loss"] != pytest.approx(theirs["loss"], rel=RTOL, abs=ATOL)
    assert ours["grad_norm"] != pytest.approx(theirs["grad_norm"], rel=RTOL)
    _assert_metrics(ours, theirs, DPO_METRICS, beta)  # δ shifts the loss, not the rewards


def test_kto_default_layout(tiny_model_dir, ref_model_dir, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    # Policy and reference swapped relative to the DPO tests: on these rows that makes z₀ > 0 (not clamped).
    policy_dir, ref_dir = ref_model_dir, tiny_model_dir
    cfg = _base_cfg(tmp_path, base_model=str(policy_dir), ref_model=str(ref_dir), rl="kto", rl_beta=0.1,
                    kto_undesirable_weight=1.2, datasets=[KTO_DATASET])
    ours, order, rows = _reinforge_first_step(cfg)
    tokenizer = load_tokenizer(build_config(cfg))
    raw = json.loads((DATA_DIR / "kto_en_demo.json").read_text())[KTO_START:KTO_START + N_ROWS]
    # TRL pairs example i with completion i-1 of its (sequential) batch; reinforge pairs within its micro-batch,
    # in the run's row order: TRL gets the rows in that order, so both form the same KL sequences.
    trl_data = [{"prompt": raw[i]["messages"][:-1], "completion": raw[i]["messages"][-1:], "label": raw[i]["label"]}
                for i in order]
    trainer = KTOTrainer(model=_causal_lm(policy_dir), ref_model=_causal_lm(ref_dir),
                         args=_trl_args(KTOConfig, tmp_path, beta=0.1, undesirable_weight=1.2, max_length=None,
                                        train_sampling_strategy="sequential"),
                         train_dataset=Dataset.from_list(trl_data), processing_class=tokenizer)
    for i, trl_row in zip(order, trainer.train_dataset):
        assert rows[i]["prompt_ids"] == trl_row["prompt_ids"]
        assert rows[i]["completion_ids"] == trl_row["completion_ids"]
    labels = [rows[i]["label"] for i in order]
    assert any(labels) and not all(labels)
    theirs = _trl_first_step(trainer)

    assert ours["loss"] == pytest.approx(theirs["loss"], rel=RTOL, abs=ATOL)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=RTOL)
    _assert_metrics(ours, theirs, ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                                   "logps/rejected"), 0.1)
    # z₀ is a difference of float32 sums of size ~2e3 (policy and reference log-probs of the KL sequences): it
    # is defined to a few float32 ulps of that size only (~2.4e-4), whichever code computes it.
    assert ours["kl"] == pytest.approx(theirs["kl"], abs=2.5e-4)
    assert ours["kl"] > 0.05  # the distinct reference makes z₀ non-trivial


def _trl_paired_ids(row: dict) -> dict:
    """reinforge's tokenised pair in the columns of TRL's CPO/ORPO trainers (prompt tokens labelled -100)."""
    out = {"prompt_input_ids": row["prompt_ids"], "prompt_attention_mask": [1] * len(row["prompt_ids"])}
    for side in ("chosen", "rejected"):
        ids = row["prompt_ids"] + row[f"{side}_ids"]
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                    f"{side}_labels": [-100] * len(row["prompt_ids"]) + row[f"{side}_ids"]})
    return out


def test_simpo_default_layout_against_cpo_trainer(tiny_model_dir, tmp_path):
    """SimPO = TRL's CPOTrainer with loss_type simpo and cpo_alpha 0.

    TRL's CPO trainer renders the chat template as a string and appends EOS to each completion unless it ends
    with it; SmolLM2's assistant turn ends with "<|im_end|>\\n", so TRL scores one extra <|im_end|> after the
    newline, a token the model never sees after a turn at inference. reinforge scores the template's rendering as
    is (as TRL's DPO and KTO trainers do). That is checked on TRL's own tokenisation below; then TRL's trainer
    trains one step on reinforge's token ids (its collator, loss, clipping and logging).
    TRL logs nll_loss 0 when cpo_alpha = 0 (it skips the term); reinforge logs the chosen NLL it would add.
    """
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    cfg = _base_cfg(tmp_path, base_model=str(tiny_model_dir), rl="simpo", rl_beta=2.0, simpo_gamma=1.0,
                    cpo_alpha=0.0, datasets=[DPO_DATASET])
    ours, order, rows = _reinforge_first_step(cfg)
    tokenizer = load_tokenizer(build_config(cfg))
    raw = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[DPO_START:DPO_START + N_ROWS]
    trainer = CPOTrainer(model=_causal_lm(tiny_model_dir),
                         args=_trl_args(CPOConfig, tmp_path, loss_type="simpo", beta=2.0, simpo_gamma=1.0,
                                        cpo_alpha=0.0, max_length=4096, remove_unused_columns=False),
                         train_dataset=Dataset.from_list([_sharegpt_to_trl(raw[i]) for i in order]),
                         processing_class=tokenizer)
    eos = tokenizer.eos_token_id
    ours_rows = [rows[i] for i in order]
    for row, trl_row in zip(ours_rows, trainer.train_dataset):
        assert trl_row["chosen_input_ids"] == row["prompt_ids"] + row["chosen_ids"] + [eos]
        assert trl_row["rejected_input_ids"] == row["prompt_ids"] + row["rejected_ids"] + [eos]

    trainer.train_dataset = Dataset.from_list([_trl_paired_ids(r) for r in ours_rows])
    theirs = _trl_first_step(trainer)

    assert ours["loss"] == pytest.approx(theirs["loss"], rel=RTOL, abs=ATOL)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=RTOL)
    _assert_metrics(ours, theirs, PAIR_METRICS, 2.0)
    assert theirs["nll_loss"] == 0.0 and ours["nll_loss"] > 1.0  # the chosen NLL per token, ≈ ln(vocab) here


def test_orpo_default_layout_nll_over_response_only(tiny_model_dir, tmp_path):
    """ORPO against TRL's ORPOTrainer (one step on reinforge's token ids, as for SimPO: TRL's own tokenisation
    appends an EOS after the template's end of turn). The documented difference: reinforge's NLL term is the
    paper's L_SFT, over the chosen response tokens; TRL's (and Axolotl's, which uses it) averages over prompt and
    response tokens. No key switches it, so: the odds-ratio part (loss − nll_loss) and every metric but nll_loss
    are equal; TRL's nll_loss is the chosen sequences' NLL over every token, recomputed here with the model; ours
    is not."""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    cfg = _base_cfg(tmp_path, base_model=str(tiny_model_dir), rl="orpo", orpo_alpha=0.25, datasets=[DPO_DATASET])
    ours, order, rows = _reinforge_first_step(cfg)
    tokenizer = load_tokenizer(build_config(cfg))
    raw = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[DPO_START:DPO_START + N_ROWS]
    trainer = ORPOTrainer(model=_causal_lm(tiny_model_dir),
                          args=_trl_args(ORPOConfig, tmp_path, beta=0.25, max_length=4096, remove_unused_columns=False),
                          train_dataset=Dataset.from_list([_sharegpt_to_trl(raw[i]) for i in order]),
                          processing_class=tokenizer)
    ours_rows = [rows[i] for i in order]
    eos = tokenizer.eos_token_id
    for row, trl_row in zip(ours_rows, trainer.train_dataset):
        assert trl_row["chosen_input_ids"] == row["prompt_ids"] + row["chosen_ids"] + [eos]
    trainer.train_dataset = Dataset.from_list([_trl_paired_ids(r) for r in ours_rows])
    model = _causal_lm(tiny_model_dir)
    with torch.no_grad():  # TRL's NLL: every token of the chosen sequences after the first, prompt included
        sums = [F.cross_entropy(model(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]), reduction="sum")
                for ids in (r["prompt_ids"] + r["chosen_ids"] for r in ours_rows)]
        full_nll = float(sum(sums)) / sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) - 1 for r in ours_rows)
    theirs = _trl_first_step(trainer)

    assert ours["loss"] - ours["nll_loss"] == pytest.approx(theirs["loss"] - theirs["nll_loss"], rel=RTOL, abs=ATOL)
    _assert_metrics(ours, theirs, PAIR_METRICS + ("log_odds_ratio", "log_odds_chosen"), 0.25)
    assert theirs["nll_loss"] == pytest.approx(full_nll, rel=RTOL)
    assert ours["nll_loss"] != pytest.approx(full_nll, rel=1e-3)
    assert ours["grad_norm"] != pytest.approx(theirs["grad_norm"], rel=1e-3)  # the NLL terms differ


# ---------------------------------------------------------------------------------------------------------------
# GRPO: both trainers get the same fixed completions from one TRL-form rollout function (TRL 1.16's
# `rollout_func(prompts, trainer)`, reinforge's `trl.rollout_func` in TRL's form) and the same reward functions.

GRPO_FUNCS = '''
def fixed_rollout(prompts, trainer):
    """The k-th completion of each prompt is a fixed function of (prompt, k): lengths 3..8, the last one cut at
    max_completion_length (no EOS), so groups have different rewards and one completion is truncated."""
    tok = trainer.processing_class
    eos = tok.eos_token_id
    prompt_ids, completion_ids, seen = [], [], {}
    for prompt in prompts:
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        key = tuple(ids)
        k = seen[key] = seen.get(key, -1) + 1
        body = [(31 * (len(ids) + 3 * k + j)) % 4000 + 200 for j in range(2 + 2 * k)]
        prompt_ids.append(ids)
        completion_ids.append(body[:8] if k == 3 else body + [eos])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def length_reward(prompts, completions, completion_ids, **kwargs):
    return [len(c) / 8 for c in completion_ids]


def even_tokens(prompts, completions, completion_ids, **kwargs):
    return [sum(1 for t in c if t % 2 == 0) / max(len(c), 1) for c in completion_ids]
'''
GRPO_PROMPTS = ["Name a colour.", "What is two plus three?"]


@pytest.mark.parametrize("rl,loss_type", [("grpo", "dapo"), ("grpo", "grpo"), ("gdpo", "dapo")])
def test_grpo_first_step_with_fixed_completions(tiny_model_dir, tmp_path, monkeypatch, rl, loss_type):
    """GRPO's first step (GDPO: TRL's multi_objective_aggregation normalize_then_sum) against TRL's GRPOTrainer
    given the same completions and rewards: 2 prompts × 4 completions, 2 micro-batches of one group each, the
    default layout (each group's prompt computed once). Compared: loss, grad_norm, learning_rate, the reward and
    completion metrics, entropy and clip ratios."""
    import importlib

    import yaml
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from reinforge.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = f"fixed_rollouts_{rl}_{loss_type}"
    (tmp_path / f"{module}.py").write_text(GRPO_FUNCS)
    rows = [{"prompt": [{"role": "user", "content": text}]} for text in GRPO_PROMPTS]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trl_keys = {"num_generations": 4, "max_completion_length": 8, "temperature": 1.0, "beta": 0.0,
                "loss_type": loss_type, "epsilon": 0.2, "scale_rewards": "group",
                "rollout_func": f"{module}.fixed_rollout",
                "reward_funcs": [f"{module}.length_reward", f"{module}.even_tokens"], "reward_weights": [1.0, 0.5]}
    cfg = {"base_model": str(tiny_model_dir), "rl": rl, "datasets": [{"path": "prompts.jsonl"}],
           "trl": trl_keys, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 1,
           "learning_rate": 1e-5, "lr_scheduler": "linear", "max_grad_norm": 1.0, "output_dir": "out",
           "use_tensorboard": False, "seed": 42}
    parsed = build_config(cfg)
    assert parsed.sample_packing_value and parsed.prefix_sharing_value and parsed.chunked_logprobs
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    ours = next(m for m in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
                if m.get("step") == 1 and "loss" in m)

    funcs = importlib.import_module(module)
    tokenizer = load_tokenizer(parsed)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, fp16=False,
                      per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1, learning_rate=1e-5,
                      lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                      gradient_checkpointing=False, seed=42,
                      num_generations=4, max_completion_length=8, temperature=1.0, beta=0.0, loss_type=loss_type,
                      epsilon=0.2, scale_rewards="group", reward_weights=[1.0, 0.5],
                      multi_objective_aggregation="normalize_then_sum" if rl == "gdpo" else "sum_then_normalize")
    trainer = GRPOTrainer(model=_causal_lm(tiny_model_dir), reward_funcs=[funcs.length_reward, funcs.even_tokens],
                          args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          rollout_func=funcs.fixed_rollout)
    theirs = _trl_first_step(trainer)

    assert ours["loss"] != 0.0 and ours["grad_norm"] > 0.0
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=RTOL, abs=ATOL)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=RTOL)
    assert ours["learning_rate"] == pytest.approx(theirs["learning_rate"]) == 1e-5
    names = ["reward", "reward_std", "frac_reward_zero_std", "entropy", "completions/mean_length",
             "completions/min_length", "completions/max_length", "completions/clipped_ratio",
             "completions/mean_terminated_length", "clip_ratio/low_mean", "clip_ratio/low_min",
             "clip_ratio/high_mean", "clip_ratio/high_max", "clip_ratio/region_mean"]
    names += [f"rewards/{fn}/{stat}" for fn in ("length_reward", "even_tokens") for stat in ("mean", "std")]
    bad = [f"{n}: reinforge {ours.get(n)!r}, TRL {theirs.get(n)!r}" for n in names
           if n not in ours or ours[n] != pytest.approx(theirs[n], rel=RTOL, abs=ATOL)]
    assert not bad, "\n".join(bad)
    assert theirs["completions/clipped_ratio"] == pytest.approx(0.25)  # one truncated completion per group

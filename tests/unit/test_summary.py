"""The end-of-run summary: steps, first/last train metrics and eval before/after."""

from pathlib import Path

from reinforge.config.schema import ReinforgeConfig
from reinforge.data.tokenize import TokenizeStats
from reinforge.training.summary import print_summary


def test_summary_counts_steps_without_loss_and_shows_ebft_eval(capsys):
    cfg = ReinforgeConfig(base_model="m", rl="ebft", datasets=[{"path": "d.jsonl"}], ebft={"mode": "strided"})
    history = [{"step": 0, "eval_ebft/cfm_loss": 0.9, "eval_ebft/ce_loss": 3.0},
               {"step": 1, "loss": 0.5, "ebft/cfm_loss": 0.8},
               {"step": 2, "skipped_zero_adv_batches": 2.0},  # every micro-batch skipped: no loss logged
               {"step": 2, "eval_ebft/cfm_loss": 0.7, "eval_ebft/ce_loss": 2.5}]
    s = print_summary(cfg, history, TokenizeStats(rows_in=3, rows_out=3), Path("out"))
    out = capsys.readouterr().out
    assert s["steps"] == 2 and "reinforge ebft: 2 steps" in out
    assert s["eval_before_ebft/cfm_loss"] == 0.9 and s["eval_after_ebft/cfm_loss"] == 0.7
    assert "eval  ebft/ce_loss" in out and "before 3.0000  after 2.5000" in out
    assert s["first_loss"] == s["last_loss"] == 0.5


def test_summary_means_of_first_and_last_ten_steps(capsys):
    cfg = ReinforgeConfig(base_model="m", rl="ebft", datasets=[{"path": "d.jsonl"}], ebft={"mode": "strided"})
    history = [{"step": i, "loss": 0.0, "ebft/cfm_loss": float(i)} for i in range(1, 26)]
    s = print_summary(cfg, history, TokenizeStats(rows_in=3, rows_out=3), Path("out"))
    assert s["first10_mean_ebft/cfm_loss"] == 5.5 and s["last10_mean_ebft/cfm_loss"] == 20.5
    assert "(mean of the first 10 steps 5.5000, of the last 10 20.5000)" in capsys.readouterr().out
    s = print_summary(cfg, history[:19], TokenizeStats(rows_in=3, rows_out=3), Path("out"))
    assert "first10_mean_ebft/cfm_loss" not in s

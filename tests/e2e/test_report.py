"""The run report (output_dir/report: PNG plots and index.html) after real tiny runs, on interruption and error,
from `reinforge report`, and as a real headless browser shows it."""

import contextlib
import html
import io
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from reinforge.cli import main
from reinforge.training import report as report_mod
from reinforge.training.report import FIG_WIDTH_PX, figure_size_px, group, read_metrics, series

from conftest import DATA_DIR

DATASET = {"type": "chat_template.default", "field_messages": "conversations",
           "message_property_mappings": {"role": "from", "content": "value"},
           "roles": {"user": ["human"], "assistant": ["gpt"]}}
CHROMIUM = "/usr/bin/chromium"


def dpo_config(tmp_path: Path, model_dir: Path, **extra) -> Path:
    rows = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[:4]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    cfg = {"base_model": str(model_dir), "rl": "dpo", "datasets": [{**DATASET, "path": str(tmp_path / "pairs.json")}],
           "sequence_len": 64, "micro_batch_size": 2, "max_steps": 6, "learning_rate": 3e-3, "lr_scheduler": "constant",
           "output_dir": str(tmp_path / "out"), "logging_steps": 1, "use_tensorboard": False, **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def check_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The PNG decodes, has `size` pixels and is not blank (several colours); returns its RGB pixels."""
    with Image.open(path) as img:
        assert img.size == size, (path.name, img.size, size)
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.var() > 0, path
    packed = (pixels[..., 0].astype(np.uint32) << 16) | (pixels[..., 1].astype(np.uint32) << 8) | pixels[..., 2]
    assert len(np.unique(packed)) > 1, path
    return pixels


def check_report(out: Path) -> tuple[Path, list]:
    """Every figure of the grouping has its PNG (of the expected size, not blank) and is shown by index.html."""
    index = out / "report" / "index.html"
    assert index.is_file()
    figures = group(list(series(read_metrics(out))))
    page = index.read_text()
    for stem, _, panels in figures:
        check_png(out / "report" / f"{stem}.png", figure_size_px(len(panels)))
        assert f'<img src="{stem}.png"' in page
    assert sorted(p.name for p in (out / "report").glob("*.png")) == sorted(f"{s}.png" for s, _, _ in figures)
    return index, figures


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    """A tiny DPO run with eval curves: (output_dir, stdout, stderr)."""
    tmp = tmp_path_factory.mktemp("dpo-report")
    cfg = dpo_config(tmp, tiny_model_dir, val_set_size=1, eval_steps=3)
    rc, out, err = run_main(["train", str(cfg)])
    assert rc == 0, err
    return tmp / "out", out, err


def test_dpo_run_writes_report_named_in_summary(dpo_run):
    out, stdout, _ = dpo_run
    index, figures = check_report(out)
    assert f"  report: {index}" in stdout.splitlines()
    stems = [s for s, _, _ in figures]
    for stem in ("loss", "preference_rewards", "accuracies", "entropy", "log_probs", "optimisation", "other"):
        assert stem in stems, stems
    panels = dict((s, p) for s, _, p in figures)
    assert panels["loss"] == [("loss", ["loss", "eval_loss"])]  # eval overlaid on train
    assert figure_size_px(1) == (FIG_WIDTH_PX, 360)
    assert ("learning_rate", ["learning_rate"]) in panels["optimisation"]
    other = [n for _, names in panels["other"] for n in names]
    assert "epoch" in other and "skipped_nonfinite_steps" in other  # nothing is lost
    page = index.read_text()
    assert "<h1>reinforge dpo run: out</h1>" in page and "<td>finished</td>" in page
    first = read_metrics(out)[1]["loss"]  # step 1's training loss (record 0 is the step-0 evaluation)
    assert f"<td>loss</td><td class=\"n\">{first:.6g}</td>" in page
    config = (out / "reinforge_config.yaml").read_text()
    assert f"<pre>{html.escape(config)}</pre>" in page


def test_report_command_rewrites_and_errors_without_metrics(dpo_run, tmp_path):
    out, _, _ = dpo_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.safetensors", "report"))
    (copy / "report").mkdir()
    (copy / "report" / "stale.png").write_bytes(b"old")
    rc, stdout, err = run_main(["report", str(copy)])
    assert rc == 0, err
    assert stdout == f"{copy / 'report' / 'index.html'}\n"
    check_report(copy)  # the stale PNG is gone
    rc, stdout, err = run_main(["report", str(tmp_path / "empty")])
    assert rc == 2 and stdout == ""
    assert err == f"error: no metrics.jsonl in {tmp_path / 'empty'} (is it a reinforge output_dir of a run that " \
                  f"logged a step?)\n"


REWARDS = '''
from pathlib import Path


def even_tokens(prompts, completions, completion_ids, **kwargs):
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def constant(prompts, completions, **kwargs):
    return [1.0 for _ in completions]


def explode_after_first_log(prompts, completions, **kwargs):
    if Path("out/metrics.jsonl").exists():
        raise ZeroDivisionError("boom after a logged step")
    return [0.5 for _ in completions]
'''


def grpo_config(tmp_path: Path, model_dir: Path, monkeypatch, reward_funcs: list[str], **extra) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report_rewards.py").write_text(REWARDS)
    rows = [{"prompt": [{"role": "user", "content": f"Write about topic {i}."}]} for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trl = {"num_generations": 4, "max_completion_length": 6, "top_k": 20, "reward_funcs": reward_funcs, "beta": 0.04}
    cfg = {"base_model": str(model_dir), "rl": "grpo", "datasets": [{"path": "prompts.jsonl"}], "trl": trl,
           "micro_batch_size": 4, "max_steps": 3, "learning_rate": 1e-2, "lr_scheduler": "constant",
           "output_dir": "out", "use_tensorboard": False, "seed": 1, **extra}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "grpo.yaml"


def test_grpo_run_writes_report(tmp_path, monkeypatch, tiny_model_dir):
    cfg = grpo_config(tmp_path, tiny_model_dir, monkeypatch, ["report_rewards.even_tokens", "report_rewards.constant"])
    rc, stdout, err = run_main(["train", str(cfg)])
    assert rc == 0, err
    index, figures = check_report(tmp_path / "out")
    assert "  report: out/report/index.html" in stdout.splitlines()
    panels = dict((s, p) for s, _, p in figures)
    assert panels["reward"] == [("reward", ["reward"]), ("per reward function (mean)",
                                                        ["rewards/constant/mean", "rewards/even_tokens/mean"])]
    for stem in ("loss", "reward_std", "completion_lengths", "kl", "entropy", "optimisation"):
        assert stem in panels, list(panels)
    assert "completions/mean_length" in panels["completion_lengths"][0][1]
    assert "<h1>reinforge grpo run: out</h1>" in index.read_text()


def test_error_after_logged_steps_writes_report(tmp_path, monkeypatch, tiny_model_dir):
    cfg = grpo_config(tmp_path, tiny_model_dir, monkeypatch, ["report_rewards.explode_after_first_log"])
    rc, _, err = run_main(["train", str(cfg)])
    assert rc == 1 and "boom after a logged step" in err
    index = tmp_path / "out" / "report" / "index.html"
    assert f"reinforge: report of the run so far: {Path('out') / 'report' / 'index.html'}" in err.splitlines()
    check_report(tmp_path / "out")
    assert "stopped by an error after step 1" in index.read_text()


def test_failing_plot_warns_once_and_the_run_succeeds(tmp_path, tiny_model_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no plotting today")

    monkeypatch.setattr(report_mod, "_plot", broken)
    rc, stdout, err = run_main(["train", str(dpo_config(tmp_path, tiny_model_dir, max_steps=2))])
    assert rc == 0
    warnings = [l for l in err.splitlines() if "report" in l]
    assert warnings == ["reinforge: warning: the report was not written: RuntimeError: no plotting today"]
    assert "report:" not in stdout and "reinforge dpo: 2 steps" in stdout
    assert not (tmp_path / "out" / "report").exists()


def test_sigint_writes_report_with_the_checkpoint(tmp_path, tiny_model_dir):
    from test_signals import config, start

    proc = start(tmp_path, config(tmp_path, tiny_model_dir))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 130
    err = (tmp_path / "stderr.txt").read_text()
    step = int(re.search(r"interrupted after step (\d+); checkpoint written to", err).group(1))
    index = tmp_path / "out" / "report" / "index.html"
    assert f"report: {index}" in err.splitlines()
    check_report(tmp_path / "out")
    assert f"interrupted after step {step}; checkpoint {tmp_path / 'out' / f'checkpoint-{step}'}" in index.read_text()


PROBE = """<script>window.addEventListener("load", () => {
  const p = document.createElement("pre"); p.id = "probe";
  p.textContent = JSON.stringify([...document.images].map(i => [i.getAttribute("src"), i.complete, i.naturalWidth,
                                                                i.naturalHeight]));
  document.body.appendChild(p);
});</script>"""


@pytest.mark.browser
def test_report_page_shows_its_plots_in_a_real_browser(dpo_run, tmp_path):
    """Chromium (headless) loads index.html from disk: every image loads at the PNG's size, and a screenshot of
    the page shows the plots' colours."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} missing: run `make browser` (apt-get install chromium; `make test` does it)")
    out, _, _ = dpo_run
    figures = group(list(series(read_metrics(out))))
    index = out / "report" / "index.html"
    probe = out / "report" / "probe.html"  # beside index.html, so that its relative image paths hold
    probe.write_text(index.read_text().replace("</body>", PROBE + "</body>"))
    base = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000"]
    try:
        dom = subprocess.run([*base, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120,
                             check=True).stdout
    finally:
        probe.unlink()
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m, dom[-2000:]
    images = json.loads(html.unescape(m.group(1)))
    expected = [[f"{stem}.png", True, *figure_size_px(len(panels))] for stem, _, panels in figures]
    assert images == expected
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1300,2400", index.as_uri()], capture_output=True,
                   timeout=120, check=True)
    pixels = check_png(shot, (1300, 2400)).astype(int)
    blue = (np.abs(pixels - np.array([31, 119, 180])).max(axis=2) <= 12).sum()  # matplotlib's first line colour
    orange = (np.abs(pixels - np.array([255, 127, 14])).max(axis=2) <= 12).sum()  # its second
    assert blue > 200 and orange > 200, (blue, orange)

"""`reinforge validate` (and the start of train/preprocess/merge-lora/inference) reports every problem that
needs no weights: models, datasets, dataset types, reward/rollout functions, the run's state."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT
from reinforge.cli import main
from reinforge.config import load_config
from reinforge.config.preflight import preflight_errors

PAIRS = [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}] * 4
PROMPTS = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "answer": "4"} for i in range(8)]
GOOD_REWARD = "def ok(prompts, completions, **kwargs):\n    return [1.0 for _ in completions]\n"


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory holding pairs.json, prompts.jsonl and pf_rewards.py (an importable reward). Module
    names are unique to this file: imports are cached per process."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.json").write_text(json.dumps(PAIRS))
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in PROMPTS))
    (tmp_path / "pf_rewards.py").write_text(GOOD_REWARD)
    return tmp_path


def write(tmp_path: Path, cfg: dict, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def dpo(model, **extra):
    return {"base_model": str(model), "rl": "dpo", "datasets": [{"path": "pairs.json"}], "output_dir": "out",
            "use_tensorboard": False, **extra}


def grpo(model, trl=None, **extra):
    return {"base_model": str(model), "rl": "grpo", "datasets": [{"path": "prompts.jsonl"}], "micro_batch_size": 4,
            "trl": {"num_generations": 4, "reward_funcs": ["pf_rewards.ok"], **(trl or {})}, "output_dir": "out",
            "use_tensorboard": False, **extra}


def validate(tmp_path, cfg, capsys, *extra) -> tuple[int, str]:
    code = main(["validate", write(tmp_path, cfg), *extra])
    return code, capsys.readouterr().err


def test_valid_config_passes_and_prints_the_config(work, tiny_model_dir, capsys):
    assert main(["validate", write(work, grpo(tiny_model_dir))]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["trl"]["reward_funcs"] == ["pf_rewards.ok"]


def test_misspelt_type_gives_trains_did_you_mean(work, tiny_model_dir, capsys):
    """The message is the one data preparation gives (`resolve_format`, the same code)."""
    from reinforge.data.errors import DataError
    from reinforge.data.prepare import resolve_format

    cfg = dpo(tiny_model_dir, datasets=[{"path": "pairs.json", "type": "chatml.intell"}])
    code, err = validate(work, cfg, capsys)
    assert code == 2
    with pytest.raises(DataError) as prepared:
        resolve_format(load_config(write(work, cfg)).datasets[0], "paired", PAIRS[0])
    first = str(prepared.value).splitlines()[0]
    assert "Did you mean chatml.intel" in first
    assert f"`datasets[0].type`: {first}" in err
    assert main(["train", write(work, cfg)]) == 2  # train stops on it before loading anything
    assert f"`datasets[0].type`: {first}" in capsys.readouterr().err


def test_types_of_test_datasets_and_module_fn(work, tiny_model_dir, capsys):
    (work / "pf_tf.py").write_text("def transform(cfg, dataset_idx=0):\n    return lambda row: row\n")
    cfg = dpo(tiny_model_dir, datasets=[{"path": "pairs.json", "type": "pf_tf.transform"}],
              test_datasets=[{"path": "pairs.json", "type": "pf_tf.nothing"}, {"path": "pairs.json", "type": "nomod.fn"}])
    code, err = validate(work, cfg, capsys)
    assert code == 2 and "2 problem(s)" in err and "datasets[0]" not in err.replace("test_datasets[0]", "")
    assert "`test_datasets[0].type`:" in err and "pf_tf.py has no function `nothing`" in err
    assert "`test_datasets[1].type`:" in err and "no module `nomod` with a function `fn`" in err


def test_missing_local_dataset_and_uncached_hub_dataset(work, tiny_model_dir, capsys):
    cfg = dpo(tiny_model_dir, datasets=[{"path": "pairs.json"}, {"path": "data/missing.jsonl"},
                                        {"path": "nobody-xyz/no-such-dataset"}])
    code, err = validate(work, cfg, capsys)
    assert code == 2
    assert f"`datasets[1].path`: file or directory not found: data/missing.jsonl (working directory {work})" in err
    assert "`datasets[2].path`: 'nobody-xyz/no-such-dataset' is not a local file or directory" in err
    assert "hf download --repo-type dataset nobody-xyz/no-such-dataset" in err


def _hub_cache_entry(cache: Path, repo_type: str, repo_id: str, files: dict[str, str]) -> None:
    """The layout huggingface_hub writes: <type>s--org--name/refs/main and snapshots/<commit>/<files>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)


def test_hub_model_and_dataset_in_the_offline_cache_pass(work, tiny_model_dir, capsys, monkeypatch):
    from huggingface_hub import constants

    cache = work / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    _hub_cache_entry(cache, "model", "someorg/ref-model", {"config.json": "{}"})
    _hub_cache_entry(cache, "dataset", "someorg/pairs", {"train.json": json.dumps(PAIRS)})
    cfg = dpo(tiny_model_dir, ref_model="someorg/ref-model", datasets=[{"path": "someorg/pairs"}])
    assert validate(work, cfg, capsys) == (0, "")
    code, err = validate(work, {**cfg, "ref_model": "someorg/other-model"}, capsys)
    assert code == 2 and "`ref_model`: 'someorg/other-model' is not a local directory" in err
    assert f"Hugging Face Hub model in the offline cache ({cache})" in err


def test_models_missing_each_named_with_how_to_get_it(work, tiny_model_dir, capsys):
    code, err = validate(work, dpo("models/SmolLM2-135M-Instruct"), capsys)
    assert code == 2 and "`base_model`: 'models/SmolLM2-135M-Instruct' is not a local directory" in err
    assert "run `make model`" in err
    (work / "empty").mkdir()
    (work / "weights.bin").write_text("x")
    code, err = validate(work, dpo(tiny_model_dir, tokenizer_config="nobody-xyz/tok", ref_model="empty"), capsys)
    assert code == 2 and "2 problem(s)" in err
    assert "`tokenizer_config`: 'nobody-xyz/tok' is not a local directory" in err and "hf download nobody-xyz/tok" in err
    assert "`ref_model`: the directory empty has no config.json" in err
    code, err = validate(work, dpo("missing.gguf"), capsys)
    assert code == 2 and f"`base_model`: GGUF file missing.gguf not found (working directory {work})" in err
    code, err = validate(work, dpo("weights.bin"), capsys)
    assert code == 2 and "`base_model`: weights.bin is a file, not a model directory or a .gguf file" in err


def test_reward_functions_must_import(work, tiny_model_dir, capsys):
    (work / "pf_broken.py").write_text("raise RuntimeError('cannot start')\n")
    cfg = grpo(tiny_model_dir, trl={"reward_funcs": ["pf_rewards.ok", "pf_rewards.missing", "nomod.fn", "pf_broken.fn", "accuracy"]})
    code, err = validate(work, cfg, capsys)
    assert code == 2 and "3 problem(s)" in err
    assert "`trl.reward_funcs[1]`: reward function 'pf_rewards.missing':" in err and "has no function 'missing'" in err
    assert "`trl.reward_funcs[2]`: reward function 'nomod.fn': module 'nomod' not found" in err
    line = next(l for l in err.splitlines() if "`trl.reward_funcs[3]`" in l)
    assert "importing module 'pf_broken' failed: RuntimeError: cannot start" in line


def test_rollout_function_must_import_and_fit_a_form(work, tiny_model_dir, capsys):
    (work / "pf_rollouts.py").write_text("def odd(x, y):\n    return []\n\n"
                                      "def trl_form(prompts, trainer):\n    return {}\n")
    code, err = validate(work, grpo(tiny_model_dir, trl={"rollout_func": "pf_rollouts.nothing"}), capsys)
    assert code == 2 and "`trl.rollout_func`: ImportError: module 'pf_rollouts' has no attribute 'nothing'" in err
    code, err = validate(work, grpo(tiny_model_dir, trl={"rollout_func": "pf_rollouts.odd"}), capsys)
    assert code == 2 and "`trl.rollout_func`: TypeError: rollout_func pf_rollouts.odd has parameters (x, y)" in err
    assert "TRL 1.16: fn(prompts, trainer)" in err
    code, err = validate(work, grpo(tiny_model_dir, trl={"rollout_func": "pf_rollouts.trl_form", "async_prefetch": True,
                                                        "use_data_producer": True}),
                         capsys)
    assert code == 2 and "pf_rollouts.trl_form has the trl form, which runs on the main thread" in err


def test_run_state_output_dir_and_resume(work, tiny_model_dir, capsys):
    code, err = validate(work, dpo(tiny_model_dir, resume_from_checkpoint=True), capsys)
    assert code == 2 and "resume_from_checkpoint: true, but output_dir out holds no complete checkpoint" in err
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("x")
    # validate: the config is valid; the directory's state is a note (train refuses it below)
    code, err = validate(work, dpo(tiny_model_dir), capsys)
    assert code == 0 and "note: train would refuse this output_dir as it is: output_dir out is not empty; set " \
        "overwrite_output_dir: true" in err
    assert validate(work, dpo(tiny_model_dir, overwrite_output_dir=True), capsys)[0] == 0
    # train: the run's state alone is exit 1 (the run cannot start), as before preflight
    assert main(["train", write(work, dpo(tiny_model_dir))]) == 1
    assert "output_dir out is not empty" in capsys.readouterr().err and (work / "out" / "keep.txt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")
def test_gpu_only_keys_on_cpu(work, tiny_model_dir, capsys):
    code, err = validate(work, dpo(tiny_model_dir, fp16=True, adapter="qlora", flex_attention=True), capsys)
    assert code == 2 and "3 problem(s)" in err
    assert "fp16 mixed precision needs a GPU" in err and "adapter: qlora needs a CUDA GPU" in err
    assert "flex_attention: true needs a CUDA GPU" in err


def test_generation_batch_that_cannot_be_split_over_processes(work, tiny_model_dir, capsys, monkeypatch):
    cfg = grpo(tiny_model_dir, trl={"generation_batch_size": 4})  # one prompt of 4 completions per rollout
    assert validate(work, cfg, capsys)[0] == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert preflight_errors(load_config(write(work, cfg)), "validate") == [
        "the generation batch (4 completions = 1 prompts × 4) cannot be split into whole prompt groups of "
        "micro-batches of 4 on 2 processes; make the number of prompts a multiple of 2"]


def test_unknown_chat_template_is_a_config_error(work, tiny_model_dir, capsys):
    code, err = validate(work, dpo(tiny_model_dir, chat_template="chatmlx",
                                   datasets=[{"path": "pairs.json", "chat_template": "lama3"}]), capsys)
    assert code == 2 and "`chat_template`: unknown chat_template 'chatmlx'; valid: tokenizer_default" in err
    assert "`datasets[0].chat_template`: unknown chat_template 'lama3'" in err


def test_every_problem_is_listed_at_once(work, tiny_model_dir, capsys):
    cfg = grpo("nobody-xyz/model", trl={"reward_funcs": ["nomod.fn"]},
               datasets=[{"path": "gone.jsonl", "type": "tf_missing.transform"}], resume_from_checkpoint=True)
    code, err = validate(work, cfg, capsys)
    assert code == 2 and "5 problem(s) found before loading anything" in err
    for key in ("`base_model`", "`datasets[0].path`", "`datasets[0].type`", "`trl.reward_funcs[0]`",
                "resume_from_checkpoint: true"):
        assert key in err


def test_other_commands_check_what_they_use(work, tiny_model_dir, capsys):
    cfg = write(work, dpo(tiny_model_dir, datasets=[{"path": "gone.json"}], adapter="lora"))
    assert main(["preprocess", cfg]) == 2
    assert "`datasets[0].path`: file or directory not found: gone.json" in capsys.readouterr().err
    missing_model = write(work, dpo("nobody-xyz/model", adapter="lora"), "m.yaml")
    for command in (["merge-lora", missing_model], ["inference", missing_model, "--prompt", "hi"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "`base_model`: 'nobody-xyz/model' is not a local directory" in err and "datasets" not in err
    assert preflight_errors(load_config(cfg), "merge-lora") == []  # merge-lora reads no data


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.slow  # the examples name the real model's directory (`make model`)
@pytest.mark.parametrize("example", [pytest.param(p, marks=pytest.mark.nemo_gym) if p.stem.startswith("nemo-gym") else p
                                     for p in EXAMPLES], ids=[p.stem for p in EXAMPLES])  # NeMo Gym data: `make gym`
def test_shipped_examples_pass_preflight(example, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples' paths are relative to the checkout
    cfg = load_config(example, [f"output_dir={tmp_path / 'out'}"])
    assert preflight_errors(cfg, "validate") == []


def test_tokenizer_default_needs_a_tokenizer_with_a_template(work, tiny_model_dir, capsys):
    import shutil

    assert (tiny_model_dir / "chat_template.jinja").is_file()
    assert validate(work, dpo(tiny_model_dir, chat_template="tokenizer_default"), capsys) == (0, "")
    bare = work / "bare-tokenizer"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, bare / name)
    cfg = dpo(tiny_model_dir, tokenizer_config=str(bare), datasets=[{"path": "pairs.json", "chat_template": "tokenizer_default"}])
    code, err = validate(work, cfg, capsys)
    assert code == 2 and f"`datasets[0].chat_template`: tokenizer_default, but the tokenizer of {bare} has no chat template" in err
    assert validate(work, {**cfg, "chat_template": "chatml", "datasets": [{"path": "pairs.json"}]}, capsys) == (0, "")

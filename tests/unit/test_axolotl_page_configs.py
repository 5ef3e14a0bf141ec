"""Every YAML config example of Axolotl's RLHF page passes `reinforge validate` unchanged but for its paths.

The page is tests/assets/axolotl_rlhf_page/rlhf.qmd (Axolotl's docs/rlhf.qmd, Apache-2.0; see the README there).
Each ```yaml block is one test. A block is laid over the base config of its section, which supplies only what the
block leaves out (a model, data, a reward function for a GRPO fragment; the page presents fragments as additions to
such a config); then the model and data paths are replaced: `base_model` → the tiny test model, Hub datasets and
`path: ...` placeholders → small local files in the page's documented formats, `~/Gym` → a local NeMo Gym-style
directory, the DeepSpeed JSON path → a local file. None of the block's own keys or values changes otherwise, and the
resolved config printed by `reinforge validate` must hold every one of them.

Three blocks ask for what reinforge does not have; `validate` refuses each in one line naming what it needs
(REFUSED below): context parallelism, and FSDP / DeepSpeed ZeRO-3 for GRPO (generation needs whole weights). One
asks for what this machine does not have: the strided EBFT block's `flex_attention: true` needs a CUDA GPU, and
without one `validate` (like `train`) says so in one line.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import DATA_DIR, ROOT

ASSETS = ROOT / "tests" / "assets" / "axolotl_rlhf_page"
PAGE = ASSETS / "rlhf.qmd"
DATA = ASSETS / "data"
GYM = ASSETS / "gym"
N_BLOCKS = 32  # ```yaml blocks on the page copy; a new copy of the page must be looked at again


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().split("{")[0]).strip("-")


def page_examples() -> list[tuple[str, str, str, str]]:
    """(id, section, subsection, yaml text) of every ```yaml block of the page, in page order.

    section: the enclosing `###` heading (the method); subsection: the `####` heading, then any deeper one
    ("Async GRPO/Replay Buffer")."""
    text = PAGE.read_text()
    out = []
    for i, m in enumerate(re.finditer(r"^```yaml\n(.*?)^```", text, re.S | re.M)):
        before = re.sub(r"^```.*?^```", "", text[:m.start()], flags=re.S | re.M)  # `# comments` in code are no headings
        section = re.findall(r"^### (.+)$", before, re.M)[-1].strip()
        after_section = before[[h.start() for h in re.finditer(r"^### ", before, re.M)][-1]:]
        parts = [re.findall(rf"^{'#' * n} (.+)$", after_section, re.M) for n in (4, 5)]
        group = parts[0][-1].strip() if parts[0] else ""
        deeper = after_section[[h.start() for h in re.finditer(r"^#### ", after_section, re.M)][-1]:] if group else ""
        sub = re.findall(r"^##### (.+)$", deeper, re.M)
        subsection = "/".join(p for p in (group, sub[-1].strip() if sub else "") if p)
        out.append((f"{i:02d}-{_slug(subsection or section)}", section, subsection, m.group(1)))
    return out


EXAMPLES = page_examples()

# Local files for the page's Hub datasets, in the formats the page documents for each `type:`.
HUB_DATA = {
    "Intel/orca_dpo_pairs": DATA / "orca_rlhf.jsonl",
    "argilla/ultrafeedback-binarized-preferences": DATA / "ultrafeedback_binarized.jsonl",
    "argilla/ultrafeedback-binarized-preferences-cleaned": DATA / "orpo_argilla.jsonl",
    "argilla/ultrafeedback-binarized-preferences-cleaned-kto": DATA / "kto_ultra.jsonl",
    "openai/gsm8k": DATA_DIR / "gsm8k" / "train.jsonl",
    "AI-MO/NuminaMath-TIR": DATA / "numina_math_tir.jsonl",
    "nvidia/OpenCodeInstruct": DATA / "opencode_instruct.jsonl",
}
# Files for the page's `path: ...` placeholders, by (rl, type).
PLACEHOLDER_DATA = {
    ("dpo", "chat_template.default"): DATA / "chat_template_default.jsonl",
    ("dpo", "user_defined"): DATA / "user_defined_dpo.jsonl",
    ("kto", "user_defined"): DATA / "user_defined_kto.jsonl",
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


_GRPO_BASE = {
    "rl": "grpo",
    "datasets": [{"path": "openai/gsm8k", "name": "main", "type": "rewards.oai_gsm8k_transform"}],
    "trl": {"reward_funcs": ["rewards.rand_reward_func"]},
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 2,
}
_ASYNC = next(yaml.safe_load(t) for _, _, sub, t in EXAMPLES if sub == "Async GRPO")
_FULL_ASYNC = next(yaml.safe_load(t) for _, _, sub, t in EXAMPLES if sub == "Async GRPO/Full Async GRPO Example")
# What each section's fragments are laid over (keys a block sets win).
SECTION_BASE = {
    "DPO": {"rl": "dpo", "datasets": [{"path": "Intel/orca_dpo_pairs", "split": "train", "type": "chatml.intel"}]},
    "IPO": {"datasets": [{"path": "Intel/orca_dpo_pairs", "split": "train", "type": "chatml.intel"}]},
    "ORPO": {},
    "KTO": {"micro_batch_size": 2},  # KTO's KL reference point needs >= 2 rows per batch
    "GRPO": _GRPO_BASE,
    "GDPO": _GRPO_BASE,
    "SimPO": {"datasets": [{"path": "Intel/orca_dpo_pairs", "split": "train", "type": "chatml.intel"}]},
    "EBFT {#ebft}": {"micro_batch_size": 4},  # structured: one rollout holds whole groups of num_generations
    "NeMo Gym Integration": {"micro_batch_size": 4},  # one rollout holds whole groups of num_generations
    "Using local dataset files": {"rl": "dpo"},
    "TRL auto-unwrapping for PEFT": {"rl": "dpo", "adapter": "lora",
                                     "datasets": [{"path": "Intel/orca_dpo_pairs", "type": "chatml.intel"}]},
}
# Fragments that the page presents as additions to another of its configs: the async features to the first async
# block (`use_data_producer`, `async_prefetch`, ...), the multi-GPU settings to the full async example.
SUBSECTION_BASE = {
    **{sub: _merge(_GRPO_BASE, _ASYNC) for _, _, sub, _ in EXAMPLES if sub.startswith("Async GRPO/")},
    "Async GRPO/Full Async GRPO Example": {},
    "Async GRPO/Multi-GPU Async GRPO": _FULL_ASYNC,
}

SHARDED_ONLINE = ("needs whole (not sharded) weights: FSDP and DeepSpeed ZeRO-3 are not supported for online methods yet")
# Refused by `validate` on a machine without CUDA only (train could not honour it; with a GPU it validates).
FLEX_ON_CPU = "flex_attention: true needs a CUDA GPU (PyTorch's FlexAttention has no backward on CPU)"
REFUSED = {
    "context_parallel_size": "context_parallel_size: 2 needs sequence parallelism over several GPUs (ring attention), "
                             "which reinforge does not implement; use 1",
    "fsdp": SHARDED_ONLINE,
    "deepspeed": SHARDED_ONLINE,
}


def _gym_path(path: str) -> str:
    return str(GYM / path[len("~/Gym/"):]) if path.startswith("~/Gym/") else path


def substitute_paths(cfg: dict, model_dir: Path) -> dict:
    """The model and data paths of a config replaced by local ones (see the module docstring); nothing else."""
    cfg = copy.deepcopy(cfg)
    cfg["base_model"] = str(model_dir)
    for ds in cfg.get("datasets") or []:
        path = ds.get("path")
        if path in HUB_DATA:
            ds["path"] = str(HUB_DATA[path])
        elif path == "...":
            kind = "user_defined" if isinstance(ds.get("type"), dict) else ds.get("type")
            ds["path"] = str(PLACEHOLDER_DATA[(cfg["rl"], kind)])
        elif isinstance(path, str):
            ds["path"] = _gym_path(path)
    if cfg.get("nemo_gym_enabled"):
        cfg["nemo_gym_dir"] = str(GYM)  # the page's ~/Gym (also the default when the key is left out)
    if isinstance(cfg.get("deepspeed"), str):
        cfg["deepspeed"] = str(ASSETS / Path(cfg["deepspeed"]).name)
    return cfg


def complete_config(section: str, subsection: str, block: dict, model_dir: Path) -> dict:
    """The block over its base, with the paths replaced."""
    base = SUBSECTION_BASE[subsection] if subsection in SUBSECTION_BASE else SECTION_BASE[section]
    return substitute_paths(_merge(base, block), model_dir)


def _leaves(data, prefix=""):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, value in enumerate(data):
            yield from _leaves(value, f"{prefix[:-1]}[{i}].")
    else:
        yield prefix[:-1], data


def _lookup(data, dotted: str):
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted):
        data = data[int(part[1:-1])] if part.startswith("[") else data[part]
    return data


# Axolotl's legacy keys that reinforge reads under another name (config/nemo_gym.py rewrite_raw).
RENAMED = {"message_field_role": "message_property_mappings.role",
           "message_field_content": "message_property_mappings.content"}


def _same(given, resolved) -> bool:
    if isinstance(given, str) and isinstance(resolved, (int, float)) and not isinstance(resolved, bool):
        return float(given) == float(resolved)  # YAML 1.1 reads `1e-5` as a string
    if given is None:  # `max_completion_length:` without a value: the default
        return True
    return given == resolved


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture
def page_dir(tmp_path, monkeypatch):
    """A working directory like the page's: its `rewards.py` / `math_env.py` and its `orca_rlhf.jsonl` beside the
    config (the local-files example names the file relative to the working directory)."""
    for f in (ASSETS / "modules").glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(DATA / "orca_rlhf.jsonl", tmp_path / "orca_rlhf.jsonl")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# sha256 of the issue's seed copy of the page (../shared/seeds/000_e8974f0642d7e83a.txt, flattened to one line),
# its whitespace collapsed: the copy here must be that page, also on a checkout without ../shared
SEED_SHA256 = "b55ef271723dfc291e16f2ff048007144c3eb244280a487709b5426d21f346c5"


def test_the_page_copy_is_the_issue_page():
    text = " ".join(PAGE.read_text().split())
    assert hashlib.sha256(text.encode()).hexdigest() == SEED_SHA256
    seed = ROOT.parent / "shared" / "seeds" / "000_e8974f0642d7e83a.txt"
    if seed.is_file():  # beside the shared folder, compare the text itself too
        assert text == " ".join(seed.read_text().split())


def test_the_page_copy_has_every_block():
    assert len(EXAMPLES) == N_BLOCKS
    assert {section for _, section, _, _ in EXAMPLES} == set(SECTION_BASE)


@pytest.mark.parametrize("example_id,section,subsection,text", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_page_example_validates(example_id, section, subsection, text, page_dir, tiny_model_dir, capsys):
    from reinforge.cli import main

    block = yaml.safe_load(text) or {}
    cfg = complete_config(section, subsection, block, tiny_model_dir)
    path = page_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc = main(["validate", str(path)])
    out, err = capsys.readouterr()
    refused = [msg for key, msg in REFUSED.items() if key in block]
    if block.get("flex_attention") and not _cuda():
        refused.append(FLEX_ON_CPU)
    if refused:
        assert rc == 2, out
        assert "1 problem(s)" in err and refused[0] in err, err
        return
    assert rc == 0, err
    resolved = yaml.safe_load(out)
    own = substitute_paths({**block, "rl": cfg["rl"]}, tiny_model_dir) if block else {}
    for key, value in _leaves({k: v for k, v in own.items() if k in block}):
        name = key.rsplit(".", 1)[-1]
        if name in RENAMED:
            key = key[: -len(name)] + RENAMED[name]
        assert _same(value, _lookup(resolved, key)), f"{key}: {value!r} resolved as {_lookup(resolved, key)!r}"


def test_local_files_example_loads_its_data_files(page_dir):
    """`ds_type: json` + `data_files` without `path` reads the files like datasets.load_dataset(ds_type, ...)."""
    from reinforge.config.schema import DatasetConfig
    from reinforge.data.errors import DataError
    from reinforge.data.sources import fingerprint, load_source, source_name

    block = next(yaml.safe_load(t) for _, s, _, t in EXAMPLES if s == "Using local dataset files")
    ds = DatasetConfig(**block["datasets"][0])
    assert ds.path is None and source_name(ds) == "orca_rlhf.jsonl"
    rows = load_source(ds)
    assert len(rows) == 4 and set(rows.column_names) == {"system", "question", "chosen", "rejected"}
    assert fingerprint(ds) is not None
    with pytest.raises(DataError, match="data_files.*not found: missing.jsonl"):
        load_source(DatasetConfig(ds_type="json", data_files=["missing.jsonl"]))
    with pytest.raises(ValueError, match="needs `path`"):
        DatasetConfig(type="chatml.intel")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"axolotl_page_{name}", ASSETS / "modules" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_page_modules_name_every_function_the_examples_use():
    """Every `rewards.*` / `math_env.*` name of the examples exists in the stand-in modules and behaves as the page
    says (transforms give a prompt and the answer; rewards one float per completion)."""
    named = set()
    for _, _, _, text in EXAMPLES:
        named |= set(re.findall(r"(?<![\w.])((?:rewards|math_env)\.[a-z_0-9]+)", text))
    modules = {"rewards": _module("rewards"), "math_env": _module("math_env")}
    for name in sorted(named):
        mod, fn = name.split(".")
        assert callable(getattr(modules[mod], fn, None)), name
    row = {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}
    fn, opts = modules["rewards"].oai_gsm8k_transform(None)
    assert fn(row) == {"prompt": [{"role": "user", "content": row["question"]}], "answer": "7"}
    assert opts == {"remove_columns": ["question"]}
    fn, _ = modules["rewards"].prompt_transform(None)
    assert fn({"problem": "1+1?", "solution": "so \\boxed{2}"})["answer"] == "2"
    completions = [[{"role": "assistant", "content": "the answer is 7"}], [{"role": "assistant", "content": "8"}]]
    assert modules["rewards"].correctness_reward(completions, answer=["7", "7"]) == [1.0, 0.0]
    assert modules["rewards"].format_reward(completions) == [1.0, 0.0]
    assert all(0.0 <= r < 1.0 for r in modules["rewards"].rand_reward_func(completions))
    assert modules["math_env"].math_reward(None, ["x FINAL ANSWER: 7", "7"], answers=["7", "7"]) == [1.0, 0.0]


# ---- what the page's keys do ----

def _cfg(model_dir, **keys):
    from reinforge.config.loader import build_config

    return build_config({"base_model": str(model_dir), "rl": "dpo", "datasets": [{"path": str(DATA / "orca_rlhf.jsonl"),
                                                                                    "type": "chatml.intel"}], **keys})


def test_gradient_checkpointing_kwargs_reach_torch_checkpoint(tiny_model_dir):
    """`gradient_checkpointing_kwargs` are the keyword arguments of every layer's checkpoint function (default
    use_reentrant: false); they need gradient_checkpointing and name torch's arguments only."""
    from reinforge.config import ConfigError
    from reinforge.models.loading import load_policy

    def checkpoint_kwargs(cfg):
        model = load_policy(cfg)
        layer = next(m for m in model.modules() if getattr(m, "gradient_checkpointing", False))
        return layer._gradient_checkpointing_func.keywords

    assert checkpoint_kwargs(_cfg(tiny_model_dir, gradient_checkpointing=True)) == {"use_reentrant": False}
    cfg = _cfg(tiny_model_dir, gradient_checkpointing=True, adapter="lora",
               gradient_checkpointing_kwargs={"use_reentrant": True, "preserve_rng_state": False})
    assert checkpoint_kwargs(cfg) == {"use_reentrant": True, "preserve_rng_state": False}
    with pytest.raises(ConfigError, match="only with gradient_checkpointing: true"):
        _cfg(tiny_model_dir, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ConfigError, match="unknown key `gradient_checkpointing_kwargs.use_rentrant`; did you mean "
                                          "`gradient_checkpointing_kwargs.use_reentrant`"):
        _cfg(tiny_model_dir, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_rentrant": True})


def test_keys_accepted_with_their_meaning(tiny_model_dir):
    from reinforge.config import ConfigError

    cfg = _cfg(tiny_model_dir, remove_unused_columns=False, context_parallel_size=1, flash_attention=False)
    assert cfg.remove_unused_columns is False and cfg.context_parallel_size == 1
    grpo = {"rl": "grpo", "trl": {"reward_funcs": ["accuracy"], "num_generations": 2, "max_completion_length": None},
            "micro_batch_size": 2}
    assert _cfg(tiny_model_dir, **grpo).trl.max_completion_length == 256  # `max_completion_length:` = the default
    with pytest.raises(ConfigError, match="context_parallel_size: 4 needs sequence parallelism"):
        _cfg(tiny_model_dir, context_parallel_size=4)
    with pytest.raises(ConfigError, match="either flash_attention or flex_attention"):
        _cfg(tiny_model_dir, flash_attention=True, flex_attention=True)


@pytest.mark.parametrize("keys,needs", [
    ({"flex_attention": True}, "flex_attention: true needs a CUDA GPU (PyTorch's FlexAttention has no backward on CPU)"),
    ({"flash_attention": True}, "flash_attention: true needs a CUDA GPU and the flash-attn package"),
    ({"fsdp": ["full_shard", "auto_wrap"]}, "fsdp / fsdp_config need CUDA GPUs"),
])
def test_train_refuses_what_this_machine_cannot_honour(keys, needs, tiny_model_dir, tmp_path, capsys):
    """Without CUDA, `reinforge train` stops before loading anything, in one line naming what the key needs."""
    import torch

    from reinforge.cli import main

    if torch.cuda.is_available():
        pytest.skip("the refusals are for machines without CUDA")
    path = tmp_path / "config.yaml"
    cfg = _cfg(tiny_model_dir, output_dir=str(tmp_path / "out"), **keys).model_dump(mode="json", exclude_defaults=True)
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if needs in line]) == 1, err  # one line, naming what it needs
    assert not (tmp_path / "out" / "metrics.jsonl").exists()

"""Checks that need no weights, run before any work: `reinforge validate`, and the start of `train`,
`preprocess`, `merge-lora`, `inference` and `vllm-serve` (each checks what it uses).

`preflight_errors(cfg, command)` returns one entry per problem, each naming the config key (one line; an unknown
`type:` adds the example record of the closest format on indented lines, as data preparation does):
- models (`base_model`, `tokenizer_config`, `ref_model`): a local directory (relative to the working
  directory), a `.gguf` file, or a Hugging Face Hub id in the offline cache;
- datasets (`datasets`, `test_datasets`, `nemo_gym_datasets`): a local file or directory, or a Hub dataset in
  the offline cache; every `type:` resolves as preparation resolves it (`reinforge.data.prepare.resolve_type`:
  same did-you-mean message; a `module.fn` must import);
- user code: every `trl.reward_funcs` entry (`reinforge.rewards.loading.load_reward_func`) and
  `trl.rollout_func` (`reinforge.rollout.functions.load_rollout_function`) imports, in a form training accepts;
- the run: the resume checkpoint, a non-empty `output_dir`, what this machine lacks (GPU for fp16/qlora,
  tracker packages), and a GRPO generation batch that cannot be split over the processes.
`preflight` raises PreflightError (a ConfigError) listing them all.
"""

from __future__ import annotations

import sys
from pathlib import Path

from reinforge.config.loader import ConfigError
from reinforge.config.schema import DatasetConfig, ReinforgeConfig

#: What each command checks: models it loads, data it prepares, user code it runs, the training run itself.
COMMANDS: dict[str, frozenset[str]] = {
    "train": frozenset({"models", "data", "code", "run"}),
    "validate": frozenset({"models", "data", "code", "run"}),
    "preprocess": frozenset({"tokenizer", "data"}),
    "merge-lora": frozenset({"models"}),
    "inference": frozenset({"models"}),
    "vllm-serve": frozenset({"models"}),
}

#: Files of which a tokenizer directory (or cached Hub repo) has at least one.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "config.json")

#: The model `make model` writes (see the Makefile).
MAKE_MODEL_DIR = "models/SmolLM2-135M-Instruct"


class PreflightError(ConfigError):
    """Problems found by `preflight`. `exit_code`: 2 (an invalid config or data; always for `validate`), or 1 when
    every problem is about the run's state on this machine (output_dir, resume checkpoint, GPU, packages), as
    when `train` found them later."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def preflight(cfg: ReinforgeConfig, command: str = "train", source: str = "<config>") -> None:
    """Run the checks of `command`; raises PreflightError (a ConfigError) listing every problem (`source`: the
    config file, named first)."""
    config_errors, run_errors = _problems(cfg, command)
    if command == "validate" and (note := _output_dir_problem(cfg)):
        # the directory's contents are the state of an earlier run, not a fault of the config: train refuses it
        print(f"note: train would refuse this output_dir as it is: {note}", file=sys.stderr)
    errors = config_errors + run_errors
    if errors:
        raise PreflightError(f"{source}: {len(errors)} problem(s) found before loading anything:\n"
                             + "\n".join(f"  - {e}" for e in errors),
                             exit_code=2 if config_errors or command == "validate" else 1)


def preflight_errors(cfg: ReinforgeConfig, command: str = "train") -> list[str]:
    """Every problem found for `command` (a key of COMMANDS) without loading weights (see the module docstring).

    Raises:
        ValueError: an unknown command.
    """
    config_errors, run_errors = _problems(cfg, command)
    return config_errors + run_errors


def _problems(cfg: ReinforgeConfig, command: str) -> tuple[list[str], list[str]]:
    """(problems of the config, its data, models and code; problems of the run's state on this machine)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    parts = COMMANDS[command]
    errors: list[str] = []
    if "models" in parts:
        errors += _model_errors(cfg, tokenizer_only=False)
    elif "tokenizer" in parts:
        errors += _model_errors(cfg, tokenizer_only=True)
    if "data" in parts:
        errors += _dataset_errors(cfg)
    if "code" in parts:
        errors += _code_errors(cfg)
    return errors, _run_errors(cfg, command) if "run" in parts else []


# ---- models ------------------------------------------------------------------------------------

def model_problem(key: str, value: str, needs: tuple[str, ...] = ("config.json",)) -> str | None:
    """Why `value` (the config's `key`) cannot be loaded offline, or None: it must be a local directory holding one
    of the files `needs`, a `.gguf` file, or a Hub id with one of them in the offline Hugging Face cache."""
    path = Path(value).expanduser()
    cwd = Path.cwd()
    if value.endswith(".gguf"):
        return None if path.is_file() else f"`{key}`: GGUF file {value} not found (working directory {cwd})"
    if path.is_dir():
        if any((path / name).is_file() for name in needs):
            return None
        return (f"`{key}`: the directory {value} has no {' or '.join(needs)}, so it is not a Hugging Face "
                f"{'tokenizer' if needs == TOKENIZER_FILES else 'model'} directory")
    if path.exists():
        return f"`{key}`: {value} is a file, not a model directory or a .gguf file"
    if any(_in_hub_cache(value, "model", name) for name in needs):
        return None
    from huggingface_hub import constants

    if Path(value).as_posix().rstrip("/").endswith(MAKE_MODEL_DIR):
        how = f"run `make model` in the reinforge checkout (it writes {MAKE_MODEL_DIR}) and run from there"
    else:
        how = (f"download it where there is network (`hf download {value}`; it is then read from the cache "
               f"offline) or set `{key}` to a local directory")
    return (f"`{key}`: {value!r} is not a local directory (relative to {cwd}), a .gguf file, or a Hugging Face "
            f"Hub model in the offline cache ({constants.HF_HUB_CACHE}); {how}")


def _in_hub_cache(repo_id: str, repo_type: str, filename: str | None) -> bool:
    """Whether the Hub repo (or its `filename`) is in the local Hugging Face cache; never uses the network."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    try:
        if filename is not None:
            return isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str)
        snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
        return True
    except (ValueError, OSError):  # HFValidationError (not a repo id) or LocalEntryNotFoundError (not cached)
        return False


def _model_errors(cfg: ReinforgeConfig, tokenizer_only: bool) -> list[str]:
    if tokenizer_only:
        key, value = ("tokenizer_config", cfg.tokenizer_config) if cfg.tokenizer_config else ("base_model", cfg.base_model)
        problem = model_problem(key, value, TOKENIZER_FILES)
        return [problem] if problem else []
    checks = [("base_model", cfg.base_model, ("config.json",))]
    if cfg.tokenizer_config:
        checks.append(("tokenizer_config", cfg.tokenizer_config, TOKENIZER_FILES))
    if cfg.ref_model:
        checks.append(("ref_model", cfg.ref_model, ("config.json",)))
    errors = [p for key, value, needs in checks if (p := model_problem(key, value, needs))]
    if not errors:
        errors += _chat_template_errors(cfg)
    return errors


def _chat_template_errors(cfg: ReinforgeConfig) -> list[str]:
    """`chat_template: tokenizer_default` (top level or per dataset) on a tokenizer without a template, told from
    its files (`chat_template.jinja`, `chat_template.json`, or the `chat_template` key of tokenizer_config.json)."""
    keys = [("chat_template", cfg.chat_template)] + [(f"datasets[{i}].chat_template", ds.chat_template)
                                                      for i, ds in enumerate(cfg.datasets)]
    keys = [key for key, value in keys if value == "tokenizer_default"]
    source = cfg.tokenizer_config or cfg.base_model
    if not keys or source.endswith(".gguf") or _has_chat_template(source) is not False:
        return []
    return [f"`{key}`: tokenizer_default, but the tokenizer of {source} has no chat template; choose a named "
            f"template (chat_template: chatml, llama3, ...) or tokenizer_default_fallback_<name>" for key in keys]


def _has_chat_template(source: str) -> bool | None:
    """Whether the tokenizer files of `source` (a local directory or a cached Hub id) hold a chat template; None
    when they cannot be read."""
    import json

    from huggingface_hub import try_to_load_from_cache

    def file(name: str) -> Path | None:
        local = Path(source).expanduser() / name
        if local.is_file():
            return local
        if Path(source).expanduser().is_dir():
            return None
        try:
            cached = try_to_load_from_cache(source, name)
        except ValueError:  # HFValidationError: not a repo id
            return None
        return Path(cached) if isinstance(cached, str) else None

    if file("chat_template.jinja") or file("chat_template.json"):
        return True
    config = file("tokenizer_config.json")
    if config is None:
        return None
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return None


# ---- datasets ----------------------------------------------------------------------------------

def dataset_problem(ds: DatasetConfig) -> str | None:
    """Why a dataset entry's `path` cannot be read offline, or None: a local file or directory (as
    `reinforge.data.sources` reads it) or a Hub dataset in the offline cache (hub or `datasets` cache)."""
    from reinforge.data.errors import DataError
    from reinforge.data.sources import _looks_local, local_files

    cwd = Path.cwd()
    try:
        if local_files(ds) is not None:
            return None
    except DataError as exc:
        return str(exc).splitlines()[0]
    if _looks_local(ds.path):
        return f"file or directory not found: {ds.path} (working directory {cwd})"
    if _hub_dataset_cached(ds.path):
        return None
    import datasets
    from huggingface_hub import constants

    return (f"{ds.path!r} is not a local file or directory (relative to {cwd}) nor a Hugging Face dataset in the "
            f"offline cache ({constants.HF_HUB_CACHE}, {datasets.config.HF_DATASETS_CACHE}); download it where there "
            f"is network (`hf download --repo-type dataset {ds.path}`, or `datasets.load_dataset` once) or set "
            f"`path` to a local file")


def _hub_dataset_cached(name: str) -> bool:
    """In the hub cache (`datasets--org--name`) or in `datasets`' own cache (`org___name`, as its offline
    loader looks it up)."""
    if _in_hub_cache(name, "dataset", None):
        return True
    import datasets
    from datasets.naming import camelcase_to_snakecase

    parts = name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    return (Path(datasets.config.HF_DATASETS_CACHE) / "___".join(parts)).is_dir()


def _dataset_errors(cfg: ReinforgeConfig) -> list[str]:
    from reinforge.data.errors import DataError
    from reinforge.data.prepare import KIND_OF_METHOD, resolve_type

    kind = KIND_OF_METHOD[cfg.rl]
    errors = []
    for role, entries in (("datasets", cfg.datasets), ("test_datasets", cfg.test_datasets or [])):
        for i, ds in enumerate(entries):
            if problem := dataset_problem(ds):
                errors.append(f"`{role}[{i}].path`: {problem}")
            if ds.type is None:
                continue  # detected from the first row when the data is prepared
            try:
                resolve_type(ds, kind, cfg, i)
            except DataError as exc:
                # the message data preparation gives, with the closest format's example on the following lines
                errors.append(f"`{role}[{i}].type`: " + str(exc).replace("\n", "\n    "))
    if cfg.nemo_gym_enabled:
        root = Path(cfg.nemo_gym_dir).expanduser()
        for i, entry in enumerate(cfg.nemo_gym_datasets or []):
            if not (root / entry.path).is_file():
                errors.append(f"`nemo_gym_datasets[{i}].path`: {root / entry.path} not found (the path is relative "
                              f"to nemo_gym_dir; `make gym` installs NeMo Gym's example data)")
    return errors


# ---- user code ---------------------------------------------------------------------------------

def _one_line(text: str) -> str:
    """A message on one line: with a traceback, its first line and the exception's line; else its lines joined."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return f"{lines[0].rstrip(':')}: {lines[-1]}"
    return "; ".join(lines)


def _code_errors(cfg: ReinforgeConfig) -> list[str]:
    from reinforge.algorithms.registry import method

    t = cfg.trl
    errors = []
    if method(cfg.rl).online and method(cfg.rl).rewards != "feature_matching":
        from reinforge.rewards.loading import RewardLoadError, load_reward_func

        for i, spec in enumerate(t.reward_funcs or []):
            try:
                load_reward_func(spec)
            except RewardLoadError as exc:
                errors.append(f"`trl.reward_funcs[{i}]`: {_one_line(str(exc))}")
    if t.rollout_func:
        from reinforge.rollout.functions import load_rollout_function

        try:
            fn = load_rollout_function(t.rollout_func)
        except Exception as exc:  # noqa: BLE001 - ImportError/TypeError, or the user's module failing to import
            errors.append(f"`trl.rollout_func`: {_one_line(f'{type(exc).__name__}: {exc}')}")
        else:
            if t.async_prefetch and not fn.thread_safe:
                errors.append(f"`trl.rollout_func`: {t.rollout_func} has the {fn.form} form, which runs on the main "
                              f"thread; trl.async_prefetch produces rollouts in a background thread and needs the "
                              f"reinforge form (fn(prompts, prompt_ids, generator, tokenizer, params))")
    return errors


# ---- the run -----------------------------------------------------------------------------------

def _output_dir_problem(cfg: ReinforgeConfig) -> str | None:
    """Why `train` would refuse `output_dir` as it is (not empty, nothing to resume), or None. With several
    processes the main one may already be writing it; `prepare_output_dir` checks it then."""
    from reinforge.training.distributed import launched_world_size
    from reinforge.training.setup import RunError, output_dir_problem, resolve_resume

    if launched_world_size() > 1:
        return None
    try:
        resuming = resolve_resume(cfg) is not None
    except RunError:
        return None  # reported by _run_errors
    return output_dir_problem(cfg, resuming)


def _run_errors(cfg: ReinforgeConfig, command: str) -> list[str]:
    """Problems of the run's state on this machine. For `validate`, a non-empty output_dir is a note (see
    `preflight`), not an error: the config is valid, and resuming or overwriting is the user's choice at train time."""
    from reinforge.algorithms.registry import method
    from reinforge.training.distributed import launched_world_size
    from reinforge.training.setup import RunError, environment_problems, resolve_resume

    errors = []
    try:
        resolve_resume(cfg)
    except RunError as exc:
        errors.append(str(exc))
    if command != "validate" and (problem := _output_dir_problem(cfg)):
        errors.append(problem)
    errors += environment_problems(cfg)
    world = max(1, launched_world_size())
    spec = method(cfg.rl)
    if spec.online and not (spec.rewards == "feature_matching" and cfg.ebft.mode == "strided"):
        from reinforge.training.online import prompts_per_process

        try:
            prompts_per_process(cfg, world)
        except RunError as exc:
            errors.append(str(exc))
    return errors


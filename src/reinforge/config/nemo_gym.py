"""Config keys of the NeMo Gym integration (Axolotl's top-level `nemo_gym_*` names and defaults) and `plugins:`.

NeMo Gym environments score GRPO rollouts: single-turn through each row's resource server `/verify`, multi-turn
through an agent server's `/run` (the agent calls the policy through a vLLM server). Mixed into `ReinforgeConfig`.
See docs/nemo_gym.md.

Also here (they come with Axolotl's NeMo Gym configs): Axolotl's legacy dataset keys `message_field_role` /
`message_field_content`, read as `message_property_mappings`.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Plugins a config may list (Axolotl's class paths); reinforge has the integration built in, so listing one
#: changes nothing by itself.
KNOWN_PLUGINS = {
    "axolotl.integrations.nemo_gym.NemoGymPlugin": "NeMo Gym (built into reinforge; switched on by nemo_gym_enabled)",
}

#: The reward function names of the integration (reinforge's own, then Axolotl's aliases).
VERIFY_REWARDS = ("reinforge.rewards.nemo_gym.reward_nemo_gym_verify", "nemo_gym.reward_nemo_gym_verify",
                  "axolotl.integrations.nemo_gym.rewards.reward_nemo_gym_verify")
ENV_REWARDS = ("reinforge.rewards.nemo_gym.reward_env", "nemo_gym.reward_env",
               "axolotl.integrations.nemo_gym.rewards.reward_env")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class NemoGymDataset(_Strict):
    """One entry of `nemo_gym_datasets:`: a NeMo Gym JSONL file and the resource server that verifies its rows."""

    path: str = Field(description="JSONL file relative to nemo_gym_dir (as in Axolotl: not absolute, or it is joined twice). The `datasets:` entry with the same file is the training data.")
    server_name: str | None = Field(default=None, description="Resource server (its top-level name in the NeMo Gym config) whose /verify scores the rows; a row's own `agent_ref` naming a resources server wins.")
    max_samples: int | None = Field(default=None, ge=1, description="Use at most this many rows of the file, drawn at random (as Axolotl) but seeded by `seed`: the matching `datasets:` entry reads a JSONL of those rows written to <dataset_prepared_path or ~/.cache/reinforge/prepared>/nemo_gym_samples/.")


class NemoGymKeys(_Strict):
    """`plugins:` and the `nemo_gym_*` keys (mixed into the top level)."""

    plugins: list[str] | None = Field(default=None, description="Axolotl plugin class paths; accepted: " + ", ".join(f"`{k}`" for k in KNOWN_PLUGINS) + " (the integration is built in: listing it is allowed, nemo_gym_enabled switches it on). Any other name is an error.")
    nemo_gym_enabled: bool = Field(default=False, description="Score GRPO/GDPO rollouts with NeMo Gym environments (single-turn /verify, or multi-turn agent /run with nemo_gym_multi_turn).")
    nemo_gym_dir: str = Field(default="~/Gym", description="NeMo Gym's directory: the one holding resources_servers/, responses_api_models/, responses_api_agents/ (a clone, or the site-packages of the installed wheel); ng_run runs there.")
    nemo_gym_venv: str | None = Field(default=None, description="reinforge's own: the environment whose bin/ has ng_run and uv. Default: nemo_gym_dir/.venv, else .venv-gym here or in the reinforge checkout (`make gym`), else PATH.")
    nemo_gym_auto_start: bool = Field(default=True, description="Start the NeMo Gym servers (`ng_run` with nemo_gym_config_paths) and stop them, and Ray, when training ends however it ends; servers already answering on the head port are reused and left running.")
    nemo_gym_config_paths: list[str] | None = Field(default=None, description="NeMo Gym config YAMLs for ng_run, relative to nemo_gym_dir (or absolute); required with nemo_gym_auto_start.")
    nemo_gym_head_port: int = Field(default=11000, ge=1, le=65535, description="Port of NeMo Gym's head server (it lists the servers and their URLs).")
    nemo_gym_host: str = Field(default="127.0.0.1", description="reinforge's own: address of the head server, and the default host of servers it starts. Servers on other (non-loopback) addresses are refused unless this is itself non-loopback.")
    nemo_gym_server_timeout: float = Field(default=360.0, gt=0.0, description="Seconds to wait for the head server and every configured server to answer at start.")
    nemo_gym_verify_timeout: float = Field(default=30.0, gt=0.0, description="Seconds one /verify request may take; a timeout or a non-200 answer masks that sample and is counted in nemo_gym/verify_errors.")
    nemo_gym_run_timeout: float = Field(default=300.0, gt=0.0, description="Seconds one agent /run episode (multi-turn) may take; a failed episode is a masked sample, counted in nemo_gym/run_errors.")
    nemo_gym_multi_turn: bool = Field(default=False, description="Rollouts come from an agent server's /run (the agent calls the policy through the vLLM server, runs the tools, verifies); needs trl.use_vllm and the reward reward_env.")
    nemo_gym_model_name: str | None = Field(default=None, description="Model name reported in the Responses objects sent to /verify; in multi-turn also the model the agent's model proxy asks the vLLM server for (`reinforge vllm-serve` serves the policy under it). Default: base_model.")
    nemo_gym_auto_clone: bool | None = Field(default=None, description="Axolotl's: clone NeMo Gym into nemo_gym_dir when it is missing (default on). reinforge never clones (no network access is assumed; `make gym` installs NeMo Gym from PyPI): a missing nemo_gym_dir stops the run with how to install it, whatever this says.")
    nemo_gym_max_turns: int | None = Field(default=None, ge=1, description="Multi-turn: most model calls per episode (Axolotl's meaning; Axolotl declares it, default 10, and leaves it to the agent). Servers reinforge starts get it as every agent's `max_steps`; with servers started by hand it is checked against the agents' `max_steps`. Default: the agent config's own `max_steps`.")
    nemo_gym_max_concurrency: int = Field(default=32, ge=1, description="reinforge's own: /verify or /run requests in flight at once per process.")
    nemo_gym_datasets: list[NemoGymDataset] | None = Field(default=None, description="The NeMo Gym JSONL files trained on, each with the resource server of its rows (see `nemo_gym_datasets[]`). Required with nemo_gym_enabled.")

    @model_validator(mode="before")
    @classmethod
    def _axolotl_dataset_keys(cls, data: Any) -> Any:
        return rewrite_raw(data)

    @model_validator(mode="after")
    def _check_nemo_gym(self):
        for name in self.plugins or []:
            if name not in KNOWN_PLUGINS:
                raise ValueError(f"plugins: {name!r} is not a plugin reinforge knows; accepted: "
                                 + ", ".join(KNOWN_PLUGINS) + " (reinforge has no plugin loader: other Axolotl "
                                 "integrations are not available)")
        if not self.nemo_gym_enabled:
            return self
        rl, trl = getattr(self, "rl", None), getattr(self, "trl", None)
        if rl not in ("grpo", "gdpo"):
            raise ValueError(f"nemo_gym_enabled scores GRPO rollouts; rl: {rl} has none (use rl: grpo or gdpo)")
        if self.nemo_gym_auto_start and not self.nemo_gym_config_paths:
            raise ValueError("nemo_gym_config_paths is required when nemo_gym_enabled and nemo_gym_auto_start are "
                             "on (the NeMo Gym configs ng_run starts); or set nemo_gym_auto_start: false and start "
                             "the servers yourself")
        if not self.nemo_gym_datasets:
            raise ValueError("nemo_gym_datasets is required with nemo_gym_enabled: at least one {path, server_name}")
        for d in self.nemo_gym_datasets:
            if os.path.isabs(os.path.expanduser(d.path)):
                raise ValueError(f"nemo_gym_datasets[].path {d.path!r} must be relative to nemo_gym_dir (as in Axolotl)")
        if not self.nemo_gym_multi_turn and not any(d.server_name for d in self.nemo_gym_datasets):
            raise ValueError("single-turn NeMo Gym needs nemo_gym_datasets[].server_name: the resource server whose "
                             "/verify scores the rows")
        funcs = list(trl.reward_funcs or []) if trl is not None else []
        wanted, other = (ENV_REWARDS, VERIFY_REWARDS) if self.nemo_gym_multi_turn else (VERIFY_REWARDS, ENV_REWARDS)
        mode = "multi-turn (nemo_gym_multi_turn: true)" if self.nemo_gym_multi_turn else "single-turn"
        if any(f in other for f in funcs):
            raise ValueError(f"trl.reward_funcs lists {next(f for f in funcs if f in other)}, which is not the reward "
                             f"of {mode} NeMo Gym; use {wanted[-1]} (or {wanted[0]})")
        if not any(f in wanted for f in funcs):
            raise ValueError(f"{mode} NeMo Gym rewards come from the reward function {wanted[-1]} (or {wanted[0]}); "
                             f"add it to trl.reward_funcs (reinforge adds no reward function by itself)")
        if trl is not None and trl.rollout_func:
            raise ValueError("trl.rollout_func cannot be combined with nemo_gym_enabled: NeMo Gym produces the "
                             "rollouts' rewards (and with multi-turn the rollouts themselves)")
        if self.nemo_gym_multi_turn and trl is not None and not trl.use_vllm:
            raise ValueError("nemo_gym_multi_turn: the agent samples from the policy through a vLLM server; set "
                             "trl.use_vllm: true (and start `reinforge vllm-serve` with the tool-call parser, see "
                             "docs/nemo_gym.md)")
        if self.nemo_gym_max_turns is not None and not self.nemo_gym_multi_turn:
            raise ValueError("nemo_gym_max_turns bounds the model calls of a multi-turn episode; it needs "
                             "nemo_gym_multi_turn: true")
        if trl is not None and trl.streaming_partial_batch:
            raise ValueError("trl.streaming_partial_batch does not apply with nemo_gym_enabled (rewards come from "
                             "NeMo Gym once a rollout's completions are verified); remove it")
        return self

    @property
    def nemo_gym_path(self) -> Path:
        """nemo_gym_dir, user-expanded and absolute."""
        return Path(os.path.expanduser(self.nemo_gym_dir)).resolve()

    @property
    def nemo_gym_policy_name(self) -> str:
        """The model name NeMo Gym's model proxy asks the vLLM server for (multi-turn): nemo_gym_model_name, else
        base_model. With LoRA sync the adapter is served under it; otherwise the base model is."""
        return self.nemo_gym_model_name or str(getattr(self, "base_model", ""))

    @property
    def nemo_gym_base_served_name(self) -> str:
        """Multi-turn with LoRA sync: the name the base model is served under (the policy's name + `-base`; vLLM
        refuses an adapter named like a served base model)."""
        return f"{self.nemo_gym_policy_name}-base"


def rewrite_raw(data: Any) -> Any:
    """The raw config with Axolotl's legacy `datasets[].message_field_role` / `message_field_content` moved into
    `message_property_mappings`, and the `datasets:` entry that reads the file of a `nemo_gym_datasets[]` entry with
    `max_samples` pointed at a seeded random sample of its rows (`sample_rows`). The loader applies it before
    checking for unknown keys. Raises ValueError on contradictory settings or an unreadable file."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for key in ("datasets", "test_datasets"):
        if isinstance(data.get(key), list):
            data[key] = [_legacy_message_fields(d) if isinstance(d, dict) else d for d in data[key]]
    if data.get("nemo_gym_enabled") and isinstance(data.get("nemo_gym_datasets"), list) \
            and isinstance(data.get("datasets"), list):
        data["datasets"] = [_limit_rows(d, data) if isinstance(d, dict) else d for d in data["datasets"]]
    return data


def _legacy_message_fields(ds: dict[str, Any]) -> dict[str, Any]:
    legacy = {"message_field_role": "role", "message_field_content": "content"}
    if not any(k in ds for k in legacy):
        return ds
    ds = dict(ds)
    mappings = dict(ds.get("message_property_mappings") or {})
    for key, prop in legacy.items():
        if key in ds:
            value = ds.pop(key)
            if prop in mappings and mappings[prop] != value:
                raise ValueError(f"datasets[].{key}: {value!r} disagrees with message_property_mappings.{prop}: "
                                 f"{mappings[prop]!r}; set one")
            mappings[prop] = value
    ds["message_property_mappings"] = mappings
    return ds


def _same_file(a: str, b: Path) -> bool:
    try:
        return Path(os.path.expanduser(a)).resolve() == b.resolve()
    except OSError:
        return False


def sample_rows(source: Path, n: int, seed: int, directory: Path) -> Path:
    """A JSONL file of `n` rows of the JSONL file `source` drawn at random without replacement (as Axolotl's
    `random.sample` of the file's lines, but seeded: `random.Random(seed)`), in the file's order; all rows when it
    has at most `n`. Written once to `directory`, named by the source's contents, `n` and `seed`, so a run (and a
    resumed one) reads the same rows. Raises ValueError when `source` cannot be read."""
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ValueError(f"nemo_gym_datasets[].max_samples: cannot read {source}: {exc}") from None
    lines = [l for l in data.decode().splitlines() if l.strip()]
    keep = sorted(random.Random(seed).sample(range(len(lines)), n)) if len(lines) > n else range(len(lines))
    digest = hashlib.sha256(data).hexdigest()[:12]
    path = directory / f"{source.stem}.{len(keep)}-of-{len(lines)}.seed{seed}.{digest}.jsonl"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(lines[i] + "\n" for i in keep))
        tmp.replace(path)
    return path


def _limit_rows(ds: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    gym_dir = data.get("nemo_gym_dir") or "~/Gym"
    for g in data["nemo_gym_datasets"]:
        if not isinstance(g, dict) or not g.get("max_samples") or not isinstance(ds.get("path"), str):
            continue
        source = Path(os.path.expanduser(gym_dir)) / str(g.get("path", ""))
        if _same_file(ds["path"], source):
            if (ds.get("split") or "train") != "train":
                raise ValueError(f"datasets[] {ds['path']}: split {ds['split']!r} and nemo_gym_datasets[].max_samples "
                                 f"({g['max_samples']}) both choose rows; set one")
            from reinforge.config.schema import ReinforgeConfig
            from reinforge.data.cache import default_dir

            seed = data.get("seed", ReinforgeConfig.model_fields["seed"].default)
            cache = Path(os.path.expanduser(str(data["dataset_prepared_path"]))) if data.get("dataset_prepared_path") \
                else default_dir()
            sample = sample_rows(source.resolve(), int(g["max_samples"]), int(seed), cache / "nemo_gym_samples")
            return {**ds, "path": str(sample)}
    return ds

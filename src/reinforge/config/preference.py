"""Config keys of the offline preference methods (DPO loss family, KTO, ORPO, SimPO/CPO), Axolotl's names.

Mixed into `ReinforgeConfig`; cross-field checks that involve `rl` live in `check_preference_keys`.
Every key defaults to None ("not set"): a key set for a method that does not read it is an error
rather than silently ignored. The effective values (defaults applied) are the `*_value` properties.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The DPO loss types of TRL 1.16 (`DPOConfig.loss_type`), and accepted older spellings. Kept free of
# torch so that loading a config stays fast; tests/unit/test_preference_config.py checks these equal
# `reinforge.algorithms.dpo.LOSS_TYPES` / `LOSS_ALIASES`.
DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
DPO_LOSS_ALIASES: dict[str, str] = {"aot_pair": "aot_unpaired"}
_USES_LABEL_SMOOTHING = {"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"}

_DPO_ONLY = ("dpo_loss_type", "dpo_loss_weights", "dpo_label_smoothing", "rpo_alpha", "dpo_use_weighting", "ld_alpha",
             "dpo_discopop_tau", "dpo_bco_running_mean")
_METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "kto_desirable_weight": ("kto",), "kto_undesirable_weight": ("kto",),
    "orpo_alpha": ("orpo",), "simpo_gamma": ("simpo",), "cpo_alpha": ("simpo",),
    **{k: ("dpo", "ipo") for k in _DPO_ONLY},
}


class PreferenceKeys(BaseModel):
    """Keys specific to offline preference methods (Axolotl's names; TRL's name in each description)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # --- DPO family (rl: dpo / ipo) ---
    dpo_loss_type: list[str] | None = Field(
        default=None, min_length=1,
        description="DPO loss types, summed with dpo_loss_weights (TRL `loss_type`; default [sigmoid]). One of: "
        + ", ".join(DPO_LOSS_TYPES) + " (aot_pair = aot_unpaired). A single string is read as a one-item list. "
        "MPO: [sigmoid, bco_pair, sft] with weights [0.8, 0.2, 1.0].",
    )
    dpo_loss_weights: list[float] | None = Field(
        default=None, min_length=1,
        description="One weight (finite, >= 0) per dpo_loss_type entry (TRL `loss_weights`; default all 1.0).",
    )
    dpo_label_smoothing: float | None = Field(
        default=None, ge=0.0, lt=0.5,
        description="ε in [0, 0.5) (TRL `label_smoothing`): cDPO for sigmoid, flip probability for robust, target "
        "smoothing for exo_pair (must be > 0; paper: 1e-3), smoothing for aot/aot_unpaired. Default 0. "
        "Not with IPO. Unlike TRL 1.16 (which ignores it for sigmoid), sigmoid + ε is cDPO.",
    )
    rpo_alpha: float | None = Field(
        default=None, ge=0.0,
        description="RPO (arXiv 2404.19733): adds rpo_alpha × the chosen completions' NLL per token to the DPO loss "
        "(TRL < 1.0 `rpo_alpha`; in TRL 1.16 the same as adding `sft` with this weight).",
    )
    dpo_use_weighting: bool | None = Field(
        default=None,
        description="WPO (arXiv 2406.11827): weight each pair by its length-normalised policy probability (TRL "
        "`use_weighting`). Default false. Not with aot/aot_unpaired.",
    )
    ld_alpha: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="LD-DPO (arXiv 2409.06411) α in [0, 1] (TRL `ld_alpha`): tokens beyond the shorter completion's "
        "length count with weight α in the sequence log-probs (1 = plain DPO). Default unset (plain DPO).",
    )
    dpo_discopop_tau: float | None = Field(
        default=None, gt=0.0,
        description="τ of the discopop loss (TRL `discopop_tau`), > 0. Default 0.05 (the paper's).",
    )
    dpo_bco_running_mean: bool | None = Field(
        default=None,
        description="bco_pair's reward shift δ: true (default) = running mean of the rewards seen in training, as in "
        "the BCO paper (arXiv 2404.04656) and TRL < 1.0; false = δ = 0, as TRL 1.16.",
    )

    # --- KTO ---
    kto_desirable_weight: float | None = Field(
        default=None, gt=0.0, description="λ_D, weight of desirable examples' losses (TRL `desirable_weight`; default 1.0).")
    kto_undesirable_weight: float | None = Field(
        default=None, gt=0.0, description="λ_U, weight of undesirable examples' losses (TRL `undesirable_weight`; default 1.0).")

    # --- ORPO ---
    orpo_alpha: float | None = Field(
        default=None, ge=0.0,
        description="λ of ORPO (arXiv 2403.07691): loss = NLL(chosen) + λ·odds-ratio loss (TRL `beta`). Default 0.1; "
        "`rl_beta`/`trl.beta` are accepted instead (Axolotl reads them first) but must agree when both are set.",
    )

    # --- SimPO / CPO ---
    simpo_gamma: float | None = Field(
        default=None, ge=0.0, description="SimPO target reward margin γ >= 0 (TRL `simpo_gamma`; default 0.5).")
    cpo_alpha: float | None = Field(
        default=None, ge=0.0,
        description="Weight of the chosen NLL term (CPO, arXiv 2401.08417; TRL `cpo_alpha`). Default 0.0 = SimPO "
        "proper; note TRL's CPOConfig defaults to 1.0 (CPO-SimPO), which Axolotl inherits when the key is unset.",
    )

    @field_validator("dpo_loss_type", mode="before")
    @classmethod
    def _loss_type_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("dpo_loss_type")
    @classmethod
    def _known_loss_types(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        unknown = [v for v in value if v not in DPO_LOSS_TYPES and v not in DPO_LOSS_ALIASES]
        if unknown:
            raise ValueError(f"unknown DPO loss type(s) {', '.join(map(repr, unknown))}; valid: "
                             + ", ".join(DPO_LOSS_TYPES + tuple(DPO_LOSS_ALIASES)))
        return value

    @field_validator("dpo_loss_weights")
    @classmethod
    def _finite_weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(not math.isfinite(w) or w < 0 for w in value):
            raise ValueError(f"dpo_loss_weights must be finite and >= 0, got {value}")
        return value

    # ---- effective values ----
    @property
    def dpo_loss_types_value(self) -> list[str]:
        """The DPO loss types in effect, canonical names: `rl: ipo` → [ipo]; else dpo_loss_type or [sigmoid]."""
        if getattr(self, "rl", None) == "ipo":
            return ["ipo"]
        return [DPO_LOSS_ALIASES.get(t, t) for t in (self.dpo_loss_type or ["sigmoid"])]

    @property
    def dpo_loss_weights_value(self) -> list[float]:
        """One weight per entry of `dpo_loss_types_value` (all 1.0 when unset)."""
        return list(self.dpo_loss_weights) if self.dpo_loss_weights is not None else [1.0] * len(self.dpo_loss_types_value)

    @model_validator(mode="after")
    def check_preference_keys(self) -> "PreferenceKeys":
        """Cross-field checks that need `rl` (available when mixed into ReinforgeConfig)."""
        rl = getattr(self, "rl", None)
        if rl is None:
            return self
        for key, methods in _METHOD_KEYS.items():
            if getattr(self, key) is not None and rl not in methods:
                raise ValueError(f"{key} is used only with rl: {' / '.join(methods)} (this config has rl: {rl}); "
                                 f"remove it")
        if rl == "ipo":
            if self.dpo_loss_type is not None:
                raise ValueError("rl: ipo is dpo_loss_type: [ipo]; to combine losses use rl: dpo with "
                                 f"dpo_loss_type: {self.dpo_loss_type}")
        if rl in ("dpo", "ipo"):
            self._check_dpo(rl)
        if rl == "kto":
            for key in ("micro_batch_size", "eval_batch_size"):
                value = getattr(self, key, None)
                if value is not None and value < 2:
                    raise ValueError(f"rl: kto needs {key} >= 2: the KL reference point is estimated from mismatched "
                                     f"(prompt, completion) pairs within a batch (got {key}: {value})")
        if rl == "orpo" and self.orpo_alpha is not None:
            trl = getattr(self, "trl", None)
            for key, value in (("rl_beta", getattr(self, "rl_beta", None)), ("trl.beta", getattr(trl, "beta", None))):
                if value is not None and value != self.orpo_alpha:
                    raise ValueError(f"rl: orpo takes λ from orpo_alpha={self.orpo_alpha}, but {key}={value} is also "
                                     "set and differs; set one")
        return self

    def _check_dpo(self, rl: str) -> None:
        types = self.dpo_loss_types_value
        if self.dpo_loss_weights is not None and len(self.dpo_loss_weights) != len(types):
            raise ValueError(f"dpo_loss_weights has {len(self.dpo_loss_weights)} entries but there are {len(types)} "
                             f"loss types ({', '.join(types)}); give one weight per type")
        if len(set(types)) != len(types):
            raise ValueError(f"dpo_loss_type lists a loss twice: {types}; combine them with one weight")
        eps = self.dpo_label_smoothing
        if eps is not None and eps > 0:
            if "ipo" in types:
                raise ValueError("dpo_label_smoothing does not apply to IPO (rl: ipo or dpo_loss_type ipo); remove it")
            if not _USES_LABEL_SMOOTHING.intersection(types):
                raise ValueError(f"dpo_label_smoothing has no effect on loss types {', '.join(types)}; it is read by "
                                 + ", ".join(sorted(_USES_LABEL_SMOOTHING)))
        if "exo_pair" in types and not (eps and eps > 0):
            raise ValueError("exo_pair needs dpo_label_smoothing > 0 (the EXO paper uses 1e-3)")
        if self.dpo_use_weighting and {"aot", "aot_unpaired"}.intersection(types):
            raise ValueError("dpo_use_weighting (WPO) is not defined for aot/aot_unpaired: those losses sort the batch, "
                             "so per-pair weights do not line up with the sorted terms")
        if self.ld_alpha is not None and getattr(self, "precompute_ref_log_probs", False):
            raise ValueError("ld_alpha (LD-DPO) needs the reference's per-token log-probs at every step; the "
                             "precomputed reference cache holds per-sequence sums. Unset precompute_ref_log_probs")
        if self.dpo_discopop_tau is not None and "discopop" not in types:
            raise ValueError("dpo_discopop_tau is used only with dpo_loss_type discopop")
        if self.dpo_bco_running_mean is not None and "bco_pair" not in types:
            raise ValueError("dpo_bco_running_mean is used only with dpo_loss_type bco_pair")

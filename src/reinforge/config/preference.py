"""Config keys of the offline preference methods (DPO loss family, KTO, ORPO, SimPO/CPO), Axolotl's names.

Mixed into `ReinforgeConfig`; cross-field checks that involve `rl` live in `check_preference_keys`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PreferenceKeys(BaseModel):
    """Keys specific to offline preference methods."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

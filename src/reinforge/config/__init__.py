"""Configuration: pydantic schema, YAML loading, dotted overrides, strict unknown-key errors."""

from reinforge.config.schema import DatasetConfig, ReinforgeConfig, TRLConfig
from reinforge.config.loader import ConfigError, load_config, parse_overrides

__all__ = ["ReinforgeConfig", "DatasetConfig", "TRLConfig", "ConfigError", "load_config", "parse_overrides"]

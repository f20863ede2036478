"""Configs: `base_awm` (every key), `dgx_awm` (SD3.5 presets), `tiny_awm` (CPU)."""

from advantage_weighted_matching.config.validate import ConfigError, batch_plan, format_batch_plan, validate

__all__ = ["ConfigError", "batch_plan", "format_batch_plan", "validate"]

"""grpo_lib: Group Relative Policy Optimization, one concept per module (see DESIGN.md)."""

__version__ = "0.2.0"

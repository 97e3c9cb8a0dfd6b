"""clawly: per-category abliteration of refusal behaviour in causal language models."""

__version__ = "0.1.0"

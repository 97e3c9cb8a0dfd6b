"""clawly: per-category abliteration of refusal behaviour in causal language models.

from clawly import Pipeline, Settings
"""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft) logs at import, on CPUs with AVX512-BF16, that it could not fetch an
# optional kernel from the Hub: noise on every command, and clawly never wants code from the Hub.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["Pipeline", "Settings", "TrialOutcome", "__version__"]


def __getattr__(name: str):
    # lazy: `import clawly` (and the settings alone) must not pull in torch and transformers
    if name in ("Pipeline", "TrialOutcome"):
        from clawly import api

        return getattr(api, name)
    if name == "Settings":
        from clawly.settings import Settings  # lazy, as above

        return Settings
    raise AttributeError(f"module 'clawly' has no attribute {name!r}")

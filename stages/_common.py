"""The shared entry point of every stage: Hydra config -> validated Settings -> library call.

User-fixable errors print one line (`clawly <stage>: error: ...`) and exit with status 2;
set CLAWLY_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from clawly.errors import ClawlyError
from clawly.log import StageLogger, get_logger
from clawly.settings import Settings

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def run_stage(name: str, step: Callable[[Settings, StageLogger], object]) -> None:
    """Run `step` as the Hydra app of stage `name` (call from the stage module's __main__)."""

    # an absolute path: with `python -m`, a relative config_path would be read as a Python package
    @hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
    def main(cfg: DictConfig) -> None:
        values = OmegaConf.to_container(cfg, resolve=True)
        try:
            settings = Settings.from_dict(values)  # type: ignore[arg-type]
            log = get_logger(name, os.path.join(settings.artifacts_dir, "logs"))
            log.event("start", "", config={k: v for k, v in values.items() if k != "hydra"})  # type: ignore[union-attr]
            step(settings, log)
            log.event("done")
        except ClawlyError as e:
            if os.environ.get("CLAWLY_DEBUG"):
                raise
            print(f"clawly {name}: error: {e}", file=sys.stderr)
            sys.exit(2)

    main()

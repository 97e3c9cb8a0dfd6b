"""Write params.yaml from conf/ exactly as DVC's Hydra composition does (for plain `dvc repro`).

    python -m stages.params                      # compose conf/config.yaml
    python -m stages.params optimize=full        # with overrides
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent


def composed_params(overrides: list[str] | None = None, config_dir: Path = ROOT / "conf") -> str:
    """The YAML text DVC writes to params.yaml for these overrides."""
    with initialize_config_dir(str(config_dir.resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=overrides or [])
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


if __name__ == "__main__":
    (ROOT / "params.yaml").write_text(composed_params(sys.argv[1:]), encoding="utf-8")
    print(f"wrote {ROOT / 'params.yaml'}")

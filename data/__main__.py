"""`python -m data [overrides]`: the data path alone (configs/data_app.yaml, the same `data` group as
`python -m train`).

    python -m data                                         # the default sources
    python -m data data=filtered                           # web-style quality filters, MinHash, langid
    python -m data data.num_shards=8 data.shard_index=3    # one Slurm array task's share
    python -m data '+stages.base={tokens: 1000000, mix: {code: 0.7, docs: 0.3}}'   # with a mix plan

Every step's counts are logged and land in `<cache_dir>/<hash>/manifest.json` and `report.md`/`.png`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from data.config import DataConfig
from train.errors import ConfigError


@dataclass
class DataApp:
    data: DataConfig = MISSING
    stages: dict[str, Any] = field(default_factory=dict)
    """Stages to plan the mix of ({stage: {tokens: target, mix: {source: weight}}}); empty: no plan."""
    run_dir: str = "runs/data"
    log_level: str = "INFO"


ConfigStore.instance().store(name="data_app_schema", node=DataApp)


@hydra.main(version_base="1.3", config_path="../configs", config_name="data_app")
def main(dcfg: DictConfig) -> None:
    from data.prepare import prepare_data

    try:
        cfg = OmegaConf.to_object(dcfg)
        logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        stages = {
            k: {"tokens": v.get("tokens", 0), "mix": dict(v.get("mix", {}))} for k, v in cfg.stages.items()
        }
        prepared = prepare_data(cfg.data, stages=stages or None)
    except ConfigError as e:
        print(f"kiln data: invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    if prepared is None:
        print(f"kiln data: shard {cfg.data.shard_index} of {cfg.data.num_shards} done; others still running")
    else:
        print(f"kiln data: prepared at {prepared.root}")


if __name__ == "__main__":
    main()

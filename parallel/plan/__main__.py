"""`python -m parallel.plan [plan=<example>] [cluster=<name>] [plan.key=value ...] [--dry-run]`

Prints the plan (size, tokens, batch and LR, layouts that fit with their memory and time) and writes the fastest
layout the run's schema accepts as `configs/generated/<plan.name>.yaml`, used as `python -m train
+generated=<plan.name>`. `--dry-run` prints only. Examples: configs/plan/*.yaml; clusters: configs/cluster/*.yaml.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from parallel.plan.planner import PlanConfig, config_choice, describe, format_plan, plan
from train.config import ClusterConfig
from train.errors import ConfigError

DRY_RUN = "--dry-run"


@dataclass
class PlannerConfig:
    plan: PlanConfig = MISSING
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    dry_run: bool = False


ConfigStore.instance().store(name="planner_schema", node=PlannerConfig)


def run(cfg: PlannerConfig, *, configs_dir: str) -> str:
    """Plan, print, and (unless dry_run) write the config; returns the text printed."""
    c = cfg.cluster
    p = plan(
        cfg.plan,
        cluster_name=c.name,
        gpu=c.gpu,
        gpus_per_node=c.gpus_per_node,
        max_nodes=c.max_nodes,
        intra_node_gbps=c.intra_node_gbps,
        inter_node_gbps=c.inter_node_gbps,
    )
    out = [format_plan(p)]
    chosen, hp, why = config_choice(p)
    if chosen is None:
        out.append(f"no layout that fits can be written as a run config yet: {why}")
    else:
        if chosen is not p.best:
            out.append(
                f"config uses {describe(chosen.layout)} (the fastest, {describe(p.best.layout)}: {why})"
            )
        if cfg.dry_run:
            out.append(f"--dry-run: {cfg.plan.out_dir}/{cfg.plan.name}.yaml not written")
        else:
            from parallel.plan.emit import write

            path = write(p, chosen, hp, out_dir=cfg.plan.out_dir, configs_dir=configs_dir)
            out.append(f"wrote {path}: python -m train +generated={cfg.plan.name}")
    text = "\n\n".join(out)
    print(text, flush=True)
    return text


CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="planner")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = OmegaConf.to_object(dcfg)
        assert isinstance(cfg, PlannerConfig)
        run(cfg, configs_dir=CONFIGS)
    except ConfigError as e:
        print(f"kiln plan: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if DRY_RUN in sys.argv:
        sys.argv.remove(DRY_RUN)
        sys.argv.append("dry_run=true")
    main()

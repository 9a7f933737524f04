"""The whole planner: budgets to plans, bad inputs, the generated config and the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from parallel.layout import ParallelLayout
from parallel.plan.emit import parallel_fields
from parallel.plan.memory import Layout
from parallel.plan.planner import PlanConfig, config_choice, plan
from train.config import register, to_config
from train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
H100 = {"cluster_name": "h100_sxm", "gpu": "h100_sxm", "gpus_per_node": 8, "max_nodes": 128}
LOCAL = {"cluster_name": "local", "gpu": "cpu", "gpus_per_node": 2, "max_nodes": 1}
register()


def test_chinchilla_budget_plans_a_70b_class_model_that_fits():
    p = plan(PlanConfig(flops=5.76e23, vocab_size=32000, seq_length=2048), **H100)
    assert p.params.total == pytest.approx(p.sizing.n_params, rel=0.02)  # the shape hits the law's N
    assert p.params.total == pytest.approx(70e9, rel=0.06) and p.hp.tokens == pytest.approx(1.4e12, rel=0.08)
    best = p.best
    assert best.memory.total <= 80e9 and best.layout.world == p.world
    assert best.batch_sequences % (best.layout.dp * best.layout.micro_batch) == 0
    assert p.days <= 30  # the fewest nodes that finish within max_days
    fewer = plan(PlanConfig(flops=5.76e23, vocab_size=32000, seq_length=2048, nodes=p.nodes // 2), **H100)
    assert fewer.days > 30
    # Every candidate in the table fits and they are sorted fastest first.
    times = [c.seconds_per_token for c in p.result.fits]
    assert times == sorted(times) and all(c.memory.total <= 80e9 for c in p.result.fits)


def test_gpu_hours_budget_and_overtraining():
    p = plan(PlanConfig(gpu_hours=1e5, mfu=0.4, tokens_per_param=200, nodes=8), **H100)
    assert p.flops == pytest.approx(1e5 * 3600 * 989.4e12 * 0.4)
    assert p.hp.tokens / p.params.total == pytest.approx(200, rel=0.05)
    assert p.world == 64


def test_moe_plan_sizes_active_parameters():
    p = plan(PlanConfig(flops=1e22, num_experts=64, top_k=8, seq_length=4096), **H100)
    assert p.params.active == pytest.approx(p.sizing.n_params, rel=0.02)
    assert p.params.total > 4 * p.params.active
    assert any(c.layout.ep > 1 for c in p.result.fits)


def test_budget_too_small_names_the_nearest_feasible_budget():
    with pytest.raises(
        ConfigError, match=r"plan.flops='1e\+10': the budget sizes a .* needs >= 4.18e\+13 FLOPs"
    ):
        plan(PlanConfig(flops=1e10, vocab_size=4096, seq_length=256), **LOCAL)


def test_no_layout_fits_names_the_nearest():
    with pytest.raises(
        ConfigError, match=r"plan.nodes=1: no layout of .* fits 40 GB per a100_40gb .* nearest: tp8"
    ):
        plan(
            PlanConfig(n_params=405e9, flops=1e25),
            cluster_name="x", gpu="a100_40gb", gpus_per_node=8, max_nodes=1,
        )  # fmt: skip


def _compose_generated(name: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=[f"+generated={name}"]))


def test_generated_config_composes_and_validates_as_the_plan(tmp_path):
    from parallel.plan.__main__ import PlannerConfig, run
    from train.config import ClusterConfig

    name = f"test_plan_{os.getpid()}"
    out = ROOT / "configs" / "generated"
    req = PlanConfig(name=name, flops=3e14, vocab_size=4096, seq_length=256, out_dir=str(out))
    try:
        text = run(PlannerConfig(plan=req, cluster=ClusterConfig()), configs_dir=str(ROOT / "configs"))
        assert f"python -m train +generated={name}" in text
        cfg = _compose_generated(name)
    finally:
        (out / f"{name}.yaml").unlink(missing_ok=True)
    p = plan(req, **LOCAL)
    chosen, hp, _ = config_choice(p)
    arch = cfg.model.arch()
    assert (arch.num_layers, arch.hidden_size, arch.ffn_hidden_size) == (
        p.arch.num_layers,
        p.arch.hidden_size,
        p.arch.ffn_hidden_size,
    )
    assert (cfg.parallel.tp, cfg.parallel.dp_size, cfg.parallel.micro_batch) == (
        chosen.layout.tp,
        chosen.layout.dp,
        chosen.layout.micro_batch,
    )
    base = cfg.recipe.stages["base"]
    assert list(cfg.recipe.stages) == ["base"] and cfg.run_dir == f"runs/kiln/{name}"
    assert (base.tokens, base.batch_tokens, base.seq_length) == (hp.tokens, hp.batch_tokens, 256)
    assert base.lr == pytest.approx(hp.lr, rel=1e-3) and cfg.data.tokenizer.vocab_size == 4096
    # The plan's predictions travel with the config, for the run report's predicted-vs-measured plot.
    from parallel.plan.emit import prediction

    expected = prediction(chosen)
    assert cfg.logging.predicted == pytest.approx(expected, rel=1e-3)
    assert cfg.logging.predicted["time/step"] == pytest.approx(chosen.time.total, rel=1e-3)


def test_shipped_generated_example_composes():
    cfg = _compose_generated("tiny_cpu")
    assert cfg.recipe.name == "tiny_cpu" and cfg.cluster.name == "local"
    assert set(cfg.logging.predicted) == {
        "time/step", "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "mem/peak_allocated_gb"
    }  # fmt: skip


def test_a_prediction_that_is_not_positive_is_refused():
    from train.config import LoggingConfig

    with pytest.raises(ConfigError, match=r"logging.predicted.time/step=0.0: must be > 0"):
        LoggingConfig(predicted={"time/step": 0.0})


@pytest.mark.parametrize("example", sorted(p.stem for p in (ROOT / "configs" / "plan").glob("*.yaml")))
def test_every_plan_example_composes_and_plans(example):
    from omegaconf import OmegaConf

    from parallel.plan.__main__ import PlannerConfig

    cluster = "local" if example == "tiny_cpu" else "h100_sxm"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        dcfg = compose(config_name="planner", overrides=[f"plan={example}", f"cluster={cluster}"])
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, PlannerConfig)
    c = cfg.cluster
    p = plan(cfg.plan, cluster_name=c.name, gpu=c.gpu, gpus_per_node=c.gpus_per_node, max_nodes=c.max_nodes)
    assert p.result.fits and p.best.memory.total <= p.result.memory_limit


def test_layout_fields_follow_the_run_schema():
    fields, why = parallel_fields(Layout(tp=2, dp=4, sp=True, micro_batch=2), gpus_per_node=8, nodes=1)
    assert why is None and (fields["tp"], fields["dp"], fields["zero_stage"], fields["sp"]) == (2, 4, 1, True)
    fields, why = parallel_fields(
        Layout(tp=2, pp=2, vpp=2, dp=2, ep=2, sp=True, recompute="selective"), gpus_per_node=8, nodes=1
    )
    assert why is None and (fields["pp"], fields["vpp"], fields["ep"], fields["recompute"]) == (
        2,
        2,
        2,
        "selective",
    )
    ParallelLayout(**fields)  # the run's own validation takes it
    # A layout the run refuses (here: deepspeed with PP) is not writable, with the layout's own reason.
    _, why = parallel_fields(Layout(pp=2, dp=4, engine="deepspeed", zero=3), gpus_per_node=8, nodes=1)
    assert why is not None and why.startswith("parallel.pp=2: engine=deepspeed")


def test_moe_model_fields_compose_as_an_arch():
    from parallel.plan.emit import model_fields
    from parallel.plan.flops import as_plan_arch, param_count
    from parallel.plan.shape import moe_shape
    from train.config import ModelConfig

    arch = moe_shape(2e8, vocab_size=32000, num_experts=16, top_k=2)
    fields, why = model_fields(arch, seq_length=4096)
    assert why is None and fields["extra"]["moe"]["num_experts"] == 16
    built = as_plan_arch(ModelConfig(**fields).arch())
    assert param_count(built, vocab_size=32000) == param_count(arch, vocab_size=32000)


@pytest.mark.slow  # two interpreters that import torch: ~20 s each on a loaded 2-core machine
def test_cli_dry_run_prints_and_writes_nothing(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "parallel.plan", "--dry-run", f"plan.out_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "memory/GPU" in r.stdout and "--dry-run" in r.stdout and "layouts fit" in r.stdout
    assert list(tmp_path.iterdir()) == []
    bad = subprocess.run(
        [sys.executable, "-m", "parallel.plan", "plan.flops=1e10"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "kiln plan: plan.flops='1e+10'" in bad.stderr


def test_plan_with_a_fitted_law(tmp_path):
    import json

    from parallel.plan.laws import EPOCH

    law = {"E": 2.0, "A": 300.0, "B": 1500.0, "alpha": 0.32, "beta": 0.34}
    (tmp_path / "fit.json").write_text(json.dumps({"parametric": law}))
    p = plan(PlanConfig(flops=1e21, fitted_law=str(tmp_path / "fit.json"), nodes=2), **H100)
    n_star, _ = type(EPOCH)(**law).optimal(1e21)
    assert p.sizing.n_params == pytest.approx(n_star, rel=1e-12) and p.sizing.law.startswith("fitted")
    assert p.params.total == pytest.approx(n_star, rel=0.02)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(
        ConfigError, match="plan.fitted_law=.*need a fit.json from `python -m parallel.plan.fit`"
    ):
        plan(PlanConfig(flops=1e21, fitted_law=str(tmp_path / "bad.json")), **H100)


def test_generated_cluster_plan_with_pipeline_composes_and_validates():
    from parallel.plan.__main__ import PlannerConfig, run
    from train.config import ClusterConfig

    name = f"test_plan_h100_{os.getpid()}"
    out = ROOT / "configs" / "generated"
    req = PlanConfig(name=name, flops=5.76e23, vocab_size=32000, seq_length=2048, out_dir=str(out))
    cluster = ClusterConfig(name="h100_sxm", gpu="h100_sxm", gpus_per_node=8, max_nodes=128,
                            intra_node_gbps=450, inter_node_gbps=50)  # fmt: skip
    try:
        run(PlannerConfig(plan=req, cluster=cluster), configs_dir=str(ROOT / "configs"))
        cfg = _compose_generated(name)
    finally:
        (out / f"{name}.yaml").unlink(missing_ok=True)
    p = plan(req, **H100)
    chosen, hp, why = config_choice(p)
    assert chosen is p.best and why is None  # the run's schema takes the fastest layout (PP and VPP here)
    par = cfg.parallel
    assert (par.tp, par.pp, par.vpp, par.dp_size, par.nnodes) == (
        chosen.layout.tp,
        chosen.layout.pp,
        chosen.layout.vpp,
        chosen.layout.dp,
        p.nodes,
    )
    assert cfg.cluster.name == "h100_sxm" and cfg.recipe.stages["base"].batch_tokens == hp.batch_tokens


def test_generated_config_renders_as_a_slurm_job():
    from parallel.plan.__main__ import PlannerConfig, run
    from slurm import submit
    from train.config import ClusterConfig

    name = f"test_plan_slurm_{os.getpid()}"
    out = ROOT / "configs" / "generated"
    req = PlanConfig(name=name, flops=1e22, vocab_size=32000, seq_length=4096, nodes=4, out_dir=str(out))
    cluster = ClusterConfig(name="h100_sxm", gpu="h100_sxm", gpus_per_node=8, max_nodes=128)
    try:
        run(PlannerConfig(plan=req, cluster=cluster), configs_dir=str(ROOT / "configs"))
        cfg = submit.load_config([f"+generated={name}"])
        jobs = submit.plan_training(cfg, [f"+generated={name}"])
    finally:
        (out / f"{name}.yaml").unlink(missing_ok=True)
    assert len(jobs) == 1 and "#SBATCH --nodes=4" in jobs[0].text and "+generated=" in jobs[0].text

"""Config composition, schema validation and the errors users see for configs that cannot work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from train.config import register, to_config
from train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = str(ROOT / "configs")
register()


def compose_cfg(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["data", "model", "parallel", "recipe", "logging", "cluster"])
def test_every_shipped_option_composes_and_validates(group):
    for option in options(group):
        cfg = to_config(compose_cfg([f"{group}={option}"]))
        assert cfg.recipe.stages, option


def test_default_config_values():
    cfg = to_config(compose_cfg())
    assert list(cfg.recipe.stages) == ["base", "long_context", "anneal"]
    assert cfg.run_dir == "runs/kiln/default"
    assert cfg.parallel.world_size == 2 and cfg.parallel.dp_size == 2
    lc = cfg.recipe.stages["long_context"]
    assert (
        lc.init_from == "base"
        and lc.seq_length == 1024
        and lc.rope_scaling
        == {
            "kind": "llama3",
            "factor": 4.0,
            "original_context": 256,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        }
    )
    anneal = cfg.recipe.stages["anneal"]
    assert anneal.lr is None and anneal.min_lr == 0 and anneal.schedule == "linear"
    assert anneal.mix["docs"] > anneal.mix["code"]
    assert cfg.model.arch().num_attention_heads % cfg.model.arch().num_kv_heads == 0


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["model.num_kv_heads=3"], "model.num_kv_heads", "must divide num_attention_heads=8"),
        (
            ["recipe.stages.base.batch_tokens=1280"],
            "recipe.stages.base.batch_tokens",
            "multiple of dp*micro_batch",
        ),
        (
            ["recipe.stages.base.batch_tokens=1000"],
            "recipe.stages.base.batch_tokens",
            "multiple of seq_length=256",
        ),
        (["parallel.tp=3"], "parallel.tp", "world size 2; try tp=2"),
        (["parallel.nproc_per_node=4", "parallel.tp=4", "model.num_kv_heads=2"], "parallel.tp", "try tp=2"),
        (["parallel.dp=3"], "parallel.dp", "use dp=2 or dp=-1"),
        (
            ["data.sources.docs.kind=files", "data.sources.docs.paths=[/no/such/dir/*.jsonl]"],
            "data.sources.docs.paths",
            "matches no file",
        ),
        (["+recipe.stages.anneal.mix.web=1.0"], "recipe.stages.anneal.mix.web", "no such data source"),
        (
            ["recipe.stages.long_context.init_from=nowhere"],
            "recipe.stages.long_context.init_from",
            "earlier stage",
        ),
        (
            ["recipe.stages.base.schedule=wsdx"],
            "recipe.stages.base.schedule",
            "cosine, linear, constant, wsd",
        ),
        (["recipe.stages.base.schedule=wsd"], "recipe.stages.base.decay_tokens", "20% of the stage"),
        (
            [
                "recipe.stages.base.schedule=wsd",
                "recipe.stages.base.decay_tokens=1000",
                "recipe.stages.base.decay_style=sqrt",
            ],
            "recipe.stages.base.decay_style",
            "1-sqrt",
        ),
        (
            ["recipe.stages.base.branch_tokens=[262144]"],
            "recipe.stages.base.branch_tokens",
            "only schedule=wsd_s has branches",
        ),
        (
            [
                "recipe.stages.base.schedule=wsd_s",
                "recipe.stages.base.decay_tokens=65536",
                "recipe.stages.base.branch_tokens=[98304]",  # only 32768 after the 65536-token warm-up
            ],
            "recipe.stages.base.branch_tokens",
            "at least decay_tokens=65536 after warm-up and the previous branch",
        ),
        (
            [
                "recipe.stages.base.schedule=wsd_s",
                "recipe.stages.base.decay_tokens=65536",
                "recipe.stages.base.branch_tokens=[200000]",
            ],
            "recipe.stages.base.branch_tokens",
            "multiple of batch_tokens=8192",
        ),
        (["recipe.stages.base.warmup_tokens=-1"], "recipe.stages.base.warmup_tokens", "must be in [0"),
        (
            ["recipe.stages.long_context.passkey_contexts=[100,1024]"],
            "recipe.stages.long_context.passkey_contexts",
            "each context must be >= 256 tokens",
        ),
        (["recipe.stages.base.passkey_depths=[0,1.5]"], "recipe.stages.base.passkey_depths", "in [0, 1]"),
        (["recipe.stages.base.passkey_trials=0"], "recipe.stages.base.passkey_trials", "must be >= 1"),
        (["logging.wandb.mode=sometimes"], "logging.wandb.mode", "offline, online, disabled"),
        (["only_stage=warmup"], "only_stage", "base, long_context, anneal"),
    ],
)
def test_invalid_config_names_key_value_and_fix(overrides, key, hint):
    with pytest.raises(ConfigError) as err:
        to_config(compose_cfg(overrides))
    assert err.value.key == key
    assert hint in str(err.value)
    assert str(err.value).startswith(f"{key}=")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_refuses_bad_config_before_any_process_starts(tmp_path):
    proc = _cli("model.num_kv_heads=3", f"run_dir={tmp_path}/run")
    assert proc.returncode == 2
    assert "kiln: invalid config: model.num_kv_heads=3: must divide num_attention_heads=8" in proc.stderr
    assert "torch.distributed.run" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "data").exists()  # no data work was done


def test_cli_unknown_group_option_lists_the_choices():
    proc = _cli("model=llama_huge", "--cfg", "job")
    assert proc.returncode != 0
    assert "Could not find 'model/llama_huge'" in proc.stderr
    assert "llama_tiny" in proc.stderr


def test_cli_help_lists_groups_and_cfg_job_prints_config():
    help_text = _cli("--help").stdout
    for group in ("data:", "model:", "parallel:", "stage:", "recipe:", "logging:"):
        assert group in help_text
    job = _cli("--cfg", "job", "experiment=demo").stdout
    assert "run_dir: runs/${experiment}/${name}" in job
    assert "rope_scaling:" in job


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["recipe.stages.long_context.rope_scaling.kind=none"],
            "recipe.stages.long_context.seq_length=1024: longer than the 256 tokens base trained at with the same "
            "RoPE, which does not extrapolate; set rope_scaling \\(e.g. \\{kind: linear, factor: 4\\}\\)",
        ),
        (
            ["recipe.stages.long_context.rope_scaling.original_context=8192"],
            "recipe.stages.long_context.rope_scaling.original_context=8192: llama3 scaling starts from the "
            "context base trained at: set original_context=256",
        ),
        (
            [
                "recipe.stages.long_context.rope_scaling.kind=linear",
                "recipe.stages.long_context.rope_scaling.factor=2",
            ],
            "linear factor 2 reaches 512 tokens from base's 256, short of seq_length=1024; use factor 4",
        ),
        (
            ["recipe.stages.long_context.rope_scaling.kind=warp"],
            "recipe.stages.long_context.rope_scaling.kind='warp': choose one of none, linear",
        ),
        (
            ["+recipe.stages.long_context.rope_scaling.fudge=2"],
            "recipe.stages.long_context.rope_scaling=.*unexpected keyword argument 'fudge'; its fields are kind",
        ),
        (["recipe.stages.anneal.rope_theta=-1"], "recipe.stages.anneal.rope_theta=-1.0: must be > 0"),
    ],
)
def test_stage_rope_changes_are_checked_against_the_context(overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_config(compose_cfg(overrides))


def test_stage_rope_changes_reach_the_model():
    cfg = to_config(
        compose_cfg(
            ["recipe.stages.long_context.rope_scaling.kind=none", "recipe.stages.long_context.rope_theta=4e5"]
        )
    )
    lc = cfg.recipe.stages["long_context"].arch(cfg.model.arch())  # ABF: a larger base instead of scaling
    assert lc.rope.kind == "none" and lc.rope_theta == 4e5
    anneal = cfg.recipe.stages["anneal"].arch(cfg.model.arch())
    assert (anneal.rope.kind, anneal.rope.factor, anneal.rope_theta) == (
        "llama3",
        4.0,
        cfg.model.arch().rope_theta,
    )


def test_llama3_8b_recipe_is_the_papers_three_stages():
    cfg = to_config(compose_cfg(["recipe=llama3_8b"]))
    arch = cfg.model.arch()
    assert (arch.num_layers, arch.hidden_size, arch.rope_theta) == (32, 4096, 500_000.0)
    base, lc, anneal = (cfg.recipe.stages[s] for s in ("base", "long_context", "anneal"))
    assert (base.seq_length, lc.seq_length, anneal.seq_length) == (8192, 131072, 131072)
    assert lc.arch(arch).rope.kind == "llama3" and lc.arch(arch).rope.original_context == 8192
    assert anneal.arch(arch).rope == lc.arch(arch).rope  # annealing continues the long-context model
    assert (anneal.lr, anneal.min_lr, anneal.schedule, anneal.average_last) == (None, 0.0, "linear", 5)
    assert lc.batch_tokens == anneal.batch_tokens == 4 * 1024 * 1024
    # Base ramps as the paper's Sec. 3.4.1: 4M-token batches of 4K sequences to 252M tokens, 8M of 8K to 2.87T,
    # then 16M; its 8,000 warm-up steps span the first two phases.
    plan = base.plan()
    assert [(p.batch_tokens, p.seq_length) for p in plan] == [
        (4 << 20, 4096),
        (8 << 20, 8192),
        (16 << 20, 8192),
    ]
    assert plan[0].steps == 61 and plan[0].end_token >= 252_000_000 > plan[0].end_token - (4 << 20)
    assert plan[1].end_token >= 2_870_000_000_000 > plan[1].end_token - (8 << 20)
    assert base.warmup_tokens == plan[0].end_token + (8000 - 61) * (8 << 20)


def test_olmo2_style_recipe_is_warmup_stable_then_decay_to_zero():
    cfg = to_config(compose_cfg(["recipe=olmo2_style"]))
    pre, anneal = cfg.recipe.stages["pretrain"], cfg.recipe.stages["anneal"]
    assert pre.schedule == "constant" and pre.min_lr == pre.lr and anneal.init_from == "pretrain"
    assert (anneal.lr, anneal.min_lr, anneal.schedule, anneal.keep_optimizer) == (None, 0.0, "linear", True)


def test_average_last_needs_that_many_checkpoints_in_the_stage():
    with pytest.raises(
        ConfigError, match="recipe.stages.anneal.average_last=3: needs 2..1 .*8 steps, one every 65536 tokens"
    ):
        to_config(
            compose_cfg(["recipe.stages.anneal.average_last=3", "recipe.stages.anneal.save_every_tokens=0"])
        )
    cfg = to_config(
        compose_cfg(["recipe.stages.anneal.average_last=3", "recipe.stages.anneal.save_every_tokens=16384"])
    )
    assert cfg.recipe.stages["anneal"].average_last == 3  # saves at steps 2, 4, 6 and the final 8


def test_context_parallel_presets_and_sequence_lengths():
    """parallel.cp: the run's stages are checked (parallel/layout.py check_batch); MLA models are fine too."""
    assert to_config(compose_cfg(["parallel=cp2"])).parallel.cp == 2
    assert to_config(compose_cfg(["parallel=cp2", "model=deepseek_v2_tiny"])).parallel.cp == 2
    with pytest.raises(ConfigError, match=r"recipe.stages.base.seq_length=258: .* multiple of 2\*cp"):
        to_config(
            compose_cfg(
                ["parallel=cp2", "recipe.stages.base.seq_length=258", "recipe.stages.base.batch_tokens=8256"]
            )
        )

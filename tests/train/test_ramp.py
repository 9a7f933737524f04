"""Batch-size and sequence-length ramps (train/ramp.py): the phases of a stage, the token-keyed intervals, the
cutting of samples into shorter sequences, the config checks, and (slow) real runs that follow a ramp with the
same losses at every layout and after a kill and restart."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from data.blend import split_sequences
from train.errors import ConfigError
from train.ramp import Phase, crossed, crossings, is_boundary, phase_at, phases


def test_phases_of_a_two_step_batch_ramp_and_a_sequence_warmup():
    # Samples of 8 tokens, 64 tokens per step at the end; 16 to 100 tokens, 32 to 300; sequences of 4 to 50.
    plan = phases(
        tokens=1000, seq_length=8, batch_tokens=64, batch_ramp=[[100, 16], [300, 32]], seq_ramp=[[50, 4]]
    )
    # Each phase ends at the first step that starts at or past its until_tokens (50 -> 64, 100 -> 112, 300 -> 304);
    # the stage stops at the last whole batch (944 of 1000 tokens).
    assert plan == [
        Phase(
            first_step=0,
            steps=4,
            first_token=0,
            first_sample=0,
            batch_tokens=16,
            seq_length=4,
            sample_length=8,
        ),
        Phase(
            first_step=4,
            steps=3,
            first_token=64,
            first_sample=8,
            batch_tokens=16,
            seq_length=8,
            sample_length=8,
        ),
        Phase(
            first_step=7,
            steps=6,
            first_token=112,
            first_sample=14,
            batch_tokens=32,
            seq_length=8,
            sample_length=8,
        ),
        Phase(
            first_step=13,
            steps=10,
            first_token=304,
            first_sample=38,
            batch_tokens=64,
            seq_length=8,
            sample_length=8,
        ),
    ]
    assert [p.split for p in plan] == [2, 1, 1, 1] and [p.samples_per_step for p in plan] == [2, 2, 4, 8]
    assert phase_at(plan, 0) is plan[0] and phase_at(plan, 6) is plan[1] and phase_at(plan, 22) is plan[3]
    assert plan[2].first_sample_of(9) == 14 + 2 * 4 and plan[3].first_sample_of(23) == 118
    # Without ramps: one phase, tokens // batch_tokens steps, as before ramps existed.
    assert phases(tokens=1000, seq_length=8, batch_tokens=64, batch_ramp=[], seq_ramp=[]) == [
        Phase(0, 15, 0, 0, 64, 8, 8)
    ]


def _steps(plan):
    """(tokens before, tokens after) of every step, one by one."""
    return [
        (p.first_token + i * p.batch_tokens, p.first_token + (i + 1) * p.batch_tokens)
        for p in plan
        for i in range(p.steps)
    ]


@pytest.mark.parametrize("every", [0, 7, 16, 40, 64, 100, 1000])
def test_crossings_and_boundaries_equal_a_step_by_step_count(every):
    plan = phases(
        tokens=1000, seq_length=8, batch_tokens=64, batch_ramp=[[100, 16], [300, 32]], seq_ramp=[[50, 4]]
    )
    steps = _steps(plan)
    assert crossings(plan, every) == sum(crossed(a, b, every) for a, b in steps[:-1])
    ends = {b for _, b in steps}
    assert [t for t in range(1001) if is_boundary(plan, t)] == sorted(ends)


def test_intervals_in_tokens_keep_the_step_intervals_of_a_constant_batch():
    plan = phases(tokens=64 * 20, seq_length=8, batch_tokens=64, batch_ramp=[], seq_ramp=[])
    saved = [b // 64 for a, b in _steps(plan) if crossed(a, b, 256)]
    assert saved == [4, 8, 12, 16, 20]  # save_every_tokens = 4 batches: every 4th step


def test_split_sequences_cuts_samples_in_order_with_fresh_positions():
    tokens = torch.arange(2 * 8).reshape(2, 8)
    mb = {
        "tokens": tokens,
        "labels": tokens + 1,
        "loss_mask": torch.ones(2, 8),
        "position_ids": torch.arange(8).expand(2, 8),
        "source": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
    }
    (cut,) = split_sequences([mb], 2)
    assert cut["tokens"].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert torch.equal(cut["labels"], cut["tokens"] + 1)
    assert cut["position_ids"].tolist() == [[0, 1]] * 8
    assert cut["source"].tolist() == [[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4
    assert cut["loss_mask"].shape == (8, 2)


def test_a_step_in_a_short_phase_trains_its_samples_cut_in_order():
    from train.ramp import step_micro_batches

    class Packed:  # sample i: tokens i*8 .. i*8+7, as a packed dataset of seq_length 8 gives them
        def __getitem__(self, i):
            t = torch.arange(i * 8, i * 8 + 8)
            return {"tokens": t, "labels": t + 1, "loss_mask": torch.ones(8), "position_ids": torch.arange(8)}

    plan = phases(tokens=1000, seq_length=8, batch_tokens=64, batch_ramp=[[100, 32]], seq_ramp=[[50, 4]])
    # Step 1 (second step of the first phase: 4 samples of 8 a step, sequences of 4): samples 4..7; rank 1 of 2
    # holds samples 6 and 7, one per micro-batch, each cut into 2 sequences of 4.
    micro = step_micro_batches(Packed(), plan, 1, dp_rank=1, dp_size=2, micro_batch=1)
    assert [mb["tokens"].tolist() for mb in micro] == [
        [[48, 49, 50, 51], [52, 53, 54, 55]],
        [[56, 57, 58, 59], [60, 61, 62, 63]],
    ]
    assert all(mb["position_ids"].tolist() == [[0, 1, 2, 3]] * 2 for mb in micro)
    # The first step past 50 tokens trains whole samples: step 2 starts at 64 tokens, sample 8.
    (mb,) = step_micro_batches(Packed(), plan, 2, dp_rank=0, dp_size=2, micro_batch=2)
    assert mb["tokens"].shape == (2, 8) and mb["tokens"][0, 0].item() == 8 * 8


def _cfg(*overrides):
    from tests.train.test_config import compose_cfg
    from train.config import to_config

    return to_config(compose_cfg(list(overrides)))


def test_a_ramped_stage_validates_and_counts_its_steps():
    cfg = _cfg(
        "recipe.stages.base.tokens=65536",
        "recipe.stages.base.warmup_tokens=4096",
        "+recipe.stages.base.batch_ramp=[[8192,2048],[16384,4096]]",
        "+recipe.stages.base.seq_ramp=[[8192,128]]",
    )
    base = cfg.recipe.stages["base"]
    # 4 steps of 2048, 2 of 4096, then (65536 - 16384) // 8192 = 6 steps of the stage's 8192.
    assert [(p.steps, p.batch_tokens, p.seq_length) for p in base.plan()] == [
        (4, 2048, 128),
        (2, 4096, 256),
        (6, 8192, 256),
    ]
    assert base.steps == 12 and base.trained_tokens == 65536 and base.samples == 4 * 8 + 2 * 16 + 6 * 32


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("+recipe.stages.base.batch_ramp=[[8192,2048],[4096,4096]]", "batch_ramp", "until_tokens increasing"),
        ("+recipe.stages.base.batch_ramp=[[8192]]", "batch_ramp", "[[until_tokens, batch_tokens], ...]"),
        ("+recipe.stages.base.batch_ramp=[[99999999,2048]]", "batch_ramp", "in (0, tokens="),
        ("+recipe.stages.base.batch_ramp=[[8192,1000]]", "batch_ramp", "multiple of seq_length=256"),
        ("+recipe.stages.base.seq_ramp=[[8192,100]]", "seq_ramp", "divide seq_length=256"),
        ("+recipe.stages.base.seq_ramp=[[8192,256]]", "seq_ramp", "and be shorter"),
    ],
)
def test_bad_ramps_are_refused_naming_the_stage_and_field(override, key, hint):
    with pytest.raises(ConfigError, match=rf"recipe\.stages\.base\.{key}") as err:
        _cfg(override)
    assert hint in str(err.value)


def test_ramps_must_fit_the_layout_and_the_engine():
    # dp=2, micro_batch=4: a ramp batch of 4 sequences cannot split into micro-batches of 4 on 2 ranks.
    with pytest.raises(
        ConfigError, match=r"recipe\.stages\.base\.batch_ramp.*multiple of dp\*micro_batch"
    ) as err:
        _cfg(
            "parallel.nproc_per_node=2",
            "parallel.micro_batch=4",
            "+recipe.stages.base.batch_ramp=[[8192,1024]]",
        )
    assert "try 8" in str(err.value)
    with pytest.raises(ConfigError, match=r"recipe\.stages\.base\.seq_ramp.*multiple of tp"):
        _cfg(
            "parallel.nproc_per_node=2",
            "parallel.tp=2",
            "parallel.sp=true",
            "+recipe.stages.base.seq_ramp=[[8192,1]]",
        )
    with pytest.raises(ConfigError, match=r"recipe\.stages\.base\.batch_ramp.*parallel.engine=deepspeed"):
        _cfg("parallel=deepspeed_zero1", "+recipe.stages.base.batch_ramp=[[8192,4096]]")
    _cfg("parallel=deepspeed_zero1", "+recipe.stages.base.seq_ramp=[[8192,128]]")  # same accumulation: fine


def test_wsd_s_branches_must_end_a_step_of_the_ramped_plan():
    common = [
        "recipe.stages.base.tokens=65536",
        "recipe.stages.base.eval_every_tokens=0",
        "recipe.stages.base.save_every_tokens=0",
        "recipe.stages.base.schedule=wsd_s",
        "recipe.stages.base.decay_tokens=4096",
        "recipe.stages.base.warmup_tokens=0",
        "+recipe.stages.base.batch_ramp=[[6144,2048]]",
    ]
    _cfg(*common, "recipe.stages.base.branch_tokens=[14336]")  # 3 x 2048 = 6144, then 6144 + 8192
    with pytest.raises(ConfigError, match=r"recipe\.stages\.base\.branch_tokens.*end a step"):
        _cfg(*common, "recipe.stages.base.branch_tokens=[16384]")


def test_a_checkpoint_without_the_ramp_fields_still_resumes(tmp_path):
    import json
    import os

    from train import checkpoint

    cfg = _cfg()
    record = checkpoint.resume_record(cfg, "base")
    old = {k: v for k, v in record.items() if not k.endswith(("batch_ramp", "seq_ramp"))}
    os.makedirs(tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / checkpoint.CONFIG_FILE, "w") as f:
        json.dump(old, f)
    checkpoint.check_resume(str(tmp_path / "ckpt"), record, allow=[])  # fields added since, at their defaults
    ramped = checkpoint.resume_record(_cfg("+recipe.stages.base.batch_ramp=[[8192,4096]]"), "base")
    with pytest.raises(ConfigError, match=r"recipe\.stages\.base\.batch_ramp"):
        checkpoint.check_resume(str(tmp_path / "ckpt"), ramped, allow=[])


def test_no_ramp_plan_matches_the_closed_form_for_every_small_stage():
    for tokens, seq, batch in itertools.product([256, 1000, 4096], [8, 16], [16, 64]):
        plan = phases(tokens=tokens, seq_length=seq, batch_tokens=batch, batch_ramp=[], seq_ramp=[])
        steps = tokens // batch
        assert sum(p.steps for p in plan) == steps and (not plan or plan[-1].end_token == steps * batch)
        assert math.isclose(sum(p.steps * p.samples_per_step for p in plan), steps * batch / seq)


# ------------------------------------------------------------------------------------- real runs (slow)
# 4 steps of 1024 tokens in sequences of 128 (each 256-token sample cut in two), 3 of 2048 at 256, then 3 of
# the stage's 4096: 10 steps, 22528 of the 24576 tokens.
RAMPED = [
    "parallel.micro_batch=1",
    "only_stage=base",
    "recipe.stages.base.tokens=24576",
    "recipe.stages.base.batch_tokens=4096",
    "recipe.stages.base.warmup_tokens=2048",
    "recipe.stages.base.eval_every_tokens=0",
    "+recipe.stages.base.batch_ramp=[[4096,1024],[10240,2048]]",
    "+recipe.stages.base.seq_ramp=[[4096,128]]",
]
TOKENS = [1024, 2048, 3072, 4096, 6144, 8192, 10240, 14336, 18432, 22528]
SAMPLES = [4, 8, 12, 16, 24, 32, 40, 56, 72, 88]


def _ramped_run(run_dir, data_cache, *extra, env=None):
    from tests.conftest import ROOT, SMALL, read_metrics, run_train

    proc = run_train(
        [*SMALL, *RAMPED, f"run_dir={run_dir}", f"data.cache_dir={data_cache}", *extra], cwd=ROOT, env=env
    )
    return proc, read_metrics(run_dir)


def _last_per_step(records):
    """The last training record of each step (a resumed run logs steps again)."""
    return {r["step"]: r for r in records if r["stage"] == "base" and "loss" in r}


@pytest.fixture(scope="module")
def dp2_ramped(tmp_path_factory, data_cache):
    return _ramped_run(tmp_path_factory.mktemp("ramp") / "run", data_cache)


@pytest.mark.slow
def test_a_ramped_run_follows_its_plan(dp2_ramped):
    from parallel.plan.flops import flops_per_token

    _, records = dp2_ramped
    steps = _last_per_step(records)
    assert sorted(steps) == list(range(1, 11))
    assert [steps[s]["tokens"] for s in range(1, 11)] == TOKENS
    # Data position: every sample of the stage's order consumed once, in order, whatever the batch.
    samples = [
        sum(v for k, v in steps[s].items() if k.startswith("data/") and k.endswith("/samples")) for s in steps
    ]
    assert samples == SAMPLES
    # The LR of each step is the schedule at the tokens trained before it: warm-up over 2048, then cosine over
    # the stage's 24576 tokens to min_lr.
    start = [0, *TOKENS[:-1]]
    peak, low = 3e-3, 3e-4
    for s, t in zip(range(1, 11), start, strict=True):
        want = (
            peak * t / 2048
            if t < 2048
            else low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (t - 2048) / 22528))
        )
        assert steps[s]["lr"] == pytest.approx(want, rel=1e-6), s
    # FLOPs per token follow the training length: the attention term at 128 in the first phase, 256 after.
    stage_start = next(r for r in records if r.get("event") == "stage_start")
    assert steps[10]["flops_per_token"] == pytest.approx(stage_start["flops_per_token"], rel=1e-12)
    from tests.conftest import SMALL

    arch, vocab = _cfg(*SMALL).model.arch(), 1024  # padded to a multiple of 128: 1024 itself
    per_token = {n: flops_per_token(arch, seq_length=n, vocab_size=vocab) for n in (128, 256)}
    assert stage_start["flops_per_token"] == pytest.approx(per_token[256], rel=1e-12)
    assert steps[2]["flops_per_token"] == pytest.approx(per_token[128], rel=1e-12)
    assert steps[10]["loss"] < steps[1]["loss"] - 0.5  # it trains


@pytest.mark.slow
def test_a_ramped_run_equals_one_process_and_runs_as_a_pipeline(dp2_ramped, tmp_path, data_cache):
    reference = {s: r["loss"] for s, r in _last_per_step(dp2_ramped[1]).items()}
    _, records = _ramped_run(tmp_path / "single", data_cache, "parallel=single")
    losses = {s: r["loss"] for s, r in _last_per_step(records).items()}
    assert sorted(losses) == sorted(reference)
    for s in reference:
        assert losses[s] == pytest.approx(reference[s], rel=2e-6, abs=2e-6), s
    # Pipeline stages initialize their layers from their own RNG streams, so PP=2 is not the same model as
    # one process (tests/parallel/test_parity.py compares layouts from one set of weights); here it must
    # pass the ramp's cut micro-batches (2 rows of 128 per sample, then 1 of 256) between its stages and train.
    _, records = _ramped_run(tmp_path / "pp2", data_cache, "parallel=pp2")
    steps = _last_per_step(records)
    assert [steps[s]["tokens"] for s in sorted(steps)] == TOKENS
    assert (
        steps[1]["loss"] == pytest.approx(math.log(1024), abs=0.3)
        and steps[10]["loss"] < steps[1]["loss"] - 0.5
    )


@pytest.mark.slow
def test_a_ramped_run_killed_mid_ramp_resumes_exactly(dp2_ramped, tmp_path, data_cache):
    # Rank 1 dies in step 6 (batch 2048, sequences of 256); step 5 was saved (6144 tokens crosses 6144).
    proc, records = _ramped_run(
        tmp_path / "run",
        data_cache,
        "recipe.stages.base.save_every_tokens=2048",  # only this run saves mid-stage: it resumes from one
        "parallel.max_restarts=1",
        env={"KILN_FAULT": "step:1:6"},
    )
    assert "resumed base at step 5 (6144 tokens)" in proc.stderr
    losses = [r["loss"] for _, r in sorted(_last_per_step(records).items())]
    assert losses == [r["loss"] for _, r in sorted(_last_per_step(dp2_ramped[1]).items())]  # bit for bit

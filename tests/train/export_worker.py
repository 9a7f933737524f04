"""A Kiln checkpoint saved the way the loop saves one (train/loop.py: build_engine, the stage's scheduler,
checkpoint.save with the loop state and the config record), for tests/train/test_export.py. Imported by the
in-process tests; run under torchrun for the multi-process ones:

    torchrun --nproc_per_node=2 tests/train/export_worker.py <tokenizer.model> <cases.json>

where cases.json maps each case's out dir to its overrides; for each case, one after another in the same
processes (a launch per case would spend most of its time starting up), it saves the checkpoint under
<out dir>/runs/... and, on rank 0, the full weights as <out dir>/reference.pt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import torch

STAGE = "base"
WEIGHT_STD = 0.08  # logits far from uniform: greedy choices are not near-ties


def compose(overrides: list[str], *, vocab_size: int):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train.config import register, to_config

    register()  # the schema (kiln_schema) in Hydra's ConfigStore
    configs = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    base = [f"data.tokenizer.vocab_size={vocab_size}", "logging.wandb.mode=disabled"]
    with initialize_config_dir(config_dir=os.path.abspath(configs), version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=base + overrides))


def fake_prepared_data(cfg, tokenizer_model: str) -> str:
    """The data cache entry the run would have (only the tokenizer and the manifest naming it)."""
    from data.prepare import MANIFEST, prepared_dir

    root = prepared_dir(cfg.data)
    os.makedirs(root, exist_ok=True)
    shutil.copyfile(tokenizer_model, os.path.join(root, "tokenizer.model"))
    manifest = {
        "tokenizer": {"model": "tokenizer.model", "vocab_size": cfg.data.tokenizer.vocab_size, "eod": 1}
    }
    config = json.loads(json.dumps(dataclasses.asdict(cfg.data), default=str))  # as data/prepare.py writes it
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump({**manifest, "config": config, "sources": {}}, f)
    return root


def randomize(model, *, vocab_size: int, seed: int) -> None:
    """Draw every weight as a full tensor from `seed` and copy this rank's shard in: the same model at any TP
    (vocabulary rows past `vocab_size` are zero)."""
    from models.shard import full_state_dict, local_key, shard_for_rank

    gen = torch.Generator().manual_seed(seed)
    full = full_state_dict(model)
    own = model.state_dict()
    with torch.no_grad():
        for key in sorted(full):
            shape = list(full[key].shape)
            if key.endswith("word_embeddings.weight") or key == "output_layer.weight":
                shape[0] = vocab_size
            value = torch.randn(shape, generator=gen)
            if key.endswith("norm.weight"):
                value = (0.0 if model.arch.norm_zero_centered else 1.0) + 0.1 * value
            else:
                value = WEIGHT_STD * value
            local = shard_for_rank(model, key, value)
            if local is None:
                continue
            target = own[local_key(model, key)]
            target.zero_()
            target[: local.shape[0]].copy_(local)


def save_like_loop(cfg, *, vocab_size: int, seed: int | None = 0):
    """Build the stage's engine as train/loop.py does, draw weights (megatron engine, `seed`), save a final
    checkpoint with the loop state and config record. Returns (engine, checkpoint path)."""
    from models.gpt import build_model
    from parallel.engines import OptimSettings, build_engine
    from train import checkpoint
    from train.loop import StageResult
    from train.schedule import build_scheduler

    stage, layout = cfg.recipe.stages[STAGE], cfg.parallel
    arch = stage.arch(cfg.model.arch())
    engine = build_engine(
        layout,
        build_model=lambda **kw: build_model(
            arch,
            vocab_size=vocab_size,
            max_seq_length=stage.seq_length,
            tp=layout.tp,
            sp=layout.sp,
            dtype=torch.float32,
            **kw,
        ),
        optim=OptimSettings(
            lr=stage.lr, min_lr=stage.min_lr, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, clip_grad=1.0
        ),
        device=torch.device("cpu"),
        dtype=torch.float32,
        grad_accum=layout.accum_steps(stage.batch_sequences),
    )
    if seed is not None:
        randomize(engine.modules[0], vocab_size=vocab_size, seed=seed)
    if layout.engine == "megatron":  # a saved optimizer has stepped: Adam state exists (as after a step)
        for opt in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
            if hasattr(opt, "_init_optimizer_states_with_dummy_values"):  # distributed optimizer
                opt._init_optimizer_states_with_dummy_values()
            else:  # megatron's plain optimizer (parallel=single: zero_stage 0)
                opt.init_state_fn(opt.optimizer, opt.config)
    scheduler = build_scheduler(
        engine,
        peak_lr=stage.lr,
        min_lr=stage.min_lr,
        tokens=stage.tokens,
        warmup_tokens=stage.warmup_tokens,
        schedule=stage.schedule,
    )
    result = StageResult(
        stage=STAGE, step=1, tokens=stage.batch_tokens, final=True, peak_lr=stage.lr, lr=stage.lr
    )
    directory = checkpoint.stage_dir(cfg.run_dir, STAGE)
    result.checkpoint = checkpoint.path_for(directory, result.step)
    path = checkpoint.save(
        directory,
        engine=engine,
        scheduler=scheduler,
        state=vars(result),
        retention=cfg.checkpoint,
        record=checkpoint.resume_record(cfg, STAGE),
    )
    return engine, path


def save_case(out: str, tokenizer_model: str, overrides: list[str], *, vocab: int) -> None:
    """One case: this layout's process groups, its checkpoint and the full weights it holds; then the groups
    are taken down again for the next case (the gloo world stays)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from models.shard import full_state_dict
    from parallel import engine as groups

    os.chdir(out)
    cfg = compose(overrides, vocab_size=vocab)
    device = torch.device("cpu")
    groups.init_model_parallel(cfg.parallel, seed=cfg.seed, device=device)
    if dist.get_rank() == 0:
        fake_prepared_data(cfg, tokenizer_model)
    engine, _ = save_like_loop(cfg, vocab_size=vocab, seed=None if cfg.parallel.engine == "deepspeed" else 0)
    model = engine.modules[0]
    if cfg.parallel.engine == "deepspeed":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            reference = {k: v.clone() for k, v in full_state_dict(model).items()}
    else:
        reference = full_state_dict(model)
    if dist.get_rank() == 0:
        torch.save(reference, os.path.join(out, "reference.pt"))
    dist.barrier()
    del engine, model
    parallel_state.destroy_model_parallel()


def main() -> None:
    import sentencepiece as spm

    from parallel import engine as groups

    tokenizer_model, cases = sys.argv[1], sys.argv[2]
    with open(cases) as f:
        cases = json.load(f)
    vocab = spm.SentencePieceProcessor(model_file=tokenizer_model).get_piece_size()
    groups.init_distributed(torch.device("cpu"))
    for out, overrides in cases.items():
        save_case(out, tokenizer_model, overrides, vocab=vocab)
    groups.destroy()


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    main()

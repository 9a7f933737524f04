"""IsoFLOP sweeps: the resolvers `configs/recipe/isoflop_sweep.yaml` sizes each run with, and the record every
run leaves for `python -m parallel.plan.fit` (`scaling.json` in the run directory: N, D, C, final loss).
"""

from __future__ import annotations

import json
import os

from omegaconf import OmegaConf

from parallel.plan.flops import flops_per_token, param_count

RECORD = "scaling.json"


def _arch(model) -> object:
    from models.llama import resolve_arch

    overrides = {k: v for k, v in dict(model).items() if k not in ("family", "size") and v is not None}
    return resolve_arch(model["family"], model["size"], **overrides)


def isoflop_tokens(flops: float, model, vocab_size: int, batch_tokens: int) -> int:
    """Tokens that spend `flops` = 6 N D on `model` (N with the padded vocabulary), in whole batches."""
    from models.llama import padded_vocab_size

    n = param_count(_arch(model), vocab_size=padded_vocab_size(int(vocab_size), 1)).total
    return max(1, int(float(flops) / (6 * n)) // int(batch_tokens)) * int(batch_tokens)


def llama_ffn(hidden: int) -> int:
    """The SwiGLU width of the tiny Llama family for `hidden` (8/3 h rounded up to a multiple of 64)."""
    from models.llama import llama_ffn_size

    return llama_ffn_size(int(hidden), multiple_of=64)


def sci(x: float) -> str:
    """A budget as a short name: 1e+13 -> '1e13', 3e13 -> '3e13'."""
    mantissa, exp = f"{float(x):.1e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


def register_resolvers() -> None:
    """`${isoflop_tokens:...}`, `${llama_ffn:...}` and `${sci:...}` for the sweep configs (idempotent)."""
    for name, fn in (("isoflop_tokens", isoflop_tokens), ("llama_ffn", llama_ffn), ("sci", sci)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def write_record(cfg, results, *, vocab_size: int) -> str:
    """Rank 0, at the end of a run: N (total parameters), D (tokens trained), C = 6ND, the Megatron-convention
    FLOPs, and the final loss (mean validation loss over sources at the end of the last stage; the last
    training loss when there was no validation)."""
    arch = cfg.model.arch()
    n = param_count(arch, vocab_size=vocab_size).total
    tokens = sum(r.tokens for r in results)
    flops = sum(
        r.tokens
        * flops_per_token(arch, seq_length=cfg.recipe.stages[r.stage].seq_length, vocab_size=vocab_size)
        for r in results
    )
    last = results[-1]
    loss = sum(last.valid_end.values()) / len(last.valid_end) if last.valid_end else last.train_loss[-1]
    record = {
        "n_params": n,
        "tokens": tokens,
        "flops_6nd": 6 * n * tokens,
        "flops": flops,
        "budget": getattr(cfg.recipe, "flops", None),
        "loss": loss,
        "model": {
            k: getattr(arch, k)
            for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")
        },
    }
    path = os.path.join(cfg.run_dir, RECORD)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path

"""Run under torchrun (2 gloo processes): each family at TP=2, TP=2+SP and (MoE) EP=2 against `transformers`
with the same weights - logits, loss and every gradient. Writes {case: max diffs} as JSON to argv[1] (rank 0)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.gpt import build_model
from models.hf import load_hf_into, to_hf_state
from models.shard import full_state_dict
from parallel import cpu
from parallel.fixes import apply_megatron_fixes
from tests.models.hf_helpers import CASES, SEQ, VOCAB, arch_of, hf_model


def layouts(arch):
    out = [dict(tp=2, sp=False), dict(tp=2, sp=True)] if arch.moe is None else [dict(tp=2, sp=True)]
    if arch.moe is not None:
        out.append(dict(ep=2))
    return out


def init(tp: int = 1, ep: int = 1, **_):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234)


def sp_grad_reduce(model):
    """What megatron's finalize_model_grads does for SP: sum the grads of sequence-split replicated weights."""
    from megatron.core import parallel_state

    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())


def gather_logits(logits):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits)


def run_case(case: str, layout: dict, folder: Path) -> dict[str, float]:
    family, arch = arch_of(case)
    hf = hf_model(arch, family)  # same seed on every rank: the same weights
    if dist.get_rank() == 0:
        hf.save_pretrained(folder)
    dist.barrier()
    torch.manual_seed(7)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    labels = torch.roll(tokens, -1, dims=1)
    hf.zero_grad()
    hf_out = hf(input_ids=tokens).logits
    F.cross_entropy(hf_out.reshape(-1, VOCAB), labels.reshape(-1)).backward()

    init(**layout)
    model = build_model(
        arch,
        vocab_size=VOCAB,
        max_seq_length=SEQ,
        tp=layout.get("tp", 1),
        sp=layout.get("sp", False),
        ep=layout.get("ep", 1),
    )
    load_hf_into(model, folder)
    pos = torch.arange(SEQ).expand_as(tokens)
    with torch.no_grad():
        logits = gather_logits(model(tokens, pos, None).transpose(0, 1)).transpose(0, 1)
    loss = model(tokens, pos, None, labels=labels).mean()
    loss.backward()
    sp_grad_reduce(model)
    ours = to_hf_state(full_state_dict(model, grads=True), arch, vocab_size=VOCAB)
    theirs = hub_grads(hf, family)
    pad = hf.config.pad_token_id
    if (
        pad is not None
    ):  # HF's nn.Embedding(padding_idx=pad) never updates that row (Gemma 2: pad 0); Kiln does
        ours["model.embed_tokens.weight"][pad] = theirs["model.embed_tokens.weight"][pad]
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))[:4]
    ep = layout.get("ep", 1)
    diffs = {"grads": 0.0, "expert_grads": 0.0}
    for key, grad in theirs.items():
        # Expert grads collect the tokens of every EP rank (identical inputs here): ep x the reference.
        expert = ".experts." in key
        mine = ours[key] / ep if expert else ours[key]
        kind = "expert_grads" if expert else "grads"
        diffs[kind] = max(diffs[kind], (mine - grad).abs().max().item())
    hf_loss = F.cross_entropy(hf_out.reshape(-1, VOCAB), labels.reshape(-1)).item()
    return {
        "logits": (logits - hf_out.detach()).abs().max().item(),
        "loss": abs(loss.item() - hf_loss),
        **diffs,
        "compared_tensors": len(theirs),
    }


def hub_grads(hf, family: str) -> dict[str, torch.Tensor]:
    """The HF model's grads under hub checkpoint names (transformers 5 holds experts fused in memory:
    (E, 2f, h) gate_up and (E, h, f) down; Mixtral's hub names say block_sparse_moe and w1/w3/w2)."""
    mixtral = family == "mixtral"
    out = {}
    for name, p in hf.named_parameters():
        if p.grad is None:
            continue
        if mixtral:
            name = name.replace(".mlp.", ".block_sparse_moe.")
        if p.ndim == 3:  # fused experts
            prefix = name.rsplit(".", 1)[0]  # ...experts
            for e in range(p.shape[0]):
                if name.endswith("gate_up_proj"):
                    gate, up = p.grad[e].chunk(2, dim=0)
                    g, u = ("w1", "w3") if mixtral else ("gate_proj", "up_proj")
                    out[f"{prefix}.{e}.{g}.weight"], out[f"{prefix}.{e}.{u}.weight"] = gate, up
                else:
                    out[f"{prefix}.{e}.{'w2' if mixtral else 'down_proj'}.weight"] = p.grad[e]
            continue
        out[name] = p.grad
    if hf.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def start_worker(timeout_s: int) -> None:
    """A gloo rank with Kiln's CPU shims and megatron fixes; a hung collective fails the test after
    `timeout_s` instead of hanging the session."""
    import faulthandler

    faulthandler.dump_traceback_later(timeout_s, exit=True)
    dist.init_process_group("gloo")
    cpu.apply()
    apply_megatron_fixes()


def finish_worker(results: dict) -> None:
    """Rank 0 writes the results to the path the test passed (argv[1]); every rank leaves the group."""
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def main() -> None:
    start_worker(600)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shared = [tmp]
        dist.broadcast_object_list(shared, src=0)
        for case in sys.argv[2:] or list(CASES):
            _, arch = arch_of(case)
            for layout in layouts(arch):
                name = f"{case}:" + ",".join(f"{k}{int(v)}" for k, v in layout.items())
                results[name] = run_case(
                    case, layout, Path(shared[0]) / name.replace(":", "_").replace(",", "_")
                )
                dist.barrier()
    finish_worker(results)


if __name__ == "__main__":
    main()

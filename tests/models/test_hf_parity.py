"""Every family against `transformers`: the same weights give the same logits and loss (CPU, fp32), each RoPE
scaling kind included, and HF -> Kiln -> HF is bitwise."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from models.gpt import build_model
from models.hf import from_hf_state, load_hf_into, read_hf_state, save_hf
from models.shard import full_state_dict
from tests.models.hf_helpers import CASES, ROPES, SEQ, VOCAB, arch_of, hf_logits, hf_model, kiln_logits

TOL = 1e-4  # the bound; measured diffs are printed by -s


def _pair(case: str, tmp_path, **extra):
    family, arch = arch_of(case, **extra)
    hf = hf_model(arch, family)
    hf.save_pretrained(tmp_path / "hf")
    model = build_model(arch, vocab_size=VOCAB, max_seq_length=SEQ).eval()
    load_hf_into(model, tmp_path / "hf")
    return family, arch, hf, model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_loss_equal_transformers(case, tmp_path, megatron_world1):
    family, arch, hf, model = _pair(case, tmp_path)
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    ours, theirs = kiln_logits(model, tokens), hf_logits(hf, tokens)
    diff = (ours - theirs).abs().max().item()
    print(f"{case}: max |logit diff| {diff:.2e}")
    assert diff <= TOL
    assert theirs.std() > 0.1  # the comparison is not between near-constant outputs
    pos = torch.arange(SEQ).expand_as(tokens)
    with torch.no_grad():
        ours_loss = model(tokens[:, :-1], pos[:, :-1], None, labels=tokens[:, 1:]).mean()
        theirs_loss = hf(input_ids=tokens, labels=tokens).loss
    assert abs(ours_loss.item() - theirs_loss.item()) <= TOL


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_scaling_kinds_equal_transformers(kind, tmp_path, megatron_world1):
    family, arch, hf, model = _pair("llama3", tmp_path, rope=ROPES[kind])
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    diff = (kiln_logits(model, tokens) - hf_logits(hf, tokens)).abs().max().item()
    print(f"rope {kind}: max |logit diff| {diff:.2e}")
    assert diff <= TOL


def test_deepseek_yarn_rope_equals_transformers(tmp_path, megatron_world1):
    yarn = ROPES["yarn"].__class__(
        kind="yarn", factor=4.0, original_context=16, mscale=0.707, mscale_all_dim=0.707
    )
    family, arch, hf, model = _pair("deepseek_v2", tmp_path, rope=yarn)
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    diff = (kiln_logits(model, tokens) - hf_logits(hf, tokens)).abs().max().item()
    assert diff <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_hf_round_trip_is_bitwise(case, tmp_path, megatron_world1):
    family, arch, hf, model = _pair(case, tmp_path)
    save_hf(full_state_dict(model), arch, tmp_path / "out", family=family, vocab_size=VOCAB)
    theirs = read_hf_state(tmp_path / "hf")
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert from_hf_state(theirs, arch).keys() <= dict(model.named_parameters()).keys()


_LOAD_IN_CLEAN_PROCESS = """
import sys, torch
from transformers import AutoModelForCausalLM
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    tokens = torch.load(folder + "/tokens.pt")
    with torch.no_grad():
        torch.save(model(input_ids=tokens).logits, folder + "/logits.pt")
"""


def test_exports_load_in_transformers(tmp_path, megatron_world1):
    """`from_pretrained` of each export (in a process without megatron's CPU shims, as a user would) gives the
    logits of the model it came from."""
    import subprocess
    import sys

    folders, expected = [], {}
    for case in CASES:
        family, arch, hf, model = _pair(case, tmp_path / case)
        out = tmp_path / case / "out"
        save_hf(full_state_dict(model), arch, out, family=family, vocab_size=VOCAB)
        tokens = torch.randint(0, VOCAB, (1, SEQ))
        torch.save(tokens, out / "tokens.pt")
        folders.append(str(out))
        expected[str(out)] = kiln_logits(model, tokens)
    subprocess.run([sys.executable, "-c", _LOAD_IN_CLEAN_PROCESS, *folders], check=True, timeout=300)
    for folder, ours in expected.items():
        diff = (torch.load(folder + "/logits.pt") - ours).abs().max().item()
        assert diff <= TOL, (folder, diff)

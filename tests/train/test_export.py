"""`python -m train.export`: a real Kiln checkpoint of every family -> a Hugging Face folder that `transformers`
loads (in a clean process, as a user would: Kiln's CPU shims must not touch it) with the same logits, the same
greedy continuation and a tokenizer that encodes as the run's sentencepiece model; `--format torch` loads back
into Kiln exactly; TP=2 and DeepSpeed ZeRO-3 checkpoints consolidate to the same tensors; bad input is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.conftest import torchrun
from tests.train import export_worker as worker
from train import checkpoint
from train.export import export, main, read_torch

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {  # family -> its tiny model config
    "llama3": ["model=llama_tiny"],
    "mistral": ["model=mistral_tiny"],
    "mixtral": ["model=mixtral_tiny"],
    "qwen2": ["model=qwen2_tiny"],
    "gemma2": ["model=gemma2_tiny"],
    # DeepseekV2's router never renormalizes the top-k weights (Kiln's tiny does; refused: bad-input test)
    "deepseek_v2": ["model=deepseek_v2_tiny", "+model.extra.moe={norm_topk_prob: false}"],
}
TOL = 1e-4
PROMPT, NEW_TOKENS = 24, 16
SAMPLE = (
    "def greet(name: str) -> str:\n    return f'Grüße, {name}!'  # naïve café — ½ ∑\n\n"
    "\tx  =  3.14159e-2 ; y=[1,2,3]\n  leading spaces, trailing  \n世界 😀 <eod> 12345"
)


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> str:
    """A sentencepiece BPE trained as the data pipeline trains one (data/tokenizer.py), on stdlib code; 600
    pieces, so the exported vocabulary is cut from the padded embedding (640 rows at TP=1, 768 at TP=2)."""
    from data.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:30]]
    prefix = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(
        texts + [SAMPLE], model_prefix=str(prefix), vocab_size=600, model_type="bpe", byte_fallback=True
    )


def _vocab(tokenizer_model: str) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tokenizer_model).get_piece_size()


def _run(tokenizer_model: str, overrides: list[str]):
    """A run dir with the data cache entry and a final `base` checkpoint saved as the loop saves it."""
    vocab = _vocab(tokenizer_model)
    cfg = worker.compose(overrides, vocab_size=vocab)
    worker.fake_prepared_data(cfg, tokenizer_model)
    engine, path = worker.save_like_loop(cfg, vocab_size=vocab)
    return cfg, engine.modules[0].eval(), path


def _kiln_outputs(model, vocab: int, prompt: torch.Tensor) -> dict:
    """Logits of the prompt (the real vocabulary's columns) and the greedy continuation (stops at <eod>, id 1)."""

    def logits(tokens):
        with torch.no_grad():
            pos = torch.arange(tokens.shape[1]).expand_as(tokens)
            return model(tokens, pos, None)[..., :vocab].float()

    tokens = prompt
    for _ in range(NEW_TOKENS):
        nxt = logits(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        if nxt.item() == 1:
            break
    return {"logits": logits(prompt), "generated": tokens[0].tolist()}


_HF_CHECK = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
new_tokens, *folders = sys.argv[1:]
for folder in folders:
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    # transformers 5 swaps in Qwen2Tokenizer (byte-level) for model_type qwen2 whatever tokenizer_config says
    qwen2 = json.load(open(folder + "/config.json"))["model_type"] == "qwen2"
    tok = (PreTrainedTokenizerFast if qwen2 else AutoTokenizer).from_pretrained(folder)
    prompt = torch.load(folder + "/../prompt.pt")
    with torch.no_grad():
        logits = model(input_ids=prompt).logits
        generated = model.generate(prompt, max_new_tokens=int(new_tokens), do_sample=False)
    sample = open(folder + "/../sample.txt").read()
    torch.save({"logits": logits, "generated": generated[0].tolist(), "ids": tok(sample)["input_ids"],
                "decoded": tok.decode(tok(sample)["input_ids"]), "class": type(model).__name__},
               folder + "/../hf.pt")
"""


def test_every_family_exports_to_transformers(tmp_path, tokenizer_model, megatron_world1, monkeypatch):
    """Each family's tiny size: Kiln checkpoint -> export -> transformers (logits <= 1e-4, same greedy tokens);
    the tokenizer encodes the sample as sentencepiece does. Run dirs are relative to where training ran and
    the export runs elsewhere: the tokenizer is found from the checkpoint's location. llama3 is sharded."""
    import sentencepiece as spm

    vocab = _vocab(tokenizer_model)
    expected_ids = spm.SentencePieceProcessor(model_file=tokenizer_model).encode(SAMPLE)
    prompt = torch.randint(2, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    folders, kiln = [], {}
    for family, model_overrides in FAMILIES.items():
        case = tmp_path / family
        (case / "train").mkdir(parents=True)
        monkeypatch.chdir(case / "train")  # run_dir and data cache relative to here, as `python -m train`
        cfg, model, path = _run(tokenizer_model, [*model_overrides, "parallel=single"])
        kiln[family] = _kiln_outputs(model, vocab, prompt)
        monkeypatch.chdir(tmp_path)
        stage_dir = str(case / "train" / checkpoint.stage_dir(cfg.run_dir, "base"))
        out = export(stage_dir, case / "hf", max_shard_bytes=200_000 if family == "llama3" else 5 * 10**9)
        torch.save(prompt, case / "prompt.pt")
        (case / "sample.txt").write_text(SAMPLE)
        folders.append(str(out))
        config = json.loads((out / "config.json").read_text())
        assert config["vocab_size"] == vocab and config["eos_token_id"] == 1
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith("model")) == [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ]
    shards = sorted(p.name for p in (tmp_path / "llama3" / "hf").glob("model*"))
    assert len(shards) > 2 and "model.safetensors.index.json" in shards
    subprocess.run(
        [sys.executable, "-c", _HF_CHECK, str(NEW_TOKENS), *folders], check=True, timeout=600, cwd=tmp_path
    )
    for family, ours in kiln.items():
        theirs = torch.load(tmp_path / family / "hf.pt")
        diff = (theirs["logits"] - ours["logits"]).abs().max().item()
        print(
            f"{family} ({theirs['class']}): max |logit diff| {diff:.2e}, greedy {ours['generated'][PROMPT:]}"
        )
        assert diff <= TOL, family
        assert ours["logits"].std() > 0.5  # not a comparison of near-constant outputs
        assert theirs["generated"] == ours["generated"], family
        assert theirs["ids"] == expected_ids and theirs["decoded"] == SAMPLE


def test_torch_format_loads_back_into_kiln_exactly(tmp_path, tokenizer_model, megatron_world1, monkeypatch):
    from models.gpt import build_model

    monkeypatch.chdir(tmp_path)
    cfg, model, path = _run(tokenizer_model, ["model=mixtral_tiny", "parallel=single"])
    out = export(path, tmp_path / "pt", fmt="torch")
    arch, meta, state = read_torch(out)
    assert (meta["family"], meta["vocab_size"], meta["padded_vocab_size"]) == ("mixtral", 600, 640)
    assert arch == model.arch and meta["state"]["step"] == 1
    again = build_model(arch, vocab_size=meta["padded_vocab_size"], max_seq_length=meta["seq_length"])
    missing, unexpected = again.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    theirs = dict(again.named_parameters())
    for key, value in model.named_parameters():
        assert torch.equal(theirs[key], value), key
    tokens = torch.randint(0, 600, (1, 16))
    pos = torch.arange(16)[None]
    with torch.no_grad():
        assert torch.equal(model(tokens, pos, None), again.eval()(tokens, pos, None))
    assert (out / "tokenizer.model").read_bytes() == Path(tokenizer_model).read_bytes()


def test_bf16_checkpoint_exports_its_values_in_fp32(tmp_path, tokenizer_model, megatron_world1, monkeypatch):
    """GPU runs train and save bf16 weights: the export (fp32) holds exactly their values."""
    import models.gpt
    from models.hf import read_hf_state, to_hf_state

    build = models.gpt.build_model
    monkeypatch.setattr(
        models.gpt, "build_model", lambda *a, **k: build(*a, **{**k, "dtype": torch.bfloat16})
    )
    monkeypatch.chdir(tmp_path)
    _, model, path = _run(tokenizer_model, ["model=llama_tiny", "parallel=single"])
    monkeypatch.setattr(models.gpt, "build_model", build)
    assert next(model.parameters()).dtype == torch.bfloat16
    weights = {k: v.float() for k, v in model.named_parameters()}
    ours = read_hf_state(export(path, tmp_path / "hf"))
    for key, value in to_hf_state(weights, model.arch, vocab_size=600).items():
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], value), key


# ------------------------------------------------------------------------------------------ bad input
def _fake_checkpoint(directory: Path, record: dict, *, complete: bool = True) -> Path:
    path = directory / "checkpoints" / "base" / "step_000001"
    path.mkdir(parents=True)
    (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": 1, "tokens": 1, "final": True}))
    (path / checkpoint.CONFIG_FILE).write_text(json.dumps(record))
    if complete:
        checkpoint.write_complete(str(path), checkpoint.hash_files(str(path), checkpoint._files(str(path))))
    return path


def _record(overrides: list[str] | None = None, **changes) -> dict:
    cfg = worker.compose(overrides or [], vocab_size=400)
    return {**checkpoint.resume_record(cfg, "base"), **changes}


def _refused(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_with_exit_code_2_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    err = _refused(capsys, str(tmp_path / "nowhere"), "--out", str(out))
    assert "kiln export: checkpoint=" in err and "no such directory" in err
    cut = _fake_checkpoint(tmp_path / "cut", _record(), complete=False)
    err = _refused(capsys, str(cut), "--out", str(out))
    assert "incomplete" in err and "no COMPLETE record" in err and "export an earlier step_N" in err
    err = _refused(capsys, str(cut.parent), "--out", str(out))
    assert "holds no complete checkpoint" in err
    odd = _fake_checkpoint(tmp_path / "odd", _record(**{"model.family": "gpt5"}))
    err = _refused(capsys, str(odd), "--out", str(out))
    assert "model.family='gpt5': unknown family; choose one of llama3, mistral, mixtral" in err
    deepseek = _fake_checkpoint(tmp_path / "deepseek", _record(["model=deepseek_v2_tiny"]))
    err = _refused(capsys, str(deepseek), "--out", str(out))
    assert "model.moe.norm_topk_prob=True: transformers' DeepseekV2ForCausalLM does not compute this" in err
    assert "--format torch" in err
    old = _record()
    del old["model.family"]
    old_path = _fake_checkpoint(tmp_path / "old", old)
    err = _refused(capsys, str(old_path), "--out", str(out))
    assert "does not record the model family" in err and "pass --family" in err
    err = _refused(capsys, str(old_path), "--out", str(out), "--family", "llama3")
    assert "data.cache_dir=" in err and "pass --tokenizer" in err  # past the family: the data cache is absent
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))


def test_cli_refuses_a_non_empty_out_unless_forced(tmp_path, tokenizer_model, megatron_world1, monkeypatch):
    """As a user runs it: `python -m train.export` exits 2 and leaves an existing folder untouched; with
    --force it replaces it with the export (exit 0)."""
    monkeypatch.chdir(tmp_path)
    _, _, path = _run(tokenizer_model, ["model=qwen2_tiny", "parallel=single"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def cli(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "train.export", path, "--out", str(out), "--format", "torch", *extra]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)

    proc = cli()
    assert proc.returncode == 2, proc.stderr
    assert "--out=" in proc.stderr and "exists and is not empty" in proc.stderr and "--force" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    proc = cli("--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["arch.json", "model.pt", "tokenizer.model"]


def test_failed_export_leaves_nothing_behind(tmp_path, tokenizer_model, megatron_world1, monkeypatch):
    """A failure while writing (here: --force over an old export, then the writer fails) leaves the old
    folder as it was and no temporary folder."""
    import train.export as ex

    monkeypatch.chdir(tmp_path)
    _, _, path = _run(tokenizer_model, ["model=llama_tiny", "parallel=single"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def broken(state, source, tokenizer_path, folder, **kw):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ex, "write_hf", broken)
    with pytest.raises(OSError, match="disk full"):
        export(path, out, force=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert not list(tmp_path.glob(".out.*"))


# ------------------------------------------------------------------------------------------ multi-process
MULTI = {  # case -> the layout its 2 processes save at (megatron-core)
    "tp2": ["model=llama_tiny", "parallel.nproc_per_node=2", "parallel.tp=2"],
    "ep2": ["model=mixtral_tiny", "parallel.nproc_per_node=2", "parallel.ep=2"],
}
DEEPSPEED = {  # case -> the DeepSpeed layout its 2 processes save at
    "zero3_dp2": ["model=qwen2_tiny", "parallel=deepspeed_zero3"],  # DP=2: every parameter partitioned
    "zero1_tp2": [
        "model=gemma2_tiny",
        "parallel=deepspeed_zero1",
        "parallel.tp=2",
    ],  # one ZeRO group per TP rank
    "zero0_dp2": [
        "model=llama_tiny",
        "parallel=deepspeed_zero1",
        "parallel.zero_stage=0",
    ],  # the module itself
}


@pytest.fixture(scope="module")
def saved_by_two(tmp_path_factory, tokenizer_model) -> dict[str, Path]:
    """Every case's checkpoint, saved by one torchrun launch of 2 processes (export_worker.py, case after
    case): {case: the directory holding its runs/ and reference.pt}."""
    root = tmp_path_factory.mktemp("saved_by_two")
    dirs = {case: root / case for case in {**MULTI, **DEEPSPEED}}
    for d in dirs.values():
        d.mkdir()
    cases = root / "cases.json"
    cases.write_text(json.dumps({str(dirs[case]): o for case, o in {**MULTI, **DEEPSPEED}.items()}))
    torchrun(ROOT / "tests" / "train" / "export_worker.py", tokenizer_model, cases, timeout=900)
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MULTI))
def test_multiprocess_checkpoint_exports_the_weights_the_ranks_held(
    tmp_path, tokenizer_model, megatron_world1, monkeypatch, case, saved_by_two
):
    """Weights drawn as full tensors and sharded per rank (TP=2: split tensors and vocabulary padded to 768
    rows; EP=2: 4 experts per rank), saved by 2 processes: the export holds them exactly. At TP=2 also: the
    same weights saved at TP=1 (640 rows) export to identical tensors."""
    from models.hf import to_hf_state
    from train.export import read_source

    multi = saved_by_two[case]
    monkeypatch.chdir(multi)
    two = read_hf(export("runs/kiln/default/checkpoints/base", tmp_path / "hf2"))
    reference = torch.load(multi / "reference.pt")
    arch = read_source("runs/kiln/default/checkpoints/base").arch
    expected = to_hf_state(reference, arch, vocab_size=600)
    assert two.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(two[key], value), key
    if "parallel.tp=2" in MULTI[case]:
        assert reference["embedding.word_embeddings.weight"].shape[0] == 768
        monkeypatch.chdir(tmp_path)
        _run(tokenizer_model, [MULTI[case][0], "parallel=single", "run_dir=tp1/run"])
        one = read_hf(export("tp1/run/checkpoints/base", tmp_path / "hf1"))
        assert one.keys() == two.keys()
        for key in one:
            assert torch.equal(one[key], two[key]), key


def read_hf(folder):
    from models.hf import read_hf_state

    return read_hf_state(folder)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DEEPSPEED))
def test_deepspeed_checkpoint_is_consolidated(
    tmp_path, tokenizer_model, megatron_world1, monkeypatch, case, saved_by_two
):
    """The export of a DeepSpeed checkpoint saved by 2 processes (ZeRO shards through zero_to_fp32, one TP rank
    at a time, then TP shards joined, in one process) holds the weights the ranks gathered, to the bit."""
    monkeypatch.chdir(saved_by_two[case])
    out = export("runs/kiln/default/checkpoints/base", tmp_path / "pt", fmt="torch")
    _, _, state = read_torch(out)
    reference = torch.load(saved_by_two[case] / "reference.pt")
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def test_checkpoints_record_the_family_and_older_ones_still_resume(tmp_path):
    from train.errors import ConfigError

    record = checkpoint.resume_record(worker.compose(["model=qwen2_tiny"], vocab_size=400), "base")
    assert record["model.family"] == "qwen2"
    path = tmp_path / "step_000001"
    path.mkdir()
    older = {k: v for k, v in record.items() if k != "model.family"}  # saved before the family was recorded
    (path / checkpoint.CONFIG_FILE).write_text(json.dumps(older))
    checkpoint.check_resume(str(path), record, allow=[])
    (path / checkpoint.CONFIG_FILE).write_text(json.dumps({**record, "model.family": "llama3"}))
    with pytest.raises(ConfigError, match="model.family: 'llama3' -> 'qwen2'"):
        checkpoint.check_resume(str(path), record, allow=[])

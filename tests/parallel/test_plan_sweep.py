"""The IsoFLOP sweep recipe sizes each run by its budget; every run leaves the record the fit reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from models.llama import padded_vocab_size
from parallel.plan.flops import flops_per_token, param_count
from parallel.plan.sweep import sci, write_record
from train.config import register, to_config
from train.loop import StageResult

ROOT = Path(__file__).resolve().parents[2]
register()


def _cfg(overrides, *, hydra=False):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(
            config_name="config", overrides=["recipe=isoflop_sweep", *overrides], return_hydra_config=hydra
        )


@pytest.mark.parametrize(("flops", "width"), [(1e13, 64), (3e13, 256), (1e14, 384)])
def test_each_run_trains_c_over_6n_tokens(flops, width):
    cfg = to_config(_cfg([f"recipe.flops={flops}", f"model.hidden_size={width}"]))
    arch = cfg.model.arch()
    assert arch.hidden_size == width and arch.ffn_hidden_size % 64 == 0
    n = param_count(arch, vocab_size=padded_vocab_size(cfg.data.tokenizer.vocab_size, 1)).total
    base = cfg.recipe.stages["base"]
    assert base.tokens % base.batch_tokens == 0
    assert 6 * n * base.tokens == pytest.approx(flops, rel=base.batch_tokens / base.tokens + 1e-9)
    assert cfg.run_dir == f"runs/kiln/isoflop/C{sci(flops)}_d{width}" and cfg.recipe.flops == flops


def test_sweep_declares_its_grid():
    params = _cfg([], hydra=True).hydra.sweeper.params
    assert params["recipe.flops"] == "1.0e13,3.0e13,1.0e14"
    assert params["model.hidden_size"] == "64,128,192,256,384"
    assert sci(3e13) == "3e13" and sci(1e13) == "1e13" and sci(2.5e17) == "2.5e17"


def test_write_record(tmp_path):
    cfg = to_config(_cfg(["recipe.flops=1e13", f"run_dir={tmp_path}"]))
    tokens = cfg.recipe.stages["base"].tokens
    results = [
        StageResult(
            "base", 10, tokens, True, 3e-3, 3e-4, train_loss=[8.0, 5.5], valid_end={"code": 5.0, "docs": 6.0}
        )
    ]
    path = write_record(cfg, results, vocab_size=4096)
    r = json.loads(Path(path).read_text())
    n = param_count(cfg.model.arch(), vocab_size=4096).total
    assert r["n_params"] == n and r["tokens"] == tokens and r["flops_6nd"] == 6 * n * tokens
    assert r["flops"] == pytest.approx(
        tokens * flops_per_token(cfg.model.arch(), seq_length=256, vocab_size=4096)
    )
    assert r["loss"] == 5.5 and r["budget"] == 1e13  # mean validation loss over sources

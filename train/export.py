"""`python -m train.export <checkpoint> --out DIR [--format hf|torch]`: a Kiln checkpoint as a model others load.

<checkpoint> is one checkpoint (`runs/<exp>/<name>/checkpoints/<stage>/step_N`) or a stage directory (its
`latest` complete one). Its `config.json` (train/checkpoint.py `resume_record`) gives the family, the stage's
architecture and context, and the data config, whose cache holds the run's sentencepiece tokenizer.

- `hf` (default): model.safetensors (above --max-shard-size: shards + model.safetensors.index.json),
  config.json, generation_config.json, tokenizer.json + tokenizer_config.json (the sentencepiece model converted
  to a `tokenizers` BPE that encodes identically) and the tokenizer.model itself: `AutoModelForCausalLM` and
  `AutoTokenizer.from_pretrained(DIR)` load it. Embedding and LM head are cut to the tokenizer's vocabulary.
- `torch`: model.pt, the full Kiln state dict (padded vocabulary rows kept, so it loads back exactly, see
  `read_torch`), arch.json (family, architecture, vocabulary) and tokenizer.model.

Weights are consolidated in this one process (a world of one, gloo, CPU): megatron dist_checkpointing
checkpoints at any TP/PP/EP, or DeepSpeed ones (ZeRO 0-3; ZeRO shards through DeepSpeed's zero_to_fp32, one
tensor-parallel rank at a time). The folder is written under a temporary name and renamed into place, so a
failed export leaves nothing behind. Bad input exits with code 2 and one line naming what and how to fix it.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from models.arch import Arch
from train import checkpoint
from train.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("hf", "torch")
DEFAULT_MAX_SHARD = "5GB"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class Source:
    """What one checkpoint holds, read from its files (no weights yet)."""

    path: str
    stage: str
    family: str
    arch: Arch
    """The stage's architecture (the model's with the stage's RoPE changes), as the loop built it."""
    seq_length: int
    record: dict
    """The checkpoint's config.json: the flat {key: value} of train/checkpoint.py `resume_record`."""


# ------------------------------------------------------------------------------------------ reading
def resolve(path: str) -> str:
    """The checkpoint at `path`: itself when it is one (it must be complete), else a stage directory's newest
    complete checkpoint (`latest`)."""
    if not os.path.isdir(path):
        raise ConfigError(
            "checkpoint", path, "no such directory; give runs/<exp>/<name>/checkpoints/<stage>[/step_N]"
        )
    if os.path.exists(os.path.join(path, checkpoint.STATE_FILE)) or os.path.basename(path).startswith(
        "step_"
    ):
        problem = checkpoint.verify(path)
        if problem is not None:
            raise ConfigError(
                "checkpoint",
                path,
                f"incomplete: {problem}; export an earlier step_N, or the stage directory (its latest complete one)",
            )
        return path
    found = checkpoint.latest(path)
    if found is None:
        raise ConfigError(
            "checkpoint",
            path,
            "holds no complete checkpoint (step_N with a COMPLETE record); train the stage first",
        )
    return found


def _unflatten(flat: dict, prefix: str) -> dict:
    """The nested dict of the flat keys under `prefix.` (the inverse of `checkpoint.flatten`)."""
    out: dict = {}
    for key, value in flat.items():
        if not key.startswith(prefix + "."):
            continue
        *parents, leaf = key[len(prefix) + 1 :].split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def read_source(path: str, *, family: str | None = None) -> Source:
    """The checkpoint at `path` (see `resolve`) and what its config.json says; `family` for a checkpoint saved
    before the record held it."""
    from models.registry import FAMILIES
    from train.stage import StageConfig

    path = resolve(path)
    record_file = os.path.join(path, checkpoint.CONFIG_FILE)
    if not os.path.exists(record_file):
        raise ConfigError(
            "checkpoint",
            path,
            f"has no {checkpoint.CONFIG_FILE} (the run config record), so its architecture is unknown; "
            "export a checkpoint saved by `python -m train`",
        )
    with open(record_file) as f:
        record = json.load(f)
    family = family or record.get("model.family")
    if family is None:
        raise ConfigError(
            "model.family",
            None,
            f"{record_file} does not record the model family (saved by an older Kiln); "
            f"pass --family, one of {', '.join(FAMILIES)}",
        )
    if family not in FAMILIES:
        raise ConfigError("model.family", family, f"unknown family; choose one of {', '.join(FAMILIES)}")
    stages = sorted({k.split(".")[2] for k in record if k.startswith("recipe.stages.")})
    if len(stages) != 1:
        raise ConfigError("checkpoint", path, f"{record_file} records stages {stages}, expected exactly one")
    stage = stages[0]
    settings = _unflatten(record, f"recipe.stages.{stage}")
    try:
        arch = Arch.from_dict(_unflatten(record, "arch"))
        scaled = StageConfig(
            rope_theta=settings.get("rope_theta"), rope_scaling=settings.get("rope_scaling") or {}
        )
        arch = scaled.arch(arch).validate()
    except TypeError as e:
        raise ConfigError("checkpoint", path, f"{record_file}: unreadable architecture ({e})") from None
    return Source(
        path=path,
        stage=stage,
        family=family,
        arch=arch,
        seq_length=int(settings["seq_length"]),
        record=record,
    )


def find_tokenizer(source: Source, override: str | None = None) -> str:
    """The run's sentencepiece model: `override`, else the tokenizer of the data cache entry under
    `data.cache_dir` whose manifest holds the data config the checkpoint records (a relative cache_dir is
    looked up from the working directory and from every parent of the checkpoint)."""
    from data.prepare import MANIFEST, NOT_HASHED, load_prepared

    if override is not None:
        if not os.path.isfile(override):
            raise ConfigError("--tokenizer", override, "no such file; give the run's sentencepiece .model")
        return override
    cache_dir = source.record.get("data.cache_dir")
    if cache_dir is None:
        raise ConfigError(
            "data.cache_dir", None, "not in the checkpoint's record; pass --tokenizer PATH.model"
        )

    def hashed(flat: dict) -> dict:  # what names a cache entry (data/prepare.py config_hash)
        return {k: v for k, v in flat.items() if k.startswith("data.") and k.split(".")[1] not in NOT_HASHED}

    wanted = hashed(source.record)
    roots = [cache_dir] if os.path.isabs(cache_dir) else [os.path.join(os.getcwd(), cache_dir)]
    if not os.path.isabs(cache_dir):
        roots += [os.path.join(str(p), cache_dir) for p in Path(source.path).resolve().parents]
    for root in roots:
        for manifest in sorted(glob.glob(os.path.join(root, "*", MANIFEST))):
            with open(manifest) as f:
                config = json.load(f).get("config", {})
            if hashed(checkpoint.flatten({"data": config})) == wanted:
                return load_prepared(os.path.dirname(manifest)).tokenizer_path
    raise ConfigError(
        "data.cache_dir",
        cache_dir,
        f"no prepared data of this run's data config there (looked in {roots[0]}"
        f"{' and above the checkpoint' if len(roots) > 1 else ''}); pass --tokenizer PATH/tokenizer.model",
    )


# ------------------------------------------------------------------------------------------ weights
def _world_of_one() -> bool:
    """Join or start a world of one with megatron-core's groups at TP=PP=EP=1; True when started here."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from parallel import engine
    from parallel.layout import ParallelLayout

    started = False
    if not dist.is_initialized():
        engine.init_distributed(torch.device("cpu"))
        started = True
    if dist.get_world_size() != 1:
        raise RuntimeError(
            f"export consolidates in one process, but this is rank {dist.get_rank()} of {dist.get_world_size()}"
        )
    if not parallel_state.model_parallel_is_initialized():
        engine.init_model_parallel(ParallelLayout(nproc_per_node=1), seed=0, device=torch.device("cpu"))
        started = True
    elif parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise RuntimeError("export needs megatron-core groups at TP=PP=EP=1")
    return started


def _build(source: Source, vocab_rows: int):
    from models.gpt import build_model

    return build_model(source.arch, vocab_size=vocab_rows, max_seq_length=source.seq_length).eval()


def _megatron_rows(path: str) -> int:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(path)
    key = next((k for k in meta if k.endswith(_VOCAB_KEYS[0])), None)
    if key is None:
        raise ConfigError("checkpoint", path, "holds no embedding tensor: not a Kiln model checkpoint")
    return meta[key].global_shape[0]


def _deepspeed_shards(path: str) -> list[dict[str, torch.Tensor]]:
    """The module state of each tensor-parallel rank of a DeepSpeed checkpoint, fp32: ZeRO-1/2/3 from the fp32
    master partitions (DeepSpeed's zero_to_fp32, one TP rank at a time), ZeRO-0 from the module itself."""
    from parallel.engines.deepspeed import TAG, import_deepspeed

    import_deepspeed(torch.device("cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_dir = os.path.join(path, TAG)
    model_files = glob.glob(os.path.join(ds_dir, "*mp_rank_*_model_states.pt"))
    ranks = sorted({int(re.search(r"mp_rank_(\d+)_model_states", f).group(1)) for f in model_files})
    if not ranks:
        raise ConfigError(
            "checkpoint", path, f"{ds_dir} holds no *_model_states.pt: the DeepSpeed save is incomplete"
        )
    first = torch.load(sorted(model_files)[0], map_location="cpu", weights_only=False)
    stage = first.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    shards = []
    for r in ranks:
        if stage == 0:
            module = torch.load(
                os.path.join(ds_dir, f"mp_rank_{r:02d}_model_states.pt"),
                map_location="cpu",
                weights_only=False,
            )["module"]
            tensors = {k: v for k, v in module.items() if isinstance(v, torch.Tensor)}  # not extra state
            shards.append({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
            continue
        with tempfile.TemporaryDirectory() as tmp:  # zero_to_fp32 reads every *_states.pt of a directory
            os.mkdir(os.path.join(tmp, TAG))
            for f in glob.glob(os.path.join(ds_dir, f"*mp_rank_{r:02d}_*_states.pt")):
                os.symlink(os.path.abspath(f), os.path.join(tmp, TAG, os.path.basename(f)))
            shards.append(get_fp32_state_dict_from_zero_checkpoint(tmp, tag=TAG))
    return shards


def _join_tp(model, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One full state dict from per-TP-rank module states (`model`, built at TP=1, says which are split)."""
    from models.shard import join_shards

    if len(shards) == 1:
        return shards[0]
    params = dict(model.named_parameters())
    out = {}
    for key, value in shards[0].items():
        param = params.get(key)
        if param is not None and getattr(param, "tensor_model_parallel", False):
            out[key] = join_shards(key, [s[key] for s in shards], param.partition_dim)
        else:
            out[key] = value
    return out


def load_weights(source: Source) -> dict[str, torch.Tensor]:
    """The checkpoint's full model state dict (TP/EP/ZeRO shards joined, experts under their global index,
    vocabulary rows as saved), consolidated in this process."""
    from models.shard import full_state_dict
    from parallel.engines.deepspeed import TAG

    started = _world_of_one()
    try:
        if os.path.isdir(os.path.join(source.path, TAG)):
            shards = _deepspeed_shards(source.path)
            model = _build(source, sum(s[_VOCAB_KEYS[0]].shape[0] for s in shards))
            missing, unexpected = model.load_state_dict(_join_tp(model, shards), strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise ConfigError(
                    "checkpoint",
                    source.path,
                    f"the DeepSpeed module does not fit {source.family} (missing {missing[:3]}, unexpected "
                    f"{unexpected[:3]})",
                )
        else:
            model = _build(source, _megatron_rows(source.path))
            checkpoint.load(source.path, model=model)
        return {k: v.clone() for k, v in full_state_dict(model).items()}
    finally:
        if started:
            from parallel import engine

            engine.destroy()


# ------------------------------------------------------------------------------------------ writing
def parse_size(text: str) -> int:
    """Bytes of "5GB", "500MB", "2GiB", "1000"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if m is None:
        raise ConfigError("--max-shard-size", text, "give a size like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


def _sentencepiece(tokenizer_path: str):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    with open(tokenizer_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def write_tokenizer(tokenizer_path: str, folder: Path, *, max_length: int) -> dict:
    """tokenizer.json + tokenizer_config.json (a `tokenizers` BPE built from the sentencepiece model's pieces,
    scores and normalizer settings by transformers' converter; it encodes as `SentencePieceProcessor.encode`:
    tests/train/test_export.py) and the tokenizer.model itself. Returns the special token ids."""
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = _sentencepiece(tokenizer_path)
    if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 bpe
        raise ConfigError(
            "data.tokenizer.model_type", "unigram", "export converts BPE sentencepiece models only"
        )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    spec = proto.trainer_spec
    specials = {"eos_token": spec.eos_piece if spec.eos_id >= 0 else None, "unk_token": spec.unk_piece}
    if spec.bos_id >= 0:
        specials["bos_token"] = spec.bos_piece
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # Text that spells a special token ("<eod>") is text, as for sentencepiece: ids are identical.
        "split_special_tokens": True,
        **{k: v for k, v in specials.items() if v is not None},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    return {
        "vocab_size": len(proto.pieces),
        "eos_token_id": spec.eos_id if spec.eos_id >= 0 else None,
        "bos_token_id": spec.bos_id if spec.bos_id >= 0 else None,
    }


def _vocab_size(tokenizer_path: str, rows: int) -> int:
    size = len(_sentencepiece(tokenizer_path).pieces)
    if size > rows:
        raise ConfigError(
            "--tokenizer",
            tokenizer_path,
            f"has {size} pieces but the checkpoint's embedding only {rows} rows: not the run's tokenizer",
        )
    return size


def write_hf(state: dict, source: Source, tokenizer_path: str, folder: Path, *, max_shard_bytes: int) -> None:
    from models.hf import save_hf

    rows = state[_VOCAB_KEYS[0]].shape[0]
    _vocab_size(tokenizer_path, rows)
    if source.family == "qwen2":
        log.warning(
            "qwen2: transformers' AutoTokenizer replaces the tokenizer with its byte-level Qwen2Tokenizer for "
            "model_type qwen2; load it with PreTrainedTokenizerFast.from_pretrained(<out>) for the run's ids"
        )
    ids = write_tokenizer(tokenizer_path, folder, max_length=source.seq_length)
    tokens = {"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"], "pad_token_id": None}
    save_hf(
        state,
        source.arch,
        folder,
        family=source.family,
        vocab_size=ids["vocab_size"],
        max_shard_bytes=max_shard_bytes,
        config_extra=tokens,
    )
    generation = {**tokens, "do_sample": False}  # greedy by default; sampling is the caller's choice
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def write_torch(state: dict, source: Source, tokenizer_path: str, folder: Path) -> None:
    rows = state[_VOCAB_KEYS[0]].shape[0]
    meta = {
        "family": source.family,
        "arch": dataclasses.asdict(source.arch),
        "vocab_size": _vocab_size(tokenizer_path, rows),
        "padded_vocab_size": rows,
        "seq_length": source.seq_length,
        "stage": source.stage,
        "checkpoint": os.path.abspath(source.path),
        "state": checkpoint.read_state(source.path),
    }
    torch.save(state, folder / "model.pt")
    (folder / "arch.json").write_text(json.dumps(meta, indent=2, default=str))
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")


def read_torch(folder: str | Path) -> tuple[Arch, dict, dict[str, torch.Tensor]]:
    """(arch, arch.json, state dict) of a `--format torch` export; `models.gpt.build_model(arch,
    vocab_size=meta["padded_vocab_size"], max_seq_length=...)` then `load_state_dict(state, strict=False)`."""
    folder = Path(folder)
    meta = json.loads((folder / "arch.json").read_text())
    return Arch.from_dict(meta["arch"]), meta, torch.load(folder / "model.pt", weights_only=True)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", str(out), "is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(
            "--out", str(out), "exists and is not empty; choose another directory or pass --force"
        )


def export(
    path: str,
    out: str | Path,
    *,
    fmt: str = "hf",
    tokenizer: str | None = None,
    family: str | None = None,
    force: bool = False,
    max_shard_bytes: int = parse_size(DEFAULT_MAX_SHARD),
) -> Path:
    """Export the checkpoint at `path` (see the module docstring) to the folder `out`; returns it."""
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"choose one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(out, force)
    source = read_source(path, family=family)
    if fmt == "hf":
        from models.hf import check_exportable

        check_exportable(source.arch, source.family)  # before the weights are read
    tokenizer_path = find_tokenizer(source, tokenizer)
    state = load_weights(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if fmt == "hf":
            write_hf(state, source, tokenizer_path, tmp, max_shard_bytes=max_shard_bytes)
        else:
            write_torch(state, source, tokenizer_path, tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s, %s stage %s) to %s", source.path, fmt, source.family, source.stage, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="checkpoints/<stage>/step_N, or a stage directory (its latest)")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    parser.add_argument("--format", default="hf", choices=FORMATS, help="hf (default) or torch")
    parser.add_argument(
        "--tokenizer", help="the sentencepiece .model (default: the run's, from its data cache)"
    )
    parser.add_argument("--family", help="the model family, for checkpoints that do not record it")
    parser.add_argument(
        "--max-shard-size", default=DEFAULT_MAX_SHARD, help="hf: shard above this (default 5GB)"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export(
            args.checkpoint,
            args.out,
            fmt=args.format,
            tokenizer=args.tokenizer,
            family=args.family,
            force=args.force,
            max_shard_bytes=parse_size(args.max_shard_size),
        )
    except ConfigError as e:
        print(f"kiln export: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

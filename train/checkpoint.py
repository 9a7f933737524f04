"""Checkpoints with megatron.core.dist_checkpointing: model, optimizer, LR schedule and the loop state
(step, tokens seen, the LR, RNG). Layout:

    <run_dir>/checkpoints/<stage>/step_000120/            one complete checkpoint
    <run_dir>/checkpoints/<stage>/step_000120/kiln.json   the loop state, readable without torch
    <run_dir>/checkpoints/<stage>/step_000120/COMPLETE     size and sha256 of every file, written last
    <run_dir>/checkpoints/<stage>/latest                  the name of the newest complete checkpoint

Atomic save: every rank writes into `step_N.tmp`; the files are fsynced and hashed (the hashing is spread over
the ranks), rank 0 writes `COMPLETE` and renames the directory into place, then moves `latest`. A save killed at
any point leaves either the previous checkpoints untouched or a `.tmp` directory that is never read (and is
removed by the next save). `latest()` checks the checkpoint it returns against its COMPLETE record and falls back
to the newest one that passes, naming what was wrong, so a truncated shard or a lost `latest` costs only the
work since the previous checkpoint. A stage is done when its latest checkpoint says `"final": true`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from train import faults

log = logging.getLogger(__name__)

OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}  # reshardable across DP/TP sizes
STATE_FILE = "kiln.json"
CONFIG_FILE = "config.json"
COMPLETE_FILE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class CheckpointConfig:
    """Retention and verification of checkpoints (the `checkpoint` key of the run config)."""

    keep_last: int = 3
    """Complete checkpoints kept per stage, newest first; a stage's final checkpoint is always kept."""
    keep_every_tokens: int = 0
    """Also keep checkpoints whose token count is a multiple of this (0: none), e.g. for later evaluation."""
    full_verify: bool = False
    """Check every file's sha256 against the COMPLETE record before loading (reads the whole checkpoint);
    off, only the files' presence and sizes are checked."""
    async_save: bool = False
    """Write the shards in a forked process while training continues (megatron engine; megatron-core's
    async dist_checkpointing); the checkpoint becomes complete and `latest` once every rank's writer is done.
    The deepspeed engine refuses it (its own async saving needs Nebula, a cloud service)."""

    def __post_init__(self) -> None:
        from train.errors import ConfigError

        if self.keep_last < 1:
            raise ConfigError("checkpoint.keep_last", self.keep_last, "must be >= 1 (the resume point)")
        if self.keep_every_tokens < 0:
            raise ConfigError(
                "checkpoint.keep_every_tokens", self.keep_every_tokens, "must be >= 0 (0: none)"
            )


@dataclass
class ResumeConfig:
    """What a resumed run may change on purpose (the `resume` key of the run config)."""

    allow_config_change: list[str] = field(default_factory=list)
    """Config keys (or prefixes, e.g. `recipe.stages.base.lr`, `data.sources`) a resume may change although
    the run then no longer repeats the uninterrupted one exactly. Shape-changing model keys never can."""


# Keys of the run record that decide what a resumed stage computes; everything else (layout, logging,
# checkpoint retention, cluster) may change freely: the layout is resharded on load.
RESUME_KEYS = ("model.family", "arch", "data", "recipe.stages.{stage}", "seed")
# Keys recorded since a later Kiln (model.family: for `python -m train.export`): a checkpoint saved before
# has none of them and still resumes; when both sides have one, it is compared like any other key.
RECORDED_LATER = ("model.family",)
# Arch fields that change tensor shapes: a checkpoint cannot load into a model that differs in one.
SHAPE_KEYS = (
    "arch.num_layers",
    "arch.hidden_size",
    "arch.num_attention_heads",
    "arch.num_kv_heads",
    "arch.ffn_hidden_size",
    "arch.head_dim",
    "arch.tie_embeddings",
    "data.tokenizer.vocab_size",
)


def resume_record(cfg, stage: str) -> dict:
    """The flat {key: value} of what a checkpoint of `stage` was computed with (see RESUME_KEYS)."""
    import dataclasses

    tree = {
        "model.family": cfg.model.family,
        "arch": dataclasses.asdict(cfg.model.arch()),
        "data": dataclasses.asdict(cfg.data),
        "seed": cfg.seed,
    }
    tree["recipe.stages." + stage] = dataclasses.asdict(cfg.recipe.stages[stage])
    return flatten(tree)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a.b.c": leaf} of nested dicts (an empty dict is a leaf)."""
    flat: dict = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            flat.update(flatten(v, key))
        else:
            flat[key] = v
    return flat


def _new_stage_default(key: str, value) -> bool:
    """Whether `key` is a stage field at its default (`recipe.stages.<stage>.<field>`): a field added to
    StageConfig after a checkpoint was saved is absent from its record and, left at its default, changes
    nothing the checkpoint computed."""
    import dataclasses

    from train.stage import StageConfig

    parts = key.split(".")
    if len(parts) != 4 or parts[:2] != ["recipe", "stages"]:
        return False
    fields = {f.name: f for f in dataclasses.fields(StageConfig)}
    f = fields.get(parts[3])
    if f is None:
        return False
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return json.loads(json.dumps(default)) == value


def check_resume(path: str, current: dict, *, allow: list[str]) -> None:
    """Refuse to resume from `path` when the run config changed since it was saved in a way that breaks an
    exact resume, naming every changed key; keys under an `allow` prefix pass (with a warning)."""
    from train.errors import ConfigError

    record = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(record):
        return  # a checkpoint from before the record existed, or a foreign directory
    with open(record) as f:
        saved = json.load(f)
    current = json.loads(json.dumps(current, default=str))  # compare as saved (tuples are lists in JSON)
    changed = sorted(
        k
        for k in set(saved) | set(current)
        if saved.get(k, "<absent>") != current.get(k, "<absent>")
        and not (k not in saved and (k in RECORDED_LATER or _new_stage_default(k, current[k])))
    )

    def allowed(key: str) -> bool:
        return any(key == a or key.startswith(a + ".") for a in allow)

    shapes = [k for k in changed if k in SHAPE_KEYS]
    if shapes:
        diff = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in shapes)
        raise ConfigError(
            "resume",
            path,
            f"the checkpoint has another architecture ({diff}); these cannot be allowed: "
            "start a new run, or a new stage with init_from",
        )
    refused = [k for k in changed if not allowed(k)]
    if refused:
        diff = "; ".join(
            f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}" for k in refused
        )
        raise ConfigError(
            "resume",
            path,
            f"the config changed since this checkpoint was saved ({diff}), so the resumed run would not repeat "
            f"the original; undo the change, or allow it: resume.allow_config_change=[{','.join(refused)}]",
        )
    for key in changed:
        log.warning("resume: %s changed %r -> %r (allowed)", key, saved.get(key), current.get(key))


def stage_dir(run_dir: str, stage: str) -> str:
    return os.path.join(run_dir, "checkpoints", stage)


def averaged_dir(directory: str) -> str:
    """Where a stage's averaged checkpoint goes (stage.average_last), beside its own step checkpoints."""
    return os.path.join(directory, "averaged")


def path_for(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:06d}")


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------- files and hashes
def _files(root: str) -> list[str]:
    """Every file under `root` except the COMPLETE record, as sorted relative paths."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != COMPLETE_FILE:
                out.append(rel)
    return sorted(out)


def _sha256(path: str, *, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def hash_files(root: str, names: list[str], *, fsync: bool = False) -> dict[str, list]:
    """{relative path: [size, sha256]} for `names` under `root` (fsynced first when asked)."""
    return {
        n: [os.path.getsize(os.path.join(root, n)), _sha256(os.path.join(root, n), fsync=fsync)]
        for n in names
    }


def write_complete(root: str, files: dict[str, list]) -> None:
    """The COMPLETE record: every file's size and hash, and one digest over all of them."""
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    _write_synced(os.path.join(root, COMPLETE_FILE), json.dumps({"digest": digest, "files": files}, indent=1))


def verify(path: str, *, full: bool = False) -> str | None:
    """None when `path` is a complete checkpoint, else what is wrong with it. Sizes always; with `full`, every
    file's sha256 too (reads the whole checkpoint)."""
    marker = os.path.join(path, COMPLETE_FILE)
    if not os.path.isfile(marker):
        return f"{path}: no {COMPLETE_FILE} record (the save did not finish)"
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{marker}: unreadable ({e})"
    on_disk = set(_files(path))
    missing = sorted(set(files) - on_disk)
    if missing:
        return f"{path}: {len(missing)} file(s) missing, e.g. {missing[0]}"
    for name, (size, sha) in files.items():
        actual = os.path.getsize(os.path.join(path, name))
        if actual != size:
            return f"{path}/{name}: {actual} bytes, {size} when saved (truncated or overwritten)"
        if full and _sha256(os.path.join(path, name)) != sha:
            return f"{path}/{name}: content differs from its sha256 when saved (corrupted)"
    return None


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _complete_steps(directory: str) -> list[str]:
    """Checkpoint directories of a stage, newest first (not checked)."""
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if _STEP_DIR.match(n)]
    return [os.path.join(directory, n) for n in sorted(names, reverse=True)]


def _unfinished_saves(directory: str, after: str | None) -> None:
    """Warn about `.tmp` directories of saves newer than `after` that never finished (killed during the save)."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        if (
            name.endswith(".tmp")
            and _STEP_DIR.match(name[:-4])
            and (after is None or name[:-4] > os.path.basename(after))
        ):
            log.warning(
                "ignoring an unfinished save: %s; resuming from %s",
                verify(os.path.join(directory, name)),
                after or "the start (no complete checkpoint)",
            )


def latest(directory: str) -> str | None:
    """The newest complete checkpoint of a stage, or None. Follows `latest` when it points at a checkpoint that
    passes `verify`; otherwise warns with the reason and takes the newest checkpoint that does. Warns about
    newer saves that were cut off (their `.tmp` directories, never read)."""
    found = _latest(directory)
    _unfinished_saves(directory, found)
    return found


def _latest(directory: str) -> str | None:
    pointer = os.path.join(directory, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            path = os.path.join(directory, f.read().strip())
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint 'latest' is not usable: %s; looking for an earlier complete one", problem)
    elif _complete_steps(directory):
        log.warning("%s: no 'latest' pointer; looking for the newest complete checkpoint", directory)
    for path in _complete_steps(directory):
        problem = verify(path)
        if problem is None:
            log.warning("using %s", path)
            return path
        log.warning("skipping %s", problem)
    return None


def complete_checkpoints(directory: str) -> list[str]:
    """The stage's checkpoints that pass `verify`, oldest first."""
    return [p for p in reversed(_complete_steps(directory)) if verify(p) is None]


def prune(directory: str, retention: CheckpointConfig, *, keep: str) -> list[str]:
    """Delete complete checkpoints the retention policy does not keep (never `keep`, the newest K, the final
    ones, or multiples of keep_every_tokens) and stale `.tmp` directories of killed saves. Returns deleted paths."""
    complete = complete_checkpoints(directory)[::-1]  # newest first
    kept = set(complete[: retention.keep_last]) | {keep}
    for p in complete:
        state = read_state(p)
        every = retention.keep_every_tokens
        if state.get("final") or (every and state["tokens"] % every == 0):
            kept.add(p)
    doomed = [p for p in complete if p not in kept]
    doomed += [
        os.path.join(directory, n)
        for n in os.listdir(directory)
        if n.endswith(".tmp") and os.path.isdir(os.path.join(directory, n))
    ]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------------ save/load
class MegatronState:
    """Model chunks (and a megatron-core optimizer) written with megatron.core.dist_checkpointing, so a checkpoint
    saved at one layout loads at another (TP, PP, virtual stages, DP). The engines' `save_state`/`load_state`
    (parallel/engines/) follow the same two-method protocol."""

    def __init__(self, modules: list, optimizer=None) -> None:
        self.modules, self.optimizer = modules, optimizer

    def _model_sd(self) -> dict:
        sds = [c.sharded_state_dict() for c in self.modules]
        # Virtual-pipeline chunks hold local names that repeat ("decoder.layers.0"); the sharded tensors
        # inside carry the global names, so the nesting never reaches the files.
        return sds[0] if len(sds) == 1 else {f"chunk{i}": sd for i, sd in enumerate(sds)}

    def save_state(self, path: str, common: dict, *, async_save: bool = False):
        """Write the checkpoint into `path`; with `async_save`, only the common state now, and return
        megatron-core's AsyncRequest that writes the shards (train/checkpoint.py `save` schedules it)."""
        from megatron.core import dist_checkpointing

        model_sd = self._model_sd()
        sharded = {"model": model_sd, **common}
        if self.optimizer is not None:
            sharded["optimizer"] = self.optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_FORMAT)
        return dist_checkpointing.save(sharded, path, async_sharded_save=async_save)

    def load_state(self, path: str, *, optimizer: bool) -> dict:
        """Load weights (and the optimizer when asked and present); returns the common (non-sharded) state."""
        from megatron.core import dist_checkpointing

        model_sd = self._model_sd()
        sharded: dict = {"model": model_sd}
        if optimizer and self.optimizer is not None:
            # A fresh distributed optimizer has no Adam state yet: allocate it so the checkpoint has a target
            # (megatron's plain optimizer, used at data-parallel size 1, allocates its own when loading).
            for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
                    opt._init_optimizer_states_with_dummy_values()
            sharded["optimizer"] = self.optimizer.sharded_state_dict(
                model_sd, is_loading=True, metadata=OPTIMIZER_FORMAT
            )
        loaded = dist_checkpointing.load(sharded, path)
        if len(self.modules) == 1:
            self.modules[0].load_state_dict(loaded["model"])
        else:
            for i, chunk in enumerate(self.modules):
                chunk.load_state_dict(loaded["model"][f"chunk{i}"])
        if "optimizer" in sharded:
            self.optimizer.load_state_dict(loaded["optimizer"])
        return dist_checkpointing.load_common_state_dict(path)


_pending = None
"""megatron-core's AsyncCallsQueue of this process's unfinished async saves (checkpoint.async_save)."""


def wait_for_saves(*, blocking: bool = True) -> None:
    """Finish the async saves whose writers are done on every rank (all of them, waiting, when `blocking`):
    their COMPLETE record, rename and `latest` happen here. Call on all ranks; a no-op without pending saves."""
    if _pending is not None and _pending.get_num_unfinalized_calls():
        _pending.maybe_finalize_async_calls(blocking=blocking)


def save(
    directory: str,
    *,
    scheduler,
    state: dict,
    retention: CheckpointConfig | None = None,
    engine=None,
    model=None,
    optimizer=None,
    record: dict | None = None,
) -> str:
    """Save on all ranks; returns the checkpoint path. `engine` is the training engine (parallel/engines/),
    or give `model` (the bare GPTModel, DDP's `.module`) and `optimizer`; `state` is the JSON-able loop state,
    `record` the `resume_record` of the config it was computed with.

    With `retention.async_save` (megatron engine) the shards are written by a forked process while training
    goes on; the checkpoint becomes complete (COMPLETE, rename, `latest`) in `wait_for_saves`, which the loop
    calls after every step, before a stop and at the stage's end. A final checkpoint is always written
    synchronously. One save is in flight at a time: a new one first waits for the previous."""
    global _pending
    retention = retention or CheckpointConfig()
    store = engine if engine is not None else MegatronState([model], optimizer)
    path = path_for(directory, state["step"])
    tmp = path + ".tmp"
    wait_for_saves()
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    common = {"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
    background = retention.async_save and not state.get("final")
    request = store.save_state(tmp, common, async_save=True) if background else store.save_state(tmp, common)
    if dist.get_rank() == 0:
        _write_synced(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=2))
        if record is not None:
            _write_synced(os.path.join(tmp, CONFIG_FILE), json.dumps(record, indent=1, default=str))

    def finish() -> None:
        _complete(directory, tmp, path, retention, step=state["step"])

    if not background:
        finish()
        return path
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    request.add_finalize_fn(finish)
    if _pending is None:
        _pending = AsyncCallsQueue()
    _pending.schedule_async_request(request)
    log.info("saving checkpoint %s in the background", path)
    return path


def _complete(directory: str, tmp: str, path: str, retention: CheckpointConfig, *, step: int) -> None:
    """After every rank's shards are in `tmp`: fsync and hash them (each rank a share), rank 0 writes COMPLETE,
    renames `tmp` to `path`, moves `latest` and applies retention."""
    faults.inject("save", step)  # KILN_FAULT drills: cut off after the shards, before COMPLETE
    dist.barrier()
    rank, world = dist.get_rank(), dist.get_world_size()
    names = _files(tmp)
    mine = hash_files(tmp, names[rank::world], fsync=True)
    shares: list = [None] * world
    dist.all_gather_object(shares, mine)
    if rank == 0:
        write_complete(tmp, {k: v for share in shares for k, v in share.items()})
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        _fsync_dir(directory)
        _write_synced(os.path.join(directory, "latest.tmp"), os.path.basename(path))
        os.replace(os.path.join(directory, "latest.tmp"), os.path.join(directory, "latest"))
        _fsync_dir(directory)
        for gone in prune(directory, retention, keep=path):
            log.info("retention: removed %s", gone)
    dist.barrier()
    log.info("saved checkpoint %s", path)


def load(
    path: str,
    *,
    engine=None,
    model=None,
    optimizer=None,
    scheduler=None,
    load_optimizer: bool = True,
    full_verify: bool = False,
) -> dict:
    """Load weights (and, when given, optimizer and schedule state) from `path`; returns its loop state.
    `engine` (parallel/engines/) or `model` + `optimizer` as in `save`; with an engine, `load_optimizer`
    says whether its optimizer state is loaded. Refuses a checkpoint that fails `verify` (with
    `full_verify`, every file's hash is checked)."""
    problem = verify(path, full=full_verify)
    if problem is not None:
        raise RuntimeError(f"refusing to load a broken checkpoint: {problem}")
    if engine is None:
        engine, load_optimizer = MegatronState([model], optimizer), optimizer is not None
    common = engine.load_state(path, optimizer=load_optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(common["scheduler"])
        torch.set_rng_state(common["rng"])
    return read_state(path)

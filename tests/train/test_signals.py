"""train/signals.py on a world of one: USR1/TERM and the stop file set the agreed flag; `stop` requeues inside
Slurm (at most max_restarts times), records the event, and exits with 75."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from train import signals


@pytest.fixture
def handlers(megatron_world1, monkeypatch):
    """signals.install() for one test, then the previous handlers back; no Slurm job in the environment."""
    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", signals.STOP_FILE_ENV):
        monkeypatch.delenv(key, raising=False)
    old = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    signals.install()
    yield torch.device("cpu")
    for s, h in old.items():
        signal.signal(s, h)
    signals._received.clear()


def events(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "slurm", signals.EVENTS_FILE)) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_the_flag_and_stop_exits_75(handlers, tmp_path, sig):
    assert signals.stop_requested(handlers) is False
    os.kill(os.getpid(), sig)
    assert signals.stop_requested(handlers) is True
    with pytest.raises(SystemExit) as exit_info:
        signals.stop(run_dir=str(tmp_path), max_restarts=3, stage="base", step=7, checkpoint="ck")
    assert exit_info.value.code == signals.STOP_EXIT_CODE == 75
    (event,) = events(tmp_path)
    assert {k: event[k] for k in ("job", "stage", "step", "action", "why")} == {
        "job": None,
        "stage": "base",
        "step": 7,
        "action": "exit",
        "why": sig.name,
    }


def test_stop_file_requests_a_stop(handlers, tmp_path, monkeypatch):
    path = tmp_path / "stop-1"
    monkeypatch.setenv(signals.STOP_FILE_ENV, str(path))
    assert signals.stop_requested(handlers) is False
    path.touch()
    assert signals.stop_requested(handlers) is True


@pytest.mark.parametrize("restarts, action", [(0, "requeue"), (2, "requeue"), (3, "max_restarts")])
def test_inside_slurm_requeues_until_max_restarts(handlers, tmp_path, monkeypatch, restarts, action):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
    calls = []
    monkeypatch.setattr(signals.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or _Done())
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(SystemExit):
        signals.stop(run_dir=str(tmp_path), max_restarts=3, stage="anneal", step=12, checkpoint="ck")
    assert calls == ([["scontrol", "requeue", "4242"]] if action == "requeue" else [])
    (event,) = events(tmp_path)
    assert (event["job"], event["restarts"], event["action"]) == ("4242", restarts, action)


class _Done:
    returncode = 0
    stderr = ""


def test_lead_too_short_names_the_key_the_times_and_a_value():
    assert signals.lead_too_short(step_s=20.0, save_s=30.0, lead_s=60) is None
    why = signals.lead_too_short(step_s=29.3, save_s=41.2, lead_s=60)
    assert why == (
        "cluster.slurm.signal_lead_s=60: one step (29.3 s) + one checkpoint write (41.2 s) take 70.5 s, longer "
        "than the lead; a job stopped at its time limit loses the work since its last checkpoint: set it to >= 141"
    )

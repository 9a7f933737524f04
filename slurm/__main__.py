"""`python -m slurm ...`: launch Kiln runs on Slurm.

    python -m slurm submit [--dry-run] [--one-job] <overrides as for python -m train>
    python -m slurm shard-data --num-shards N [--dry-run] <overrides>
    python -m slurm status <run_dir>

`submit` renders the sbatch script(s) into <run_dir>/slurm/ and submits them: a recipe with several stages is
one job per stage chained with --dependency=afterok (--one-job: the whole recipe in one job). `--dry-run` prints
the scripts and submits nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys

from slurm import status as status_mod
from slurm import submit as submit_mod
from train.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="render and submit the run (one job per stage, chained)")
    s.add_argument("--dry-run", action="store_true", help="print the script(s), submit nothing")
    s.add_argument("--one-job", action="store_true", help="all stages of the recipe in one job")
    s.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m train")
    d = sub.add_parser("shard-data", help="prepare the data as a job array, one task per shard")
    d.add_argument("--num-shards", type=int, required=True)
    d.add_argument("--dry-run", action="store_true")
    d.add_argument("overrides", nargs="*")
    t = sub.add_parser("status", help="job state, restarts, last checkpoint and step of a run")
    t.add_argument("run_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname).1s %(name)s: %(message)s")
    try:
        if args.command == "status":
            print(status_mod.format_status(args.run_dir, status_mod.job_status(args.run_dir)))
            return 0
        cfg = submit_mod.load_config(args.overrides)
        if args.command == "submit":
            jobs = submit_mod.plan_training(cfg, args.overrides, one_job=args.one_job)
        else:
            jobs = submit_mod.plan_data_array(cfg, args.overrides, num_shards=args.num_shards)
        submit_mod.submit(jobs, dry_run=args.dry_run)
    except ConfigError as e:
        print(f"kiln: invalid config: {e}", file=sys.stderr)
        return 2
    except submit_mod.SlurmError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 1
    for job in jobs:
        if args.dry_run:
            print(f"# ---- {job.script}\n{job.text}")
        else:
            after = f" after {job.after} (afterok)" if job.after else ""
            print(f"submitted {job.part}: job {job.job_id}{after}  [{job.script}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

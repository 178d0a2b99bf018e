"""What ``distill`` and ``optimize`` share: open the run folder, resolve the config, run, report.

The folder's lifecycle (engine/rundir.py; docs/cli.md "Run folders"):

1. Everything that can be checked is checked before anything is written: the config, the folder
   (``--out`` must be new, empty, or a folder of ours with nothing resumable, or ``--force``d), and the
   driver's construction (teacher, roles, requirements).
2. The main process takes the folder's exclusive lock; a second writer gets one line and exit 2.
3. A folder of ours that holds nothing resumable is cleared of what the library wrote (restart in place);
   the user's own files in it stay.
4. If the run then fails with bad input before its first checkpoint, a folder this command created is
   removed again, so bad input leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

from scoredistill.config import check_resume_overrides, load_yaml
from scoredistill.engine.rundir import RunLock, check_new, clear_own, has_checkpoint
from scoredistill.errors import CheckpointError, ConfigError, out_of_memory


def load_saved_config(run_dir: str, field: str = "--resume") -> dict:
    """The ``config.yaml`` of an existing run folder."""
    if not os.path.isdir(run_dir):
        raise ConfigError(field, f"folder not found: {run_dir}")
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        from scoredistill.engine.rundir import is_ours

        if is_ours(run_dir):  # a run stopped between taking the folder and writing its config: nothing to resume
            raise ConfigError(field, f"{run_dir} has no config.yaml yet (its run stopped before writing it, nothing "
                              "to resume): run the CONFIG.yaml --out command again, it restarts in place")
        raise ConfigError(field, f"{run_dir} has no config.yaml (not a scoredistill run folder)")
    return load_yaml(path)


def steps_done(run_dir: str) -> int:
    """The step of the newest checkpoint of ``run_dir`` (0 without one): what ``--resume`` continues."""
    from scoredistill.engine.io import list_checkpoints

    steps = [int(name.rsplit("_", 1)[1]) for name in map(os.path.basename, list_checkpoints(run_dir))
             if name.rsplit("_", 1)[-1].isdigit()]
    return max(steps, default=0)


def run_in_folder(args, *, command: str, resolve: Callable, build: Callable, schema=None) -> dict | None:
    """``scoredistill COMMAND CONFIG --out RUN_DIR [--force]`` or ``--resume RUN_DIR`` with ``--set`` overrides.

    ``resolve(user, overrides) -> cfg``; ``build(cfg, run_dir) -> driver`` (a :class:`~scoredistill.engine.loop.Loop`,
    constructed without writing anything); ``schema`` says which keys ``--resume --set`` may change
    (:func:`~scoredistill.config.check_resume_overrides`)."""
    resume = bool(args.resume)
    if resume:
        if args.config or args.out:
            raise ConfigError("--resume", "takes the run folder alone: CONFIG and --out come from the run itself")
        run_dir = args.resume
        saved = load_saved_config(run_dir)
        check_resume_overrides(args.set, saved, steps_done(run_dir), schema)
        cfg = resolve(saved, args.set)
    else:
        if not args.config or not args.out:
            raise ConfigError(command, "needs CONFIG.yaml --out RUN_DIR, or --resume RUN_DIR")
        run_dir = args.out
        cfg = resolve(load_yaml(args.config), args.set)
        check_new(run_dir, "--out", force=getattr(args, "force", False))
    driver = build(cfg, run_dir)
    created = not os.path.exists(run_dir)
    lock = RunLock(run_dir, command, "--resume" if resume else "--out", adopt=resume) if driver.is_main else None
    t0 = time.time()
    try:
        if lock is not None:
            lock.acquire()
            if not resume:
                # checked again under the lock: another process may have written here since the first check
                check_new(run_dir, "--out", force=getattr(args, "force", False))
                clear_own(run_dir)
        try:
            try:
                res = driver.run(resume=resume)
            except (MemoryError, RuntimeError) as e:  # sizes too large for this machine: bad input too
                oom = out_of_memory(e)
                if oom is None:
                    raise
                raise oom from None
        except (ConfigError, CheckpointError):
            if created and lock is not None and not has_checkpoint(run_dir):
                lock.release()
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if driver.is_main:
            print(driver.report(res, time.time() - t0))
            print(f"wrote {os.path.join(run_dir, 'report.md')}")
        return res
    finally:
        if lock is not None:
            lock.release()
        close = getattr(driver, "close", None)
        if close is not None:
            close()



def add_run_arguments(parser, what: str) -> None:
    """The arguments ``distill`` and ``optimize`` share."""
    parser.add_argument("config", nargs="?", help=f"recipe YAML ({what})")
    parser.add_argument("--out", help="run folder to create")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the newest checkpoint of RUN_DIR")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--force", action="store_true", help="start over in a run folder of ours that holds "
                        "checkpoints (never touches other folders)")

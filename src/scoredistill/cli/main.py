"""``scoredistill`` command line: distill, sample, teacher-sample, train-teacher, demo (optimize, export,
bench and render in their own modules).

Bad input (unknown keys or values, wrong shapes, missing files, unreadable checkpoints) prints one
line ``scoredistill: error: FIELD: message`` on stderr and exits with code 2, without a traceback
and without touching what is already in the run folder.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

EXIT_BAD_INPUT = 2
EXIT_ABORTED = 3
MAX_SIZE = 2**24  # --n past this is a typo (config.MAX_SIZE; not imported here: torch loads lazily)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + message by default)
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _fail(msg: str, code: int = EXIT_BAD_INPUT):
    sys.stderr.write(f"scoredistill: error: {msg}\n")
    sys.exit(code)


def cmd_distill(args):
    from scoredistill.cli.runs import run_in_folder
    from scoredistill.config import resolve
    from scoredistill.engine.distiller import Distiller

    return run_in_folder(args, command="distill", resolve=resolve, build=Distiller)


def _write_samples(out: str, x, title: str) -> None:
    """``.npy``: the float32 array ``(N, *data_shape)``; ``.png``: a grid of image samples (1 or 3 channels).
    Written to a temporary name and renamed, so a failed run never leaves half a file at ``out``."""
    import math

    import numpy as np

    from scoredistill.config import ConfigError

    ext = os.path.splitext(out)[1].lower()
    if ext not in (".npy", ".png"):
        raise ConfigError("--out", f"unknown file type {ext or '(none)'!r} in {out}; "
                                   "accepted: .npy (array), .png (image grid)")
    if ext == ".png" and not (x.dim() == 4 and x.shape[1] in (1, 3)):
        raise ConfigError("--out", f"a .png grid needs images of 1 or 3 channels; these samples have shape "
                                   f"{tuple(x.shape[1:])}: use .npy")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if ext == ".npy":
        tmp = out + ".tmp.npy"
        np.save(tmp, x.detach().float().cpu().numpy().astype(np.float32))
        os.replace(tmp, out)
    else:
        from scoredistill.viz.images import grid_inches, image_grid_panels

        nrow = min(10, math.ceil(math.sqrt(len(x))))
        image_grid_panels([(title, x)], out, max_images=len(x), nrow=nrow, panel_inches=grid_inches(nrow, x.shape[-1]))


def cmd_sample(args):
    import torch

    import scoredistill.adapters  # noqa: F401  (registers diffusers student folders with the model registry)
    from scoredistill.config import ConfigError
    from scoredistill.engine.report import student_steps
    from scoredistill.errors import CheckpointError
    from scoredistill.models.registry import load_model
    from scoredistill.models.rollout import sample_noise_seed

    folder = os.path.join(args.run_dir, "generator")
    if not 1 <= args.n <= MAX_SIZE:
        raise ConfigError("--n", f"must be an integer in [1, 2^24], got {args.n}")
    if not 0 <= args.seed < 2**63:
        raise ConfigError("--seed", f"must be an integer in [0, 2^63), got {args.seed}")
    if not os.path.isdir(args.run_dir):
        raise ConfigError("RUN_DIR", f"folder not found: {args.run_dir}")
    try:
        gen, gcfg = load_model(folder)
    except FileNotFoundError:
        raise ConfigError("RUN_DIR", f"{args.run_dir} has no generator/ yet (train first)") from None
    gen.eval()
    g = torch.Generator().manual_seed(args.seed)
    shape = gcfg.get("data_shape") or getattr(gen, "data_shape", None)
    if (not isinstance(shape, (list, tuple)) or not shape
            or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in shape)):
        raise CheckpointError(f"{folder}/config.json: data_shape must be a list of positive integers, got {shape!r}")
    shape = tuple(shape)
    z = torch.randn(args.n, *shape, generator=g)
    cond = None
    if gen.num_classes:
        if args.cls is not None:
            if not 0 <= args.cls < gen.num_classes:
                raise ConfigError("--class", f"must be in [0, {gen.num_classes - 1}]")
            cond = torch.full((args.n,), args.cls, dtype=torch.long)
        else:
            cond = torch.randint(0, gen.num_classes, (args.n,), generator=g)
    elif args.cls is not None:
        raise ConfigError("--class", "this generator is unconditional")
    k = student_steps(gen)
    if args.steps is not None and not getattr(gen, "takes_noise_generator", False):
        raise ConfigError("--steps", f"this student samples with all its {k} step(s) only; accepted: no --steps")
    try:
        with torch.no_grad():
            if getattr(gen, "takes_noise_generator", False):  # K-step: the re-noising is seeded too
                noise = torch.Generator().manual_seed(sample_noise_seed(args.seed))
                x = gen.sample(z, cond, steps=args.steps, generator=noise).float()
                k = args.steps or k
            else:
                x = gen(z, cond).float()
    except RuntimeError as e:  # a config.json edited out of step with the weights
        raise CheckpointError(f"{folder} cannot sample {tuple(shape)}: {str(e).strip().splitlines()[0]}") from None
    what = f"class {args.cls}, " if args.cls is not None else ""
    _write_samples(args.out, x, f"{k}-step generator ({what}seed {args.seed})")
    print(f"wrote {args.out} {tuple(x.shape)}")


def cmd_teacher_sample(args):
    import torch

    from scoredistill.config import ConfigError, load_yaml, resolve
    from scoredistill.engine.build import build_teacher, sample_classes
    from scoredistill.sampling import SAMPLERS, nfe, teacher_sample

    cfg = resolve(load_yaml(args.config), args.set)
    if args.sampler not in SAMPLERS:
        raise ConfigError("--sampler", f"unknown value {args.sampler!r}; accepted: {', '.join(SAMPLERS)}")
    if not 1 <= args.n <= MAX_SIZE:
        raise ConfigError("--n", f"must be an integer in [1, 2^24], got {args.n}")
    if not 1 <= args.steps <= 10000:
        raise ConfigError("--steps", f"must be an integer in [1, 10000], got {args.steps}")
    if not 0 <= args.seed < 2**63:
        raise ConfigError("--seed", f"must be an integer in [0, 2^63), got {args.seed}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise ConfigError("--guidance", f"must be a finite number >= 0 (canonical CFG, 1 = unguided), "
                          f"got {args.guidance}")
    teacher, _ = build_teacher(cfg["teacher"])
    g = torch.Generator().manual_seed(args.seed)
    cond = sample_classes(teacher.num_classes, args.n, g)
    if args.cls is not None:
        if not teacher.num_classes:
            raise ConfigError("--class", "this teacher is unconditional")
        if not 0 <= args.cls < teacher.num_classes:
            raise ConfigError("--class", f"must be in [0, {teacher.num_classes - 1}]")
        cond = torch.full((args.n,), args.cls, dtype=torch.long)
    x = teacher_sample(teacher, args.n, steps=args.steps, sampler=args.sampler, cond=cond, w=args.guidance,
                       generator=g)
    _write_samples(args.out, x, f"teacher, {nfe(args.sampler, args.steps)}-NFE {args.sampler} (seed {args.seed})")
    print(f"wrote {args.out} {tuple(x.shape)} ({nfe(args.sampler, args.steps)} NFE)")


def cmd_train_teacher(args):
    from scoredistill.engine.rundir import is_ours, write_marker
    from scoredistill.engine.teacher_training import train_teacher
    from scoredistill.errors import ConfigError

    # the teacher folder is written whole (temporary folder + rename), which would replace what a folder
    # already holds: only a new or empty one is accepted, never one with anything in it
    out = args.out
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        what = "a teacher written earlier" if is_ours(out) else "files scoredistill did not write"
        raise ConfigError("--out", f"{out} exists and is not an empty folder ({what}); choose a new folder")
    res = train_teacher(args.config, out, args.set)
    write_marker(out, "train-teacher")
    print(f"wrote teacher to {res['out']} (final loss {res['final_loss']:.4f}); use it with "
          f"teacher: {{kind: learned, path: {res['out']}}}")


def cmd_demo(args):
    from scoredistill.cli.demo import run_demo

    out = args.out or os.path.join("runs", "demo_image" if args.image else "demo")
    run_demo(out, quick=args.quick, image=args.image)


def build_parser() -> argparse.ArgumentParser:
    from scoredistill.cli.runs import add_run_arguments

    p = _Parser(prog="scoredistill", description="Score distillation of diffusion and flow models.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    d = sub.add_parser("distill", help="distill a teacher into a one- or few-step generator")
    add_run_arguments(d, "recipes/toy, digits, mnist, sd15, sdxl, sd3")
    d.set_defaults(fn=cmd_distill)

    s = sub.add_parser("sample", help="sample a trained generator to .npy (array) or .png (image grid)")
    s.add_argument("run_dir")
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--class", dest="cls", type=int, default=None)
    s.add_argument("--steps", type=int, default=None,
                   help="K-step students: sample with K' <= K of their steps (evenly strided; docs/fewstep.md)")
    s.add_argument("--out", required=True, help="FILE.npy (float32 array) or FILE.png (image grid)")
    s.set_defaults(fn=cmd_sample)

    ts = sub.add_parser("teacher-sample", help="sample the teacher with a multi-step ODE sampler")
    ts.add_argument("config")
    ts.add_argument("--n", type=int, default=1000)
    ts.add_argument("--steps", type=int, default=18)
    ts.add_argument("--sampler", default="heun")
    ts.add_argument("--seed", type=int, default=0)
    ts.add_argument("--class", dest="cls", type=int, default=None)
    ts.add_argument("--guidance", type=float, default=1.0, help="canonical CFG scale (1 = unguided)")
    ts.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ts.add_argument("--out", required=True, help="FILE.npy (float32 array) or FILE.png (image grid)")
    ts.set_defaults(fn=cmd_teacher_sample)

    tt = sub.add_parser("train-teacher", help="fit a small learned teacher to a GMM or a bundled image dataset")
    tt.add_argument("config")
    tt.add_argument("--out", required=True)
    tt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    tt.set_defaults(fn=cmd_train_teacher)

    dm = sub.add_parser("demo", help="ring8 -> one-step DMD2 generator in under two minutes on a CPU")
    dm.add_argument("--out", default=None, help="output folder (default runs/demo or runs/demo_image)")
    dm.add_argument("--image", action="store_true", help="bundled digits teacher -> one-step DMD2 generator (~3 min)")
    dm.add_argument("--quick", action="store_true", help="a few hundred steps (smoke test)")
    dm.set_defaults(fn=cmd_demo)
    from scoredistill.cli.optimize import add_optimize_parser

    add_optimize_parser(sub)
    from scoredistill.cli.export import add_export_parser

    add_export_parser(sub)
    from scoredistill.cli.bench import add_bench_parser

    add_bench_parser(sub)
    from scoredistill.cli.render import add_render_parser

    add_render_parser(sub)
    return p


def main(argv=None):
    from scoredistill.config import ConfigError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "fn", None):
            parser.print_help()
            return 0
        if getattr(args, "config", None) and not os.path.exists(args.config):
            raise ConfigError("CONFIG", f"file not found: {args.config}")
        from scoredistill.engine.distiller import TrainingAborted
        from scoredistill.engine.io import CheckpointError

        try:
            args.fn(args)
        except TrainingAborted as e:
            _fail(f"training aborted: {e}", EXIT_ABORTED)
        except CheckpointError as e:
            _fail(f"checkpoint: {e}")
        except (MemoryError, RuntimeError) as e:
            from scoredistill.errors import out_of_memory

            oom = out_of_memory(e)
            if oom is None:
                raise
            _fail(str(oom))
    except _UsageError as e:
        _fail(str(e))
    except ConfigError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail(_interrupted(locals().get("args")), 130)
    return 0


def _interrupted(args) -> str:
    """What Ctrl-C leaves behind and how to go on: ``--resume`` a run folder with a checkpoint, the same command
    for one without (it restarts in place, docs/cli.md), nothing for the other commands."""
    command = getattr(args, "command", None)
    run_dir = getattr(args, "resume", None) or getattr(args, "out", None)
    if command not in ("distill", "optimize") or not run_dir:
        return "interrupted"
    from scoredistill.engine.rundir import has_checkpoint

    if os.path.isdir(run_dir) and has_checkpoint(run_dir):
        return f"interrupted; resume with `scoredistill {command} --resume {run_dir}`"
    return "interrupted before the first checkpoint; run the same command again to start over"


if __name__ == "__main__":
    sys.exit(main())

"""Ship a trained image teacher into the package: ``teachers/weights/NAME/`` (config, weights, README).

    python scripts/ship_teacher.py RUN_DIR --name mnist [--eval-n 1000] [--device cuda] \
        [--docs-image docs/images/mnist_teacher.png] [--dest DIR] [--command "..."] [--force]

RUN_DIR is the ``--out`` folder of ``scoredistill train-teacher`` (``config.json`` + ``model.safetensors``).
The README records the training command (rebuilt from the recipe path and ``--set`` overrides stored in
the folder's config, or ``--command``), the sha256 of the weights and, with ``--eval-n N``, the quality
of N class-balanced 35-NFE Heun samples (classifier-feature FD, conf>0.9, label accuracy), which the
test of the bundled teacher compares against. Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from scoredistill.config import ConfigError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="folder written by scoredistill train-teacher (teacher.kind: image)")
    p.add_argument("--name", required=True, help="bundled teacher name (digits, mnist)")
    p.add_argument("--dest", default=None, help="target folder (default: src/scoredistill/teachers/weights/NAME)")
    p.add_argument("--command", default=None, help="training command for the README (default: rebuilt)")
    p.add_argument("--eval-n", type=int, default=0, help="measure N 35-NFE Heun samples (0: skip)")
    p.add_argument("--device", default="cpu", help="where to sample for --eval-n / --docs-image (cpu, cuda)")
    p.add_argument("--docs-image", default=None, help="also write a 35-NFE sample grid PNG (row k: class k)")
    p.add_argument("--force", action="store_true", help="replace weights already in the target folder")
    args = p.parse_args(argv)
    from scoredistill.teachers.ship import ship_teacher

    try:
        ship_teacher(args.run_dir, args.name, dest=args.dest, command=args.command, eval_n=args.eval_n,
                     device=args.device, force=args.force)
        if args.docs_image:
            from scoredistill.engine.image_teacher_training import write_sample_grid
            from scoredistill.teachers.bundled import load_teacher_folder

            model, _ = load_teacher_folder(args.run_dir, args.name)
            write_sample_grid(model.to(args.device), args.docs_image, f"bundled {args.name} teacher")
            print(f"wrote {args.docs_image}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

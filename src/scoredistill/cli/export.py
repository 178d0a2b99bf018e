"""``scoredistill export RUN_DIR --format diffusers|lora --out DIR`` (scoredistill.adapters.export)."""

from __future__ import annotations

import json


def cmd_export(args):
    from scoredistill.adapters.export import export_run

    info = export_run(args.run_dir, args.out, fmt=args.format, verify=not args.no_verify, seed=args.seed,
                      force=args.force)
    print(f"wrote {args.out} ({info['format']}, {info['pipeline']}, {len(info['timesteps'])} step(s) at "
          f"timesteps {info['timesteps']})")
    print(f"call: pipe(..., {', '.join(f'{k}={v!r}' for k, v in info['call'].items())})")
    if "verify" in info:
        print("verify: " + json.dumps(info["verify"]))


def add_export_parser(sub):
    e = sub.add_parser("export", help="export a distilled diffusers student as a pipeline folder or LoRA weights")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--format", default="diffusers", choices=("diffusers", "lora"),
                   help="diffusers: full pipeline folder; lora: LoRA safetensors (students trained as LoRA)")
    e.add_argument("--out", required=True, help="folder to create")
    e.add_argument("--force", action="store_true",
                   help="replace --out if it holds an earlier export (never a folder scoredistill did not write)")
    e.add_argument("--seed", type=int, default=0, help="noise seed for the verification samples")
    e.add_argument("--no-verify", action="store_true", help="skip reloading and sampling the exported folder")
    e.set_defaults(fn=cmd_export)
    return e

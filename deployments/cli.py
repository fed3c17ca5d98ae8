"""`lens-serve`: the command line. Each subcommand imports what it needs inside itself.

`analyze`, `inspect` and `make-demo` use lenscore only and never start Ray; `validate` reads
the group files; `pack` writes packed lens files for checkpoints or group files; `k8s render`
writes the KubeRay manifest from `serve_config.yaml`.
Exit status: 0 ok, 2 bad input / incompatible lens / bad config, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

# LensError codes a user fixes by changing the command's arguments or files: exit 2.
_USER_ERRORS = {
    "bad_input",
    "text_too_long",
    "incompatible_lens",
    "missing_checkpoint",
    "corrupt_checkpoint",
    "checkpoint_refused",
    "base_unavailable",
}


class CliError(Exception):
    """A one-line error for stderr with its exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def main(argv: list[str] | None = None) -> int:
    """Run `lens-serve`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["k8s", "render"]:
        # render has its own parser (deployments/k8s.py); hand it every remaining option.
        from deployments.ops.k8s import render_main

        return render_main(argv[2:])
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error of ours.
        sys.stderr.close()
        return 0
    except CliError as exc:
        print(f"lens-serve: error: {exc}", file=sys.stderr)
        return exc.status
    except Exception as exc:  # noqa: BLE001 - one line on stderr, never a traceback
        from lenscore.errors import LensError

        if not isinstance(exc, LensError):
            raise
        print(f"lens-serve: error: {exc.message}", file=sys.stderr)
        return 2 if exc.code in _USER_ERRORS else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lens-serve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_analyze(sub)
    inspect = sub.add_parser("inspect", help="describe one lens checkpoint")
    inspect.add_argument("--checkpoint", required=True, type=Path, help="run dir or .pt file")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=run_inspect)
    demo = sub.add_parser("make-demo", help="write tiny demo bases, donor and lenses")
    demo.add_argument("dir", type=Path)
    demo.set_defaults(run=run_make_demo)
    _add_pack(sub)
    validate = sub.add_parser("validate", help="check every group file; exit 2 on problems")
    validate.add_argument("groups_dir", nargs="?", type=Path, default=Path("groups"))
    validate.set_defaults(run=run_validate)
    k8s = sub.add_parser("k8s", help="KubeRay manifests")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True)
    render = k8s_sub.add_parser(
        "render", help="write k8s/rayservice.yaml from serve_config.yaml (--check: compare)"
    )
    render.add_argument("serve_config", nargs="?", help="default serve_config.yaml")
    render.add_argument("out", nargs="?", help="default k8s/rayservice.yaml")
    render.add_argument("--cluster", help="cluster values (default k8s/cluster.yaml)")
    render.add_argument("--check", action="store_true", help="exit 1 if OUT is stale")
    return parser


def _add_analyze(sub: Any) -> None:
    p = sub.add_parser("analyze", help="explain every token of a text with one lens")
    p.add_argument("--checkpoint", required=True, type=Path, help="run dir or .pt file")
    p.add_argument("--base", required=True, type=Path, help="base model directory")
    p.add_argument("--donor", type=Path, help="donor model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--messages-file", type=Path, help='JSON list of {"role", "content"}')
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--seed", type=int)
    p.add_argument("--best-of-k", type=int, default=1)
    p.add_argument("--optimize-temperature", type=float)
    p.add_argument("--no-salience", action="store_true")
    p.add_argument("--logit-lens", action="store_true")
    p.add_argument("--kl", action="store_true")
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--positions",
        type=lambda s: [int(x) for x in s.split(",")],
        help="comma-separated positions",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_analyze)


def _add_pack(sub: Any) -> None:
    p = sub.add_parser(
        "pack",
        help="write packed lens files (safetensors + JSON) that replicas read instead of "
        "trainer checkpoints",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--groups", type=Path, help="pack every lens of these group files (their cache dirs)"
    )
    src.add_argument("--checkpoint", type=Path, nargs="+", help="run dirs or .pt files")
    p.add_argument(
        "--cache-dir", type=Path, help="where to write (default: each group's packed_cache_dir)"
    )
    p.add_argument("--force", action="store_true", help="rewrite fresh packed files too")
    p.set_defaults(run=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    """Pack each named checkpoint; one line per lens; exit 2 if any could not be packed."""
    from lenscore.errors import LensError
    from lenscore.packed import pack_checkpoint

    failed = 0
    for name, checkpoint, cache_dir in _pack_jobs(args):
        try:
            packed = pack_checkpoint(checkpoint, cache_dir, force=args.force)
        except LensError as exc:
            print(f"lens-serve: error: {name}: {exc.message}", file=sys.stderr)
            failed += 1
            continue
        state = "packed" if packed.written else "fresh "
        print(f"{state} {name}: {packed.source.name} -> {packed.tensors_path} "
              f"({packed.tensor_bytes} bytes)")  # fmt: skip
    return 2 if failed else 0


def _pack_jobs(args: argparse.Namespace) -> list[tuple[str, Path, Path]]:
    """(name shown, checkpoint, cache dir) for every lens to pack."""
    if args.checkpoint:
        if args.cache_dir is None:
            raise CliError("--checkpoint needs --cache-dir")
        return [(str(path), path, args.cache_dir) for path in args.checkpoint]
    from deployments.config import GroupConfigError
    from deployments.group_files import load_groups

    try:
        groups = load_groups(args.groups)
    except GroupConfigError as exc:
        raise CliError(str(exc)) from exc
    jobs = []
    for group in groups:
        cache_dir = args.cache_dir or group.replica.packed_cache_dir
        if cache_dir is None:
            raise CliError(
                f"group {group.group_id} has no replica.packed_cache_dir; set it or pass "
                "--cache-dir"
            )
        jobs += [(lens.lens_id, lens.checkpoint, cache_dir) for lens in group.lenses]
    return jobs


def run_analyze(args: argparse.Namespace) -> int:
    """Load base (+ donor) and lens, analyse, print JSON or a table."""
    import torch

    from lenscore import AnalysisOptions, analyze, load_base, load_lens

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available")
    messages = _read_messages(args.messages_file) if args.messages_file else None
    options = AnalysisOptions(
        temperature=args.temperature,
        seed=args.seed,
        best_of_k=args.best_of_k,
        optimize_temperature=args.optimize_temperature,
        calculate_salience=not args.no_salience,
        logit_lens=args.logit_lens,
        kl=args.kl,
        batch_size=args.batch_size,
        positions=tuple(args.positions) if args.positions else None,
    )
    options.validate()
    base = load_base(args.base, dtype=args.dtype, device=args.device)
    donor = load_base(args.donor, dtype=args.dtype, device=args.device) if args.donor else None
    lens = load_lens(args.checkpoint, base, donor=donor)
    result = analyze(lens, text=args.text, messages=messages, options=options)
    if args.json:
        json.dump(result, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        _print_table(result)
    return 0


def _read_messages(path: Path) -> list[dict[str, Any]]:
    try:
        messages = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CliError(f"cannot read messages file {path}: {exc}") from exc
    if isinstance(messages, dict) and "messages" in messages:
        messages = messages["messages"]
    return messages


def _print_table(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(
        f"lens {meta['lens_id']}  layer {meta['layer']}  t_text {meta['t_text']}  "
        f"base {meta['base_model']}"
    )
    print(f"{'pos':>4}  {'token':<14} {'mse':>10} {'rel_rmse':>9}  explanation")
    for row in result["rows"]:
        token = json.dumps(row["token"], ensure_ascii=False)[1:-1][:14]
        text = json.dumps(row["explanation"], ensure_ascii=False)[1:-1]
        print(
            f"{row['position']:>4}  {token:<14} {row['mse']:>10.4f} "
            f"{row['relative_rmse']:>9.4f}  {text}"
        )


def run_inspect(args: argparse.Namespace) -> int:
    """Print step, layer, prompts, tensor shapes and sizes of one checkpoint."""
    from lenscore import LensConfig, read_checkpoint

    raw = read_checkpoint(args.checkpoint)
    try:
        cfg = LensConfig.from_dict(raw.config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CliError(f"{raw.path}: config cannot be read: {exc}") from exc
    info = {
        "path": str(raw.path),
        "step": raw.step,
        "epoch": raw.epoch,
        "layer_l": cfg.layer_l,
        "t_text": cfg.t_text,
        "model_name": cfg.model_name,
        "decoder_prompt": cfg.decoder_prompt,
        "encoder_prompt": cfg.soft_prompt_text,
        "patch_all_layers": cfg.patch_all_layers,
        "per_layer_projections": cfg.per_layer_projections,
        "new_decoder": cfg.new_decoder,
        "encoder_output_layer": cfg.output_layer,
        "add_current_token": cfg.add_current_token,
        "tensors": {
            f"{part}.{key}": {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for part, state in (("decoder", raw.decoder), ("encoder", raw.encoder))
            for key, t in state.items()
        },
        "lens_bytes": raw.tensor_bytes,
        "file_bytes": raw.file_bytes,
        "fell_back_from": [{"path": str(p), "why": why} for p, why in raw.fell_back_from],
    }
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return 0
    for key, value in info.items():
        if key == "tensors":
            print("tensors:")
            for name, t in value.items():
                print(f"  {name:<45} {str(t['shape']):<16} {t['dtype']}")
        else:
            print(f"{key}: {value}")
    return 0


def run_make_demo(args: argparse.Namespace) -> int:
    """Write the demo tree into DIR."""
    from lenscore.demo import make_demo

    manifest = make_demo(args.dir)
    print(
        f"wrote demo into {args.dir}: {len(manifest['bases'])} bases, "
        f"{len(manifest['donors'])} donor(s), {len(manifest['lenses'])} lenses"
    )
    return 0


def run_validate(args: argparse.Namespace) -> int:
    """Print one line per problem in the group files; exit 2 if any."""
    from deployments.checks import validate_groups

    problems = validate_groups(args.groups_dir)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 2
    print(f"{args.groups_dir}: all group files are valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())

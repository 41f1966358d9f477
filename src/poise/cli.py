"""The `poise` command: one thin sub-command per stage; flags come from the stage's config class.

Errors a user can fix (`PoiseError`) print as one line, `poise: error: ...`, with exit code 2 and no
traceback; warnings print as `poise: warning: ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from poise.config import (
    AttributeConfig,
    DemoConfig,
    EvaluateConfig,
    FeaturesConfig,
    ImportConfig,
    ReportConfig,
    SelectConfig,
    TrainConfig,
    WarmupConfig,
    base_type,
    field_types,
    from_dict,
    load_yaml,
)
from poise.errors import PoiseError, PoiseWarning
from poise.version import __version__


# ----------------------------------------------------------------------------- dataclass -> flags
def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of `cls`; required fields go into a "required" group of the help.

    argparse's own `required=True` cannot be used: a required setting may come from the --config file.
    """
    hints = field_types(cls)
    required = parser.add_argument_group("required (on the command line or in --config)")
    parser._action_groups.insert(1, parser._action_groups.pop())  # listed before the options
    for f in dataclasses.fields(cls):
        group = required if f.metadata.get("required") else parser
        kind, _ = base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.metadata.get("yaml_only"):
            continue
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="*", default=argparse.SUPPRESS, help=help_text)
            continue
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(kind) is list:
            kwargs["type"] = lambda text: [t.strip() for t in text.split(",") if t.strip()]
            kwargs["metavar"] = "A,B,..."
        elif kind is int:
            kwargs["type"] = int
        elif kind is float:
            kwargs["type"] = float
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, [], False) and "required" not in f.metadata:
            kwargs["help"] = f"{help_text} (default: {default})"
        group.add_argument(flag, **kwargs)


def build_config(cls: type, args: argparse.Namespace, section: str) -> Any:
    """Defaults <- YAML file (--config) <- flags given on the command line."""
    base = load_yaml(args.config, cls, section) if getattr(args, "config", None) else cls()
    values = dataclasses.asdict(base)
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    config = from_dict(cls, values, "command line")
    missing = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cls)
               if f.metadata.get("required") and getattr(config, f.name) in (None, "", [])]
    if missing:
        raise PoiseError(f"{' and '.join(missing) if len(missing) <= 2 else ', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} required")
    return config


# ------------------------------------------------------------------------------------ commands
def _run_under_torchrun(run: Callable[[Any], Any], config: Any) -> tuple[Any, float, bool]:
    """Run a stage that may be launched by torchrun: (result, seconds, is rank 0); leaves the group after."""
    from poise import distributed

    started = time.perf_counter()
    try:
        result = run(config)
    finally:
        distributed.shutdown()
    return result, time.perf_counter() - started, distributed.is_main()


def cmd_warmup(args: argparse.Namespace) -> int:
    from poise.warmup import run_warmup

    config = build_config(WarmupConfig, args, "warmup")
    checkpoints, seconds, main = _run_under_torchrun(run_warmup, config)
    if main:
        from poise.io import disk_size, human_size

        print(f"warmup: {len(checkpoints)} checkpoint(s) in {config.out} ({seconds:.1f}s, "
              f"{human_size(disk_size(config.out))} on disk)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from poise.files import TRAIN_SUMMARY_FILE as SUMMARY_FILE
    from poise.train import run_train

    config = build_config(TrainConfig, args, "train")
    out, seconds, main = _run_under_torchrun(run_train, config)
    if main:
        from poise.io import disk_size, human_size, read_json

        summary = read_json(Path(out) / SUMMARY_FILE)
        first, final, mean = summary.get("first_loss"), summary.get("final_loss"), summary.get("last_epoch_mean_loss")
        losses = "" if final is None else (f"loss {first:.4f} at the first step, {final:.4f} at the last, "
                                            f"{mean:.4f} mean over the last epoch; ")
        print(f"train: {summary['examples']} examples, {summary['steps']} steps; {losses}adapter in {out} "
              f"({seconds:.1f}s, {human_size(disk_size(out))} on disk; PeftModel.from_pretrained(base, '{out}'))")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from poise.evaluate import SCORES_FILE, run_evaluate
    from poise.io import read_json

    config = build_config(EvaluateConfig, args, "evaluate")
    started = time.perf_counter()
    out = run_evaluate(config)
    scores = read_json(Path(out) / SCORES_FILE)
    print_scores(scores, Console(soft_wrap=True))
    print(f"evaluate: {out}/{SCORES_FILE} ({time.perf_counter() - started:.1f}s)")
    return 0


def print_scores(scores: dict, console: Any) -> None:
    """One row per task: its metrics (value ± stderr); then the macro-average and the worst task."""
    from poise.report.tables import print_scores as print_evaluation

    print_evaluation(scores, console)


def cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from poise.hf_import import import_checkpoint

    config = build_config(ImportConfig, args, "import-checkpoint")
    print(f"checkpoint: {import_checkpoint(config)}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from poise.features.stage import run_features

    config = build_config(FeaturesConfig, args, "features")
    out, seconds, main = _run_under_torchrun(run_features, config)
    if main:
        from poise.io import disk_size, human_size

        print(f"features: {out} ({seconds:.1f}s, {human_size(disk_size(out))} on disk)")
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    from poise.attribution import compute_attribution
    from poise.progress import callback

    config = build_config(AttributeConfig, args, "attribute")
    with callback("attribute", unit="rows") as update:
        out = compute_attribution(config, progress=update)
    print(f"attribution: {out} (poise select --attribution {out} ...)")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from rich.console import Console

    from poise.progress import callback
    from poise.selection.stage import run_select

    config = build_config(SelectConfig, args, "select")
    started = time.perf_counter()
    with callback(f"select {config.method}", unit="steps", log=False) as update:
        selection, reused = run_select(config, progress=update)
    console = Console(soft_wrap=True)
    verb = "up to date:" if reused else "selected"
    console.print(
        f"{verb} {len(selection.indices)} of {selection.n_pool} rows with {selection.label} "
        f"-> {config.out}/selection.json" + ("" if reused else f" ({time.perf_counter() - started:.2f}s)")
    )
    counts: dict[str, int] = {}
    for pick in selection.trace:
        if pick.get("task") is not None:
            counts[pick["task"]] = counts.get(pick["task"], 0) + 1
    if counts:
        total = sum(counts.values())
        console.print("picks by task served: " + ", ".join(
            f"{task} {n} ({100 * n / total:.0f}%)" for task, n in sorted(counts.items(), key=lambda kv: -kv[1])))
    strata = selection.arguments.get("strata_counts")
    if strata:
        console.print(f"picks by {selection.arguments.get('stratify')}: "
                      + ", ".join(f"{value} {n}" for value, n in strata.items()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from poise.report import run_report

    config = build_config(ReportConfig, args, "report")
    console = Console(soft_wrap=True)
    path = run_report(config, console=console)
    console.print(f"report: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from poise.demo import run_demo

    config = build_config(DemoConfig, args, "demo")
    run_demo(config)
    return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from poise.pipeline import STAGES

    parser.add_argument("config", metavar="CONFIG.yaml",
                        help="the run config (a YAML file; 'demo' is the one poise ships, on its demo data)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config key, value in YAML syntax, e.g. --set select.budgets=[0.1,0.15] "
                             "(repeatable)")
    parser.add_argument("--from", dest="from_stage", choices=STAGES, metavar="STAGE",
                        help=f"rerun this stage and every later one even when up to date ({', '.join(STAGES)})")
    parser.add_argument("--until", choices=STAGES, metavar="STAGE", help="stop after this stage")
    parser.add_argument("--plan", action="store_true",
                        help="print the units, tokens, disk and time each stage will take (estimates) and run nothing")


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from poise import distributed
    from poise.pipeline import run, summarize

    result = run(args.config, overrides=args.overrides, from_stage=args.from_stage, until=args.until,
                 plan=args.plan)
    if args.plan:
        return 0
    if distributed.is_main():
        summarize(result, Console(soft_wrap=True))
    return 0


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("demo",), help="demo: poise's embedded multi-capability demo data")
    parser.add_argument("--out", required=True, help="output folder: pool.jsonl, validation/, heldout/")
    parser.add_argument("--pool-size", type=int, default=300, help="examples in the pool (default: 300)")
    parser.add_argument("--validation-per-task", type=int, default=8, help="validation examples per task (default: 8)")
    parser.add_argument("--heldout-per-task", type=int, default=20,
                        help="held-out evaluation items per task (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generators and the sampling (default: 0)")


def cmd_data(args: argparse.Namespace) -> int:
    from poise.data.demo import write_demo_data

    summary = write_demo_data(args.out, pool_size=args.pool_size, validation_per_task=args.validation_per_task,
                              heldout_per_task=args.heldout_per_task, seed=args.seed)
    counts = summary["counts"].values()
    unrelated = sum(c["pool"] for c in counts if c["capability"] is None)
    print(f"demo data in {args.out}: pool.jsonl {sum(c['pool'] for c in counts)} examples ({unrelated} of them serve "
          f"no capability), validation/ {args.validation_per_task} and heldout/ {args.heldout_per_task} per "
          f"capability: {', '.join(summary['capabilities'])}; sources.json says where each comes from")
    return 0


#: Commands whose arguments are not one config class: name -> (add arguments, run, help).
SPECIAL: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "run": (add_run_arguments, cmd_run, "the whole pipeline from one config, resumable (warmup ... report)"),
    "data": (add_data_arguments, cmd_data, "write poise's demo data (pool, validation and held-out files)"),
}


COMMANDS: dict[str, tuple[type, Callable[[argparse.Namespace], int], str]] = {
    "warmup": (WarmupConfig, cmd_warmup, "LoRA warmup training with per-epoch checkpoints (adapter + Adam moments)"),
    "train": (TrainConfig, cmd_train, "LoRA fine-tuning on a selection (BIDS defaults: 2 epochs, cosine, lr 2e-5)"),
    "evaluate": (EvaluateConfig, cmd_evaluate, "lm-evaluation-harness on every capability (local held-out files, "
                 "lm-eval tasks, bids-suite)"),
    "import-checkpoint": (ImportConfig, cmd_import_checkpoint,
                          "convert an HF-Trainer checkpoint (optimizer.pt / FSDP optimizer.bin) to a poise one"),
    "features": (FeaturesConfig, cmd_features, "per-example LoRA gradient features (or RDS representations)"),
    "attribute": (AttributeConfig, cmd_attribute, "train + validation features -> the attribution matrix"),
    "select": (SelectConfig, cmd_select, "select a budgeted subset of the pool from an attribution matrix"),
    "report": (ReportConfig, cmd_report, "AID/THI/coverage/overlap plots and report.html for selections"),
    "demo": (DemoConfig, cmd_demo, "run every selection method and the report on the embedded default"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poise",
        description="Select instruction-tuning data that is influential and balanced across capabilities.",
    )
    parser.add_argument("--version", action="version", version=f"poise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add, _, help_text) in SPECIAL.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    for name, (cls, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text).strip())
        p.add_argument("--config", metavar="FILE.yaml", help="read settings from a YAML file (flags override)")
        add_config_arguments(p, cls)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    prefix = "poise: warning: " if issubclass(category, PoiseWarning) else f"{category.__name__}: "
    print(prefix + str(message), file=sys.stderr)


def _unrecognized(parser: argparse.ArgumentParser, command: str | None, extras: list[str]) -> None:
    """Exit with one line naming the unknown flag and the closest known one of the sub-command."""
    import difflib

    sub = _subparsers(parser).get(command) if command else None
    target = sub or parser
    known = [o for action in target._actions for o in action.option_strings if o.startswith("--")]
    flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
    first = flags[0] if flags else extras[0]
    close = difflib.get_close_matches(first, known, n=1, cutoff=0.6) if flags else []
    hint = f"; did you mean {close[0]}?" if close else f"; see poise {command or ''} --help".replace("  ", " ")
    what = "unrecognized argument" if flags else "unexpected value"
    target.print_usage(sys.stderr)
    print(f"poise{' ' + command if command else ''}: error: {what} {first}{hint}", file=sys.stderr)
    raise SystemExit(2)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    if not sys.stderr.isatty():
        # tqdm reads TQDM_* once, when it is imported: lm-eval's and datasets' bars would fill a log line by
        # line; poise's own progress (rich) writes a line now and then instead
        os.environ.setdefault("TQDM_DISABLE", "1")
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    commands = [*SPECIAL, *COMMANDS]
    if words and not words[0].startswith("-") and words[0] not in commands:
        import difflib

        close = difflib.get_close_matches(words[0], commands, n=1, cutoff=0.6)
        parser.print_usage(sys.stderr)
        hint = f"did you mean {close[0]}?" if close else f"the commands are {', '.join(commands)}"
        print(f"poise: error: unknown command {words[0]!r}; {hint}", file=sys.stderr)
        return 2
    args, extras = parser.parse_known_args(words)
    if extras:
        _unrecognized(parser, getattr(args, "command", None), extras)
    if not args.command:
        parser.print_help()
        return 2
    warnings.showwarning = _show_warning
    try:
        command = SPECIAL[args.command][1] if args.command in SPECIAL else COMMANDS[args.command][1]
        return command(args)
    except PoiseError as exc:
        print(f"poise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("poise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

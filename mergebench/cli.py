"""The ``mergebench`` command line: run, merge, sweep, list, prepare, leaderboard, results, analyze."""
from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

# Imports at module level are the standard library's only: ``--help`` and ``run --help`` load
# neither torch nor any plugin; each command imports what it needs.

# the choices of ``analyze`` without importing the analyses (a test checks it equals mergebench.analysis.ANALYSES)
ANALYSIS_NAMES = ("pulse", "b-approx", "sensitivity", "sass", "pareto")

# environment errors a user can fix (disk full, read-only, permission): one line naming the path
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def parse_hyperparameters(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse as JSON (numbers, booleans, lists, null)."""
    from mergebench.errors import HyperparameterError

    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise HyperparameterError(f"--hp {pair!r} is not of the form key=value")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def hyperparameters_for(method: str, overrides: dict[str, Any], several: bool) -> dict[str, Any]:
    """With several methods, each takes the overrides it has; with one, all of them
    (so an unknown name is reported by the method itself)."""
    from mergebench.registry import METHODS

    if not several:
        return overrides
    known = METHODS.get(method).hyperparameters
    return {key: value for key, value in overrides.items() if key in known}


def method_names(text: str) -> list[str]:
    """The comma-separated ``--method`` value: at least one registered name, each once."""
    from mergebench.errors import UnknownNameError
    from mergebench.registry import METHODS

    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise UnknownNameError(f"--method {text!r} names no method; valid methods: {', '.join(METHODS.names())}")
    for name in names:
        METHODS.get(name)
    return names


def command_run(args: argparse.Namespace) -> int:
    from mergebench.errors import HyperparameterError, NotApplicableError, ResultsWriteError
    from mergebench.protocols import get_protocol
    from mergebench.registry import BACKBONES
    from mergebench.results import append_result, check_writable
    from mergebench.runner import check_batch_size, check_seed, execute, resolve
    from mergebench.table import results_table

    # every name and value of every method is checked before any work starts
    args.backbone = backbone_option(args)
    methods = method_names(args.method)
    check_seed(args.seed)
    if args.batch_size is not None:
        check_batch_size(args.batch_size)
    BACKBONES.get(args.backbone)  # an unknown backbone is named before any hyperparameter
    protocol = get_protocol(args.protocol)
    overrides = parse_hyperparameters(args.hp)
    per_method = {name: hyperparameters_for(name, overrides, several=len(methods) > 1) for name in methods}
    unused = set(overrides) - {key for chosen in per_method.values() for key in chosen}
    if unused:
        raise HyperparameterError(f"no selected method has hyperparameter {', '.join(sorted(unused))}")
    plans = []
    for name in methods:
        try:
            plans.append(resolve(name, args.backbone, seed=args.seed, hyperparameters=per_method[name],
                                 batch_size=args.batch_size, checkpoint_dir=args.checkpoint_dir, data_dir=args.data_dir,
                                 device=args.device, precision=args.precision, protocol=protocol,
                                 workers=args.num_workers, cache_mb=args.cache_mb))
        except NotApplicableError as error:  # reported, nothing recorded; the other methods still run
            print(f"mergebench: {error}; nothing recorded", file=sys.stderr)
    if not plans:
        return 0
    if not args.no_save:  # once for every method: this command, not the runner, appends the records
        check_writable(Path(args.results_dir))
    keep = None
    if args.save_merged is not None:  # checked before any work
        from mergebench.export import check_out, saver

        if len(plans) != 1:
            raise HyperparameterError(f"--save-merged takes one method; {len(plans)} were given")
        keep = saver(plans[0], check_out(args.save_merged, args.overwrite, "--save-merged"), args.overwrite)

    results, unsaved = [], []
    try:
        for plan in plans:
            result = execute(plan, keep=keep) if keep is not None else execute(plan)
            results.append(result)
            family = f", {result.checkpoint_family} checkpoints" if result.checkpoint_family else ""
            print(f"{result.method}: average {100 * result.average:.2f}  (protocol {result.protocol}, merge "
                  f"{result.merge_seconds:.1f}s, eval {result.eval_seconds:.1f}s{family})", file=sys.stderr)
            if not args.no_save:
                try:  # each record as soon as it exists, so a later failure loses nothing
                    append_result(Path(args.results_dir), result)
                except ResultsWriteError as error:
                    unsaved.append(error)
    finally:
        if results:  # what was computed stays on screen, whatever comes after
            print(results_table(results))
    if unsaved:
        for error in unsaved:
            print(f"mergebench: error: {error}", file=sys.stderr)
        return 1
    if keep is not None:
        print(f"wrote the merged model to {args.save_merged}", file=sys.stderr)
    if not args.no_save:
        print(f"\nappended {len(results)} record(s) to {Path(args.results_dir) / (args.backbone + '.jsonl')}")
    return 0


def command_merge(args: argparse.Namespace) -> int:
    from mergebench.errors import UnknownNameError
    from mergebench.export import check_out, merge_and_export
    from mergebench.registry import BACKBONES
    from mergebench.runner import resolve

    args.backbone = backbone_option(args)
    methods = method_names(args.method)
    if len(methods) != 1:
        raise UnknownNameError(f"--method {args.method!r}: merge writes one method's model; name one")
    BACKBONES.get(args.backbone)
    out = check_out(args.out, args.overwrite)  # before any work
    plan = resolve(methods[0], args.backbone, seed=args.seed, hyperparameters=parse_hyperparameters(args.hp),
                   checkpoint_dir=args.checkpoint_dir, data_dir=args.data_dir, protocol=args.protocol)
    merge_and_export(plan, out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def grid_option(text: str) -> tuple[str, list[Any]]:
    """``--grid KEY=V1,V2``: the values of one hyperparameter, each JSON where it parses
    (``KEY=[[1,2],[3]]``: a JSON list of values, for list-valued hyperparameters)."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"--grid {text!r} is not of the form KEY=V1,V2,...")

    def value(item: str) -> Any:
        try:
            return json.loads(item)
        except json.JSONDecodeError:
            return item

    if values.lstrip().startswith("["):
        parsed = value(values)
        if isinstance(parsed, list):
            return key, parsed
    return key, [value(item.strip()) for item in values.split(",") if item.strip()]


def name_list(text: str) -> list[str]:
    return list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


def command_sweep(args: argparse.Namespace) -> int:
    from mergebench.errors import HyperparameterError
    from mergebench.sweep import plan_selection, plan_sweep, require_ray, run_selection, run_sweep

    if args.select_on is None:
        require_ray()
    grid: dict[str, list[Any]] = {}
    for key, values in args.grid:
        if key in grid:
            raise HyperparameterError(f"--grid {key} is given twice")
        grid[key] = values
    skipped: list[str] = []
    backbones = name_list(args.backbone or "")
    if args.suite_config:  # its backbone joins the listed ones
        from mergebench.suite_config import register_suite_config

        backbones = list(dict.fromkeys([*backbones, register_suite_config(args.suite_config)]))
    elif not backbones:
        raise HyperparameterError("--backbone or --suite-config is required")
    configurations = plan_sweep(method_names(args.method), backbones, list(args.seed), grid,
                                batch_size=args.batch_size, checkpoint_dir=args.checkpoint_dir,
                                data_dir=args.data_dir, device=args.device, precision=args.precision, skipped=skipped,
                                protocols=name_list(args.protocol), workers=args.num_workers,
                                cache_mb=args.cache_mb)
    for message in skipped:
        print(f"mergebench: {message}; left out of the sweep", file=sys.stderr)
    if args.select_on is not None:  # one record per (method, backbone, seed): the point best on validation
        configurations = plan_selection(configurations, grid, args.validation_size, args.validation_seed)
    try:
        if args.select_on is not None:
            report = run_selection(configurations, Path(args.results_dir))
        else:
            report = run_sweep(configurations, Path(args.results_dir), cpus_per_run=args.cpus_per_run,
                               gpus_per_run=args.gpus_per_run, address=args.address)
    except KeyboardInterrupt:
        print("mergebench: sweep interrupted; the records of finished runs are kept, rerun to resume", file=sys.stderr)
        return 130
    print(f"{len(configurations)} configuration(s): {len(report.recorded)} recorded, {report.skipped} already "
          f"recorded, {len(report.failed)} failed", file=sys.stderr)
    for configuration, error in report.failed:
        print(f"mergebench: failed: {configuration.label}: {error}", file=sys.stderr)
    return 1 if report.failed else 0


def hyperparameter_table(methods: list[tuple[str, Any]]) -> str:
    """What ``--hp KEY=VALUE`` accepts for each (name, method class): one row per hyperparameter."""
    from tabulate import tabulate

    rows = [[name, key, json.dumps(spec.default), spec.allowed(), spec.help]
            for name, cls in methods for key, spec in cls.hyperparameters.items()]
    return "Hyperparameters (--hp KEY=VALUE; JSON values)\n" + tabulate(
        rows, headers=["method", "name", "default", "allowed", "meaning"], disable_numparse=True)


def command_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from mergebench.registry import BACKBONES, METHODS, SUITES

    if args.protocol:
        print(protocol_table(args.protocol, [args.method] if args.method else None))
        return 0
    if args.method:
        cls = METHODS.get(args.method)
        print(hyperparameter_table([(args.method, cls)]) if cls.hyperparameters else f"{args.method}: no hyperparameters")
        return 0
    rows = []
    for name, cls in METHODS.items():
        kind = "reference" if cls.reference else ("dynamic" if cls.dynamic else "static")
        rows.append([name, kind, "yes" if cls.needs_exemplars else "no", len(cls.hyperparameters) or "-"])
    print("Methods\n" + tabulate(rows, headers=["method", "kind", "exemplars", "hyperparameters"]))
    print("\n" + hyperparameter_table(METHODS.items()))
    rows = [[name, cls.suite, cls.description] for name, cls in BACKBONES.items()]
    print("\nBackbones\n" + tabulate(rows, headers=["backbone", "suite", "description"]))
    rows = [[name, ", ".join(task.name for task in suite.tasks), ", ".join(suite_backbones(suite)), suite.description]
            for name, suite in SUITES.items()]
    print("\nSuites\n" + tabulate(rows, headers=["suite", "tasks", "backbones", "description"]))
    print("\n" + protocols_listing())
    return 0


def protocols_listing() -> str:
    """Each protocol's name and what it is (``mergebench list --protocol NAME``: its values)."""
    from tabulate import tabulate

    from mergebench.protocols import PROTOCOLS

    rows = [[p.name, p.description] for p in PROTOCOLS.values()]
    return ("Protocols (run/sweep --protocol NAME; default original; `mergebench list --protocol NAME` shows its "
            "values and sources)\n" + tabulate(rows, headers=["protocol", "description"]))


def protocol_table(name: str, methods: list[str] | None = None) -> str:
    """One protocol's value and source of every hyperparameter of every method (or of ``methods``),
    and its evaluation details."""
    from tabulate import tabulate

    from mergebench.protocols import get_protocol, sources
    from mergebench.registry import METHODS

    protocol = get_protocol(name)
    chosen = methods or METHODS.names()
    rows = [[method, key, json.dumps(value), source]
            for method in chosen for key, value, source in sources(protocol, method, METHODS.get(method).hyperparameters)]
    text = f"Protocol {protocol.name}: {protocol.description}\n" + tabulate(
        rows, headers=["method", "hyperparameter", "value", "source"], disable_numparse=True)
    details = [[suite, f"the first {setting.value} test examples of each task", setting.source]
               for suite, setting in protocol.test_examples.items()]
    details += [[suite, f"without {', '.join(setting.value)} (neither merged nor scored)", setting.source]
                for suite, setting in protocol.left_out.items()]
    details.append(["any other suite" if details else "every suite", "every test example", "mergebench default"])
    batch = protocol.batch_size
    details.append(["every suite", f"batches of {protocol.eval_batch_size} (unless --batch-size)",
                    batch.source if batch is not None else "mergebench default"])
    return text + "\n\nEvaluation\n" + tabulate(details, headers=["suite", "scored on", "source"],
                                                  disable_numparse=True)


def suite_backbones(suite) -> list[str]:
    """The suite's backbones, each with the tasks it has no checkpoints for (e.g. "mamba-130m (no stsb)")."""
    from mergebench.registry import BACKBONES

    names = []
    for name in suite.backbones:
        missing = suite.missing(BACKBONES.get(name))
        names.append(f"{name} (no {', '.join(missing)})" if missing else name)
    return names


def command_prepare(args: argparse.Namespace) -> int:
    from mergebench.device import resolve_device
    from mergebench.manifest import prepare_checkpoints
    from mergebench.registry import BACKBONES, SUITES

    args.backbone = backbone_option(args)
    backbone_cls = BACKBONES.get(args.backbone)
    device = resolve_device(args.device)  # an absent device is refused before any work
    if args.install_data:
        for command in SUITES.get(backbone_cls.suite).system_commands:
            if os.geteuid() != 0:
                command = ["sudo", *command]
            print("+ " + shlex.join(command), file=sys.stderr)
            subprocess.run(command, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    backbone = backbone_cls(checkpoint_dir=args.checkpoint_dir, data_dir=args.data_dir)
    backbone.prepare_device = device
    if args.allow_pickle:
        if not hasattr(backbone, "allow_pickle"):
            from mergebench.errors import MergebenchError

            raise MergebenchError(f"--allow-pickle: {args.backbone} reads no pickled checkpoints (the open_clip "
                                  "checkpoints of the CLIP backbones are the ones released as pickled modules)")
        backbone.allow_pickle = True
    prepare_checkpoints(backbone, force=args.force)
    print(f"{args.backbone}: ready")
    return 0


def command_leaderboard(args: argparse.Namespace) -> int:
    """leaderboard.md and, beside it, each backbone's figure; without matplotlib the table
    alone, saying why."""
    from mergebench.cache import write_atomically
    from mergebench.table import leaderboard_markdown

    output, figure_dir = Path(args.output), None
    if not args.no_plot:
        from mergebench.figure import plots_unavailable

        reason = plots_unavailable()
        if reason:
            print(f"mergebench: figures skipped: {reason}; writing the table alone", file=sys.stderr)
        else:
            figure_dir = output.parent
    text = leaderboard_markdown(Path(args.results_dir), figure_dir)
    output = write_atomically(output, lambda tmp: tmp.write_text(text))
    print(f"wrote {output}" + (" and its figures" if figure_dir is not None else ""))
    return 0


def command_results(args: argparse.Namespace) -> int:
    """The records as a table of data (mergebench.results.to_frame) in CSV, JSON or markdown."""
    from mergebench.errors import MergebenchError
    from mergebench.results import iter_records, to_frame

    located = list(iter_records(Path(args.results_dir)))
    chosen = [(where, r) for where, r in located if args.backbone in (None, r.backbone)
              and args.method in (None, r.method)]
    if not chosen:
        have = sorted({r.backbone for _, r in located})
        wanted = " and ".join(f"{name} {value!r}" for name, value in (("backbone", args.backbone),
                                                                       ("method", args.method)) if value)
        raise MergebenchError(f"--results-dir {args.results_dir}: no records" + (f" of {wanted}" if wanted else "")
                              + (f" (backbones with records: {', '.join(have)})" if have else ""))
    if args.latest:  # the leaderboard's rows: newest per configuration, seeds averaged
        from mergebench.table import by_protocol, latest_per_configuration, mean_over_seeds

        groups: dict[tuple, list] = {}
        for _, result in chosen:
            groups.setdefault((result.backbone, result.checkpoint_family or ""), []).append(result)
        frame = to_frame([row for records in groups.values()
                          for _, rows in by_protocol(mean_over_seeds(latest_per_configuration(records))) for row in rows])
    else:
        frame = to_frame([r for _, r in chosen], where=[where for where, _ in chosen])
    if args.format == "csv":
        sys.stdout.write(frame.to_csv(index=False))
    elif args.format == "json":
        print(frame.to_json(orient="records", force_ascii=False))
    else:
        print(frame.to_markdown(index=False))
    return 0


def float_list(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, e.g. ``0.1,0.5,0.9``."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers, e.g. ``1,4``."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def command_analyze(args: argparse.Namespace) -> int:
    from mergebench.analysis import AnalysisOptions, run_analysis
    from mergebench.device import resolve_device
    from mergebench.registry import BACKBONES

    device = resolve_device(args.device)  # an absent device is refused before any work
    backbone = BACKBONES.get(args.backbone)(checkpoint_dir=args.checkpoint_dir, data_dir=args.data_dir)
    options = AnalysisOptions(
        output_dir=Path(args.output_dir), examples=args.examples, alphas=args.alphas, seeds=args.seeds, etas=args.etas,
        bits=args.bits, rescale_random=args.rescale_random, batch_size=args.batch_size,
        use_cache=not args.no_cache, plot=not args.no_plot,
        command="mergebench " + shlex.join(args.argv), results_dir=Path(args.results_dir), device=str(device),
    )
    for path in run_analysis(args.analysis, backbone, options):
        print(f"wrote {path}")
    return 0


def add_backbone_options(parser: argparse.ArgumentParser) -> None:
    """``--backbone NAME`` or ``--suite-config FILE``: one of them is required."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--backbone", help="a registered backbone (`mergebench list`)")
    add_suite_config_option(group)


def add_suite_config_option(parser) -> None:
    parser.add_argument("--suite-config", metavar="FILE",
                        help="a suite file (TOML) naming your own pretrained and fine-tuned checkpoints and each task's "
                             "data: registered as a suite and backbone of its name (README: Bring your own suite)")


def backbone_option(args: argparse.Namespace) -> str:
    """``--backbone``, or the backbone a ``--suite-config`` file registers (checked before any work)."""
    from mergebench.errors import HyperparameterError

    if getattr(args, "suite_config", None):
        from mergebench.suite_config import register_suite_config

        name = register_suite_config(args.suite_config)
        if args.backbone and args.backbone != name:
            raise HyperparameterError(f"--backbone {args.backbone!r} is not the backbone of --suite-config "
                                      f"{args.suite_config} ({name!r}); give one of them")
        return name
    if not args.backbone:
        raise HyperparameterError("--backbone or --suite-config is required")
    return args.backbone


def add_location_options(parser: argparse.ArgumentParser) -> None:
    """Where a backbone finds checkpoints and datasets it would otherwise fetch from a hub."""
    parser.add_argument("--checkpoint-dir", default=os.environ.get("MERGEBENCH_CHECKPOINT_DIR"),
                        help="local checkpoints (default $MERGEBENCH_CHECKPOINT_DIR); see the suite's docs for the layout")
    parser.add_argument("--data-dir", default=os.environ.get("MERGEBENCH_DATA_DIR"),
                        help="local datasets (default $MERGEBENCH_DATA_DIR); see the suite's docs for the layout")


def add_evaluation_options(parser: argparse.ArgumentParser, device_help: str) -> None:
    """Batch size, device and precision of evaluation, as `run` and `sweep` take them."""
    parser.add_argument("--batch-size", type=int, default=None,
                        help="evaluation batch (default: the protocol's, 64 unless it sets one)")
    parser.add_argument("--device", default="cpu", metavar="{auto,cpu,cuda,cuda:N,mps}", help=device_help)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="evaluation and the forward passes of data-dependent methods under autocast at this "
                             "precision (fp16: not on the CPU)")
    parser.add_argument("--num-workers", type=int, default=None, metavar="N",
                        help="DataLoader processes that build evaluation batches (default: 0 on the CPU, up to 4 "
                             "beside a GPU)")
    parser.add_argument("--cache-mb", type=float, default=None, metavar="MB",
                        help="budget of a dynamic method's cache of composed weights, least recently used evicted "
                             "(default: 2048)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergebench", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, parents=[common], **k)  # type: ignore[method-assign]

    run = sub.add_parser("run", help="merge a backbone's fine-tuned models with a method and evaluate every task",
                         epilog="hyperparameters (--hp KEY=VALUE; JSON values): `mergebench list` shows every "
                                "method's, `mergebench list --method NAME` one method's (type, default, bounds, "
                                "meaning); names and backbones: `mergebench list`")
    run.add_argument("--method", required=True, help="method name, or several separated by commas")
    add_backbone_options(run)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--protocol", default="original",
                     help="the named published setting of hyperparameters and evaluation (default original; "
                          "`mergebench list` names them); --hp overrides it and is recorded as an override")
    run.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="override a hyperparameter")
    run.add_argument("--results-dir", default="results")
    run.add_argument("--no-save", action="store_true", help="print the table but write no record")
    run.add_argument("--save-merged", metavar="DIR",
                     help="also write the merged model to DIR after evaluating, as `mergebench merge --out` does")
    run.add_argument("--overwrite", action="store_true", help="let --save-merged replace a non-empty DIR")
    add_evaluation_options(run, "where evaluation runs (merging stays on the CPU); auto: CUDA, else MPS, else CPU")
    add_location_options(run)
    run.set_defaults(func=command_run)

    merge = sub.add_parser("merge", help="merge a backbone's fine-tuned models and write the merged model to a folder "
                                         "(no evaluation); `mergebench.load(DIR)` reads it back",
                           epilog="a static merge is a transformers folder (AutoModel.from_pretrained(DIR)) with the "
                                  "task heads in heads.safetensors; a dynamic one its artifacts; both mergebench.json")
    merge.add_argument("--method", required=True)
    add_backbone_options(merge)
    merge.add_argument("--seed", type=int, default=0)
    merge.add_argument("--protocol", default="original",
                       help="the named published setting of hyperparameters (default original), as for run")
    merge.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="override a hyperparameter")
    merge.add_argument("--out", required=True, metavar="DIR", help="the folder to write (refused if not empty)")
    merge.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")
    add_location_options(merge)
    merge.set_defaults(func=command_merge)

    sweep = sub.add_parser("sweep", help="run every method x backbone x seed x grid point as Ray tasks; resumable",
                           epilog="each configuration is resolved before any work; those already recorded in "
                                  "--results-dir are skipped, so a rerun resumes a crashed or interrupted sweep")
    sweep.add_argument("--method", required=True, help="method names, separated by commas")
    sweep.add_argument("--backbone", help="backbone names, separated by commas (and/or --suite-config)")
    add_suite_config_option(sweep)
    sweep.add_argument("--seed", type=int_list, default=(0,), help="seeds, separated by commas (default 0)")
    sweep.add_argument("--grid", type=grid_option, action="append", default=[], metavar="KEY=V1,V2",
                       help="values of one hyperparameter (repeatable); each method takes the keys it declares")
    sweep.add_argument("--protocol", default="original",
                       help="protocol names, separated by commas (default original); grid values override them")
    sweep.add_argument("--cpus-per-run", type=float, default=1, help="CPUs Ray reserves for each run (default 1)")
    sweep.add_argument("--gpus-per-run", type=float, default=0, help="GPUs Ray reserves for each run (default 0)")
    sweep.add_argument("--address", help="a running Ray cluster (default: start Ray on this machine's cores)")
    sweep.add_argument("--results-dir", default="results")
    sweep.add_argument("--select-on", choices=("validation",), default=None,
                       help="tune: score every grid point on a validation split (the suite's own where it ships "
                            "one, as the mini suite; else carved from each task's training data), record only the "
                            "best per method x backbone x seed, evaluated on the test split")
    sweep.add_argument("--validation-size", type=int, default=200,
                       help="examples per task in a carved validation split (default 200; a shipped one is used whole)")
    sweep.add_argument("--validation-seed", type=int, default=0,
                       help="seed of a carved validation split (default 0)")
    add_evaluation_options(sweep, "where each run evaluates; cuda needs --gpus-per-run (Ray gives each run its GPU)")
    add_location_options(sweep)
    sweep.set_defaults(func=command_sweep)

    lst = sub.add_parser("list", help="registered methods with their hyperparameters, backbones and suites")
    lst.add_argument("--method", help="only this method's hyperparameters")
    lst.add_argument("--protocol", help="this protocol's values and their sources (with --method: that method's)")
    lst.set_defaults(func=command_list)

    prepare = sub.add_parser("prepare", help="build data caches and fine-tuned checkpoints of a backbone")
    add_backbone_options(prepare)
    prepare.add_argument("--install-data", action="store_true", help="apt-get install the system data packages first")
    prepare.add_argument("--force", action="store_true", help="rebuild even if cached")
    prepare.add_argument("--device", default="cpu", metavar="{auto,cpu,cuda,cuda:N,mps}",
                         help="where local fine-tuning runs (checkpoints are written as CPU float32)")
    prepare.add_argument("--allow-pickle", action="store_true",
                         help="unpickle open_clip checkpoints released as pickled modules (this runs code from the "
                              "files: only for files you trust); converted once to safetensors in the cache")
    add_location_options(prepare)
    prepare.set_defaults(func=command_prepare)

    board = sub.add_parser("leaderboard", help="regenerate leaderboard.md from results/")
    board.add_argument("--results-dir", default="results")
    board.add_argument("--output", default="leaderboard.md")
    board.add_argument("--no-plot", action="store_true", help="write the table only (no figures, no matplotlib needed)")
    board.set_defaults(func=command_leaderboard)

    results = sub.add_parser("results", help="the result records as a table of data (CSV, JSON or markdown)")
    results.add_argument("--backbone", help="only this backbone's records (default: all)")
    results.add_argument("--method", help="only this method's records")
    results.add_argument("--format", choices=("csv", "json", "markdown"), default="csv")
    results.add_argument("--latest", action="store_true",
                         help="the leaderboard's rows: the newest record per configuration, seeds averaged")
    results.add_argument("--results-dir", default="results")
    results.set_defaults(func=command_results)

    analyze = sub.add_parser("analyze", help="the papers' task-vector analyses: tables and figures")
    analyze.add_argument("analysis", choices=ANALYSIS_NAMES)
    analyze.add_argument("--backbone", default="minilm-l6")
    analyze.add_argument("--output-dir", default="analyses")
    analyze.add_argument("--examples", type=int, help="evaluate on the first N test examples of each task (default: all)")
    analyze.add_argument("--alphas", type=float_list, help="pruning rates, comma-separated (default: the paper's grid; "
                         "sensitivity: the Exp I rate, default 0.9)")
    analyze.add_argument("--etas", type=float_list, help="sensitivity Exp III tuning factors (default 0.1,0.2,...,2.0)")
    analyze.add_argument("--seeds", type=int, default=3, help="pulse: C3 trials (default 3)")
    analyze.add_argument("--rescale-random", action="store_true", help="pulse: C3 rescales by 1/(1 - alpha) as DARE")
    analyze.add_argument("--bits", type=int_list, default=(1,), help="sass: value bit-widths (default 1)")
    analyze.add_argument("--batch-size", type=int, default=64)
    analyze.add_argument("--no-cache", action="store_true", help="evaluate every point again (no analysis cache)")
    analyze.add_argument("--no-plot", action="store_true", help="write the tables only (no matplotlib needed)")
    analyze.add_argument("--results-dir", default="results", help="pareto: the result records to read")
    analyze.add_argument("--device", default="cpu", metavar="{auto,cpu,cuda,cuda:N,mps}",
                         help="where the analyses evaluate, as run's --device")
    add_location_options(analyze)
    analyze.set_defaults(func=command_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The project's own errors (and a full disk, read-only or forbidden path) are one line
    naming what is at fault; anything else is a bug and keeps its traceback, as does every
    error with ``--debug``."""
    from mergebench.errors import MergebenchError

    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # the command, as recorded by `analyze`
    try:
        return args.func(args)
    except MergebenchError as error:
        if args.debug:
            raise
        print(f"mergebench: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if args.debug or error.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f": {error.filename}" if error.filename else ""
        print(f"mergebench: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

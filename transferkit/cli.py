"""The ``transferkit`` command line.

    transferkit run CONFIG [--set key=value]... [--summary FILE]
    transferkit validate CONFIG [--set key=value]...
    transferkit schema
    transferkit compile [CONFIG] [--output PATH]
    transferkit submit CONFIG --host URL [--experiment NAME]
    transferkit schedule CONFIG --host URL --cron "0 3 * * 1"
    transferkit trigger CONFIG (--host URL | --local) [--dry-run]
    transferkit predict MODEL_URI TEXT... [--tracking-uri URI] [--json]

Exit status: 0 success, 1 a run or prediction failed, 2 invalid configuration or usage,
130 / 143 a run interrupted by SIGINT / SIGTERM (every process it started is stopped).
Errors are one line on stderr: what went wrong, where, and what to do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transferkit import __version__
from transferkit.console import Console
from transferkit.errors import BackboneError, ConfigError, RunInterruptedError, TransferkitError
from transferkit.logs import LOG_FORMAT, configure_logging

__all__ = ["LOG_FORMAT", "configure_logging", "main"]  # the first two: older imports

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ output


def _sweep_table(sweep: dict[str, Any]) -> list[str]:
    metric = sweep["primary_metric"]
    crossed = any(row.get("cross_validation") is not None for row in sweep["branches"])
    lines = [
        "",
        f"Sweep ({len(sweep['branches'])} branches; {metric}; margin {sweep['margin']:g})",
        f"  {'branch':<28}{'trainable':>12}{'train s':>9}{'valid.':>8}"
        + (f"{'cross-val.':>17}" if crossed else "")
        + f"{'eval.':>8}{'vs scratch':>11}",
    ]
    for row in sweep["branches"]:
        delta = row["delta_vs_scratch"]
        mark = " ◀ selected" if row["selected"] else ""
        mark += " ⚠ negative transfer" if row["negative_transfer"] else ""
        folds = ""
        if crossed:
            mean, std = row.get("cross_validation"), row.get("cross_validation_std") or 0.0
            folds = f"{'—' if mean is None else f'{mean:.4f} ± {std:.4f}':>17}"
        lines.append(
            f"  {row['name']:<28}{row['trainable_parameters']:>12,}{row['train_seconds']:>9.1f}"
            f"{row['validation']:>8.4f}{folds}{row['test']:>8.4f}"
            f"{'—' if delta is None else f'{delta:+.4f}':>11}{mark}"
        )
    lines += [f"  selected: {sweep['reason']}", f"  report:   {sweep['report']}"]
    return lines


def _set_lines(scores: dict[str, Any]) -> list[str]:
    """The evaluation lines of a multi-label model: its headline metrics, then per label."""
    lines = [
        f"  {label:<16}{scores[key]:.4f}"
        for key, label in (
            ("macro_f1", "macro-F1"),
            ("micro_f1", "micro-F1"),
            ("samples_f1", "samples-F1"),
            ("subset_accuracy", "subset acc."),
            ("hamming_loss", "Hamming loss"),
            ("mean_average_precision", "mean AP"),
            ("roc_auc", "ROC-AUC"),
        )
    ]
    lines[0] += f"   ({scores['rows']:,} rows)"
    lines += ["", f"  {'label':<16}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>10}"]
    for name, c in scores["per_label"].items():
        lines.append(
            f"  {name:<16}{c['precision']:>10.4f}{c['recall']:>10.4f}"
            f"{c['f1']:>10.4f}{c['support']:>10}"
        )
    return lines


def _summary_table(summary: Any) -> str:
    scores = summary.scores
    swept = _sweep_table(summary.sweep) if summary.sweep else []
    heading = "Evaluation" + (" (selected branch)" if summary.sweep else "")
    if "spearman" in scores:  # scores (regression)
        shown = (("rmse", "RMSE"), ("mae", "MAE"), ("r2", "R²"), ("pearson", "Pearson"))
        lines = [
            *swept,
            "",
            heading,
            *(f"  {label:<12}{scores[key]:.4f}" for key, label in shown),
            f"  {'Spearman':<12}{scores['spearman']:.4f}   ({scores['rows']:,} rows)",
        ]
        return _summary_tail(summary, lines)
    if "per_label" in scores:
        lines = [*swept, "", heading, *_set_lines(scores)]
        return _summary_tail(summary, lines)
    # A run ranked by ROC-AUC (the images' default) shows the ranking and clinical metrics.
    ranked = summary.primary_metric == "roc_auc"
    w = 13 if ranked else 11  # room for 'sensitivity'
    lines = [
        *swept,
        "",
        heading,
        *(
            f"  {label:<{w}}{scores[key]:.4f}"
            for key, label in (
                ("roc_auc", "ROC-AUC"),
                ("accuracy", "accuracy"),
                ("balanced_accuracy", "balanced"),
            )
            if scores.get(key) is not None and (key == "accuracy" or ranked)
        ),
        *(
            [
                f"  {'sensitivity':<{w}}{scores['sensitivity']:.4f}   "
                f"(recall of {scores['positive_label']})",
                f"  {'specificity':<{w}}{scores['specificity']:.4f}",
            ]
            if ranked and scores.get("sensitivity") is not None
            else []
        ),
        f"  {'macro-F1':<{w}}{scores['macro_f1']:.4f}   ({scores['rows']:,} rows)",
        "",
        f"  {'class':<16}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>10}",
    ]
    for name, cls in scores["per_class"].items():
        lines.append(
            f"  {name:<16}{cls['precision']:>10.4f}{cls['recall']:>10.4f}"
            f"{cls['f1']:>10.4f}{cls['support']:>10}"
        )
    return _summary_tail(summary, lines)


def _summary_tail(summary: Any, lines: list[str]) -> str:
    """``lines`` followed by the step times and where the model went."""
    lines += ["", "Steps"]
    for step, seconds in summary.step_seconds.items():
        shown = "cached" if step in summary.cached_steps else f"{seconds:7.1f} s"
        lines.append(f"  {step:<18}{shown:>9}")
    lines.append(f"  {'total (wall)':<18}{summary.wall_seconds:7.1f} s")
    lines += [
        "",
        "Model",
        f"  registered  {summary.model_uri}",
        f"  champion    {'yes' if summary.champion else 'no'} — {summary.champion_reason}",
        f"  load with   mlflow.pyfunc.load_model('{summary.champion_uri}')",
        f"  tracking    {summary.tracking_uri}",
        f"  log         {summary.log_file}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- commands


def _load(args: argparse.Namespace) -> Any:
    from transferkit.config import load_config

    return load_config(args.config, args.overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    from transferkit.backbones.hub import refuse_bare_hub_ids
    from transferkit.config import apply_overrides, read_yaml, validate_mapping

    path = Path(args.config)
    raw = apply_overrides(read_yaml(path), args.overrides)
    try:
        config = validate_mapping(raw, str(path))
        refuse_bare_hub_ids(config, str(path))
    except ConfigError as exc:
        return _config_errors(exc)
    from transferkit.preflight import problems

    # First the sources, as `run` would find them before its first step (exit 1, as run
    # exits): quick, nothing of the model code loaded. Then, with the sources there, what
    # fetch_backbone checks: the family embeds the data and allows the strategy.
    found = problems(config, offline=args.offline)
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    if found:
        return 1
    try:
        from transferkit.backbones.support import check_local

        check_local(config)
    except (ConfigError, BackboneError) as exc:
        return _config_errors(exc)
    data = config.data
    source = data.uri or data.train_uri
    print(
        f"ok: {path} — {_what(config)} on {source} with {_backbone(config)}; "
        f"primary metric {config.evaluation.primary_metric}; model "
        f"'{config.registry.model_name}'"
    )
    return 0


def _config_errors(exc: TransferkitError) -> int:
    for line in getattr(exc, "all_lines", [str(exc)]):
        print(f"error: {line}", file=sys.stderr)
    return 2


def _what(config: Any) -> str:
    """What a config trains, in a few words."""
    if config.sweep is None:
        return str(config.strategy.name)
    from transferkit.sweep import plan

    return f"a sweep of {len(plan(config))} branches"


def _backbone(config: Any) -> str:
    if config.backbone_selection is None:
        return str(config.backbone.uri)
    return f"the best of {len(config.backbone_selection.candidates)} backbones by LogME"


def cmd_schema(args: argparse.Namespace) -> int:
    from transferkit.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from transferkit.runner import run_local, write_summary

    config = _load(args).resolved()
    print(
        f"transferkit run {args.config}: {_what(config)}, work dir {config.runtime.work_dir} "
        f"(transferkit {__version__})",
        file=sys.stderr,
    )
    console = Console(sys.stderr, verbose=args.verbose, quiet=args.quiet)
    try:
        summary = run_local(config, on_event=console)
    finally:
        console.close()
    print(_summary_table(summary))
    if args.summary:
        write_summary(summary, Path(args.summary))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from kfp import compiler

    from transferkit.pipelines import (
        COMPILED,
        COMPILED_SWEEP,
        build_for,
        strategy_sweep,
        transfer_learning,
    )
    from transferkit.step_inputs import step_arguments

    if not args.config:
        # The packaged YAML of both pipelines, without baked-in parameters.
        for pipeline, default in ((transfer_learning, COMPILED), (strategy_sweep, COMPILED_SWEEP)):
            output = Path(args.output) / default.name if args.output else default
            output.parent.mkdir(parents=True, exist_ok=True)
            compiler.Compiler().compile(pipeline, str(output))
            print(f"wrote {output}")
        return 0
    config = _load(args)
    output = Path(
        args.output or f"{'strategy_sweep' if config.sweep else 'transfer_learning'}.yaml"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(
        build_for(config), str(output), pipeline_parameters=step_arguments(config)
    )
    print(f"wrote {output}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from transferkit.submit import submit

    run = submit(_load(args), args.host, args.experiment, args.run_name, stamps=not args.no_cache)
    print(f"run {run.id} in experiment {args.experiment}: {run.url}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from transferkit.submit import schedule

    if args.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency {args.max_concurrency}: give 1 or more")
    job = schedule(
        _load(args), args.host, args.cron, args.experiment, args.name, args.max_concurrency
    )
    print(f"recurring run {job.id} ({args.cron}) in experiment {args.experiment}: {job.url}")
    return 0


def cmd_trigger(args: argparse.Namespace) -> int:
    from transferkit.trigger import trigger

    if bool(args.host) == bool(args.local):
        raise ConfigError("give --host URL (submit a KFP run) or --local (run here), not both")
    config = _load(args)
    if args.local:
        config = config.resolved()
    elif not config.registry.tracking_uri:
        raise ConfigError(
            "registry.tracking_uri is unset; the trigger reads the champion from the MLflow "
            "server the cluster's runs register to: set it"
        )
    decision = trigger(config, args.host, args.experiment, args.local, args.dry_run)
    for check in decision.checks:
        mark = "fires" if check.fired else "ok"
        print(f"  {check.name:<9}{mark:<7}{check.detail}")
    print(f"→ {decision.detail}")
    return 0


def _image_inputs(paths: list[str]) -> tuple[Any, list[str]] | None:
    """Images from image files, .npy arrays or .npz archives; None when the inputs are texts.

    Returns:
        uint8 images [N, H, W, C] and one name per image.
    """
    import numpy as np

    from transferkit.backbones.modality import modality_of
    from transferkit.data.images import IMAGE_SUFFIXES, decode_image, read_unlabelled_npz

    suffixes = (*IMAGE_SUFFIXES, ".npy", ".npz")
    if not all(Path(p).suffix.lower() in suffixes and Path(p).is_file() for p in paths):
        return None
    arrays, names = [], []
    for path in map(Path, paths):
        if path.suffix.lower() == ".npz":
            block = read_unlabelled_npz(path, str(path))
        elif path.suffix.lower() == ".npy":
            block = modality_of("image").served(np.load(path, allow_pickle=False))
        else:
            block = decode_image(path.read_bytes(), str(path), "auto", None)[None]
        arrays.append(block)
        names += (
            [path.name] if len(block) == 1 else [f"{path.name}[{i}]" for i in range(len(block))]
        )
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise TransferkitError(f"images of different shapes {sorted(shapes)}; resize them first")
    return np.concatenate(arrays), names


def _check_utf8(texts: list[str]) -> None:
    """Refuse an argument whose bytes were not UTF-8 (Python keeps them as surrogates, which
    no tokenizer, JSON or terminal accepts)."""
    for number, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TransferkitError(
                f"input {number}: bytes that are not UTF-8 (at character {exc.start + 1}); pass "
                "UTF-8 text (check the terminal's encoding, LANG/LC_ALL)"
            ) from None


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    texts = args.texts
    images = _image_inputs(texts)
    inputs: Any = texts if images is None else images[0]
    if images is not None:
        # What the output rows are called; a file name need not be UTF-8 to be printed.
        texts = [os.fsencode(name).decode("utf-8", "replace") for name in images[1]]
    else:
        _check_utf8(texts)
    pairs: list[str] | None = args.pair
    if pairs is not None:
        if images is not None or len(pairs) != len(texts):
            raise TransferkitError(
                f"--pair gives the second text of each input: {len(texts)} inputs and "
                f"{len(pairs)} --pair; pass one --pair per text"
            )
        _check_utf8(pairs)
        inputs = pd.DataFrame({"text": texts, "text_pair": pairs})
    if Path(args.model_uri).is_dir():
        from transferkit.serving import predictions_frame
        from transferkit.training.model import load_classifier, predict_proba

        tokenizer, model, card = load_classifier(Path(args.model_uri))
        given = "texts" if images is None else "images"
        if card.input_modality().noun != given:
            kind = card.input_modality().noun
            raise TransferkitError(f"{args.model_uri} classifies {kind}; pass {kind}")
        try:
            outputs = predict_proba(model, tokenizer, card, inputs)
        except ValueError as exc:  # pairs given to a single-text model, or the reverse
            raise TransferkitError(f"{args.model_uri}: {exc}") from None
        frame = predictions_frame(outputs, card.labels, card.decision, card.regression)
    else:
        import mlflow

        tracking = (
            args.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or (f"sqlite:///{Path('transferkit-runs/mlflow.db').absolute()}")
        )
        store = tracking.removeprefix("sqlite:///")
        if tracking.startswith("sqlite:///") and not Path(store).exists():
            # Opening a missing SQLite store would create an empty one: refuse instead.
            raise TransferkitError(
                f"no MLflow store at {store}; run a pipeline first or pass --tracking-uri"
            )
        from transferkit.registry import fetch_logged_model

        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(tracking)
        with tempfile.TemporaryDirectory(prefix="transferkit-predict-") as scratch:
            try:
                # Checked to be transferkit's own models-from-code model first: loading
                # any other pyfunc would run its code (a cloudpickle, a foreign code file).
                local, _ = fetch_logged_model(args.model_uri, Path(scratch))
                model = mlflow.pyfunc.load_model(str(local))
            except TransferkitError:
                raise
            except Exception as exc:
                raise TransferkitError(
                    f"cannot load {args.model_uri} from {tracking}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:160]}; check the URI and --tracking-uri"
                ) from None
            given = pd.DataFrame({"text": texts}) if pairs is None else inputs
            frame = model.predict(given if images is None else inputs)
    if pairs is not None:  # each row shows its two texts
        texts = [f"{a} | {b}" for a, b in zip(texts, pairs, strict=True)]
    if args.json:
        records = frame.assign(text=texts).to_dict(orient="records")
        print(json.dumps(records, indent=2, default=list))  # label lists may be arrays
        return 0
    width = min(max(len(t) for t in texts), 60)
    if "labels" in frame:  # a multi-label model: each text's labels with their probabilities
        for row, text in enumerate(texts):
            shown = text if len(text) <= width else text[: width - 1] + "…"
            chosen = [f"{n} {frame[f'p_{n}'].iloc[row]:.3f}" for n in frame["labels"].iloc[row]]
            print(f"{shown:<{width}}  {', '.join(chosen) or '(no label)'}")
        return 0
    if "label" not in frame:  # a regression model: each input's predicted score
        for text, score in zip(texts, frame["score"], strict=True):
            shown = text if len(text) <= width else text[: width - 1] + "…"
            print(f"{shown:<{width}}  {score:.4f}")
        return 0
    for text, label, score in zip(texts, frame["label"], frame["score"], strict=True):
        shown = text if len(text) <= width else text[: width - 1] + "…"
        print(f"{shown:<{width}}  {label:<12} {score:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="transferkit",
        description="Transfer-learning pipelines for Kubeflow Pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"transferkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("config", nargs=None if required else "?", help="YAML config file")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set training.epochs=2",
        )

    run = sub.add_parser("run", help="run the pipeline locally (KFP local runner)")
    with_config(run)
    run.add_argument("--summary", metavar="FILE", help="also write the summary as JSON")
    run.add_argument("-v", "--verbose", action="store_true", help="show step log lines")
    run.add_argument(
        "-q", "--quiet", action="store_true", help="no live progress, only the step lines"
    )
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser(
        "validate",
        help="check a config file and the sources it names (paths, schemes, columns, S3 "
        "objects) without running it",
    )
    with_config(validate)
    validate.add_argument(
        "--offline", action="store_true", help="skip the checks that need the network (S3)"
    )
    validate.set_defaults(func=cmd_validate)

    schema = sub.add_parser("schema", help="print the config JSON Schema")
    schema.set_defaults(func=cmd_schema)

    comp = sub.add_parser("compile", help="write the KFP IR YAML a cluster runs")
    with_config(comp, required=False)
    comp.add_argument(
        "--output",
        "-o",
        metavar="PATH",
        help="YAML to write (default: the packaged pipelines/compiled file, or "
        "transfer_learning.yaml when a config is given)",
    )
    comp.set_defaults(func=cmd_compile)

    submit = sub.add_parser("submit", help="compile and start a run on Kubeflow Pipelines")
    with_config(submit)
    submit.add_argument("--host", required=True, help="the KFP API endpoint, e.g. http://…:8888")
    submit.add_argument("--experiment", default="transferkit", help="KFP experiment name")
    submit.add_argument("--run-name", help="display name (default: <model>-<strategy>)")
    submit.add_argument(
        "--no-cache",
        action="store_true",
        help="do not hash the sources from this machine (it cannot read them); the run then "
        "does not use the KFP cache",
    )
    submit.set_defaults(func=cmd_submit)

    sched = sub.add_parser("schedule", help="create a recurring run on Kubeflow Pipelines")
    with_config(sched)
    sched.add_argument("--host", required=True, help="the KFP API endpoint")
    sched.add_argument(
        "--cron", required=True, help="when, as cron: '0 3 * * 1' is 03:00 every Monday"
    )
    sched.add_argument("--experiment", default="transferkit", help="KFP experiment name")
    sched.add_argument("--name", help="display name (default: <model>-retrain)")
    sched.add_argument(
        "--max-concurrency", type=int, default=1, help="runs of the schedule at once (default 1)"
    )
    sched.set_defaults(func=cmd_schedule)

    trig = sub.add_parser(
        "trigger",
        help="retrain when the data changed, inputs drifted or the champion is old (see "
        "trigger: in the config); idempotent",
    )
    with_config(trig)
    trig.add_argument("--host", help="submit the retraining run to this KFP API endpoint")
    trig.add_argument("--local", action="store_true", help="run the retraining here instead")
    trig.add_argument("--experiment", default="transferkit", help="KFP experiment name")
    trig.add_argument("--dry-run", action="store_true", help="decide only; start nothing")
    trig.set_defaults(func=cmd_trigger)

    predict = sub.add_parser(
        "predict", help="classify texts or images with a registered or saved model"
    )
    predict.add_argument(
        "model_uri", help="models:/NAME@champion, models:/NAME/3, runs:/… or a model folder"
    )
    predict.add_argument(
        "texts",
        nargs="+",
        metavar="INPUT",
        help="texts; or, for an image model, image files (PNG, JPEG …), .npy arrays "
        "[N, H, W(, C)] or .npz archives of images",
    )
    predict.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./transferkit-runs/mlflow.db)",
    )
    predict.add_argument(
        "--pair",
        action="append",
        metavar="TEXT",
        help="the second text of a pair, for a model of text pairs (data.text_pair_column): "
        "once per INPUT, in the same order",
    )
    predict.add_argument("--json", action="store_true", help="print JSON records")
    predict.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``transferkit`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(logging.WARNING if args.command != "run" else logging.INFO)
    started = time.perf_counter()
    try:
        return int(args.func(args))
    except RunInterruptedError as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TransferkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted after {time.perf_counter() - started:.0f} s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

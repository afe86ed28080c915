"""The ``cxrexp`` command. Subcommands mirror the MLproject entry points, flag for parameter.

Flags are generated from the frozen config dataclasses, so ``MLproject`` parameters, CLI flags and
config fields cannot drift apart: ``image_size`` <-> ``--image-size`` <-> ``ImageSpec.image_size``.
Heavy imports (TensorFlow) happen inside the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Any, Callable, Iterator, Sequence

from cxrexp import credentials, tf_logs
from cxrexp.config import (
    DEFAULT_EXPERIMENT,
    EvaluateConfig,
    ImageSpec,
    MainConfig,
    PredictConfig,
    PreprocessConfig,
    PromoteConfig,
    SegmentConfig,
    ServerConfig,
    TrainConfig,
    flat_fields,
    from_flat,
    parse_int_list,
    parse_str_list,
)
from cxrexp.errors import ConfigError, UserError

EXIT_USAGE = 2
EXIT_FAILED = 1


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(default: Any) -> Callable[[str], Any]:
    if isinstance(default, bool):
        return parse_bool
    if isinstance(default, tuple):
        return parse_int_list if default and isinstance(default[0], int) else parse_str_list
    return type(default)


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag-name`` per config field (nested configs flattened); unset flags stay None so
    presets can tell them apart."""
    for name, default in flat_fields(cls):
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_converter(default),
            default=None,
            help=f"(default: {shown!r})",
        )


def config_from_args(cls: type, args: argparse.Namespace) -> tuple[Any, set[str]]:
    """(config, names of the flags whose value differs from the default).

    "Differs from the default" rather than "was given": ``mlflow run`` passes every MLproject
    parameter, so a preset could otherwise never fill in anything.
    """
    defaults = dict(flat_fields(cls))
    given = {name: getattr(args, name) for name in defaults if getattr(args, name, None) is not None}
    try:
        cfg = from_flat(cls, given)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return cfg, {name for name, value in given.items() if value != defaults[name]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrexp", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--experiment", default="",
                        help=f"MLflow experiment for the step's runs (default {DEFAULT_EXPERIMENT!r}, or MLFLOW_EXPERIMENT_NAME "
                             "/ MLFLOW_EXPERIMENT_ID when set; under `mlflow run`, its --experiment-name decides)")
    parser.add_argument("--tf-logs", action="store_true",
                        help=f"show TensorFlow's C++ start-up logs (oneDNN, CUDA), hidden by default; {tf_logs.TF_LOGS_ENV}=1 "
                             "does the same for `mlflow run`")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls, text in (
        ("preprocess", PreprocessConfig, "cut each image to its lungs (the default; --lungs none keeps whole images), resize, CLAHE, and split "
                       "a dataset (or the built-in synthetic one) 80/10/10"),
        ("train", TrainConfig, "train the CNN (optionally under an Optuna search) and register the best model"),
        ("evaluate", EvaluateConfig, "test-split metrics with CIs, figures, Grad-CAM, shortcut audit, HTML report"),
        ("promote", PromoteConfig, "move the challenger to champion when it passes the gates"),
        ("segment", SegmentConfig, "train the lung segmenter (U-Net) on image/mask folders and register it (with no folders: on the built-in "
                    "set's masks, registered as cxr-lung-seg-synthetic)"),
    ):
        add_config_flags(sub.add_parser(name, help=text, description=text), cls)
    server_text = "start one MLflow tracking server for a team (artifacts proxied) and print its MLFLOW_TRACKING_URI"
    add_config_flags(sub.add_parser("server", help=server_text, description=server_text), ServerConfig)
    main_text = "the whole pipeline: segment (or the champion segmenter) -> preprocess -> train -> evaluate (reusing finished steps)"
    add_config_flags(sub.add_parser("run", help=main_text, description=main_text), MainConfig)
    predict = sub.add_parser("predict", help="score a folder of X-ray images to CSV")
    # Not add_config_flags: the folder is positional and the model must be named (no silent default).
    predict.add_argument("--model", required=True, help="models:/name@alias, models:/name/version or runs:/id/model")
    predict.add_argument("folder", help="folder of PNG/JPEG images (searched recursively)")
    predict.add_argument("--output", default=PredictConfig.output)
    predict.add_argument("--batch-size", type=int, default=PredictConfig.batch_size)
    rollback = sub.add_parser("rollback", help="restore the previous champion")
    rollback.add_argument("--registered-model-name", default=PromoteConfig.registered_model_name)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "preprocess":
        from cxrexp.steps import preprocess_step

        cfg, _ = config_from_args(PreprocessConfig, args)
        preprocess_step.run(cfg)
        return 0
    if args.command == "train":
        from cxrexp.steps import train_step

        cfg, given = config_from_args(TrainConfig, args)
        train_step.run(cfg, explicitly_set=given)
        return 0
    if args.command == "evaluate":
        from cxrexp.steps import evaluate_step

        cfg, _ = config_from_args(EvaluateConfig, args)
        evaluate_step.run(cfg)
        return 0
    if args.command == "promote":
        from cxrexp.steps import promote_step

        cfg, _ = config_from_args(PromoteConfig, args)
        return promote_step.run(cfg)
    if args.command == "segment":
        from cxrexp.steps import segment_step

        cfg, _ = config_from_args(SegmentConfig, args)
        segment_step.run(cfg)
        return 0
    if args.command == "server":
        from cxrexp.mlflow_edge import tracking_server

        cfg, _ = config_from_args(ServerConfig, args)
        return tracking_server.serve(cfg)
    if args.command == "rollback":
        from cxrexp.steps import promote_step

        return promote_step.rollback(args.registered_model_name)
    if args.command == "predict":
        from cxrexp.steps import predict_step

        try:
            cfg = PredictConfig(model=args.model, folder=args.folder, output=args.output, batch_size=args.batch_size)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        return predict_step.run(cfg)
    if args.command == "run":
        from cxrexp.steps import main_step

        cfg, _ = config_from_args(MainConfig, args)
        return main_step.run(cfg)
    raise AssertionError(args.command)


# Everything with a message for the user subclasses errors.UserError; a missing file named on the
# command line (FileNotFoundError) is the user's to fix too.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _keep_secrets_out_of_the_console()
    if _needs_tensorflow(args):
        tf_logs.load_tensorflow(show=args.tf_logs)
    try:
        with _experiment(args):
            return _dispatch(args)
    except USER_ERRORS as err:
        print(credentials.scrub(f"cxrexp {args.command}: error: {err}"), file=sys.stderr)
        return EXIT_USAGE


def experiment_for(flag: str, environ: dict[str, str]) -> str | None:
    """The experiment to set for a step started by cxrexp itself; None to leave MLflow's choice.

    Under ``mlflow run`` (MLFLOW_RUN_ID) the run exists already, in the experiment ``mlflow run``
    chose. Otherwise: ``--experiment``, else MLflow's own environment variables, else ``cxrexp``, so
    that runs a team compares are not scattered over MLflow's ``Default`` experiment.
    """
    if environ.get("MLFLOW_RUN_ID"):
        return None
    if flag:
        return flag
    if environ.get("MLFLOW_EXPERIMENT_NAME") or environ.get("MLFLOW_EXPERIMENT_ID"):
        return None
    return DEFAULT_EXPERIMENT


@contextlib.contextmanager
def _experiment(args: argparse.Namespace) -> Iterator[None]:
    """The step's experiment (``experiment_for``) while it runs, and MLflow's previous choice after.

    ``mlflow.set_experiment`` keeps the id in a process-wide global and in MLFLOW_EXPERIMENT_ID (so
    that ``main``'s sub-steps inherit it); restored afterwards, an in-process caller that runs steps
    against several stores (a benchmark, the tests) never carries an id into a store without it.
    """
    import os

    name = experiment_for(args.experiment, dict(os.environ))
    if args.experiment and os.environ.get("MLFLOW_RUN_ID"):
        logging.getLogger(__name__).warning(
            "--experiment %r is ignored under `mlflow run`: its run exists already; pass --experiment-name to mlflow run",
            args.experiment)
    if name is None or args.command in ("predict", "server"):  # they log no run
        yield
        return
    import mlflow
    import mlflow.tracking.fluent as fluent

    saved_id, saved_env = fluent._active_experiment_id, os.environ.get("MLFLOW_EXPERIMENT_ID")
    mlflow.set_experiment(name)
    try:
        yield
    finally:
        fluent._active_experiment_id = saved_id
        if saved_env is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = saved_env


def _needs_tensorflow(args: argparse.Namespace) -> bool:
    """Commands that build, train, explain or run a model (preprocess only for a lung view: its segmenter)."""
    if args.command == "preprocess":
        lungs = getattr(args, "lungs", None)
        return (ImageSpec.lungs if lungs is None else lungs) != "none"  # flag not given: the default view
    return args.command in ("train", "evaluate", "segment", "run", "predict")


class _ScrubSecrets(logging.Filter):
    """Replaces any password the environment holds (``credentials.known_secrets``) in a log record."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = credentials.scrub(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def _keep_secrets_out_of_the_console() -> None:
    """The last line of defence: whatever a library puts in a log line or a traceback (a driver echoing
    its connection string), a password from the environment is printed as ``***``."""
    secrets = credentials.known_secrets()
    if not secrets:
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ScrubSecrets(secrets))
    previous = sys.excepthook

    def scrubbed_traceback(kind, value, tb):
        import traceback

        sys.stderr.write(credentials.scrub("".join(traceback.format_exception(kind, value, tb)), secrets))

    if previous is sys.__excepthook__:
        sys.excepthook = scrubbed_traceback


def entrypoint(command: str) -> None:
    """Used by the scripts in entrypoints/: ``python entrypoints/train.py --epochs 3``."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())

"""The command line: check the overrides, open a sweep's parent run, hand over to Hydra.

Every override is checked before any compute starts -- composed with the real configs,
typed against the schema and validated -- and a bad one ends the program with a single
line naming the key and what is allowed (exit code 2), never a traceback.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import fields, is_dataclass
from importlib import resources

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.types import ValueType
from omegaconf import OmegaConf

from lagg_pipeline import config as config_module
from lagg_pipeline.config import CONFIG_PACKAGE, SHORTHANDS, Config, ConfigError, validate
from lagg_pipeline.errors import UserError

# MLflow's loggers then reach Hydra's: INFO into the run's log file, warnings to the terminal.
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")


_VALUE_FLAGS = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
                "-cd", "--config-dir", "-sc", "--shell-completion", "--experimental-rerun"}
PLUGIN_EXTRAS = {"launcher": "launchers", "sweeper": "optuna"}  # setup.cfg extras that bring Hydra plugins
_INFO_FLAGS = {"-h", "--help", "--hydra-help", "--version", "-i", "--info", "-sc", "--shell-completion"}


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate Hydra's own flags from config overrides."""
    flags, overrides, take_value = [], [], False
    for arg in argv:
        if take_value:
            flags.append(arg)
            take_value = False
        elif arg.startswith("-"):
            flags.append(arg)
            take_value = arg in _VALUE_FLAGS
        else:
            overrides.append(arg)
    return flags, overrides


def config_groups() -> dict[str, list[str]]:
    """Each config group under conf/ and its options (file stems)."""
    root = resources.files(CONFIG_PACKAGE)
    groups = {d.name: sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".yaml"))
              for d in root.iterdir() if d.is_dir() and not d.name.startswith("_")}
    return {name: options for name, options in groups.items() if options}  # tuned_hparams/ holds data, not options


def quote_numeric_choices(overrides: list[str], groups: dict[str, list[str]]) -> list[str]:
    """``H=8`` -> ``H='8'``: Hydra parses an unquoted 8 as an int, which it refuses as a
    group choice, and the H/ and k/ groups are named by numbers."""
    quoted = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~") in groups and re.fullmatch(r"\d+(,\d+)*", value):
            override = f"{key}=" + ",".join(f"'{v}'" for v in value.split(","))
        quoted.append(override)
    return quoted


def schema_keys(node=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(node):
        default = node.__dataclass_fields__[f.name].default_factory
        child = default() if callable(default) else None
        if is_dataclass(child):
            keys += schema_keys(type(child), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _diagnose(override, groups: dict[str, list[str]], keys: list[str]) -> None:
    """Raise the one-line ConfigError that explains why Hydra refused ``override``."""
    key = override.key_or_group
    values = _sweep_values(override) if override.is_sweep_override() else [
        override.value() if isinstance(override.value(), str) else override.get_value_element_as_str()]
    if key in groups:
        for value in values:
            if value not in groups[key] and value != "null":
                raise ConfigError(f"{key}={value} is not allowed; choose one of: {', '.join(groups[key])}")
        return
    if key.startswith("optimizer."):
        return
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown key '{key}'; {hint}allowed keys: {', '.join(keys)}")
    schema = OmegaConf.structured(Config)
    for value in values:
        try:
            OmegaConf.update(schema, key, None if value == "null" else OmegaConf.create({"v": value})["v"])
        except Exception as err:  # omegaconf's ValidationError family
            raise ConfigError(f"{key}={value} is not allowed: {str(err).splitlines()[0]}") from None


def _sweep_values(override) -> list[str]:
    """The values a sweep can take. A continuous interval (Optuna's search space) is checked at
    its two ends: the only values a sampler can reach that a type check could refuse."""
    if override.value_type == ValueType.INTERVAL_SWEEP:
        return [str(override.value().start), str(override.value().end)]
    return list(override.sweep_string_iterator())


def _variants(parsed) -> list[list[str]]:
    """The base job (first value of every sweep) and each sweep value changed alone."""

    def line(o, value):
        return f"{o.get_key_element()}={value}"

    choices = [_sweep_values(o) if o.is_sweep_override() else [o.get_value_element_as_str()]
               if not o.is_delete() else [None] for o in parsed]
    base = [c[0] for c in choices]

    def render(values):
        return [o.input_line if v is None else line(o, v) for o, v in zip(parsed, values)]

    variants = [render(base)]
    for i, c in enumerate(choices):
        for value in c[1:]:
            variants.append(render(base[:i] + [value] + base[i + 1:]))
    return variants


def check_optimizer(cfg) -> None:
    """Construct the server update once, so its own argument checks run up front."""
    from lagg_pipeline.config import HAND_OPTIMIZERS
    from lagg_pipeline.jobs.common import hand_server_update

    if cfg.optimizer.name in HAND_OPTIMIZERS:
        hand_server_update(cfg.optimizer)


def preflight(overrides: list[str]):
    """Compose and validate every job the overrides describe; return the base job's config."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lagg_pipeline.jobs.inputs import check_inputs

    config_module.register()
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    parsed = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    groups, keys = config_groups(), schema_keys()
    given = {SHORTHANDS.get(o.key_or_group, o.key_or_group) for o in parsed}
    base_cfg = None
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
        for variant in _variants(parsed):
            try:
                cfg = compose("config", overrides=variant)
            except Exception as err:
                for o in parsed:
                    _diagnose(o, groups, keys)
                messages = [line for line in str(err).splitlines() if line.strip()]
                missing = re.search(r"Could not find 'hydra/(launcher|sweeper)/(\w+)'", str(err))
                if missing:
                    group, plugin = missing.groups()
                    raise ConfigError(f"{group}={plugin} needs a Hydra plugin that is not installed: "
                                      f"pip install '.[{PLUGIN_EXTRAS[group]}]'") from None
                raise ConfigError(messages[0] if messages else type(err).__name__) from None
            validate(cfg)
            check_optimizer(cfg)
            check_inputs(cfg, given)
            base_cfg = base_cfg or cfg
    GlobalHydra.instance().clear()
    return base_cfg


def register_help(groups: dict[str, list[str]]) -> str:
    """Hydra's help with the groups a user chooses (Hydra's own list also shows the data under
    conf/tuned_hparams/ as groups); returns the name of the hydra/help option."""
    from hydra.core.config_store import ConfigStore

    listing = "\n".join(f"{name}: {', '.join(options)}" for name, options in sorted(groups.items()))
    template = ("${hydra.help.header}\n== Configuration groups ==\nCompose your configuration from those groups "
                f"(group=option)\n\n{listing}\n\n== Config ==\nOverride anything in the config (foo.bar=value)\n\n"
                "$CONFIG\n\n${hydra.help.footer}")
    ConfigStore.instance().store(group="hydra/help", name="lagg_pipeline", node={
        "app_name": "lagg_pipeline", "header": "${hydra.help.app_name} is powered by Hydra.\n",
        "footer": "Powered by Hydra (https://hydra.cc)\nUse --hydra-help to view Hydra specific help\n",
        "template": template}, provider="lagg_pipeline")
    return "lagg_pipeline"


def _fail(message: str, code: int = 2):
    print(f"lagg_pipeline: error: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(config_path="pkg://lagg_pipeline.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg):
    from lagg_pipeline.jobs import run_job
    from lagg_pipeline.meta.train import MetaTrainingDiverged, Preempted

    try:
        return run_job(cfg)
    except (ConfigError, UserError, MetaTrainingDiverged) as err:
        _fail(str(err), 2 if isinstance(err, ConfigError) else 1)
    except Preempted as err:  # 128 + SIGTERM: schedulers read it as "terminated", not as a failure of the code
        _fail(str(err), 143)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    flags, typed = split_argv(argv)
    config_module.register()
    groups = config_groups()
    overrides = quote_numeric_choices(typed, groups)
    argv = [*flags, *overrides]
    if _INFO_FLAGS.intersection(flags):
        sys.argv = [sys.argv[0], *argv]
        if {"-h", "--help"}.intersection(flags):
            sys.argv.append(f"hydra/help={register_help(groups)}")
        return _hydra_main()
    try:
        base_cfg = preflight(overrides)
    except ConfigError as err:
        _fail(str(err))
    except UserError as err:  # e.g. a dataset that is not prepared
        _fail(str(err), 1)
    parent = None
    if {"-m", "--multirun"}.intersection(flags) and base_cfg.tracking.enabled:
        from lagg_pipeline.tracking import start_run

        parent = start_run(base_cfg.tracking, run_name=f"sweep: {' '.join(typed)}"[:250],
                           tags={"sweep": "parent", "task": base_cfg.task.name})
        parent.log_params({"sweep_overrides": " ".join(typed)})
        argv = [*argv, f"tracking.parent_run_id={parent.run_id}"]
    sys.argv = [sys.argv[0], *argv]
    status = "FAILED"
    try:
        _hydra_main()
        status = "FINISHED"
    finally:
        if parent is not None:
            parent.end(status)

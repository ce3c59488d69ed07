"""Command-line flags whose defaults come from environment variables.

Every service config is built from flags in its entry point; a flag
``--redis-port`` of service ``dram`` reads its default from
``M2CACHE_DRAM_REDIS_PORT``, so containers can configure by env alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from m2cache.errors import InvalidArgument


def env_name(prefix: str, flag: str) -> str:
    """``("dram", "--redis-port")`` -> ``"M2CACHE_DRAM_REDIS_PORT"``."""
    return f"M2CACHE_{prefix}_{flag.lstrip('-')}".upper().replace("-", "_")


def parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise InvalidArgument(f"not a boolean: {text!r} (use true/false)")


def add(parser: argparse.ArgumentParser, prefix: str, flag: str, default: Any, kind: Callable = str,
        help: str = "") -> None:
    """Add ``flag`` with its default taken from the env variable when set."""
    env = env_name(prefix, flag)
    raw = os.environ.get(env)
    try:
        value = kind(raw) if raw is not None else default
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"bad value for {env}={raw!r}: {err}") from None
    parser.add_argument(flag, type=kind, default=value, help=f"{help} (env {env}, default {default!r})")


def add_config_arguments(parser: argparse.ArgumentParser, config_cls, prefix: str) -> None:
    """One flag per field of a config dataclass (``max_batch`` -> ``--max-batch``),
    defaulting to env ``M2CACHE_<PREFIX>_<FIELD>`` or the field's default; a field
    without a default is a required flag (or env variable)."""
    for name, f in config_cls.__dataclass_fields__.items():
        required = f.default is dataclasses.MISSING
        default = None if required else f.default
        kind = parse_bool if isinstance(default, bool) else (str if required else type(default))
        label = name.replace("_", " ") + (" (required)" if required else "")
        add(parser, prefix, "--" + name.replace("_", "-"), default, kind, label)


def config_from_args(config_cls, args: argparse.Namespace, prefix: str = ""):
    """The frozen config from parsed flags (fields only); Path fields become Paths."""
    values = {}
    for name, f in config_cls.__dataclass_fields__.items():
        value = getattr(args, name)
        if value is None and f.default is dataclasses.MISSING:
            flag = "--" + name.replace("-", "_").replace("_", "-")
            raise InvalidArgument(f"{flag} (or {env_name(prefix, flag)}) is required")
        values[name] = Path(value) if f.type in ("Path", Path) and value is not None else value
    return config_cls(**values)


def add_override_arguments(parser: argparse.ArgumentParser, prefix: str, fields, aliases: dict | None = None) -> None:
    """``--<prefix>-<field>`` for each dataclass field in ``fields``, defaulting to
    None (= the dataclass's own default, shown in the help), for a command that
    composes other services' configs (``m2cache up``). ``aliases`` maps a field
    to extra option strings."""
    group = parser.add_argument_group(f"{prefix} (defaults from its config dataclass)")
    for f in fields:
        default = None if f.default is dataclasses.MISSING else f.default
        kind = parse_bool if isinstance(default, bool) else (type(default) if default is not None else str)
        flags = ["--" + f"{prefix}-{f.name}".replace("_", "-"), *(aliases or {}).get(f.name, ())]
        group.add_argument(*flags, dest=f"{prefix}.{f.name}", type=kind, default=None, metavar=f.name.upper(),
                           help=f"{f.name.replace('_', ' ')} (default {default!r})")


def overrides_from_args(args: argparse.Namespace, prefix: str, fields) -> dict[str, Any]:
    """The fields given on the command line (those not None)."""
    values = {f.name: getattr(args, f"{prefix}.{f.name}") for f in fields}
    return {k: v for k, v in values.items() if v is not None}

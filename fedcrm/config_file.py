"""The one TOML loader: every fedcrm config file is read, parsed and validated here, once.

Each config file is a frozen pydantic model (``extra="forbid"``, so an unknown section or key is
an error, not silently ignored). A file that is missing, not a file, not UTF-8 or not valid TOML,
and a value that fails validation, all end as one :class:`~fedcrm.privacy.errors.ConfigError`
line naming the file, the key (``section.key``) and what is wrong.
"""

from __future__ import annotations

import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from fedcrm.privacy.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_toml(path: Path, *, what: str) -> tuple[dict[str, Any], bytes]:
    """The parsed document and its raw bytes (for a content hash)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give the path of the TOML file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc.strerror})") from None
    try:
        return tomllib.loads(raw.decode("utf-8")), raw
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def validation_message(err: ValidationError, *, where: str, prefix: str = "") -> str:
    """One line for the first problem of ``err`` (and how many more there are)."""
    first = err.errors()[0]
    loc = ".".join(
        str(x) for x in first["loc"] if not str(x).startswith("function-after")
    )
    if prefix:
        loc = f"{prefix}.{loc}" if loc else prefix
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key or section (check its spelling against the documented config)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {loc}: {msg}{more}"


#: Validation context key: the folder relative paths in a config are resolved against.
BASE_DIR = "base_dir"


def _admits_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_admits_bool(a) for a in typing.get_args(annotation)
               if not isinstance(a, FieldInfo))


def _models_in(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """The config models an annotation holds: ``(model, as the values of a mapping)``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (dict, Mapping) and len(args) == 2:
        return [(m, True) for m, _ in _models_in(args[1])]
    return [found for a in args for found in _models_in(a)]


def _true_false_where_numbers_go(model: type[BaseModel], data: Any, loc: str) -> str | None:
    """The first key holding true/false where the model expects no boolean. TOML's true would
    otherwise be read as 1 (epsilon = true is ε = 1)."""
    if not isinstance(data, Mapping):
        return None
    for key, value in data.items():
        field = model.model_fields.get(str(key))
        if field is None:
            continue
        here = f"{loc}.{key}" if loc else str(key)
        if isinstance(value, bool) and not _admits_bool(field.annotation):
            return here
        for sub, mapping in _models_in(field.annotation):
            values = value.items() if mapping and isinstance(value, Mapping) else [("", value)]
            for name, item in values:
                found = _true_false_where_numbers_go(sub, item, f"{here}.{name}" if name else here)
                if found:
                    return found
    return None


def validate(
    model: type[M], data: Mapping[str, Any], *, where: str, prefix: str = "",
    base_dir: Path | None = None,
) -> M:
    """``data`` as ``model``, or one :class:`ConfigError` line. ``base_dir`` (the config file's
    folder) is handed to validators that resolve relative paths."""
    boolean = _true_false_where_numbers_go(model, data, prefix)
    if boolean:
        raise ConfigError(f"{where}: {boolean}: true/false is not a valid value here; give a "
                          "number or text as documented")
    try:
        return model.model_validate(dict(data), context={BASE_DIR: base_dir or Path.cwd()})
    except ValidationError as err:
        raise ConfigError(validation_message(err, where=where, prefix=prefix)) from None


def load_toml(path: Path, model: type[M], *, what: str) -> M:
    """Read a TOML file and validate the whole document as ``model``."""
    data, _ = read_toml(path, what=what)
    return validate(model, data, where=str(path), base_dir=Path(path).resolve().parent)

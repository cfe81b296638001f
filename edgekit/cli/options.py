"""Options become stage configs: an option not given is None, so the config's own default applies."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from edgekit.errors import ConfigError


def config_from(config: type[BaseModel], what: str, **options):
    """``config`` built from the options that were given; a bad value is one ConfigError naming the key."""
    try:
        return config.model_validate({k: v for k, v in options.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'options'}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"{what}: {problems}") from e


def default(config: type[BaseModel], key: str):
    """The default of ``config.key``, for an option without a config of its own (and for help texts)."""
    field = config.model_fields[key]
    return field.default_factory() if field.default_factory is not None else field.default

"""The error for a config the user wrote (a run config, an adapter_config.json, a config object's field).

It lives in io, the bottom of the package, because io reads config files and raises it first; every layer above
(core's configs, the run config, the CLI) raises the same class, imported from here or as core.config.ConfigError.
"""


class ConfigError(ValueError):
    """A config value is wrong. The message says which field, what was seen and what to do."""


__all__ = ["ConfigError"]

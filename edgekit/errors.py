"""The exceptions edgekit raises.

Every message says what is wrong, why, and how to fix it, naming the config key
or file involved. Only ``edgekit.cli`` turns these into one line and an exit code.
"""


class EdgekitError(Exception):
    """Base class: a problem the user can fix (exit code 2 in the CLI)."""


class ConfigError(EdgekitError):
    """A value in a recipe, device profile or on the command line is invalid."""


class RecipeError(ConfigError):
    """A recipe or plan request names something that does not exist or cannot work."""


class DeviceError(ConfigError):
    """A device profile is missing or invalid."""


class BudgetError(EdgekitError):
    """What was asked for cannot fit the device's memory budget (or speed target)."""


class ModelError(EdgekitError):
    """A model could not be found, read, converted or trusted."""


class CacheError(EdgekitError):
    """The edgekit cache is unusable (unwritable, full, or corrupt beyond repair)."""

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


# --------------------------------------------------------------------------- message helpers


def one_line(e: BaseException, *, with_type: bool = False, limit: int = 300) -> str:
    """The first line of an exception's message (a third-party error quoted inside one of ours).

    ``with_type`` prefixes the exception's class name, except for edgekit's own errors, whose
    messages already say what is wrong.
    """
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    if with_type and not isinstance(e, EdgekitError):
        text = f"{type(e).__name__}: {text}".rstrip(": ")
    return (text or type(e).__name__)[:limit]
# Shared by the config readers (recipes, device profiles) so every file problem reads the same way.

_MAPPING = "a mapping (indented `key: value` lines)"
_WANT = {"int": "a whole number", "float": "a number", "bool": "true or false", "string": "text in quotes",
         "list": "a list (`- item` lines, or [a, b])", "dict": _MAPPING, "model": _MAPPING, "model_attributes": _MAPPING}
_BOUND = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "above"),
          "less_than_equal": ("le", "at most"), "less_than": ("lt", "below")}


def yaml_problem(e: Exception) -> str:
    """One line for a YAML error: where (1-based line and column), what, and where the open construct began."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return "YAML syntax error: " + " ".join(str(e).split())
    where = f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None and start.line != mark.line:
        where += f" ({context} that starts at line {start.line + 1})"
    if "'\\t'" in problem:
        where += " (indent with spaces, not tabs)"
    return where


def validation_problem(error: dict, example: object = None) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) as what is wrong, the value given and the fix.

    Type, range and choice errors get the value that was given and what to write instead
    (``example`` is a value of the right kind for the key, when known); others keep pydantic's message.
    """
    t, ctx = error["type"], error.get("ctx") or {}
    msg = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = ("a mapping" if isinstance(got, dict) else "a list" if isinstance(got, list)
             else repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "...")
    if t == "model_type":
        msg = "Input should be a mapping of keys to values"
    kind = t.removesuffix("_type").removesuffix("_parsing").removesuffix("_from_float")
    if t.endswith(("_type", "_parsing", "_from_float")) and kind in _WANT:
        return f"{msg}; got {shown}: write {_WANT[kind]}" + (f", e.g. {example}" if example is not None else "")
    if t in _BOUND:
        bound, words = _BOUND[t]
        return f"{msg}, got {shown}; set it to {words} {ctx.get(bound)}"
    if t == "literal_error":
        return f"{msg}, got {shown}; use one of those"
    return msg

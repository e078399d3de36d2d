"""The one exception type a user can cause."""

from collections.abc import Iterable


class PipefitError(Exception):
    """A problem with the user's input or machine, with the fix in the message.

    The CLI prints it as one line and exits non-zero; the MCP server returns it as a tool error.
    Anything else that escapes a tool function is a bug in pipefit.
    """

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(f"{message} {fix}" if fix else message)


def invalid_input(exc, known: Iterable[str] = ()) -> PipefitError:
    """One line for pydantic's ValidationError about a tool's arguments: the first problem, the
    argument named as the tool takes it (`height`), the value given, and for an unknown argument
    the known one it was probably meant to be (``known``: the tool's argument names)."""
    import difflib

    problems = exc.errors()
    # a misspelt argument is both unknown and, when required, missing: the unknown one says what happened
    problem = next((p for p in problems if p["type"] == "extra_forbidden"), problems[0])
    # a union's member shows in the location ("plan", "dict[any,any]"): the argument is what was sent
    names = [str(part) for part in problem["loc"]]
    names = names[: next((i for i, n in enumerate(names) if not n.isidentifier()), len(names))]
    where = ".".join(names) or "input"
    given = problem.get("input")
    if problem["type"] == "extra_forbidden":
        guess = difflib.get_close_matches(where, list(known), n=1)
        hint = f"Did you mean `{guess[0]}`?" if guess else ""
        names = f" It takes: {', '.join(known)}." if known else ""
        return PipefitError(f"Unknown argument `{where}`.", f"{hint}{names}".strip() or None)
    shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) and len(repr(given)) <= 80 else ""
    return PipefitError(f"Invalid `{where}`: {problem['msg']}{shown}.")

"""The one exception type a user can cause."""


class PipefitError(Exception):
    """A problem with the user's input or machine, with the fix in the message.

    The CLI prints it as one line and exits non-zero; the MCP server returns it as a tool error.
    Anything else that escapes a tool function is a bug in pipefit.
    """

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(f"{message} {fix}" if fix else message)

"""The one error type users see: a plain message plus what to do about it."""


class StudioError(Exception):
    """An error caused by the user's input or environment, with a suggested fix.

    The UI shows ``str(err)``; the CLI prints it and exits with status 2.
    """

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message if not fix else f"{message}\nWhat to do: {fix}")

"""The project's user-facing error: what was wrong and what to do, printed without a traceback."""


class UserError(Exception):
    """A problem with what the user asked for or gave (settings, files, data).

    ``python -m src.cli`` prints ``error: <message>`` and exits with status 2 (1 for failures while
    running, such as a full disk); the message must say what to pass or do instead.
    """

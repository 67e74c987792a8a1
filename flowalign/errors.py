"""Known failures of a run, each with a one-line message that says what to do.

``flowalign`` (the CLI) prints these as ``flowalign: error: <message>`` with exit code 2, no traceback.
"""


class FlowalignError(RuntimeError):
    """A known failure (NaN training, a checkpoint that cannot be written or resumed); the message is one line
    naming the fix."""

"""The error a report's user can fix (a folder that is not a run, a file that is not a model)."""


class ReportError(ValueError):
    """A run folder, export or checkpoint the report cannot read; the message says which and why."""

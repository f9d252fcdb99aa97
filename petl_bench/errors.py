"""The one exception type for mistakes in what a user asked for."""


class UserError(Exception):
    """A bad option, name or data set. The CLI prints it as one line, without a traceback, and exits 2."""

    exit_code = 2


class DownloadError(UserError):
    """A download that failed or arrived broken: one line as a UserError, but exit 1 (not a usage error)."""

    exit_code = 1


def unknown_choice(kind: str, value: str, choices) -> UserError:
    """An error that names the bad value and lists the valid ones."""
    listed = ", ".join(sorted(choices)) or "(none registered)"
    return UserError(f"unknown {kind} '{value}'; choose from: {listed}")

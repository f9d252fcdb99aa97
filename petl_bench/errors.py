"""The one exception type for mistakes in what a user asked for, and warnings said once."""

import logging

_WARNED: set[str] = set()


def warn_once(log: logging.Logger, message: str, *args) -> None:
    """A warning the first time it is given in this process (plans, tables and manifests are read or built
    more than once per command)."""
    text = message % args if args else message
    if text not in _WARNED:
        _WARNED.add(text)
        log.warning("%s", text)


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

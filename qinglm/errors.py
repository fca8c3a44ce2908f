"""The one error type a user can cause and fix, and the interruption that a signal causes."""

import signal


class QingLMError(Exception):
    """A mistake the user can fix (bad path, bad config, prompt too long, ...).

    The CLI prints the message as one line on stderr and exits with status 2; the message
    should say what to do next. Bugs are never raised as this type: they stay tracebacks.
    """


class Interrupted(KeyboardInterrupt):
    """A signal stopped the command after it saved or cleaned up; the CLI exits with 128 + signum.

    Ctrl-C (SIGINT) gives exit status 130 and SIGTERM 143, the shell's convention, so a script can tell
    a stopped run from a finished one. A plain KeyboardInterrupt counts as SIGINT.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = int(signum)


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """Return the exit status of a command stopped by interrupt: 128 + its signal number (130 for Ctrl-C)."""
    return 128 + int(getattr(interrupt, "signum", signal.SIGINT))

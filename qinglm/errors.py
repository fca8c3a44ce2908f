"""The one error type a user can cause and fix."""


class QingLMError(Exception):
    """A mistake the user can fix (bad path, bad config, prompt too long, ...).

    The CLI prints the message as one line on stderr and exits with status 2; the message
    should say what to do next. Bugs are never raised as this type: they stay tracebacks.
    """

"""The one exception type for mistakes a user can fix."""


class MinigptError(Exception):
    """A user error: bad path, bad config, missing artifact, bad argument.

    The CLI prints its message as one line and exits with code 2; the message
    says what is wrong and what to do about it.
    """

    exit_code = 2

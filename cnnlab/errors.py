"""The one exception type the command-line tools turn into a one-line message and exit status 2."""


class UserError(Exception):
    """A problem with what the user asked for (a config key, a path, a file), not a bug.

    The message is one line that names the file, flag or key, what is allowed, and what was received.
    """


class TrainingError(Exception):
    """Training had to stop (a NaN loss, a failed checkpoint write); the run directory keeps the last good epoch.

    The command-line tools print the one-line message and exit with status 1.
    """

"""One error type for bad input: the CLI turns it into a one-line message and exit code 2."""


class MtrError(Exception):
    """Bad input from a user: a config, a path, a file, a dataset. Message is one line."""

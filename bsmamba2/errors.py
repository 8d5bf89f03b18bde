"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class BSMamba2Error(Exception):
    """A problem with the user's input (file, config, checkpoint, option), explained in one line."""

"""The two exceptions the scripts turn into one clear line: the ground floor of the package (imports nothing)."""


class UserError(Exception):
    """Bad input the user can fix: the scripts print its message as one `error: ...` line and exit with code 2."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint: one `stopped: ...` line, exit code 130."""

"""The few exception types the CLI turns into one-line messages and exit codes."""


class SdloraError(Exception):
    """An expected failure: the CLI prints `error: <message>` and exits 1."""

    exit_code = 1


class UsageError(SdloraError):
    """Bad options, config or input paths: exit 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or --set override that does not validate."""


class Interrupted(SdloraError):
    """A run stopped by SIGINT/SIGTERM after saving its state."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum

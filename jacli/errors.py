"""jacli's exception types. Anything raised as a JacliError is the user's problem
(bad input, missing package, unsupported model) and becomes one ``Error:`` line and
exit code 2 in the CLI; anything else is a bug and keeps its traceback."""


class JacliError(Exception):
    """Base class: a domain error with a message meant for the user."""

    exit_code = 2


class ModelLoadError(JacliError):
    """The model file is missing, unreadable, corrupt or of an unknown format."""


class InputError(JacliError):
    """The input array is missing, unreadable, or does not fit the model."""


class OutputError(JacliError):
    """The output cannot be written (unwritable path, unknown extension, no space)."""


class BackendMissing(JacliError):
    """The framework needed for this model format is not installed."""

    def __init__(self, package: str, extra: str, fmt: str):
        super().__init__(
            f"{fmt} models need the '{package}' package, which is not installed; "
            f"install it with: pip install 'jacli[{extra}]'"
        )
        self.package = package


class UnsupportedError(JacliError):
    """The request is valid but this model/backend cannot do it (e.g. an operator without a
    derivative rule); the message says what to use instead."""


class UnsafeModelError(JacliError):
    """The model could execute code or touch the system on load; refused without --trust-model."""

"""jacli's exception types, one kind per cause:

* **the user's input** (``UserError``: a bad model file, input array or output path, a
  missing package, a refused untrusted model) — exit 2; the message says what to change;
* **a limitation** (``LimitationError``: an operator or layer that jacli or the framework
  cannot differentiate, a mode the framework cannot run) — exit 2; it names the operator or
  layer, and ``option`` holds what works instead;
* **jacli's own bug** (``InternalError``: e.g. a graph jacli derived fails where the
  model's own forward pass runs) — exit 3, "please report".

Each error keeps the framework's root cause (``root_cause``), not its first line. ``option``
is the command-line option that helps (``"--mode reverse"``) and ``hint`` the same advice
for Python users (``"mode='reverse'"``): ``str(e)`` shows the hint, and the CLI renders the
option instead. Anything raised that is not a JacliError is a bug too (exit 3)."""
from __future__ import annotations

import re


class JacliError(Exception):
    """Base class: a domain error with a message meant for the user."""

    exit_code = 2
    kind = "input"

    def __init__(self, message: str = "", *, option: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message, self.option, self.hint = message, option, hint

    def __str__(self) -> str:
        return self.message + (f"; use {self.hint}" if self.hint else "")

    def cli_message(self) -> str:
        """The message for the command line: the option that helps instead of the Python hint."""
        advice = self.option or self.hint
        return self.message + (f"; use {advice}" if advice else "")


class UserError(JacliError):
    """Something the user gave (model file, input, output path, environment) must change."""

    kind = "input"


class ModelLoadError(UserError):
    """The model file is missing, unreadable, corrupt or of an unknown format."""


class InputError(UserError):
    """The input array is missing, unreadable, or does not fit the model."""


class OutputError(UserError):
    """The output cannot be written (unwritable path, unknown extension, no space)."""


class BackendMissing(UserError):
    """The framework needed for this model format is not installed."""

    def __init__(self, package: str, extra: str, fmt: str):
        super().__init__(
            f"{fmt} models need the '{package}' package, which is not installed; "
            f"install it with: pip install 'jacli[{extra}]'"
        )
        self.package = package


class UnsafeModelError(UserError):
    """The model could execute code or touch the system on load; refused without --trust-model."""


class LimitationError(JacliError):
    """The request is valid but jacli or the framework cannot do it for this model (an
    operator or layer without a derivative rule, a mode the framework cannot run);
    ``operator`` names what is missing, ``option``/``hint`` what works instead."""

    kind = "limitation"

    def __init__(self, message: str = "", *, operator: str | None = None, option: str | None = None,
                 hint: str | None = None):
        super().__init__(message, option=option, hint=hint)
        self.operator = operator


UnsupportedError = LimitationError  # the name the backends have always raised


class InternalError(JacliError):
    """A bug in jacli: something jacli built (a derived graph, a float64 copy) failed where
    the model itself works. Exit 3; the message keeps the framework's root cause."""

    exit_code = 3
    kind = "bug"

    def __str__(self) -> str:
        return (f"{super().__str__()} (a bug in jacli: please report it, with --debug for the traceback)")

    def cli_message(self) -> str:
        return (f"{super().cli_message()} (a bug in jacli: please report it, with --debug for the traceback)")


# --- the framework's root cause ----------------------------------------------------------
_ERROR_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Exit))\s*:\s*(\S.*)$")
_NOISE = re.compile(r"^\s*(File \"|Traceback |in user code|Graph execution error|Detected at node|\^|~|During handling"
                    r"|The above exception|Stack trace|\[\[|The following operation failed|  )")
_TF_TAIL = re.compile(r"\s*\[Op:[^\]]*\](?: name: \S*)?")  # TensorFlow's "[Op:__inference_f_123] name: "
_ENCOUNTERED = "Exception encountered:"
_LIMIT = 400


def root_cause(e: BaseException, limit: int = _LIMIT) -> str:
    """The most specific line of an exception: the innermost of the chain (``raise ... from``
    and errors raised while handling others), and within its message the last
    ``SomeError: text`` line of a traceback that a framework folded into it (TorchScript's
    interpreter, TensorFlow's "in user code:"), or what follows Keras's last "Exception
    encountered:". One line, at most ``limit`` characters."""
    chain, seen = [e], {id(e)}
    while True:
        nxt = chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)
        if nxt is None or id(nxt) in seen:
            break
        chain.append(nxt)
        seen.add(id(nxt))
    for exc in reversed(chain):  # innermost first; an empty message falls back outwards
        text = _message_root(exc)
        if text:
            return text[:limit]
    return type(e).__name__


def _message_root(exc: BaseException) -> str:
    text = str(exc.args[0]) if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    if _ENCOUNTERED in text:  # Keras wraps each nested failure; the innermost is the reason
        text = text.rsplit(_ENCOUNTERED, 1)[1]
        text = re.split(r"\s*config=", text, maxsplit=1)[0]
    text = re.split(r"\s*Full object config", text, maxsplit=1)[0]  # Keras appends the whole config
    lines = [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    errors = [m for m in (_ERROR_LINE.match(ln) for ln in lines) if m]
    if errors:
        kind, message = errors[-1].groups()
        message = _TF_TAIL.sub("", message.strip())
        return f"{kind}: {message}" if len(lines) > 1 else message
    meaningful = [ln.strip() for ln in lines if not _NOISE.match(ln)]
    return _TF_TAIL.sub("", " ".join(meaningful or [lines[0].strip()]))

"""Entry point: the command group, and the one place errors become exit codes.

JacliError (and click usage errors) -> one ``Error:`` line on stderr, with the option that
helps (``e.option``) in place of the hint for Python users; exit ``e.exit_code``: 2 for the
user's input and for limitations, 3 for jacli's own bugs (``InternalError``). Anything else
is a bug too -> one ``Error: internal error`` line, exit 3 (traceback with --debug).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback

import click

from .. import __version__
from .check import check
from .compute import compute
from .diff import diff
from .export_grad import export_grad
from .inspect_cmd import inspect_cmd
from .ops import ops
from .spectral import det, svd

COMMANDS = [inspect_cmd, compute, check, export_grad, svd, det, diff, ops]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="jacli")
def cli():
    """jacli: Jacobians of saved neural-network models.

    Formats: Keras .keras/.h5, TensorFlow SavedModel directories, TorchScript .pt, torch.export .pt2,
    ONNX .onnx.
    """


for _command in COMMANDS:
    cli.add_command(_command)


class Terminated(SystemExit):
    """SIGTERM/SIGHUP raised as an exception, so that cleanup (removing a half-written
    temporary output file) runs as it does for Ctrl-C."""


_signalled: list[int] = []  # signals received during this run


def _on_signal(signum, frame):
    """Raise the signal as an exception. One raised while the import system compiles a
    module can be lost, so there the signal is sent again a moment later instead."""
    if frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    _signalled.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(128 + signum)


def _exit_if_signalled() -> None:
    """Native code (h5py) can turn the signal's exception into another error: report the signal."""
    if _signalled:
        click.echo("Error: interrupted" if _signalled[0] == signal.SIGINT else "Error: terminated", err=True)
        sys.exit(128 + _signalled[0])


def _one_line(text: str) -> str:
    """Names from hostile files can hold newlines or terminal escapes: show those escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def run() -> None:
    """The ``jacli`` command (and ``python -m jacli``): ``main`` in a process of jacli's own,
    whose C allocator and onnxruntime arena keep freed memory for reuse
    (``api.tune_allocator``)."""
    from ..api import tune_allocator

    tune_allocator()
    main()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or bool(os.environ.get("JACLI_DEBUG"))
    from ..errors import JacliError, root_cause

    signals = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored
        signals.append(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread():
        signals = []  # handlers can only be set from the main thread
    previous = {s: signal.signal(s, _on_signal) for s in signals}
    _signalled.clear()
    try:
        code = cli.main(args=argv, prog_name="jacli", standalone_mode=False)
    except Terminated as e:
        click.echo("Error: terminated", err=True)
        sys.exit(e.code)
    except JacliError as e:
        _exit_if_signalled()
        if debug:
            traceback.print_exc()
        click.echo(f"Error: {_one_line(e.cli_message())}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("Error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        hint = f" (see 'jacli {e.ctx.info_name} --help')" if getattr(e, "ctx", None) is not None else ""
        click.echo(f"Error: {_one_line(e.format_message())}{hint}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Error: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except MemoryError:
        click.echo("Error: out of memory; lower --max-memory or the batch size", err=True)
        sys.exit(2)
    except Exception as e:  # a bug: say so, keep the traceback behind --debug
        _exit_if_signalled()
        if debug:
            traceback.print_exc()
        click.echo(f"Error: internal error ({type(e).__name__}: {_one_line(root_cause(e, 300))}); "
                   "rerun with --debug for the traceback and please report it", err=True)
        sys.exit(3)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    sys.exit(code if isinstance(code, int) else 0)

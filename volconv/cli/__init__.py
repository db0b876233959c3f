"""The `volconv` command: main(argv) and its parser; one module per subcommand calls the library.

    volconv filter IN OUT --gaussian 2mm     one NIfTI file (vc.io.filter_nifti), optional --preview PNG
    volconv batch IN_DIR OUT_DIR --box 3mm   every .nii / .nii.gz of a directory, one progress bar
    volconv deconvolve IN OUT --psf P --iterations N   Richardson-Lucy (vc.restoration.richardson_lucy)
    volconv info [IN ...]                    header summary of NIfTI files; without files: the build
    volconv bench                            sample check against scipy.ndimage, then timings

Exit codes: 0 success, 2 bad arguments (argparse's own), 1 failure, 130 / 143 interrupted (SIGINT / SIGTERM).
A failure prints one line "volconv: error: <file>: <problem>" and leaves no output file behind: the NIfTI is
written atomically by vc.io.save, the preview PNG through a temporary file that is renamed into place, and an
interrupt or SIGTERM unwinds through the same clean-up. No traceback reaches the user: an error nothing
foresaw is one line too, naming the file; VOLCONV_DEBUG=1 shows its traceback instead.

Tests call main([...]) directly. The subcommands: cli.filter, cli.batch, cli.deconvolve, cli.info, cli.bench; their
shared parts: cli.common (failures, messages, argument types), cli.options (the options of filter and batch).
Nothing here imports torch (only `--device cuda` would need it); matplotlib (--preview, cli.preview) and tqdm
(progress bars) are imported only when used.
"""
import argparse
import contextlib
import os
import signal
import sys
import threading

from . import batch, bench, deconvolve, filter, info
from .common import CommandError, Reporter, Terminated, debugging, unexpected
from .options import check_filter_args

__all__ = ["main", "build_parser", "CommandError"]


def build_parser():
    from .. import __version__

    p = argparse.ArgumentParser(prog="volconv", description="Fast 3D convolution for medical volumes.",
                                epilog="VOLCONV_DEBUG=1 shows the traceback of an unexpected error.")
    p.add_argument("--version", action="version", version=f"volconv {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    for command in (filter, batch, deconvolve, info, bench):
        command.add_parser(sub)
    return p


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM and SIGHUP raise Terminated (a KeyboardInterrupt) in the main thread while the command runs, so
    that they clean up as Ctrl-C does. Signals someone chose to ignore (nohup) stay ignored; the previous
    handlers come back afterwards (tests call main() in their own process)."""
    def terminate(signum, frame):
        raise Terminated(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():   # only it may set handlers
        for name in ("SIGTERM", "SIGHUP"):
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) is signal.SIG_DFL:
                previous[number] = signal.signal(number, terminate)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _stdout_gone():
    """The reader of stdout went away (`volconv info F | head`): say nothing more. Python's documentation's
    recipe: point stdout at devnull, so that the interpreter's last flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):   # a stdout without a descriptor (a test's capture)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv=None):
    args = None
    try:
        with _signals_interrupt():
            p = build_parser()
            args = p.parse_args(argv)   # --help and argparse's errors (exit 2) leave through SystemExit
            if args.command is None:
                p.print_help()
                return 2
            if args.command in ("filter", "batch"):
                check_filter_args(args.parser, args)
            return args.run(args)
    except Terminated as e:
        print("volconv: terminated", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("volconv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _stdout_gone()
        return 1
    except Exception as e:
        if debugging():
            raise
        Reporter(quiet=False).error(unexpected(e, getattr(args, "input", getattr(args, "input_dir", None))))
        return 1

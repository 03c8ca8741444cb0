"""How a failed bundle command reports a mistake: the bundle's own error last, without MONAI's wrappers.

MONAI's config runner wraps every error raised while it builds a component or evaluates a ``$`` expression in a
``RuntimeError`` whose message dumps the component's keywords or the whole expression, so the bundle's clear message
(``image_size=100 is not valid ...``) ends up in the middle of a long traceback. `install` replaces the process's
exception hook for ``python -m monai.bundle`` runs: when the failure comes from an error raised in this package, only
that error's own traceback is printed, so its message is the last line; any other failure is printed as Python
prints it. ``MEDFUSIONNET_FULL_TRACEBACK=1`` prints everything.
"""

from __future__ import annotations

import os
import sys
import traceback

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors behind it (``__cause__``, else ``__context__``), outermost first."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


def _raised_here(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(PACKAGE_DIR + os.sep)


def bundle_error(error: BaseException) -> BaseException | None:
    """The innermost error of ``error``'s chain that was raised by this package's code, or None."""
    for inner in reversed(_chain(error)):
        if _raised_here(inner):
            return inner
    return None


def report(error_type, error: BaseException, tb, stream=None) -> None:
    """Print ``error`` as `install`'s hook does: the bundle's own error alone when there is one, else in full."""
    stream = stream or sys.stderr
    own = None if os.environ.get("MEDFUSIONNET_FULL_TRACEBACK") == "1" else bundle_error(error)
    if own is None:
        traceback.print_exception(error_type, error, tb, file=stream)
        return
    lines = traceback.format_exception(type(own), own, own.__traceback__, chain=False)
    stream.write("".join(lines[:-1]))
    stream.write("(set MEDFUSIONNET_FULL_TRACEBACK=1 for the whole traceback)\n")
    stream.write(lines[-1])


def is_bundle_command(argv0: str | None = None) -> bool:
    """Whether this process is ``python -m monai.bundle ...`` (MONAI's bundle command line)."""
    path = os.path.abspath(argv0 if argv0 is not None else (sys.argv[0] if sys.argv else ""))
    return path.endswith(os.path.join("monai", "bundle", "__main__.py"))


def install() -> None:
    """Use `report` as the exception hook of a ``python -m monai.bundle`` process whose hook is Python's own."""
    if is_bundle_command() and sys.excepthook is sys.__excepthook__:
        sys.excepthook = report

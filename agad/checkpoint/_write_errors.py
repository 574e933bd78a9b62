"""Failed checkpoint writes (disk full, read-only, no permission) as one-line errors that
name the path, and the filters that keep orbax's background-thread tracebacks of such a
failure off the console."""

from __future__ import annotations

import errno
import logging as py_logging
import sys


# errno values that mean "this folder cannot be written", whatever the file.
WRITE_ERRNOS = {
  errno.ENOSPC: "disk full",
  errno.EDQUOT: "disk quota exceeded",
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied",
  errno.EPERM: "operation not permitted",
  errno.EFBIG: "file too large",
}
# The same conditions as tensorstore words them (it raises ValueError with the OS message).
_WRITE_MESSAGES = {
  "No space left on device": errno.ENOSPC,
  "Disk quota exceeded": errno.EDQUOT,
  "Read-only file system": errno.EROFS,
  "Permission denied": errno.EACCES,
}


class WorkdirWriteError(OSError):
  """A workdir (checkpoint) write failed because the folder cannot be written: disk full,
  read-only, no permission. The message is one line and names the path."""

  def __init__(self, message: str, *, code: int | None = None, path: str | None = None):
    super().__init__(message)
    self.code, self.path = code, path

  def __str__(self) -> str:  # OSError's own __str__ would print "[Errno None] ..."
    return self.args[0]


def write_failure(error: BaseException | None) -> tuple[int, str] | None:
  """``(errno, "disk full: <file>")`` if ``error`` (or an exception it was raised from) is a
  failed write to a full / read-only / forbidden folder, else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, WorkdirWriteError):
      return error.code, str(error)
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
      where = f": {error.filename}" if error.filename else ""
      return error.errno, f"{WRITE_ERRNOS[error.errno]}{where}"
    if not isinstance(error, OSError):
      for text, code in _WRITE_MESSAGES.items():
        if text in str(error):
          return code, f"{WRITE_ERRNOS[code]}: {_short(error, typed=False)}"
    error = error.__cause__ or error.__context__
  return None


class _QuietWriteFailures(py_logging.Filter):
  """Drops the traceback (keeps the line) of orbax's own log records of a write failure.

  Orbax logs a failed background write with its full traceback from each of its worker
  threads; the ``WorkdirWriteError`` raised to the caller already says what failed, in one
  line. Every other error keeps its traceback.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    # A checkpoint saved between validations (an early stop, checkpoint.every_steps) has no
    # metrics by design: "best" is chosen among the ones that have them.
    if "orbax" in record.pathname and record.getMessage().startswith("Requested `tracked_metric`"):
      return False
    error = record.exc_info[1] if record.exc_info else None
    # After a failed background write, orbax's last writer thread finds its executor (or
    # the interpreter) shut down ("cannot schedule new futures after [interpreter]
    # shutdown"): a consequence of the failure already reported, not a second error.
    if (
      error is not None
      and "orbax" in record.pathname
      and (
        write_failure(error)
        or (isinstance(error, RuntimeError) and "cannot schedule new futures after" in str(error))
      )
    ):
      record.exc_info, record.exc_text = None, None
    return True


_QUIET = _QuietWriteFailures()


def _quiet_closed_event_loops() -> None:
  """Installed once a write has failed: drops "Event loop is closed" unraisable errors.

  Orbax's writer threads that were still running when the save failed complete into event
  loops it has already closed; each completion (a tensorstore callback) prints a raw
  asyncio traceback through ``sys.unraisablehook`` (31 of them for one failed save of a tiny
  model). They carry nothing of the failure, which ``WorkdirWriteError`` reports. Every other
  unraisable error still reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "agad_quiet", False):
    return

  def hook(unraisable):
    if not (
      isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == "Event loop is closed"
    ):
      previous(unraisable)

  hook.agad_quiet = True
  sys.unraisablehook = hook


def _short(error: BaseException, typed: bool = True) -> str:
  """An exception's first line (``typed``: after its type name), at most 200 characters."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  if typed or not text:
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= 200 else text[:197] + "..."

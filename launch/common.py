"""Shared absl set-up for the launch scripts."""

from __future__ import annotations

import contextlib
import os

from absl import flags, logging

# Registers the fraction parser for float --config.* fields (8/255); the radius helpers.
from launch.radii import describe_radii, explicit_overrides, resolve_radii  # noqa: F401

flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() first, with the cluster auto-detected "
  "(Cloud TPU pod, SLURM, Open MPI). docs/multihost.md.",
)
flags.DEFINE_string(
  "coordinator_address",
  None,
  "HOST:PORT of process 0, where the coordination service listens: an explicit "
  "multi-process start, with --num_processes and --process_id (docs/multihost.md).",
)
flags.DEFINE_integer(
  "num_processes", None, "Processes of a multi-process run (with --coordinator_address)."
)
flags.DEFINE_integer(
  "process_id",
  None,
  "This process's index, 0 .. num_processes-1 (0 hosts the "
  "coordination service and writes checkpoints, metrics and reports).",
)
flags.DEFINE_integer(
  "heartbeat_timeout",
  100,
  "Multi-process runs: seconds without heartbeats before the other processes "
  "count a process as dead and stop (JAX's default is 100).",
)
flags.DEFINE_enum(
  "matmul_precision",
  None,
  ["default", "high", "highest"],
  "jax_default_matmul_precision for every dot and convolution (unset: JAX's "
  "default, which lets GPUs use TF32 and TPUs bf16 passes for float32). "
  "'highest' gives full float32 on GPU, as on CPU.",
)


def distributed_args(f=None) -> dict | None:
  """``jax.distributed.initialize``'s arguments from the flags (None: one process).

  ``--distributed`` alone lets JAX detect the cluster; ``--coordinator_address``,
  ``--num_processes`` and ``--process_id`` (all three) start the processes by hand.
  Raises ValueError naming the bad flag."""
  f = f or flags.FLAGS
  explicit = {
    "coordinator_address": f.coordinator_address,
    "num_processes": f.num_processes,
    "process_id": f.process_id,
  }
  given = [k for k, v in explicit.items() if v is not None]
  _need(
    _is_int(f.heartbeat_timeout) and f.heartbeat_timeout >= 1,
    "heartbeat_timeout",
    f.heartbeat_timeout,
    "an integer >= 1 (seconds)",
  )
  if not given:
    return {"heartbeat_timeout_seconds": f.heartbeat_timeout} if f.distributed else None
  if len(given) < 3:
    missing = " and ".join(f"--{k}" for k in explicit if k not in given)
    raise ValueError(
      f"--{given[0]} needs {missing} too: a multi-process start names the coordinator "
      "(HOST:PORT of process 0), the number of processes and this process's index"
    )
  host, _, port = f.coordinator_address.rpartition(":")
  _need(
    bool(host) and port.isdigit() and 0 < int(port) < 65536,
    "coordinator_address",
    f.coordinator_address,
    "HOST:PORT of process 0, e.g. 127.0.0.1:12355",
  )
  _need(f.num_processes >= 1, "num_processes", f.num_processes, "an integer >= 1")
  _need(
    0 <= f.process_id < f.num_processes,
    "process_id",
    f.process_id,
    f"an integer in [0, {f.num_processes - 1}] (--num_processes={f.num_processes})",
  )
  return {**explicit, "heartbeat_timeout_seconds": f.heartbeat_timeout}


def init_runtime() -> None:
  """Multi-process initialisation (``distributed_args``), matmul precision, logging to stderr.

  Across processes on CPU, JAX 0.12 runs collectives over gloo (TCP; its default
  ``jax_cpu_collectives_implementation``). If a process dies, the coordination service
  stops the others within ``--heartbeat_timeout`` seconds (JAX logs "Terminating process
  because the JAX distributed service detected fatal errors"); restarting every process
  resumes from the last checkpoint."""
  import jax

  quiet_backend_noise()
  try:
    args = distributed_args()
  except ValueError as e:
    fatal(e)
  if args is not None:
    jax.distributed.initialize(**args)
  if flags.FLAGS.matmul_precision:
    jax.config.update("jax_default_matmul_precision", flags.FLAGS.matmul_precision)
  logging.set_verbosity(logging.INFO)
  # Orbax logs every save phase at INFO; keep its warnings, drop its chatter.
  import logging as py_logging

  py_logging.getLogger("absl").addFilter(
    lambda r: r.levelno >= py_logging.WARNING or "orbax" not in r.pathname
  )
  logging.info(
    "JAX %s: process %d/%d, devices %s (XLA_FLAGS=%r)",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.devices(),
    os.environ.get("XLA_FLAGS", ""),
  )


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one-line messages instead of tracebacks.

  An unknown ``--config.<field>`` (ml_collections otherwise dies with a raw
  ``AttributeError: "'learning_rate'"`` traceback) names the fields that exist there; a
  bad config argument (``--config=...:smallcnn,fsrr``: ``get_config`` raised) gives the
  error's last line, not the traceback ml_collections wraps in the flag error; a value of
  the wrong type (``--config.attack.eps=abc``) names the field's type and current value.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fatal(flag_error_message(argv, e))
  except (AttributeError, KeyError) as e:
    fatal(unknown_field_message(argv, e)[len("FATAL ") :])


def flag_error_message(argv: list[str], error: Exception) -> str:
  """One line for an absl flag error (see :func:`parse_flags`)."""
  text = str(error)
  if "Traceback (most recent call last)" in text:  # get_config raised: keep its message
    head = text.split(": Error whilst parsing config file", 1)[0]
    last = [l for l in text.splitlines() if l.strip()][-1].strip()
    name, sep, message = last.partition(": ")
    return f"{head}: {message if sep and name.isidentifier() else last}"
  first = text.splitlines()[0] if text else repr(error)
  if first.startswith("flag --config.") and "=" in first:
    field = first[len("flag --") :].split("=", 1)[0]
    current = _config_field(argv, field)
    if current is not _MISSING:
      kind = type(current).__name__ + (
        " (a number or a fraction like 8/255)" if isinstance(current, float) else ""
      )
      return f"Flags parsing error: {first}; {field} takes a value of type {kind} (now {current!r})"
  return f"Flags parsing error: {first} (--helpfull lists the flags)"


_MISSING = object()


def _load_config(argv: list[str]):
  """The config ``--config=PATH[:ARG]`` names (None if none or it cannot be built)."""
  import importlib.util

  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if not spec:
    return None
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_agad_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
  except Exception:  # the message stays useful without it
    return None


def _config_field(argv: list[str], field: str):
  node = _load_config(argv)
  if node is None:
    return _MISSING
  try:
    for part in field.split(".")[1:]:
      node = node[part]
  except (KeyError, AttributeError, TypeError):
    return _MISSING
  return node


def quiet_backend_noise() -> None:
  """Drops JAX's INFO lines about optional backends this machine lacks ("Unable to
  initialize backend 'tpu'" / 'proxy'): the first lines of every command otherwise."""
  import logging as py_logging

  py_logging.getLogger("jax._src.xla_bridge").addFilter(
    lambda r: (
      r.levelno >= py_logging.WARNING or "Unable to initialize backend" not in r.getMessage()
    )
  )


# ------------------------------------------------------------------ bad input, one line

# What validation raises: a message naming the field, the value and what is accepted.
BAD_INPUT = (ValueError, TypeError, KeyError, FileNotFoundError, NotImplementedError)


def one_line(error: BaseException | str) -> str:
  """The error's message on one line (a KeyError's without the quotes repr adds)."""
  if isinstance(error, KeyError) and error.args:
    text = str(error.args[0])
  else:
    text = str(error)
  return "; ".join(l.strip() for l in text.splitlines() if l.strip()) or type(error).__name__


def fatal(error: BaseException | str):
  """``FATAL <message>`` on one line of stderr, exit status 1, no traceback."""
  import sys

  sys.stderr.write(f"FATAL {one_line(error)}\n")
  sys.stderr.flush()
  sys.exit(1)


@contextlib.contextmanager
def refuse_bad_input():
  """Turns what validation raises (:data:`BAD_INPUT`) into :func:`fatal`'s one line.

  Wraps the checks a launch script runs before any work, never the work itself (a bug
  there keeps its traceback)."""
  try:
    yield
  except BAD_INPUT as e:
    fatal(e)


def check_train_config(config, *, num_devices: int | None = None) -> None:
  """Every field of a training config, before any work, in milliseconds: ``check_config``
  (all but ``eval.*``; the batch against ``num_devices``, default ``jax.device_count()``)
  and ``validate_eval_config`` (the evaluation settings saved with the run)."""
  from agad.evaluation.defaults import validate_eval_config
  from agad.training import builders

  builders.check_config(config, num_devices=num_devices)
  validate_eval_config(config.eval)


def _need(ok: bool, flag: str, value, accepted: str) -> None:
  if not ok:
    raise ValueError(f"--{flag}={value!r} is invalid: {accepted}")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _saved_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return (
    sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []
  )


def _check_workdir(flag: str, workdir, *, checkpoints: bool = True):
  """A training workdir: its ``config.json`` (returned) and, if asked, a checkpoint."""
  from agad import api

  _need(
    isinstance(workdir, str) and bool(workdir),
    flag,
    workdir,
    "a training workdir (holding config.json and checkpoints/)",
  )
  _need(
    os.path.isfile(os.path.join(workdir, "config.json")),
    flag,
    workdir,
    f"a training workdir: {os.path.join(workdir, 'config.json')} is missing "
    "(python -m launch.train writes it)",
  )
  if checkpoints:
    _need(
      bool(_saved_steps(workdir)),
      flag,
      workdir,
      f"a training workdir with checkpoints: "
      f"{os.path.join(workdir, 'checkpoints')} holds none (train first)",
    )
  try:
    config = api.load_config(workdir)  # also finds a recorded out-of-tree defense
  except ValueError as e:  # not JSON
    raise ValueError(
      f"--{flag}={workdir!r} is invalid: its config.json does not parse ({e})"
    ) from None
  from agad import defenses

  try:
    defenses.parse(config.objective.name)
  except ValueError as e:
    raise ValueError(
      f"--{flag}={workdir!r}: its objective {config.objective.name!r} cannot be loaded: {e}"
    ) from None
  return config


def next_steps(workdir: str, config) -> str:
  """What ``launch.train`` prints at the end: where the checkpoints are, and the evaluate
  and attention commands for this workdir (``--step=latest`` when the run has no
  validation split to choose "best" by)."""
  from agad import checkpoint

  steps = _saved_steps(workdir)
  try:  # "best" needs a checkpoint with validation metrics (none before the first epoch ends)
    checkpoint.resolve_step(os.path.join(workdir, "checkpoints"), "best", verify=False)
    step = "best"
  except (ValueError, FileNotFoundError):
    step = "latest"
  stop = int(config.get("stop_after_steps", 0) or 0)
  stopped = (
    f"; stopped at step {steps[-1]} by stop_after_steps, the same command resumes"
    if stop and steps and steps[-1] == stop
    else ""
  )
  return "\n".join(
    [
      f"checkpoints: {os.path.join(workdir, 'checkpoints')} (steps {', '.join(map(str, steps)) or 'none'}{stopped})",
      "next: evaluate (the number to quote is the report's worst case; a defense row needs table_aa),",
      "compare against a base run evaluated the same way, and draw attention maps:",
      f"  python -m launch.evaluate --workdir={workdir} --step={step} --preset=table_aa --num_examples=1000",
      f"  python -m launch.compare --defense={workdir} --base=BASE_WORKDIR --preset=table_aa",
      f"  python -m launch.attention --workdir={workdir} --step={step} --compare=BASE_WORKDIR",
    ]
  )


def _check_step(flag: str, step, workdir: str | None) -> None:
  accepted = "best | latest | a saved step number"
  _need(
    isinstance(step, str) and (step in ("best", "latest") or step.isdigit()), flag, step, accepted
  )
  if step.isdigit() and workdir:
    saved = _saved_steps(workdir)
    _need(int(step) in saved, flag, step, f"{accepted}; {workdir} saved steps {saved}")


def _check_best(flag: str, step, workdir: str) -> None:
  """``--step=best`` needs a checkpoint with validation metrics (checked after every other
  flag, as it reads the checkpoints' metadata)."""
  if step != "best" or not _saved_steps(workdir):
    return
  from agad import checkpoint

  try:
    checkpoint.resolve_step(os.path.join(workdir, "checkpoints"), "best", verify=False)
  except ValueError as e:
    raise ValueError(
      f"--{flag}=best is invalid for {workdir}: {e}".replace(
        "pass --step=latest", f"pass --{flag}=latest"
      )
    ) from None


def check_evaluate_flags(
  *,
  workdir,
  step="best",
  preset=None,
  num_examples=None,
  surrogate=None,
  output=None,
  chunk=1000,
  eval_config=None,
) -> None:
  """``launch.evaluate``'s flags before any work: the workdir (and ``--surrogate``) hold a
  config and checkpoints, ``--step`` names one, ``--preset`` is known, ``--num_examples``
  and ``--chunk`` are positive, and the ``--config.eval.*`` overrides merge over the saved
  ones (``merged_eval_config``)."""
  from agad.evaluation import presets
  from agad.evaluation.defaults import merged_eval_config

  saved = _check_workdir("workdir", workdir)
  _check_step("step", step, workdir)
  _need(
    preset is None or (isinstance(preset, str) and preset in presets.PRESETS),
    "preset",
    preset,
    " | ".join(presets.PRESETS) + " (default: config.eval.preset)",
  )
  _need(
    num_examples is None or (_is_int(num_examples) and num_examples >= 1),
    "num_examples",
    num_examples,
    "an integer >= 1: the first N test images (default: config.eval.num_examples)",
  )
  _need(_is_int(chunk) and chunk >= 1, "chunk", chunk, "an integer >= 1 (examples per cache entry)")
  if surrogate is not None:
    _check_workdir("surrogate", surrogate)
  _need(
    output is None or (isinstance(output, str) and bool(output)),
    "output",
    output,
    "a directory (default: WORKDIR/eval)",
  )
  merged_eval_config(saved.get("eval"), eval_config)
  _check_best("step", step, workdir)


def check_attention_flags(
  *,
  workdir,
  compare=None,
  site="features",
  num_images=16,
  figure_images=8,
  step="best",
  compare_step="best",
  explain="label",
  kinds=None,
  steps=20,
  seed=0,
  output=None,
) -> None:
  """``launch.attention``'s flags before any work (nothing is written on a refusal): the
  workdirs, steps, counts, map kinds, and ``--site`` resolved against every run's model
  (abstract shapes, no weights read)."""
  from agad import data as data_lib, defenses
  from agad import models as models_lib
  from agad.attention import KINDS
  from agad.attention.study import EXPLAIN

  runs = [("workdir", workdir, step, "step")]
  compare = [compare] if isinstance(compare, str) else list(compare or [])
  runs += [("compare", c, compare_step, "compare_step") for c in compare]
  configs = []
  for flag, path, run_step, step_flag in runs:
    configs.append((path, _check_workdir(flag, path)))
    _check_step(step_flag, run_step, path)
  _need(
    _is_int(num_images) and num_images >= 1,
    "num_images",
    num_images,
    "an integer >= 1: the first N test images",
  )
  _need(
    _is_int(figure_images) and figure_images >= 1,
    "figure_images",
    figure_images,
    "an integer >= 1: images drawn in the per-image figures",
  )
  _need(_is_int(steps) and steps >= 1, "steps", steps, "an integer >= 1 (PGD steps)")
  _need(_is_int(seed) and seed >= 0, "seed", seed, "an integer >= 0")
  _need(explain in EXPLAIN, "explain", explain, " | ".join(EXPLAIN))
  bad = [k for k in (kinds or ()) if k not in KINDS]
  _need(
    not bad and (kinds is None or len(kinds) > 0),
    "kinds",
    ",".join(kinds or ()),
    f"comma-separated map kinds from {' | '.join(KINDS)}",
  )
  _need(
    output is None or (isinstance(output, str) and bool(output)),
    "output",
    output,
    "a directory (default: WORKDIR/eval/attention)",
  )
  _need(isinstance(site, str) and bool(site), "site", site, "a site name, e.g. features")
  for path, config in configs:
    info = data_lib.dataset_info(config.data)
    model = defenses.build_model(config, info)
    try:
      models_lib.resolve_site(model, site, tuple(info.image_shape))
    except ValueError as e:
      raise ValueError(
        f"--site={site!r} is invalid for {path} ({config.model.name}): {e}"
      ) from None
  for flag, path, run_step, step_flag in runs:
    _check_best(step_flag, run_step, path)


def unknown_field_message(argv: list[str], error: Exception) -> str:
  """Names the bad ``--config.a.b`` override and the fields that exist at that level."""
  import re

  text = str(error)
  overrides = [a.split("=", 1)[0][2:] for a in argv if a.startswith("--config.")]
  bad = [o for o in overrides if re.search(rf"\b{re.escape(o.split('.')[-1])}\b", text)]
  hint = re.search(r'Did you mean "([^"]+)"', text)
  known = ""
  if bad:
    node = _config_field(argv, ".".join(bad[0].split(".")[:-1]))
    if node is not _MISSING and hasattr(node, "keys"):
      known = f"; fields of {'.'.join(bad[0].split('.')[:-1])}: {', '.join(sorted(node.keys()))}"
  name = re.sub(r"[\\'\"]", "", text.split("\\n")[0]).strip()
  where = f"--{bad[0]}" if bad else f"a --config override ({name!r})"
  return f"FATAL unknown config field in {where}{known}" + (
    f" (did you mean {hint[1]!r}?)" if hint else ""
  )

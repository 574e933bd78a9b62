"""Chaos for training and evaluation: SIGKILL a run at random moments, restart it each time,
and compare the end result bitwise with an uninterrupted run (dev-only; not installed).

  .venv/bin/python tools/chaos_train.py train [--kills=20] [--seed=0] [--root=DIR]
  .venv/bin/python tools/chaos_train.py eval [--kills=3] [--seed=0] [--root=DIR] [--model=WORKDIR]

``train``: one Fashion-MNIST smoke run (``launch.train --config=configs/fashion_mnist.py:
smallcnn,pgd_at,smoke`` with 4 epochs = 48 steps, a checkpoint every 2 steps, async saving as
the config has it, a log line per step) runs uninterrupted, then again in another workdir
where it is killed ``--kills`` times and restarted after each kill. Each kill (seeded) is one of

  startup  a random moment before the launch's first step (imports, restore, compile);
  train    a random moment while it trains (after a random step, a random part of a step);
  save     the moment a checkpoint's temporary folder appears (a write in flight);
  commit   the moment a new step folder appears (orbax may be deleting an old step).

``--kills`` are split over the kinds in proportion (startup 10%, train 40%, save 35%, commit
15%) and shuffled with ``--seed``. A kill *landed during a save* when a temporary checkpoint
folder made by that launch is left behind. Steps recomputed = the last step the killed
launch logged - the step the next launch resumed from. Verdict: the final checkpoint's whole TrainState (params, optimiser
state, BN statistics, EMA, step, PRNG key), data-iterator state and metadata are bitwise
equal to the uninterrupted run's, and both keep the same checkpoint steps.

``eval``: ``launch.evaluate --preset=autoattack`` on a smoke checkpoint (``--model``, else
trained here) with a small chunk, uninterrupted, then again in another output folder killed
``--kills`` times, each time inside a random AutoAttack chunk still to compute (a random part
of a chunk's time after it starts), each rerun resuming from the per-chunk cache. Verdict: the
report (without its wall times and cache counts) and the per-example results are identical.

Exits 1 when a verdict fails. ``--compile_cache=DIR`` shares XLA's compilation cache
between launches (faster; tests/training_test.py's launches share the test run's cache); off
by default, so each launch compiles afresh as a real restart does.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/fashion_mnist.py:smallcnn,pgd_at,smoke"
TRAIN_OVERRIDES = ("--config.checkpoint.every_steps=2", "--config.log_every_steps=1")
# The smoke run's 2 epochs (24 steps) are too few for 20 kills that each let it progress a
# little; 4 epochs (48 steps) leave room (each kill costs ~1 step of progress on average).
EPOCHS = ("--config.num_epochs=4",)
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes step N into "N.orbax-checkpoint-tmp"
KINDS = {"startup": 0.1, "train": 0.4, "save": 0.35, "commit": 0.15}  # kill kind -> probability
_STEP = re.compile(r"loop\.py:\d+\] step (\d+)/(\d+) ")
_RESUMED = re.compile(r"resumed from step (\d+)")
_TRAINING = re.compile(r"loop\.py:\d+\] training ")  # logged once the start step is known
_FINISHED = re.compile(r"already finished \(step (\d+) of")
_CHUNK = re.compile(r"\] +(\S+): (\d+)/(\d+) accuracy so far")


def child_env(compile_cache: str | None = None, **extra) -> dict:
  """A launch's environment: this checkout first on the path; optionally a shared XLA cache."""
  env = dict(os.environ, PYTHONPATH=REPO, **extra)
  env.setdefault("JAX_PLATFORMS", "cpu")
  if compile_cache:
    env.update(
      JAX_COMPILATION_CACHE_DIR=compile_cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
  return env


def train_command(workdir: str, config: str = SMOKE, overrides=TRAIN_OVERRIDES) -> list[str]:
  return [
    sys.executable,
    "-m",
    "launch.train",
    f"--config={config}",
    f"--workdir={workdir}",
    *overrides,
  ]


def smoke_command(workdir: str) -> list[str]:
  """The chaos run of ``train``: the smoke run, 4 epochs, a checkpoint every 2 steps."""
  return train_command(workdir, overrides=(*TRAIN_OVERRIDES, *EPOCHS))


# ------------------------------------------------------------------ one launch
class Launch:
  """A subprocess whose stderr (absl's log) is parsed as it comes: steps done, resume point."""

  def __init__(self, command: list[str], env: dict, log_path: str):
    self.t0 = time.monotonic()
    self.steps: list[tuple[float, int]] = []  # (seconds since start, step logged)
    self.resumed_from = 0
    self.start_known = False  # whether it got as far as choosing its start step
    self.chunks: list[tuple[float, str, int]] = []  # evaluation: (seconds, row, examples done)
    self._log = open(log_path, "a", buffering=1)  # line by line, in order with the child's own
    self._log.write(f"$ {' '.join(command)}\n")
    self._log.flush()
    self.proc = subprocess.Popen(
      command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.proc.stderr:
      self._log.write(line)
      now = time.monotonic() - self.t0
      if m := _STEP.search(line):
        self.steps.append((now, int(m.group(1))))
      elif m := _RESUMED.search(line):
        self.resumed_from = int(m.group(1))
      elif _TRAINING.search(line):
        self.start_known = True
      elif m := _FINISHED.search(line):
        self.resumed_from, self.start_known = int(m.group(1)), True
      elif m := _CHUNK.search(line):
        self.chunks.append((now, m.group(1), int(m.group(2))))

  @property
  def running(self) -> bool:
    return self.proc.poll() is None

  @property
  def last_step(self) -> int:
    return self.steps[-1][1] if self.steps else self.resumed_from

  def kill(self) -> tuple[float, bool]:
    """SIGKILL (this launch's own process only): ``(seconds it ran, whether it was killed)``;
    not killed if it had exited by itself."""
    ran = time.monotonic() - self.t0
    self.proc.send_signal(signal.SIGKILL)  # a no-op once the process has been reaped
    return ran, self.finish() == -signal.SIGKILL

  def finish(self, timeout: float | None = None) -> int:
    code = self.proc.wait(timeout)
    self._reader.join()
    self._log.close()
    return code


def _entries(directory: str) -> dict[str, int]:
  """name -> inode of a folder's entries (an entry made again gets a new inode)."""
  try:
    return {e.name: e.inode() for e in os.scandir(directory)}
  except FileNotFoundError:
    return {}


def _wait_until(launch: Launch, condition, poll: float = 0.001) -> bool:
  """Polls ``condition()`` until true (True) or the launch exits (False)."""
  while launch.running:
    if condition():
      return True
    time.sleep(poll)
  return False


# ------------------------------------------------------------------ training chaos
@dataclasses.dataclass
class Kill:
  kind: str  # planned moment: startup | train | save | commit
  ran_s: float  # how long the launch ran
  phase: str  # where it landed: startup (no step yet) | training
  reached: int | None  # last step the launch logged (its resume point if none; None if
  # it died before choosing one: then the next launch's)
  during_save: bool = False  # a temporary checkpoint folder of this launch was left behind
  left_behind: tuple = ()  # those folders
  resumed: int | None = None  # where the next launch resumed
  lost: int | None = None  # reached - resumed: steps computed again

  def line(self, i: int) -> str:
    save = f", left {', '.join(self.left_behind)}" if self.during_save else ""
    return (
      f"kill {i:2d}: {self.kind:7s} after {self.ran_s:5.1f} s ({self.phase}{save}); "
      f"reached step {self.reached}, resumed from {self.resumed}, "
      f"{self.lost} step(s) recomputed"
    )


def wait_for_moment(
  kind: str,
  rng: random.Random,
  launch: Launch,
  ckdir: str,
  before: dict,
  *,
  startup_s: float,
  step_s: float,
  total: int,
) -> None:
  """Returns at ``kind``'s moment in ``launch`` (or when the launch has ended).

  ``before``: the checkpoint folder's entries when the launch started. A save kill waits for
  the launch's k-th write, k in {1, 2} (so that a run killed at every save still progresses),
  a commit kill for its first commit.
  """
  if kind == "startup":  # a startup kill whose moment comes after the first step lands there
    deadline = rng.uniform(0.0, startup_s)
    _wait_until(launch, lambda: time.monotonic() - launch.t0 >= deadline)
  elif kind == "train":
    # One of the next 4 steps (two checkpoint intervals), then a random part of a step's time:
    # counted in steps, so the moment does not depend on how fast this launch runs.
    if _wait_until(launch, lambda: bool(launch.steps)):
      target = min(launch.resumed_from + rng.randint(1, 4), max(total - 1, launch.resumed_from + 1))
      delay = rng.uniform(0.0, step_s)
      if _wait_until(launch, lambda: launch.last_step >= target):
        start = time.monotonic()
        _wait_until(launch, lambda: time.monotonic() - start >= delay)
  else:
    k, seen = (rng.randint(1, 2) if kind == "save" else 1), set()

    def moment():
      seen.update(
        n
        for n, ino in _entries(ckdir).items()
        if before.get(n) != ino and (n.endswith(TMP_SUFFIX) if kind == "save" else n.isdigit())
      )
      return len(seen) >= k

    _wait_until(launch, moment)


def plan(kills: int, rng: random.Random) -> list[str]:
  """``kills`` kinds in ``KINDS``' proportions (largest remainders round), in a seeded order:
  every kind is represented once ``kills`` allows, which independent draws do not promise."""
  counts = {kind: int(p * kills) for kind, p in KINDS.items()}
  by_remainder = sorted(KINDS, key=lambda kind: counts[kind] - KINDS[kind] * kills)
  for kind in by_remainder[: kills - sum(counts.values())]:
    counts[kind] += 1
  kinds = [kind for kind, n in counts.items() for _ in range(n)]
  rng.shuffle(kinds)
  return kinds


def chaos_train(
  root: str,
  *,
  kills: int,
  seed: int,
  command=smoke_command,
  env=None,
  kinds: list[str] | None = None,
  log=print,
) -> dict:
  """Runs the uninterrupted reference and the killed run under ``root``; returns the figures.

  ``kinds``: the kills' kinds in order (default: ``plan(kills, rng)``).
  """
  env = env or child_env()
  rng = random.Random(seed)
  kinds = kinds or plan(kills, rng)
  ref_dir, run_dir = os.path.join(root, "reference"), os.path.join(root, "killed")
  log_path = os.path.join(root, "launches.log")
  t = time.monotonic()
  ref = Launch(command(ref_dir), env, log_path)
  if ref.finish() != 0:
    raise RuntimeError(f"the reference run failed; see {log_path}")
  ref_s = time.monotonic() - t
  (first_t, _), (last_t, total) = ref.steps[0], ref.steps[-1]
  startup_s, step_s = first_t, (last_t - first_t) / max(total - 1, 1)
  log(
    f"reference: {total} steps in {ref_s:.1f} s (first step after {startup_s:.1f} s, "
    f"then {step_s * 1000:.0f} ms per step incl. saves and validation)"
  )
  log(f"kills planned (seed {seed}): {', '.join(kinds)}")

  ckdir = os.path.join(run_dir, "checkpoints")
  done: list[Kill] = []
  launches, t = 0, time.monotonic()
  # Startup kills: a moment before the first step of a launch like the last one (a restart
  # that loads its compiled programs from a cache starts faster than the reference).
  for kind in [*kinds, None]:  # None: the last launch, left to finish
    before = _entries(ckdir)
    launch = Launch(command(run_dir), env, log_path)
    launches += 1
    if kind is not None:
      wait_for_moment(
        kind, rng, launch, ckdir, before, startup_s=startup_s, step_s=step_s, total=total
      )
      ran, killed = launch.kill()
      if launch.steps:
        startup_s = launch.steps[0][0]
    else:
      killed = launch.finish() == -signal.SIGKILL
    if launch.start_known:  # earlier kills' losses are known once a launch has chosen its start
      for i, k in enumerate(done, 1):
        if k.resumed is None:
          k.reached = launch.resumed_from if k.reached is None else k.reached
          k.resumed, k.lost = launch.resumed_from, k.reached - launch.resumed_from
          log(k.line(i))
    if not killed:  # it ran to the end
      if launch.proc.returncode != 0:
        raise RuntimeError(
          f"launch {launches} failed (exit {launch.proc.returncode}); see {log_path}"
        )
      if kind is not None:
        log(f"launch {launches} finished before its {kind} kill: the run is complete")
      break
    left = tuple(
      sorted(
        n for n, ino in _entries(ckdir).items() if n.endswith(TMP_SUFFIX) and before.get(n) != ino
      )
    )
    reached = launch.last_step if launch.start_known else None
    done.append(
      Kill(kind, ran, "training" if launch.steps else "startup", reached, bool(left), left)
    )
  chaos_s = time.monotonic() - t
  mismatches = compare_runs(ref_dir, run_dir)
  figures = {
    "kills": len(done),
    "launches": launches,
    "during_save": sum(k.during_save for k in done),
    "by_kind": {kind: sum(k.kind == kind for k in done) for kind in KINDS},
    "landed_in_startup": sum(k.phase == "startup" for k in done),
    "recomputed": [k.lost for k in done],
    "recomputed_total": sum(k.lost or 0 for k in done),
    "total_steps": total,
    "reference_s": ref_s,
    "chaos_s": chaos_s,
    "mismatches": mismatches,
    "equal": not mismatches,
    "kill_records": done,
  }
  log(
    f"{figures['kills']} kills ({figures['during_save']} during a save, "
    f"{figures['landed_in_startup']} before the first step), {launches} launches; "
    f"{figures['recomputed_total']} of {total} steps recomputed in all "
    f"(per kill: {figures['recomputed']}); chaos run {chaos_s:.0f} s vs {ref_s:.0f} s"
  )
  log(
    "verdict: "
    + (
      "final TrainState, data-iterator state, metadata and kept steps bitwise "
      "equal to the uninterrupted run"
      if not mismatches
      else "DIFFERENT: " + "; ".join(mismatches)
    )
  )
  return figures


def _json(path: str):
  with open(path) as f:
    return json.load(f)


def compare_runs(a: str, b: str) -> list[str]:
  """Differences between two training workdirs' final checkpoints ([] = bitwise equal)."""
  import jax
  import numpy as np
  from agad import checkpoint as ckpt_lib

  out = []
  steps = [
    sorted(int(d) for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit())
    for w in (a, b)
  ]
  if steps[0] != steps[1]:
    out.append(f"kept steps {steps[0]} vs {steps[1]}")
  (sa, step_a), (sb, step_b) = (ckpt_lib.read_state(w, "latest", with_key=True) for w in (a, b))
  if step_a != step_b:
    out.append(f"final step {step_a} vs {step_b}")
  la, lb = (jax.tree_util.tree_flatten_with_path(s)[0] for s in (sa, sb))
  if [p for p, _ in la] != [p for p, _ in lb]:
    out.append("the TrainStates have different structures")
  else:
    for (path, x), (_, y) in zip(la, lb):
      if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
        out.append(f"state{jax.tree_util.keystr(path)} differs")
  for item in ("data", "meta"):
    ja, jb = (_json(os.path.join(w, "checkpoints", str(step_a), item, "metadata")) for w in (a, b))
    if ja != jb:
      out.append(f"{item} item of step {step_a} differs")
  return out


# ------------------------------------------------------------------ evaluation chaos
def evaluate_command(
  model: str, output: str, num_examples: int, chunk: int, batch: int
) -> list[str]:
  return [
    sys.executable,
    "-m",
    "launch.evaluate",
    f"--workdir={model}",
    "--step=latest",
    "--preset=autoattack",
    f"--num_examples={num_examples}",
    f"--chunk={chunk}",
    f"--output={output}",
    f"--config={SMOKE}",
    f"--config.eval.batch_size={batch}",
  ]


# Report fields that measure this run (time, cache hits) rather than the result.
_RUN_FIELDS = ("wall_time_s", "this_run_s", "cached_chunks", "per_attack_time_s", "times")


def _result_only(x):
  if isinstance(x, dict):
    return {k: _result_only(v) for k, v in x.items() if k not in _RUN_FIELDS}
  if isinstance(x, list):
    return [_result_only(v) for v in x]
  return x


def compare_reports(a: str, b: str) -> list[str]:
  """Differences between two evaluation output folders' reports ([] = identical results)."""
  import numpy as np

  out = []
  reports = [sorted(glob.glob(os.path.join(d, "report_*.json"))) for d in (a, b)]
  if [os.path.basename(p) for p in reports[0]] != [
    os.path.basename(p) for p in reports[1]
  ] or not reports[0]:
    return [f"report files {reports[0]} vs {reports[1]}"]
  for pa, pb in zip(*reports):
    ra, rb = _result_only(_json(pa)), _result_only(_json(pb))
    for key in sorted(set(ra) | set(rb)):
      if ra.get(key) != rb.get(key):
        out.append(f"{os.path.basename(pa)}: {key} differs")
    with np.load(pa[:-5] + ".npz") as fa, np.load(pb[:-5] + ".npz") as fb:
      for key in sorted(set(fa.files) | set(fb.files)):
        if key not in fa.files or key not in fb.files or not np.array_equal(fa[key], fb[key]):
          out.append(f"{os.path.basename(pa)[:-5]}.npz: {key} differs")
  return out


def chaos_eval(
  root: str,
  *,
  kills: int,
  seed: int,
  model: str | None = None,
  num_examples: int = 128,
  chunk: int = 32,
  env=None,
  log=print,
) -> dict:
  """Evaluates uninterrupted, then with ``kills`` SIGKILLs inside AutoAttack chunks; see the
  module docstring. A reference evaluation already under ``root`` is reused."""
  env = env or child_env()
  rng = random.Random(seed)
  log_path = os.path.join(root, "launches.log")
  if model is None:
    model = os.path.join(root, "model")
    launch = Launch(train_command(model, overrides=()), env, log_path)
    if launch.finish() != 0:
      raise RuntimeError(f"training the smoke model failed; see {log_path}")
  command = lambda out: evaluate_command(model, out, num_examples, chunk, chunk)
  ref_out, run_out = os.path.join(root, "eval_reference"), os.path.join(root, "eval_killed")
  timing_path = os.path.join(ref_out, "chaos_timing.json")
  if not os.path.exists(timing_path):
    t = time.monotonic()
    ref = Launch(command(ref_out), env, log_path)
    if ref.finish() != 0:
      raise RuntimeError(f"the reference evaluation failed; see {log_path}")
    with open(timing_path, "w") as f:
      json.dump({"wall_s": time.monotonic() - t, "chunks": ref.chunks}, f)
  timing = _json(timing_path)
  # Each AutoAttack chunk's time: from the previous row's last chunk to its own line.
  times = [t for t, row, _ in timing["chunks"]]
  chunk_s = [
    b - a
    for a, b, (_, row, _) in zip(times, times[1:], timing["chunks"][1:])
    if row.startswith("autoattack")
  ]
  n_chunks = len(chunk_s)
  log(
    f"reference evaluation: {timing['wall_s']:.1f} s; AutoAttack chunks of {chunk} images: "
    + ", ".join(f"{c:.0f}" for c in chunk_s)
    + " s"
  )
  cache = os.path.join(run_out, "cache")

  def cache_entries():
    """Complete cache entries and partial writes; AutoAttack's progress files (what a
    killed chunk goes on from) are neither."""
    entries = glob.glob(os.path.join(cache, "*.npz"))
    entries = [e for e in entries if not e.endswith(".autoattack_progress.npz")]
    return (
      [e for e in entries if not e.endswith(".tmp.npz")],
      [e for e in entries if e.endswith(".tmp.npz")],
    )

  records, launches = [], 0
  for _ in range(kills):
    before = len(cache_entries()[0])
    cached = max(before - n_chunks, 0)  # the clean row's entries come first
    if cached >= n_chunks:
      break
    # The kill: inside a random AutoAttack chunk still to compute, at a random part (10-90%)
    # of the shortest chunk's time after it starts; counted in chunks, so the moment does not
    # depend on how fast this launch runs.
    target, fraction = rng.randint(cached, n_chunks - 1), rng.uniform(0.1, 0.9)
    launch = Launch(command(run_out), env, log_path)
    launches += 1
    row_done = lambda name, n: any(r.startswith(name) and k >= n for _, r, k in launch.chunks)
    started = (
      (lambda: row_done("clean", num_examples))
      if target == 0
      else (lambda: row_done("autoattack", target * chunk))
    )
    if not _wait_until(launch, started):
      launch.finish()
      log(f"launch {launches} finished before its kill")
      break
    start = time.monotonic()
    _wait_until(launch, lambda: time.monotonic() - start >= fraction * min(chunk_s))
    ran, killed = launch.kill()
    lost = time.monotonic() - start
    if not killed:
      log(f"launch {launches} finished before its kill")
      break
    complete, partial = cache_entries()
    records.append(
      {
        "ran_s": ran,
        "chunk": target,
        "entries_before": before,
        "entries_after": len(complete),
        "partial_writes": len(partial),
        "lost_s": lost,
      }
    )
    log(
      f"kill {len(records)}: after {ran:.1f} s, {lost:.1f} s into AutoAttack chunk {target + 1} "
      f"of {n_chunks}; complete cache entries {before} -> {len(complete)}, partial writes "
      f"left {len(partial)}"
    )
  final = Launch(command(run_out), env, log_path)
  launches += 1
  if final.finish() != 0:
    raise RuntimeError(f"the final evaluation failed; see {log_path}")
  report = _json(sorted(glob.glob(os.path.join(run_out, "report_*.json")))[0])
  cached = {r["attack"]: r.get("cached_chunks") for r in report["records"]}
  mismatches = compare_reports(ref_out, run_out)
  log(
    f"{len(records)} kills, {launches} launches; the last launch loaded {cached} chunks from "
    f"the cache; {sum(r['lost_s'] for r in records):.1f} s of attack work lost and recomputed"
  )
  log(
    "verdict: "
    + (
      "report and per-example results identical to the uninterrupted evaluation"
      if not mismatches
      else "DIFFERENT: " + "; ".join(mismatches)
    )
  )
  return {
    "kills": len(records),
    "launches": launches,
    "kill_records": records,
    "cached_chunks_last_launch": cached,
    "chunks": n_chunks,
    "chunk_s": chunk_s,
    "mismatches": mismatches,
    "equal": not mismatches,
  }


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("mode", choices=("train", "eval"))
  parser.add_argument("--kills", type=int, default=None, help="default: 20 (train), 3 (eval)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--root", default=None, help="working folder (default: a new temporary one)")
  parser.add_argument("--keep", action="store_true", help="keep the working folder")
  parser.add_argument("--model", default=None, help="eval: a trained smoke workdir to evaluate")
  parser.add_argument("--num_examples", type=int, default=128)
  parser.add_argument("--chunk", type=int, default=32)
  parser.add_argument("--compile_cache", default=None, help="share XLA's compilation cache here")
  args = parser.parse_args()
  root = args.root or tempfile.mkdtemp(prefix=f"chaos_{args.mode}_")
  os.makedirs(root, exist_ok=True)
  print(f"working folder {root} (launch logs in launches.log)")
  env = child_env(args.compile_cache)
  try:
    if args.mode == "train":
      figures = chaos_train(root, kills=args.kills or 20, seed=args.seed, env=env)
    else:
      figures = chaos_eval(
        root,
        kills=args.kills or 3,
        seed=args.seed,
        model=args.model,
        num_examples=args.num_examples,
        chunk=args.chunk,
        env=env,
      )
  finally:
    if not (args.keep or args.root):
      shutil.rmtree(root, ignore_errors=True)
  return 0 if figures["equal"] else 1


if __name__ == "__main__":
  sys.exit(main())

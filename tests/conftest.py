"""Test set-up: 4 fake CPU devices, configured before anything initialises JAX."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile many tiny programs: cheaper compiles matter more than fast code. Set through
# the environment so that the launch subprocesses of the tests compile the same way.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One persistent compilation cache per test run, shared by the pytest-xdist workers and the
# launch subprocesses (they inherit the environment of the process that starts the run): many
# tests build the same train, eval and init programs. A fresh directory per run, removed at
# exit, so nothing outlives the run.
if "PYTEST_XDIST_WORKER" not in os.environ and "AGAD_TEST_RUN_CACHE" not in os.environ:
  import atexit
  import shutil as _shutil
  import tempfile

  _cache = tempfile.mkdtemp(prefix="agad_test_jax_cache_")
  atexit.register(_shutil.rmtree, _cache, ignore_errors=True)
  os.environ["AGAD_TEST_RUN_CACHE"] = _cache
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)


# ---------------------------------------------------------------- shared smoke checkpoint

import fcntl  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402


def _manifest(workdir):
  """``{relative path: (size, mtime_ns)}`` of every file except the evaluation cache."""
  out = {}
  for root, _, files in os.walk(workdir):
    rel = os.path.relpath(root, workdir)
    if rel == os.path.join("eval", "cache") or rel.startswith(
      os.path.join("eval", "cache") + os.sep
    ):
      continue
    for f in files:
      st = os.stat(os.path.join(root, f))
      out[os.path.join(rel, f)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
  """A finished ``launch.train --config=configs/fashion_mnist.py:smallcnn,pgd_at,smoke`` workdir
  (24 steps, checkpoints at steps 12 and 24), trained once per test session and shared by
  every test and every pytest-xdist worker; its training log (stderr) is ``smoke_workdir +
  ".log"``.

  Read-only for tests: a command that writes into its workdir (launch.evaluate's reports,
  a re-run of launch.train) runs on a copy (``tests.smoke.copy_workdir(smoke_workdir,
  tmp_path / "run")``). Only the evaluation cache (``eval/cache``) may be written; anything
  else that changes is an error at the end of the session.
  """
  from tests import smoke

  if not os.path.exists(smoke.FMNIST):
    pytest.skip("Debian package dataset-fashion-mnist not installed (launch/env.sh installs it)")
  # Under xdist every worker has its own basetemp below the session's one: the first worker
  # to take the lock trains, the others wait for it and reuse the result.
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  # Named after its objective: launch.attention and the notebook label runs by folder name.
  workdir = root / "smoke" / "pgd_at"
  log, failed = root / "smoke" / "pgd_at.log", root / "smoke" / "pgd_at.failed"
  with open(root / "smoke.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not failed.exists() and not log.exists():
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.parent.mkdir(exist_ok=True)
        out = smoke.run_module(
          ["launch.train", f"--config={smoke.SMOKE_CONFIG}", f"--workdir={workdir}"]
        )
        if out.returncode != 0:
          failed.write_text(out.stderr[-5000:])
        else:
          log.write_text(out.stderr)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  if failed.exists():
    pytest.fail(f"training the shared smoke checkpoint failed:\n{failed.read_text()}")
  before = _manifest(workdir)
  yield str(workdir)
  after = _manifest(workdir)
  changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
  assert not changed, f"a test wrote into the shared smoke workdir {workdir}: {changed}"


# ---------------------------------------------------------------- compile profile (opt-in)
# AGAD_TEST_COMPILE_PROFILE=DIR writes, per pytest process, DIR/<worker>.json with each test's
# number of XLA compilations, their seconds (tracing + lowering + backend compile) and its
# wall time: where the suite's time goes (docs/testing.md). Launch subprocesses are not counted.
_PROFILE_DIR = os.environ.get("AGAD_TEST_COMPILE_PROFILE")
if _PROFILE_DIR:
  import json as _json
  import time as _time

  import jax.monitoring as _monitoring

  _profile = {}
  _current = {"test": "<collection>"}

  def _on_duration(event, duration, **_):
    if event.startswith("/jax/core/compile/") or event.startswith("/jax/compilation_cache/"):
      rec = _profile.setdefault(_current["test"], {"compiles": 0, "compile_s": 0.0, "wall_s": 0.0})
      if event == "/jax/core/compile/backend_compile_duration":
        rec["compiles"] += 1
      rec["compile_s"] += duration

  _monitoring.register_event_duration_secs_listener(_on_duration)

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    _current["test"] = item.nodeid
    start = _time.perf_counter()
    yield
    rec = _profile.setdefault(item.nodeid, {"compiles": 0, "compile_s": 0.0, "wall_s": 0.0})
    rec["wall_s"] += _time.perf_counter() - start
    _current["test"] = "<between tests>"

  def pytest_sessionfinish(session, exitstatus):
    os.makedirs(_PROFILE_DIR, exist_ok=True)
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(_PROFILE_DIR, f"{name}.json"), "w") as f:
      _json.dump(_profile, f, indent=1)

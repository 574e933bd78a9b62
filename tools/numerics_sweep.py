"""Every objective and defense spec trains its Fashion-MNIST smoke run to the end with a
finite loss and gradient norm, under each XLA:CPU code path.

  .venv/bin/python tools/numerics_sweep.py [--out=DIR] [--specs=again,fsr,...] [--steps=N]

Code paths: XLA:CPU's default, and the same with its YNN fusions turned off
(``--xla_cpu_experimental_ynn_fusion_type=``). Teacher-based defenses (ATAT, AGKD-BML) and
AFA stage II first train their smoke teacher / stage-I run, as the documented pipelines do.
Prints one line per (spec, code path) and a verdict; exits 1 on any non-finite value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_PATHS = {"default": "", "ynn_off": "--xla_cpu_experimental_ynn_fusion_type="}
SPECS = (
  "standard",
  "pgd_at",
  "trades",
  "mart",
  "alp",
  "iat",
  "cas",
  "again",
  "fsr",
  "afa",
  "trades+awp",
  "trades+again",
  "mart+again",
  "again+awp",
  "trades+fsr",
  "trades+cas",
  "atat",
  "agkd_bml",
  "afa_stage2",
)
# Teacher or first stage: (spec, extra flags) trained once per code path.
PREREQ = {
  "atat": ("smallcnn,standard", []),
  "agkd_bml": (
    "smallcnn,standard",
    [
      "--config.objective.standard.label_smoothing=0.5",
      "--config.objective.standard.smoothing=others",
    ],
  ),
  "afa_stage2": ("smallcnn_bn,afa", []),
}


def _arg(spec: str) -> str:
  return (
    spec
    if "," in spec
    else (f"smallcnn_bn,{spec}" if spec.startswith("afa") else f"smallcnn,{spec}")
  )


def train(
  arg: str, workdir: str, xla_flags: str, extra: list[str], steps: int | None = None
) -> tuple[int, str]:
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO,
    XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip(),
  )
  cmd = [
    sys.executable,
    "-m",
    "launch.train",
    f"--config=configs/fashion_mnist.py:{arg},smoke",
    "--config.log_every_steps=1",
    f"--workdir={workdir}",
    *extra,
  ]
  if steps:
    cmd.append(f"--config.stop_after_steps={steps}")
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  return out.returncode, out.stderr[-2000:]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None, help="workdirs go here (default: a temp dir)")
  parser.add_argument("--specs", default=",".join(SPECS))
  parser.add_argument(
    "--steps",
    type=int,
    default=None,
    help="stop every run (and its teacher / stage I) after this many steps "
    "(default: the whole smoke run, 24 steps)",
  )
  args = parser.parse_args()
  out = args.out or tempfile.mkdtemp(prefix="agad_numerics_")
  failures = 0
  for path_name, xla_flags in CODE_PATHS.items():
    for spec in args.specs.split(","):
      workdir = os.path.join(out, path_name, spec.replace("+", "_"))
      extra = []
      if spec in PREREQ:
        pre_arg, pre_extra = PREREQ[spec]
        pre_dir = workdir + "_prereq"
        rc, err = train(pre_arg, pre_dir, xla_flags, pre_extra, args.steps)
        if rc:
          print(
            f"{path_name:8s} {spec:14s} prerequisite {pre_arg} FAILED: {err[-300:]}", flush=True
          )
          failures += 1
          continue
        extra = [f"--config.init.workdir={pre_dir}"]
        if spec in ("atat", "agkd_bml"):
          extra.append(f"--config.objective.{spec}.teacher.workdir={pre_dir}")
      rc, err = train(_arg(spec), workdir, xla_flags, extra, args.steps)
      lines = []
      metrics = os.path.join(workdir, "metrics.jsonl")
      if os.path.exists(metrics):
        lines = [json.loads(l) for l in open(metrics)]
      losses = [l["train/loss"] for l in lines if "train/loss" in l]
      norms = [l["train/grad_norm"] for l in lines if "train/grad_norm" in l]
      ok = (
        rc == 0
        and losses
        and len(losses) == len(norms)
        and all(math.isfinite(v) for v in losses + norms)
      )
      failures += not ok
      print(
        f"{path_name:8s} {spec:14s} {'ok ' if ok else 'BAD'} steps {len(losses):3d} "
        f"loss {losses[-1] if losses else float('nan'):.4f} "
        f"max grad_norm {max(norms) if norms else float('nan'):.3f}"
        + ("" if ok else f" rc={rc} {err[-300:]}"),
        flush=True,
      )
  print(f"{'all finite' if not failures else f'{failures} FAILED'} ({out})")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())

"""The README's one-machine commands run as pasted (with tiny settings).

A README shell block is run here when the line just before its opening fence
is `<!-- readme-test: one-machine -->`; its commands run in order, in one
scratch folder, each after the previous block's. What the test changes, so
that the run takes minutes, not the demo's half hour:
- `--config=configs/demo.py` becomes `configs/tiny.py` with TINY's overrides
  (the slice reader, a few training and sampler steps, and center TCIA: the
  tiny phantom's CBICA has no held-out patient, which the audit needs);
- optional arguments, written `[--flag=...]`, are left out;
- `/tmp/` becomes the scratch folder, and `make_phantom` gets PHANTOM's flags;
- `python` is this interpreter.
Nothing else: a flag the README names that a binary lacks fails here.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

MARK = "<!-- readme-test: one-machine -->"
TINY = ("--config=configs/tiny.py", "--config.train.reader=grain",
        "--config.train.num_steps=10", "--config.synthesis.backend=pixels",
        "--config.sampler.steps=5", "--config.sampler.resamples=1",
        "--config.sampler.batch_size=4", "--config.train.center=TCIA")
PHANTOM = ("--num_cases=2", "--scale=0.25")


def one_machine_blocks(text: str) -> list[str]:
  """The shell blocks whose opening fence follows the mark, in order."""
  blocks, lines = [], text.splitlines()
  for i, line in enumerate(lines):
    if line.strip() == MARK:
      assert lines[i + 1].startswith("```bash"), f"README line {i + 2}: no bash block"
      end = lines.index("```", i + 2)
      blocks.append("\n".join(lines[i + 2:end]))
  return blocks


def commands(block: str) -> list[str]:
  """A block's commands: continuation lines joined, comments and `[...]` dropped."""
  joined = re.sub(r"\\\n\s*", " ", block)
  out = []
  for line in joined.splitlines():
    line = re.sub(r"\s#.*$", "", line)  # a trailing comment.
    line = re.sub(r"\s*\[[^\]]*\]", "", line).strip()  # an optional argument.
    if line and not line.startswith("#"):
      out.append(line)
  return out


def tiny(command: str, scratch: str) -> list[str]:
  """The command as argv, with the tiny settings of the module docstring."""
  argv = []
  for arg in shlex.split(command.replace("/tmp/", f"{scratch}/")):
    argv.extend(TINY if arg == "--config=configs/demo.py" else [arg])
  if argv[0] == "python":
    argv[0] = sys.executable
  if "launch.make_phantom" in argv:
    argv.extend(PHANTOM)
  return argv


def test_the_blocks_are_found_and_rewritten():
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = one_machine_blocks(f.read())
  assert blocks, f"no block marked {MARK!r} in README.md"
  block = ("python -m launch.x --config=configs/demo.py --workdir=runs/demo \\\n"
           "    --out=/tmp/o [--overwrite] [--a=b|c]   # a comment\n")
  (command,) = commands(block)
  assert tiny(command, "/s") == [
      sys.executable, "-m", "launch.x", *TINY, "--workdir=runs/demo", "--out=/s/o"]


@pytest.mark.slow  # the tiny pipeline and each stage's binary: minutes.
@pytest.mark.ci_slow
def test_the_readme_one_machine_commands_run(tmp_path):
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = one_machine_blocks(f.read())
  os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  ran = []
  for block in blocks:
    for command in commands(block):
      argv = tiny(command, str(tmp_path))
      r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1800)
      assert r.returncode == 0, (command, r.stderr[-3000:])
      assert "Traceback" not in r.stderr, (command, r.stderr[-3000:])
      ran.append(argv[2])
      if ran == ["launch.run_pipeline"]:  # the finished workdir, copied (see below).
        shutil.copytree(tmp_path / "runs/demo", tmp_path / "runs/copy", symlinks=True)
  assert ran[0] == "launch.run_pipeline" and (tmp_path / "runs/demo/report.md").exists()
  assert {"launch.make_phantom", "launch.export_model", "launch.synthesize",
          "launch.evaluate", "launch.privacy_audit"} <= set(ran)

  # The pipeline's finished workdir, copied (times kept, as `cp -a`) before
  # the stage binaries above reran in it, reruns with the same config: every
  # stage is reused and what it prints names the copy, never the workdir it
  # was made in. Only the evaluation's results are rewritten, to name the
  # copy's folders in the reasons of the runs it skipped.
  copy = tmp_path / "runs/copy"
  results = copy / "eval/results.json"
  before = results.read_text()
  mtimes = {p: p.stat().st_mtime_ns for p in copy.rglob("*.json") if p != results}
  r = subprocess.run(tiny("python -m launch.run_pipeline --config=configs/demo.py "
                          "--workdir=runs/copy", str(tmp_path)),
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
  assert results.read_text() == before.replace("runs/demo/", "runs/copy/")
  assert "runs/demo" not in r.stdout and "runs/copy" in r.stdout, r.stdout

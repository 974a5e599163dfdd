"""A user's error ends a binary with one line and exit status 1; a bug keeps its traceback.

Through the real binaries (launch/common.py installs the handling when they
import it); each case stops before any data is read, so each run takes
about a second or two.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from dfgm_jax import errors
from launch import common
from tests.conftest import ROOT


def _run(args, cwd, prefix=()):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONDONTWRITEBYTECODE="1")
  return subprocess.run([*prefix, sys.executable, "-m", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_error_line(r):
  assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, r.stderr[-3000:]
  assert lines[0].startswith("error: "), lines
  return lines[0]


@pytest.mark.parametrize("flags,says", [
    # Parsed while the binary is imported (the default config file).
    (["--config.train.batchsize=8"],
     "error: --config.train.batchsize: the config has no field 'batchsize' "
     "(did you mean 'batch_size'?)"),
    # Parsed inside app.run (a config file given on the command line).
    (["--config=configs/tiny.py", "--config.data.image_sise=8"],
     "error: --config.data.image_sise: the config has no field 'image_sise' "
     "(did you mean 'image_size'?)"),
    # A value outside its range: refused after flag parsing, before main().
    (["--config.data.image_size=0"],
     "error: config.data.image_size=0: must be a positive integer"),
    (["--config.train.batch_size=0"],
     "error: config.train.batch_size=0: must be a positive integer"),
    (["--config=configs/default.py:papr"],
     "error: --config=configs/default.py:papr: unknown variant; valid: default.py ("),
    (["--config=configs/nope.py"],
     "error: --config=configs/nope.py: [Errno 2] No such file or directory"),
])
def test_a_bad_config_ends_in_one_line_naming_field_and_value(flags, says, tmp_path):
  out = tmp_path / "slices"
  r = _run(["launch.preprocess", f"--brats_dir={tmp_path}", f"--out_dir={out}", *flags],
           cwd=ROOT)
  assert _one_error_line(r).startswith(says)
  assert not out.exists()  # refused before any I/O.


@pytest.mark.parametrize("binary,flags,says", [
    ("launch.synthesize_local", ["--mode=magic"],
     "error: flag --mode=magic: value should be one of <harmonise|generate>"),
    ("launch.preprocess", ["--brats_dir=b", "--out_dir=o", "--config.train.batch_size=abc"],
     "error: flag --config.train.batch_size=abc: invalid literal for int()"),
    ("launch.evaluate", ["--workdir=w", "--no_such_flag=1"],
     "error: Unknown command line flag 'no_such_flag'"),
])
def test_a_flag_absl_cannot_parse_ends_in_one_line(binary, flags, says, tmp_path):
  r = _run([binary, *flags], cwd=tmp_path)
  line = _one_error_line(r)
  assert line.startswith(says) and line.endswith("(--helpshort lists the flags)")
  assert "FATAL" not in r.stderr


@pytest.mark.parametrize("binary", ["launch.train_diffusion", "launch.train_federated"])
def test_a_data_dir_the_synthetic_reader_would_ignore_is_refused(binary, tmp_path):
  slices, workdir = tmp_path / "slices", tmp_path / "g1"
  r = _run([binary, "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--data_dir={slices}"], cwd=ROOT)
  assert _one_error_line(r) == (
      f"error: --data_dir={slices}: config.train.reader=synthetic reads no data "
      "(random batches of the right shapes); pass --config.train.reader=grain "
      "(or tf) to train on these slices, or leave --data_dir out")
  assert not workdir.exists()  # refused before training.


def test_a_read_only_output_folder_ends_in_one_line(tmp_path):
  # chmod does not stop root, so as root the binary runs as `nobody`, in a
  # folder nobody can reach.
  prefix = []
  if os.geteuid() == 0:
    setpriv = shutil.which("setpriv")
    assert setpriv, "as root, this test drops privileges with setpriv (util-linux)"
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
  top = tempfile.mkdtemp(dir=tmp_path if not prefix else None)
  try:
    os.chmod(top, 0o755)
    read_only = os.path.join(top, "ro")
    os.mkdir(read_only, 0o555)
    out = os.path.join(read_only, "phantom")
    r = _run(["launch.make_phantom", f"--out_dir={out}", "--num_cases=1",
              "--scale=0.25"], cwd=ROOT, prefix=prefix)
    line = _one_error_line(r)  # names the path it could not write.
    assert line.startswith(f"error: {read_only}") and line.endswith(": Permission denied")
  finally:
    os.chmod(os.path.join(top, "ro"), 0o755)
    shutil.rmtree(top)


_SCRIPT = """
from absl import app
from launch import common
from dfgm_jax import errors

def main(argv):
  {body}

app.run(main)
"""


@pytest.mark.parametrize("body,want", [
    ("raise errors.RunMismatch('runs/g1: another run (train.lr: 0.001 -> 0.002)')",
     "error: runs/g1: another run (train.lr: 0.001 -> 0.002)"),
    ("raise KeyError('t3')", None),  # a bug: the traceback stays.
])
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(body, want, tmp_path):
  script = tmp_path / "binary.py"
  script.write_text(_SCRIPT.format(body=body))
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                     text=True, timeout=120)
  if want:
    assert _one_error_line(r) == want
  else:
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 't3'" in r.stderr


def test_which_errors_are_the_users():
  assert common.user_error_message(errors.ConfigError("config.x=1: bad")) == "config.x=1: bad"
  assert (common.user_error_message(PermissionError(13, "Permission denied", "/o/x"))
          == "/o/x: Permission denied")
  assert common.user_error_message(OSError(30, "Read-only file system", "/o")) == (
      "/o: Read-only file system")
  assert common.user_error_message(FileNotFoundError(2, "No such file", "/x")) is None
  assert common.user_error_message(ValueError("a bug")) is None

r"""Start a Flower run of G1, follow it, and exit non-zero when it fails.

  # A federation whose SuperLink runs (a connection in $FLWR_HOME/config.toml):
  python -m launch.flower_run --superlink=hospitals --workdir=/srv/dfgm/g1_flower \
      --run_config="config='configs/default.py' centers='CBICA,TCIA'"
  # A dry run on this machine: a SuperLink and one SuperNode per center here.
  python -m launch.flower_run --local_sites=CBICA,TCIA --data_dir=W/slices \
      --state_dir=W/fl --workdir=W/g1_flower --run_config="config='configs/demo.py' centers='CBICA,TCIA'"

`flwr run` exits 0 whatever becomes of the run; this exits 0 only when Flower
marks the run completed and the server wrote flower_run.json (checked when
the workdir is on this machine), else 1 with one line: the server's reason (a
site's failure, the sites that never came, ...), or that it was stopped. The
run's log streams meanwhile (`flwr log`). Logic: launch/flower_app/runner.py.
"""

import os

from absl import app
from absl import flags

from launch import common
from dfgm_jax import errors

_SUPERLINK = flags.DEFINE_string(
    "superlink", None, "The flwr CLI's SuperLink connection ($FLWR_HOME/"
    "config.toml); not with --local_sites.")
_LOCAL_SITES = flags.DEFINE_list(
    "local_sites", None, "Centers to run a SuperLink and one SuperNode each for "
    "on this machine (its own Flower home in --state_dir).")
_DATA_DIR = flags.DEFINE_multi_string(
    "data_dir", None, "With --local_sites: the sites' slices, one folder for all "
    "or CENTER=folder per site.")
_STATE_DIR = flags.DEFINE_string(
    "state_dir", None, "With --local_sites: the sites' state (site_<center>/), "
    "the compilation cache, the Flower homes and the processes' logs.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The server's workdir (run "
                               "config workdir), absolute or from here.")
_RUN_CONFIG = flags.DEFINE_multi_string(
    "run_config", [], "Run config: 'key=value ...' or a TOML file, as "
    "`flwr run -c` (config, rounds, local-steps, centers, overrides, ...).")
_APP = flags.DEFINE_string("app", None, "The Flower app (default: this "
                           "repository).")
flags.mark_flags_as_required(["workdir"])


def _data_dirs(values, centers) -> dict:
  """{center: folder} from --data_dir values (a folder, or CENTER=folder)."""
  default, named = None, {}
  for value in values or []:
    center, sep, folder = value.partition("=")
    if sep and "/" not in center:
      if center not in centers:
        raise errors.UserError(f"--data_dir={value}: {center} is not one of "
                               f"--local_sites={','.join(centers)}")
      named[center] = folder
    else:
      default = value
  missing = [c for c in centers if c not in named and default is None]
  if missing:
    raise errors.UserError(f"--data_dir: no folder for {', '.join(missing)} "
                           "(give one folder, or CENTER=folder per site)")
  return {c: named.get(c, default) for c in centers}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from launch.flower_app import runner  # pylint: disable=g-import-not-at-top
  if bool(_SUPERLINK.value) == bool(_LOCAL_SITES.value):
    raise app.UsageError("give --superlink (a running federation) or "
                         "--local_sites (one on this machine), one of them")
  workdir = os.path.abspath(_WORKDIR.value)
  run_config = list(_RUN_CONFIG.value) + [f"workdir={workdir!r}"]
  app_dir = _APP.value or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done_file = os.path.join(workdir, runner.DONE_FILE)
  if _SUPERLINK.value:
    result = runner.run_and_follow(app_dir, _SUPERLINK.value, run_config,
                                   runner.flwr_env(), done_file=done_file
                                   if os.path.isdir(workdir) else None)
  else:
    if not _STATE_DIR.value:
      raise app.UsageError("--local_sites needs --state_dir")
    common.require_local(state_dir=_STATE_DIR.value, workdir=workdir)
    state = os.path.abspath(_STATE_DIR.value)
    sites = {c: (d, os.path.join(state, f"site_{c}"))
             for c, d in _data_dirs(_DATA_DIR.value, _LOCAL_SITES.value).items()}
    with runner.LocalDeployment(state, sites, cache_dir=os.path.join(
        state, "xla_cache")) as deployment:
      result = runner.run_and_follow(app_dir, deployment.CONNECTION, run_config,
                                     deployment.env, done_file=done_file)
  if result.code:
    raise errors.UserError(result.message)
  print(result.message, flush=True)


if __name__ == "__main__":
  app.run(main)

"""The XLA flags the binaries add (dfgm_jax/platform.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from dfgm_jax import platform
from tests.conftest import ROOT

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_flag_added_once_only_for_measured_versions(monkeypatch):
  monkeypatch.setattr(platform, "_jaxlib_version", lambda: "0.10.2")
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert platform.apply_xla_flags(env) == [f"{FLAG}="]
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}="
  assert platform.apply_xla_flags(env) == []  # already there: unchanged.
  user = {"XLA_FLAGS": f"{FLAG}=dot"}
  assert platform.apply_xla_flags(user) == [] and user["XLA_FLAGS"] == f"{FLAG}=dot"
  off = {"DFGM_XLA_TUNING": "0"}
  assert platform.apply_xla_flags(off) == [] and "XLA_FLAGS" not in off
  monkeypatch.setattr(platform, "_jaxlib_version", lambda: "0.11.2")
  other = {}
  assert platform.apply_xla_flags(other) == [] and "XLA_FLAGS" not in other


_FORWARD = """
import sys; sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from configs import tiny
from dfgm_jax.diffusion import denoiser
d = denoiser.Denoiser.init(tiny.get_config())
leaves, tree = jax.tree.flatten(d.params)  # off the zero init of the output conv.
rng = np.random.default_rng(1)
params = jax.tree.unflatten(tree, [a + 0.05 * rng.normal(size=a.shape).astype(a.dtype)
                                   for a in leaves])
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 1)), jnp.float32)
m = jnp.zeros((2, 32, 32, 1)).at[:, 10:20, 10:20].set(1.0)
out = jax.jit(lambda p: d.eps_fn(p)(x, jnp.array([10, 900]), jnp.ones(2, jnp.int32),
                                    m, m))(params)
np.save({out!r}, np.asarray(out))
"""


def test_flag_does_not_change_the_network_output(tmp_path):
  tuned = {"XLA_FLAGS": ""}
  if not platform.apply_xla_flags(tuned):
    pytest.skip(f"no flag is measured for jaxlib {platform._jaxlib_version()}")
  outs = []
  for name, xla_flags in (("default", ""), ("tuned", tuned["XLA_FLAGS"])):
    path = str(tmp_path / f"{name}.npy")
    env = dict(os.environ, XLA_FLAGS=xla_flags, DFGM_XLA_TUNING="0")
    r = subprocess.run([sys.executable, "-c", _FORWARD.format(root=ROOT, out=path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    outs.append(np.load(path))
  assert np.abs(outs[0]).max() > 0
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)

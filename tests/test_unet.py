"""Tests of the denoiser UNet (dfgm_jax/models/unet.py, ALGORITHM.md 4.3)."""

import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfgm_jax.models import blocks
from dfgm_jax.models import unet as U

BATCH = 2
PEER_PARAMS = 19_197_569  # diffusers UNet2DModel of bench/diffusers_flops.py.


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  # XLA:CPU optimisation passes dominate compile time of these tiny graphs.
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


_APPLY = {}


def apply_fn(model):
  """A jitted functional forward pass (params as an argument), one per cfg."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  key = (model.cfg, graphdef)
  if key not in _APPLY:
    def apply(params, *inputs, **kwargs):
      return nnx.merge(graphdef, params, rest)(*inputs, **kwargs)
    _APPLY[key] = jax.jit(apply, static_argnames="train")
  return _APPLY[key], params


def make_inputs(cfg, seed=0, batch=BATCH):
  rng = np.random.default_rng(seed)
  s = cfg.image_size
  x = rng.standard_normal((batch, s, s, cfg.in_channels)).astype(np.float32)
  t = rng.integers(0, 1000, (batch,)).astype(np.int32)
  c = rng.integers(0, 2, (batch,)).astype(np.int32)
  ring = (rng.random((batch, s, s, 1)) < 0.2).astype(np.float32)
  tumor = (rng.random((batch, s, s, 1)) < 0.2).astype(np.float32) * (1 - ring)
  return [jnp.asarray(a) for a in (x, t, c, ring, tumor)]


def randomize(params, seed=0, keep=lambda path: False):
  """Adds fan-in-scaled noise to every parameter (zero-init ones included)."""
  rng = np.random.default_rng(seed)

  def noise(path, p):
    if keep(path):
      return p
    scale = 1 / math.sqrt(math.prod(p.shape[:-1])) if p.ndim > 1 else 0.1
    return p + jnp.asarray(rng.standard_normal(p.shape) * scale, p.dtype)

  return jax.tree_util.tree_map_with_path(noise, params)


def path_str(path):
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


@functools.lru_cache(maxsize=None)
def abstract(name):
  return U.abstract_model(U.get_preset(name))


@pytest.fixture(scope="module")
def tiny():
  return U.create_model(U.get_preset("tiny"), 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_shape_dtype_and_param_dtype(dtype):
  cfg = U.get_preset("tiny", dtype=dtype)
  model = U.create_model(cfg, 0)
  apply, params = apply_fn(model)
  out = apply(params, *make_inputs(cfg))
  assert out.shape == (BATCH, cfg.image_size, cfg.image_size, 1)
  assert out.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  # Activations really are in the compute dtype: the convs see it.
  jaxpr = jax.make_jaxpr(apply)(params, *make_inputs(cfg))
  assert jnp.dtype(cfg.compute_dtype) in conv_input_dtypes(jaxpr.jaxpr)


def conv_input_dtypes(jaxpr):
  """Dtypes of the activations entering every conv, sub-jaxprs included."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      found.add(eqn.invars[0].aval.dtype)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr.
        if hasattr(sub, "eqns"):
          found |= conv_input_dtypes(sub)
  return found


def test_bfloat16_close_to_float32(tiny):
  inputs = make_inputs(tiny.cfg)
  apply32, params = apply_fn(tiny)
  params = randomize(params)
  apply16, _ = apply_fn(U.create_model(U.get_preset("tiny", dtype="bfloat16")))
  y32, y16 = apply32(params, *inputs), apply16(params, *inputs)
  assert y16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
  assert rel < 0.05, rel


def test_param_counts_per_preset(tiny):
  counts = {name: U.count_params(abstract(name)) for name in U.PRESETS}
  print("parameter counts:", counts)
  # The peer preset is the diffusers network, to the parameter.
  assert counts["peer"] == PEER_PARAMS
  # small = peer + FiLM (a second time projection per ResBlock) + the
  # SpatialEncoder + class embedding: 5.3 % more parameters (1.7 % more
  # FLOPs), so the +-3 % asked of it cannot hold with FiLM.
  assert abs(counts["small"] / PEER_PARAMS - 1) < 0.06
  assert counts["peer"] < counts["small"] < counts["full"] < counts["large"]
  leaves = jax.tree.leaves(nnx.state(tiny, nnx.Param))
  assert counts["tiny"] == sum(x.size for x in leaves) == U.count_params(tiny)


def test_zero_init(tiny):
  apply, params = apply_fn(tiny)
  inputs = make_inputs(tiny.cfg)
  assert not np.any(np.asarray(apply(params, *inputs)))
  injects = [m.inject for _, m in nnx.iter_modules(tiny)
             if isinstance(m, U.SpatialLevel)]
  assert len(injects) == len(tiny.cfg.channel_mult)
  for conv in injects:
    assert not np.any(np.asarray(conv.kernel[...]))
    assert not np.any(np.asarray(conv.bias[...]))

  # With the injections still zero, the SpatialEncoder's hidden convs have
  # no effect even on an otherwise trained (random) network.
  def is_inject(path):
    return "inject" in path_str(path)

  trained = randomize(params, seed=1, keep=is_inject)
  y = apply(trained, *inputs)
  changed = jax.tree_util.tree_map_with_path(
      lambda path, p: p + 1.0 if "spatial" in path_str(path)
      and not is_inject(path) else p, trained)
  np.testing.assert_array_equal(np.asarray(apply(changed, *inputs)), y)


def test_output_depends_on_every_input(tiny):
  apply, params = apply_fn(tiny)
  params = randomize(params, seed=2)
  x, t, c, ring, tumor = make_inputs(tiny.cfg)
  y = np.asarray(apply(params, x, t, c, ring, tumor))
  assert np.abs(y).max() > 0
  variants = {
      "x_t": (x + 0.5, t, c, ring, tumor),
      "t": (x, (t + 300) % 1000, c, ring, tumor),
      "class": (x, t, 1 - c, ring, tumor),
      "ring": (x, t, c, 1 - ring, tumor),
      "tumor": (x, t, c, ring, 1 - tumor),
  }
  for name, args in variants.items():
    diff = np.abs(np.asarray(apply(params, *args)) - y).max()
    assert diff > 1e-4, name


def test_attention_impl_none_vs_xla(tiny):
  inputs = make_inputs(tiny.cfg)
  apply_none, params = apply_fn(tiny)
  params = randomize(params, seed=3)
  xla_model = U.create_model(U.get_preset("tiny", attention_impl="xla"), 0)
  apply_xla, _ = apply_fn(xla_model)
  np.testing.assert_allclose(apply_xla(params, *inputs),
                             apply_none(params, *inputs), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("with_key", [True, False])
def test_functional_grads_finite(with_key):
  cfg = U.get_preset("tiny", dropout=0.1, remat=with_key)
  model = U.create_model(cfg, 0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x, t, c, ring, tumor = make_inputs(cfg)

  def loss_fn(params, key):
    net = nnx.merge(graphdef, params, rest)
    eps = net(x, t, c, ring, tumor, train=key is not None, dropout_key=key)
    return jnp.mean((eps - x) ** 2)

  key = jax.random.key(0) if with_key else None
  if cfg.remat:  # Every ResBlock is rematerialised.
    prims = [e.primitive.name for e in
             jax.make_jaxpr(loss_fn)(params, key).jaxpr.eqns]
    num_res = sum(isinstance(m, blocks.ResBlock)
                  for _, m in nnx.iter_modules(model))
    assert sum(p in ("remat2", "checkpoint") for p in prims) == num_res
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, key)
  assert np.isfinite(float(loss))
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(np.asarray(g))), path_str(path)
  # The zero-initialised output conv is where learning starts.
  assert np.abs(np.asarray(grads["out_conv"]["kernel"][...])).max() > 0


def test_dropout_key_semantics():
  cfg = U.get_preset("tiny", dropout=0.5)
  model = U.create_model(cfg, 0)
  apply, params = apply_fn(model)
  params = randomize(params, seed=4)
  inputs = make_inputs(cfg)
  with pytest.raises(ValueError, match="dropout_key"):
    model(*inputs, train=True)
  k0, k1 = jax.random.key(0), jax.random.key(1)
  eval_out = apply(params, *inputs)
  np.testing.assert_array_equal(apply(params, *inputs, dropout_key=k0),
                                eval_out)  # train=False: no dropout.
  a = apply(params, *inputs, train=True, dropout_key=k0)
  b = apply(params, *inputs, train=True, dropout_key=k0)
  c = apply(params, *inputs, train=True, dropout_key=k1)
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a - c)).max() > 0
  assert np.abs(np.asarray(a - eval_out)).max() > 0


def attention_blocks(model):
  return [m for _, m in nnx.iter_modules(model)
          if isinstance(m, blocks.AttentionBlock)]


@pytest.mark.parametrize("name", ["tiny", "small", "large"])
def test_attention_at_configured_resolutions(name, monkeypatch):
  cfg = U.get_preset(name)
  model = abstract(name)
  blocks = attention_blocks(model)
  levels = cfg.attention_levels
  assert {cfg.level_resolutions[l] for l in levels} == set(
      cfg.attention_resolutions) & set(cfg.level_resolutions)
  # Encoder + decoder blocks at those levels, plus the middle block.
  assert len(blocks) == len(levels) * (2 * cfg.num_res_blocks + 1) + 1
  for b in blocks:
    assert b.resolution in cfg.attention_resolutions
    level = cfg.level_resolutions.index(b.resolution)
    assert b.norm.scale.shape == (cfg.level_channels[level],)
    assert b.num_heads == cfg.level_channels[level] // cfg.head_channels
  # At run time attention sees exactly resolution**2 tokens.
  seen = []
  real = jax.nn.dot_product_attention

  def spy(q, k, v, **kw):
    seen.append((q.shape[1], q.shape[2] * q.shape[3]))
    return real(q, k, v, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  out = jax.eval_shape(lambda m, *a: m(*a), model,
                       *U.example_inputs(cfg, batch=1))
  assert out.shape == (1, cfg.image_size, cfg.image_size, cfg.in_channels)
  assert sorted(seen) == sorted((b.resolution ** 2, b.norm.scale.shape[0])
                                for b in blocks)


@pytest.mark.parametrize("overrides", [
    dict(resblock_updown=True),
    dict(num_classes=0, use_spatial_encoder=False, scale_shift_norm=False),
    dict(spatial_encoder_channels=0, in_channels=2),
])
def test_config_variants_run(overrides):
  cfg = U.get_preset("tiny", **overrides)
  model = U.create_model(cfg, jax.random.key(0))
  x, t, c, ring, tumor = make_inputs(cfg)
  if not cfg.num_classes:
    c = None
  out = jax.eval_shape(lambda m: m(x, t, c, ring, tumor), model)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert (U.count_params(model)
          == U.count_params(U.abstract_model(cfg)))
  if not cfg.spatial_encoder_enabled:
    assert not any(isinstance(m, U.SpatialLevel)
                   for _, m in nnx.iter_modules(model))


def test_create_model_is_deterministic_and_seeded(tiny):
  cfg = tiny.cfg
  a = nnx.state(tiny, nnx.Param)
  b = nnx.state(U.create_model(cfg, jax.random.key(0)), nnx.Param)
  c = nnx.state(U.create_model(cfg, 1), nnx.Param)
  same = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)
  assert all(jax.tree.leaves(same))
  differ = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, c)
  assert not all(jax.tree.leaves(differ))


def test_norm_impls_give_the_same_network():
  """Both GroupNorm forms compute the same UNet; 'auto' is the CPU form here."""
  outs, dots = {}, {}
  for impl in ("auto", "channels", "groups"):
    model = U.create_model(U.get_preset("tiny", norm_impl=impl), rng=0)
    inputs = make_inputs(model.cfg)
    fn, params = apply_fn(model)
    params = randomize(params)  # zero-initialised convs would hide a difference.
    outs[impl] = np.asarray(fn(params, *inputs))
    dots[impl] = str(jax.make_jaxpr(fn)(params, *inputs)).count("dot_general")
  np.testing.assert_allclose(outs["channels"], outs["groups"], atol=1e-5)
  np.testing.assert_array_equal(outs["auto"], outs["channels"])
  # The channel form adds two 0/1 matmuls per GroupNorm to the program.
  assert dots["auto"] == dots["channels"] > dots["groups"]
  with pytest.raises(ValueError, match="norm_impl"):
    U.get_preset("tiny", norm_impl="fast")


def test_parameter_paths_are_the_export_format():
  """Exports and checkpoints are read by leaf path; renames break them."""
  params = nnx.state(abstract("tiny"), nnx.Param)
  paths = {path_str(p).removesuffix("/.value")
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  for want in ("conv_in/kernel", "time_fc1/kernel", "time_fc2/bias",
               "class_embed/embedding", "spatial/1/inject/kernel",
               "down/0/res/0/conv1/kernel", "down/0/res/0/emb_proj/kernel",
               "down/0/res/0/norm1/scale", "down/0/resample/conv/kernel",
               "down/1/res/0/skip/kernel", "down/1/attn/0/qkv/kernel",
               "mid/res1/norm2/bias", "mid/attn/proj/kernel",
               "up/0/res/1/conv2/kernel", "up/0/resample/conv/bias",
               "out_norm/scale", "out_conv/kernel"):
    assert want in paths, want
  leaf_modules = {p.rsplit("/", 2)[-2] for p in paths}
  assert leaf_modules == {
      "conv_in", "time_fc1", "time_fc2", "class_embed", "conv1", "conv2",
      "inject", "emb_proj", "norm1", "norm2", "skip", "conv", "norm", "qkv",
      "proj", "out_norm", "out_conv"}

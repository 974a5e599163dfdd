"""dfgm_jax/stage_io.py: atomic writes that leave identical files alone."""

import os

from dfgm_jax import stage_io


def test_write_text_rewrites_only_what_changed(tmp_path):
  path = str(tmp_path / "a.json")
  stage_io.write_json(path, {"x": 1})
  os.utime(path, ns=(1, 1))  # an old mtime: any rewrite would move it.
  stage_io.write_json(path, {"x": 1})
  assert os.stat(path).st_mtime_ns == 1
  stage_io.write_json(path, {"x": 2})
  assert os.stat(path).st_mtime_ns != 1 and stage_io.read_json(path) == {"x": 2}
  assert os.listdir(tmp_path) == ["a.json"]  # no temporary file left behind.

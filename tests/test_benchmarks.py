"""The benchmark binaries print one JSON line with the documented keys."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SAMPLER_KEYS = {"preset", "image_size", "batch_size", "steps", "jump_length",
                "resamples", "dtype", "nfe_per_image", "images_per_s",
                "nfe_images_per_s", "tflops", "peak_fraction", "compile_s",
                "peak_memory_bytes", "devices"}


def _json_lines(args):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]


def _json_line(args):
  lines = _json_lines(args)
  assert len(lines) == 1, lines
  return lines[0]


def test_sampler_benchmark_line_and_profile(tmp_path):
  out, prof = _json_lines([
      "launch.benchmark_sampler", "--config=configs/benchmark.py:cpu",
      "--config.model.preset=tiny", "--config.model.overrides.image_size=32",
      "--config.data.image_size=32", "--config.sampler.steps=4",
      "--config.sampler.resamples=2", "--config.sampler.jump_length=2",
      "--config.bench.reps=1", f"--config.bench.profile_dir={tmp_path}"])
  assert SAMPLER_KEYS <= set(out)
  assert out["nfe_per_image"] == 6  # S=4, jl=2, r=2: one jump of 2 steps.
  assert out["images_per_s"] > 0 and out["finite"] and out["devices"] == 1
  # The profile line: one sampler call, broken down by kind of work. Its
  # FLOPs, read from the HLO, are the analytic count x NFE x batch (tiny at
  # 32 px: 0.1645 GFLOP per image and call).
  assert prof["benchmark"] == "sampler_profile" and prof["calls"] == 1
  want = out["forward_gflops_per_image"] * out["nfe_per_image"] * out["batch_size"]
  assert abs(prof["gflop"] - want) < 0.01 * want
  assert prof["categories"]["convolution"]["ms"] > 0
  assert abs(sum(c["share"] for c in prof["categories"].values()) - 1) < 1e-3
  rows = json.load(open(prof["ops_table"]))
  assert len(rows) >= len(prof["top_ops"]) and rows[0] == prof["top_ops"][0]


def test_train_benchmark_line():
  out = _json_line(["launch.benchmark_train", "--config=configs/benchmark.py:cpu",
                    "--config.model.preset=tiny", "--config.model.overrides.image_size=32",
                    "--config.data.image_size=32", "--config.bench.steps=1",
                    "--config.bench.warmup_steps=0"])
  assert {"images_per_s", "step_time_s", "compile_s", "params", "train_flops_per_image",
          "tflops", "peak_fraction"} <= set(out)
  assert out["params"] > 0 and out["images_per_s"] > 0


def test_sampler_benchmark_reads_an_exported_model(tmp_path):
  import jax
  from configs import tiny
  from dfgm_jax import model_io
  from dfgm_jax.train import diffusion
  config = tiny.get_config()
  _, _, state = diffusion.init_state(config)
  export = model_io.export(state["ema"], config, 7, str(tmp_path / "model"))
  out = _json_line(["launch.benchmark_sampler", "--config=configs/benchmark.py:cpu",
                    f"--config.bench.checkpoint_dir={export}", "--config.sampler.steps=2",
                    "--config.bench.reps=1"])
  # The export's network (tiny at 32 px) runs, with its trained weights.
  assert out["weights"] == "ema@7" and out["preset"] == "tiny"
  assert out["image_size"] == 32
  assert out["params"] == sum(x.size for x in jax.tree.leaves(state["ema"]))


def test_cpu_bench_alternates_and_summarises(tmp_path):
  # A stand-in peer that prints the peer script's line (it needs torch otherwise).
  peer = tmp_path / "peer.py"
  peer.write_text("import json\nprint('torch x')\n"
                  "print(json.dumps({'mode': 'fp32', 'images_per_s': 2.0}))\n")
  env = dict(os.environ, PY=sys.executable, PEER_PYTHON=sys.executable, PEER_SCRIPT=str(peer),
             ROUNDS="2", TF_CPP_MIN_LOG_LEVEL="3",
             SAMPLER_FLAGS="--config.model.preset=tiny --config.model.overrides.image_size=32 "
                           "--config.data.image_size=32 --config.sampler.steps=2 "
                           "--config.bench.reps=1")
  r = subprocess.run(["bash", "launch/cpu_bench.sh"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
  ours = [d for d in lines if d.get("benchmark") == "sampler"]
  assert [d.get("mode") for d in lines[:4]] == [None, "fp32", None, "fp32"]  # alternated
  assert len(ours) == 2 and all(d["preset"] == "tiny" for d in ours)
  summary = lines[-1]
  assert summary["summary"] == "cpu_sampler_vs_peer" and summary["rounds"] == 2
  assert summary["peer_images_per_s"] == [2.0, 2.0]
  med = sorted(d["images_per_s"] for d in ours)
  assert summary["ours_median"] == sum(med) / 2
  assert summary["ratio_of_medians"] == round(summary["ours_median"] / 2.0, 3)

"""The benchmark binaries print one JSON line with the documented keys."""

import json
import os
import subprocess
import sys

import pytest

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


TINY = ("--config.model.preset=tiny --config.model.overrides.image_size=32 "
        "--config.data.image_size=32 --config.bench.reps=1")


@pytest.mark.slow
@pytest.mark.ci_slow
def test_gpu_bench_script_dry_run_on_cpu(tmp_path):
  """launch/gpu_bench.sh end to end with tiny flags: the script the scarce GPU
  time goes to, checked here first. Each run leaves its JSON lines in OUT."""
  peer = tmp_path / "peer.py"  # a stand-in: the real peer needs torch.
  peer.write_text("import json, os\n"
                  "print(json.dumps({'mode': os.environ['MODES'], 'images_per_s': 3.0}))\n")
  out = tmp_path / "out"
  flags = (TINY + " --config.sampler.batch_size=2 --config.train.batch_size=2 "
           "--config.sampler.steps=4 --config.sampler.resamples=2 "
           "--config.sampler.jump_length=2 --config.bench.steps=1 "
           "--config.bench.warmup_steps=0 --config.model.dtype=float32 "
           "--config.seg.width=4 --config.seg.depth=1 --config.seg.batch_size=2 "
           "--config.seg.seeds=0,1")
  env = dict(os.environ, PY=sys.executable, OUT=str(out), TRACES=str(tmp_path / "traces"),
             PEER_SCRIPT=str(peer), BENCH_FLAGS=flags, SKIP="sampler_cudnn",
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
  r = subprocess.run(["bash", "launch/gpu_bench.sh"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "skip sampler_cudnn" in r.stdout

  def lines(name):
    return [json.loads(l) for l in (out / f"{name}.json").read_text().splitlines()]

  sampler, prof = lines("sampler_xla")
  assert SAMPLER_KEYS <= set(sampler)
  assert sampler["nfe_per_image"] == 6  # S=4, jl=2, r=2: one jump of 2 steps.
  assert sampler["images_per_s"] > 0 and sampler["finite"] and sampler["devices"] == 1
  # The profile line: one sampler call, broken down by kind of work. Its
  # FLOPs, read from the HLO, are the analytic count x NFE x batch.
  assert prof["benchmark"] == "sampler_profile" and prof["calls"] == 1
  want = sampler["forward_gflops_per_image"] * sampler["nfe_per_image"] * sampler["batch_size"]
  assert abs(prof["gflop"] - want) < 0.01 * want
  assert prof["categories"]["convolution"]["ms"] > 0
  assert abs(sum(c["share"] for c in prof["categories"].values()) - 1) < 1e-3
  rows = json.loads((out / "sampler_ops.json").read_text())
  assert len(rows) >= len(prof["top_ops"]) and rows[0] == prof["top_ops"][0]
  assert lines("peer") == [{"mode": "bf16_compile", "images_per_s": 3.0}]
  # The run-specific flag wins over BENCH_FLAGS: no jumps, S=4 calls.
  assert lines("sampler_nojump")[0]["nfe_per_image"] == 4
  assert lines("sampler_gn_channels")[0]["finite"]
  train, train_prof = lines("train")
  assert {"images_per_s", "step_time_s", "compile_s", "params", "train_flops_per_image",
          "tflops", "peak_fraction"} <= set(train)
  assert train["params"] > 0 and train["images_per_s"] > 0
  assert train_prof["benchmark"] == "train_profile" and train_prof["calls"] == 3
  assert (out / "train_ops.json").exists()
  (seg,) = lines("train_seg")
  assert seg["benchmark"] == "train_seg" and seg["seeds"] == 2 and seg["width"] == 4
  assert seg["stacked"]["images_per_s"] > 0 and seg["one_at_a_time"]["images_per_s"] > 0


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


def test_checkpoint_dir_names_the_model_folder_bucket_urls_included():
  from launch import benchmark_common
  assert benchmark_common.model_dir_of("gs://b/run/checkpoints/") == "gs://b/run"
  assert benchmark_common.model_dir_of("gs://b/model") == "gs://b/model"
  assert benchmark_common.model_dir_of("runs/g1/checkpoints") == "runs/g1"
  assert benchmark_common.model_dir_of("checkpoints") == "."


SEG_KEYS = {"image_size", "batch_size", "width", "depth", "seeds", "devices",
            "platform", "params_per_seed", "stacked", "one_at_a_time",
            "stacked_speedup"}


def test_train_benchmark_of_the_segmenter_stacked_and_one_at_a_time():
  """bench.model=seg: one line, the seeds trained stacked and one at a time.

  In process (the binary is flags + train_benchmark, run by gpu_bench.sh's
  test): a subprocess would add its imports to the test's time.
  """
  from configs import benchmark
  from launch import benchmark_common
  config = benchmark.get_config("cpu")
  config.bench.model = "seg"
  config.data.image_size = 16
  config.seg.update(width=4, depth=2, batch_size=2, seeds=(3, 5))
  config.bench.update(steps=1, warmup_steps=0)
  lines = benchmark_common.train_benchmark(config)
  assert len(lines) == 1, lines
  line = json.loads(json.dumps(lines[0]))  # what the binary prints
  assert SEG_KEYS <= set(line) and line["benchmark"] == "train_seg"
  assert (line["image_size"], line["width"], line["depth"], line["seeds"]) == (16, 4, 2, 2)
  assert line["platform"] == "cpu" and line["devices"] == 1 and line["finite"]
  assert line["params_per_seed"] > 0
  for mode in ("stacked", "one_at_a_time"):
    r = line[mode]
    assert r["images_per_s"] > 0 and r["step_time_s"] > 0 and r["compile_s"] > 0, mode
    # Total = seeds x per seed (rounding aside).
    assert abs(r["images_per_s"] - 2 * r["images_per_s_per_seed"]) < 0.02, r
  # Stacked: one step of both seeds; one at a time: one seed's step, twice.
  st, one = line["stacked"], line["one_at_a_time"]
  assert abs(st["images_per_s"] - 2 * 2 / st["step_time_s"]) < 0.02 * st["images_per_s"] + 0.01
  assert abs(one["images_per_s"] - 2 / one["step_time_s"]) < 0.02 * one["images_per_s"] + 0.01
  assert abs(line["stacked_speedup"] - st["images_per_s"] / one["images_per_s"]) < 0.01 * line["stacked_speedup"] + 0.002


def test_train_benchmark_refuses_an_unknown_model():
  import pytest
  from configs import benchmark
  from dfgm_jax import errors
  from launch import benchmark_common
  config = benchmark.get_config("cpu")
  config.bench.model = "vae"
  with pytest.raises(errors.ConfigError, match="config.bench.model='vae'"):
    benchmark_common.train_benchmark(config)

"""benchmark.py's GPU measurements (`make bench-gpu`) on tiny shapes on the CPU: the code paths a GPU run takes, so
that a renamed attribute fails here and not on the first GPU a user lends it."""
import argparse
import json
import subprocess
import sys

import benchmark
from conftest import ROOT


def test_prepare_cnn_check_and_rates_on_cpu(capsys):
    """`benchmark.py prepare --cnn`: prepare.FrameEncoder's features equal a direct forward pass of its network on
    4 distinct batches (the check raises SystemExit otherwise), then both rates are printed."""
    benchmark._bench_prepare_cnn(argparse.Namespace(device="cpu", cnn_batch=4, size=64, cnn_steps=1))
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["what"] == "prepare_cnn" and rec["batch"] == 4 and rec["size"] == 64
    assert rec["frame_encoder_fps"] > 0 and rec["plain_bf16_fps"] > 0
    assert 0 <= rec["check_max_abs_diff"] <= 0.02 * rec["check_feature_max"]


def test_gpu_step_benchmark_runs_on_cpu():
    """`benchmark.py gpu --tiny`: the pre-training step's clips/s and FLOPs, eager, without the anchor."""
    proc = subprocess.run([sys.executable, "benchmark.py", "gpu", "--tiny", "--device", "cpu", "--batches", "4",
                           "--modes", "eager", "--steps", "2", "--warmup", "1", "--no-anchor"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert recs[0]["device"] == "cpu" and recs[0]["train_gflop_per_clip"] > 0
    steps = [r for r in recs if r.get("what") == "pretrain_step"]
    assert len(steps) == 1 and steps[0]["batch"] == 4 and steps[0]["compiled"] is False
    assert steps[0]["clips_per_s"] > 0

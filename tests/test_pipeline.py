"""The whole method end to end on a tiny synthetic corpus, through the command lines a user types.

synth.py writes real media files; the design-card commands then run verbatim from the folder holding k700/,
ucf101/ and hmdb51/ (prepare -> pretrain -> probe with their default paths), and the pre-trained video encoder
must beat a random-initialised one of the same config on the UCF-like probe. About two minutes on 2 cores.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# demo settings (no ImageNet weights offline; 64 px frames give a 2x2 patch grid), kept small for the suite
PREPARE = ["--backbone", "random", "--size", "64", "--workers", "2", "--test-clips", "2"]
# the tiny preset trained longer and faster than its default: 60 epochs of 400 clips take about 30 s
PRETRAIN = ["--model", "tiny", "--epochs", "60", "--batch-size", "64", "--lr", "3e-3", "--warmup-steps", "20",
            "--no-progress"]


def run(cwd, script, *args):
    """Run one stage's CLI as a user would; fail with its output when it fails."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_pipeline_end_to_end(tmp_path):
    run(tmp_path, "synth.py", "--out", ".", "--seed", "1", "--k700-clips", "400", "--k700-val-clips", "16",
        "--ucf-groups", "3", "--ucf-clips-per-group", "3", "--hmdb-clips-per-class", "6", "--workers", "1")
    for dataset in ("k700", "ucf101", "hmdb51"):
        run(tmp_path, "prepare.py", "--root", f"{dataset}/", *PREPARE, "--vocab-size", "500")
        manifest = json.loads((tmp_path / dataset / "lava_cache" / "manifest.json").read_text())
        assert manifest["dataset"] == dataset and manifest["backbone"] == "random"

    # `python pretrain.py --losses av,vt,avt`: data defaults to k700/, the run folder to one under runs/
    log = run(tmp_path, "pretrain.py", "--losses", "av,vt,avt", *PRETRAIN)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, log
    run_dir = runs[0]
    for name in ("config.json", "log.jsonl", "ckpt_last.pt", "loss.png", "tokenizer.bpe"):
        assert (run_dir / name).is_file(), name
    losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0], losses

    # `python probe.py --dataset ucf101 --all-splits`: root defaults to ucf101/, checkpoint to the latest run's
    run(tmp_path, "probe.py", "--dataset", "ucf101", "--all-splits", "--out", "ucf.json")
    run(tmp_path, "probe.py", "--dataset", "ucf101", "--all-splits", "--checkpoint", "random",
        "--config-from", str(run_dir / "ckpt_last.pt"), "--out", "ucf_random.json")
    run(tmp_path, "probe.py", "--dataset", "hmdb51", "--all-splits", "--out", "hmdb.json")

    ucf, ucf_random, hmdb = (json.loads((tmp_path / f).read_text()) for f in ("ucf.json", "ucf_random.json", "hmdb.json"))
    for result in (ucf, ucf_random, hmdb):
        assert {"dataset", "checkpoint", "args", "splits", "mean"} <= set(result)
        for row in result["splits"]:
            assert {"split", "modalities", "top1"} <= set(row)
            assert 0 <= row["top1"] <= 100
    assert set(ucf["mean"]) == {"video", "audio+video"}
    assert sorted(row["split"] for row in ucf["splits"] if row["modalities"] == "video") == [1, 2, 3]
    assert set(hmdb["mean"]) == {"video"}
    assert (tmp_path / ucf["checkpoint"]).resolve() == (run_dir / "ckpt_last.pt").resolve()  # relative to the cwd
    assert ucf_random["checkpoint"] == "random"

    # the point of the method: unlabelled pre-training on audio and titles teaches the video encoder the classes
    # that a random-initialised one cannot read from time-averaged appearance (chance 12.5%; a 30+ point gap was
    # seen on this corpus, so 10 leaves room for the noise of 24 test videos per split)
    print(f"UCF-like video top-1: pre-trained {ucf['mean']['video']:.1f}, random init {ucf_random['mean']['video']:.1f}")
    assert ucf["mean"]["video"] >= ucf_random["mean"]["video"] + 10, (ucf["mean"], ucf_random["mean"])

    table = run(tmp_path, "probe.py", "--summary", "ucf.json", "ucf_random.json", "hmdb.json")
    assert "audio+video" in table and "random" in table

"""The paper's pre-training inputs (Section 3), from real media files through prepare.py's default --store frames
cache to pretrain.py's step: 16-frame windows anywhere in the clip, a random crop and h-flip of the pixels before
the frozen CNN, and a log-mel standardised with training-clip statistics that probe.py applies identically."""
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

import prepare
import pretrain
import probe
from conftest import ROOT, write_feature_cache
from model import LAVA
from prepare import FeatureCache
from test_prepare_pins import SR, TENTH, picture, run_prepare, write_video

FLAGS = ["--backbone", "random", "--size", "32", "--workers", "0", "--vocab-size", "300", "--shard-size", "3"]


@pytest.fixture(scope="module")
def k700(tmp_path_factory):
    """K700 layout: 4 train clips of 3 s with quiet tones, 2 val clips of 2 s with loud noise; default prepare."""
    root = tmp_path_factory.mktemp("aug") / "k700"
    rng = np.random.default_rng(0)
    rows = ["youtube_id,title"]
    for i in range(6):
        split, seconds = ("train", 3) if i < 4 else ("val", 2)
        folder = root / split / ["abseiling", "juggling"][i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        t = np.arange(seconds * SR) / SR
        audio = (0.05 * np.sin(2 * np.pi * (300 + 50 * i) * t) if split == "train"
                 else 0.9 * rng.uniform(-1, 1, len(t))).astype(np.float32)
        write_video(folder / f"clip{i:02d}_000000_000010.mp4", range(10 * seconds), TENTH, audio=audio)
        rows.append(f"clip{i:02d},clip {i} of {folder.name}")
    (root / "titles.csv").write_text("\n".join(rows) + "\n")
    run_prepare("--root", root, *FLAGS)
    return root, FeatureCache(root / "lava_cache")


def test_frames_cache_keeps_the_whole_clip_as_jpeg_frames(k700):
    root, cache = k700
    shapes = cache.manifest["shapes"]
    assert shapes["store"] == "frames" and shapes["frame_size"] == 37 and shapes["frames"] == 100  # 32 x 8/7
    for i, video in enumerate(cache.videos):
        item = cache[i]
        n = 30 if video["split"] == "train" else 20  # every 10 fps frame of the clip, each stored once
        assert item["frames"].tolist() == [n] and len(item["patches"]) == n
        pixels = prepare.decode_jpegs(item["jpeg"], item["patches"][item["window"][0]])  # (100, 37, 37, 3)
        want, _, _, _, _ = prepare.sample_frames(root / video["path"], np.arange(n), 37)  # the frames, not JPEG'd
        # exactly the frames through OpenCV's JPEG q90 (the noise pictures lose much of their colour detail to it)
        jpeg = [cv2.imencode(".jpg", w[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1] for w in want]  # BGR in
        assert all(np.array_equal(p, cv2.imdecode(j, cv2.IMREAD_COLOR)[:, :, ::-1]) for p, j in zip(pixels, jpeg))
        assert (pixels[n:] == pixels[n - 1]).all()  # past the end: the last frame repeated


def test_windows_crops_and_flips_cover_the_clip(k700):
    """Each drawn clip is found among all 16-frame windows x crop offsets x flips of the decoded frames."""
    _, cache = k700
    train = pretrain.train_indices(cache)
    ds = pretrain.PretrainClips(cache.path, train, seed=0, audio_noise=0.0)
    item = cache[train[0]]
    pixels = prepare.decode_jpegs(item["jpeg"], item["patches"][item["window"][0]])[:30]  # (30, 37, 37, 3)
    seen = set()
    for epoch in range(150):
        v = ds[(0, epoch)]["video"].numpy()                   # (16, 32, 32, 3) uint8
        found = [(s, y, x, f) for s in range(15) for y in range(6) for x in range(6) for f in (0, 1)
                 if np.array_equal(v, (lambda w: w[:, :, ::-1] if f else w)(pixels[s:s + 16, y:y + 32, x:x + 32]))]
        assert len(found) == 1, found
        seen.add(found[0])
    starts, ys, xs, flips = (set(k) for k in zip(*seen))
    assert {0, 14} <= starts  # windows reach the clip's first and last frames (30 frames: starts 0 .. 14)
    assert ys == xs == set(range(6)) and flips == {0, 1}  # crops cover the frame, both flips


def test_a_flipped_clip_gets_the_features_of_the_mirrored_pixels(k700):
    _, cache = k700
    cnn = prepare.build_backbone("random", None, "cpu")
    frames = torch.from_numpy(np.stack([picture(i)[:32, :32] for i in range(16)]))[None]  # (1, 16, 32, 32, 3)
    flipped = frames.flip(3)  # the pixels mirrored left-right, as PretrainClips does
    batch = dict(video=flipped, audio=torch.zeros(1, 80, 256), tokens=torch.zeros(1, 8, dtype=torch.long),
                 has_audio=torch.tensor([True]), has_text=torch.tensor([True]))
    video, _, _, _ = pretrain.to_device(batch, torch.device("cpu"), cnn=cnn)  # (1, 16, 1, 1, 512)
    want = cnn(((flipped[0].permute(0, 3, 1, 2).float() / 255 - torch.tensor(prepare.IMAGENET_MEAN)[:, None, None])
                / torch.tensor(prepare.IMAGENET_STD)[:, None, None]))  # (16, 512, 1, 1), a plain call
    torch.testing.assert_close(video[0], want.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    unflipped, _, _, _ = pretrain.to_device(dict(batch, video=frames), torch.device("cpu"), cnn=cnn)
    assert not torch.allclose(unflipped, video, atol=1e-3)  # a 1x1 grid cannot be mirrored: only pixels flip it


def test_audio_stats_come_from_training_clips_and_apply_alike_in_pretrain_and_probe(k700, tmp_path):
    root, cache = k700
    # each video's log-mel columns that training windows read: starts 0 .. nreal - 16, 256 columns from 10 x start
    seen = {s: [cache[i]["audio"][0, :, :10 * (int(cache[i]["frames"][0]) - 16) + 256].astype(np.float64)
                for i, v in enumerate(cache.videos) if v["split"] == s and cache[i]["has_audio"]]
            for s in ("train", "val")}
    assert [m.shape[1] for m in seen["train"]] == [396] * 4  # 30 frames: 10 x 14 + 256 of the 1,096 stored
    stats = cache.manifest["audio_stats"]  # each video weighs the same
    mean, square = np.mean([m.mean() for m in seen["train"]]), np.mean([np.square(m).mean() for m in seen["train"]])
    assert stats["videos"] == 4
    assert stats["mean"] == pytest.approx(mean, abs=1e-6)
    assert stats["std"] == pytest.approx(np.sqrt(square - mean ** 2), rel=1e-6)
    everything = np.mean([m.mean() for m in seen["train"] + seen["val"]])
    assert abs(everything - stats["mean"]) > 0.5  # the loud val clips would have moved them
    # a short run on the frames cache (the CNN in the step), then the model probe.py loads from its checkpoint
    out = tmp_path / "run"
    pretrain.main(["--data", str(root), "--model", "tiny", "--batch-size", "2", "--epochs", "1", "--workers", "0",
                   "--out", str(out), "--no-progress"])
    ckpt = torch.load(out / "ckpt_last.pt", weights_only=False)
    audio_cfg = ckpt["config"]["model"]["audio"]
    assert (audio_cfg["mel_mean"], audio_cfg["mel_std"]) == (stats["mean"], stats["std"])
    args = probe.parse_args(["--embed", "--cache", str(cache.path), "--checkpoint", str(out / "ckpt_last.pt"),
                             "--device", "cpu"])
    probed, _ = probe.load_model(args, str(out / "ckpt_last.pt"), cache)
    trained = LAVA(pretrain.LAVAConfig.from_dict(ckpt["config"]["model"]))
    trained.load_state_dict(ckpt["model"])
    mel = torch.from_numpy(cache[0]["audio"][0, :, :256].astype(np.float32))[None]
    with torch.no_grad():
        z = probed.eval().encode_audio(mel)
        torch.testing.assert_close(z, trained.eval().encode_audio(mel), rtol=0, atol=0)
        standardised = (mel - stats["mean"]) / stats["std"]
        trained.config.audio.mel_mean, trained.config.audio.mel_std = 0.0, 1.0
        torch.testing.assert_close(z, trained.encode_audio(standardised), rtol=1e-6, atol=1e-6)
    # probe.py --embed / --search on this frames cache: the centre crop of the central 16 real frames through the CNN
    emb = probe.extract_embeddings(probed, cache)
    cnn = prepare.build_backbone("random", None, "cpu")
    for i in (0, 4):  # a 3 s train clip (frames 7 .. 22) and a 2 s val clip (frames 2 .. 17)
        item, s = cache[i], (int(cache[i]["frames"][0]) - 16) // 2
        pixels = prepare.decode_jpegs(item["jpeg"], item["patches"][item["window"][0, s:s + 16]])[:, 2:34, 2:34]
        crop = torch.from_numpy(np.ascontiguousarray(pixels))  # (16, 32, 32, 3): 37 px stored, 2 px margin each side
        with torch.no_grad():
            want = probed.encode_video(prepare.frame_features(cnn, crop)[None])
        np.testing.assert_allclose(emb["z_v"][i, 0], want[0].numpy(), rtol=1e-4, atol=1e-5)


COMMON = ["--model", "tiny", "--batch-size", "4", "--lr", "1e-2", "--dropout", "0.1", "--log-every", "1",
          "--no-progress", "--seed", "1", "--threads", "1"]  # 20 train videos: 5 steps per epoch, 10 in all


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_frames_cache_resumes_bitwise_after_sigkill_and_two_ranks_match_one(tmp_path):
    cache = write_feature_cache(tmp_path / "cache", n_videos=24, grid=1, store="frames")
    common = ["--cache", str(cache), *COMMON]
    pretrain.main([*common, "--workers", "0", "--out", str(tmp_path / "whole")])
    whole = read_log(tmp_path / "whole")
    # SIGKILL once a mid-run checkpoint exists (SIGSTOP first, so that it cannot change while it is read), then the
    # same command continues: the same losses and bitwise the same weights as the uninterrupted run
    killed = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "pretrain.py"), *common, "--save-every", "1", "--workers", "2",
               "--out", str(killed)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step, deadline = None, time.time() + 120
    while step is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
        if (killed / "ckpt_last.pt").exists():
            proc.send_signal(signal.SIGSTOP)
            saved = torch.load(killed / "ckpt_last.pt", weights_only=True)["step"]
            step = saved if 2 <= saved <= 8 else None
            proc.send_signal(signal.SIGKILL if step else signal.SIGCONT)
    proc.kill()
    proc.wait()
    assert step is not None, "the run was not caught mid-run"
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    assert [r["loss"] for r in read_log(killed)] == [r["loss"] for r in whole] and len(whole) == 10
    a, b = (torch.load(tmp_path / d / "ckpt_last.pt", weights_only=True)["model"] for d in ("whole", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # 2 gloo ranks == one process (without dropout: each rank draws its own masks)
    common += ["--dropout", "0", "--max-steps", "4", "--workers", "0"]
    pretrain.main([*common, "--out", str(tmp_path / "one")])
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(ROOT / "pretrain.py"), *common, "--out", str(two)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_log(two)) == 4
    for ra, rb in zip(read_log(tmp_path / "one"), read_log(two)):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-5), ra["step"]


def test_frames_cache_whose_imagenet_weights_moved_is_one_pretrain_line(tmp_path, capsys):
    """The ImageNet weights prepare.py used have moved: pretrain says so in its own one line, naming --backbone-weights
    (not prepare's message, nor prepare's --backbone random)."""
    cache = write_feature_cache(tmp_path / "cache", n_videos=24, grid=1, store="frames")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["backbone"] = manifest["config"]["backbone"] = "imagenet"  # as prepare.py --backbone imagenet writes it
    manifest["config"]["backbone_weights"] = str(tmp_path / "moved.pth")
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as stop:
        pretrain.main(["--cache", str(cache), *COMMON, "--workers", "0", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--backbone random" not in err, err
    assert err.startswith(f"pretrain: ImageNet ResNet-18 weights not found at {tmp_path / 'moved.pth'}: pass "
                          "--backbone-weights PATH"), err

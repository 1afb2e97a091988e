"""prepare.py pinned from outside, against references that share no code with it, through its public surface
only (main(argv) or `python prepare.py`, FeatureCache, sample_frames, load_audio, clip_plan, the files of a
cache), so that its insides can be restructured under these tests:

  1. the frozen CNN: the cache's features equal a plain torchvision resnet18 cut by hand after layer4,
     normalised with torchvision's own ImageNet transform's mean/std, on the frames sample_frames returns;
     random init (seed 0), and saved weights found by --backbone-weights and in the torch hub cache;
  2. kill -9 during a shard write, and with decode workers running: the re-run's cache equals an
     uninterrupted run's, file for file and byte for byte, both ways;
  3. timestamps on every container: sample_frames keeps, for each 10 fps time t, the frame whose PyAV time is
     the last one <= t (H.264 with B-frames at a variable frame rate in Matroska: FFmpeg's 32-byte probe got
     this wrong), and t = 0 of the audio is the video stream's start when the video starts 0.3 s late.

Media are written here with PyAV; frame i of a video is a noise picture shifted right by 3 i pixels: motion, so
that the encoders make B-frames, and every frame told apart from the others by its pixels.
"""
import fractions
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import prepare
from prepare import FeatureCache, clip_plan, load_audio, sample_frames

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
MS, TENTH = fractions.Fraction(1, 1000), fractions.Fraction(1, 10)
NOISE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def picture(i, flip=False):
    """Frame i: (64, 64, 3) uint8 RGB noise shifted right by 3 i pixels; `flip`: upside down (another video)."""
    img = np.roll(NOISE, 3 * i, axis=1)
    return img[::-1] if flip else img


def write_video(path, pts, time_base, codec="libx264", options=None, audio=None, audio_codec="aac", flip=False):
    """Frame i shown from pts[i] * time_base s; audio: float32 (n,) mono 16 kHz from t = 0, or None."""
    import av
    with av.open(str(path), "w") as c:
        v = c.add_stream(codec, rate=round(1 / time_base), options=options or {})
        v.width, v.height, v.pix_fmt, v.time_base = 64, 64, "yuv420p", time_base
        a = None
        if audio is not None:
            a = c.add_stream(audio_codec, rate=SR)
            a.layout = "mono"
        for i, t in enumerate(pts):
            f = av.VideoFrame.from_ndarray(picture(i, flip), format="rgb24")
            f.pts, f.time_base = t, time_base
            c.mux(v.encode(f))
        c.mux(v.encode())
        if a is not None:
            fmt = a.codec_context.codec.audio_formats[0].name  # flac: s16 or s32; aac: fltp
            for k in range(0, len(audio), 1024):
                chunk = audio[None, k:k + 1024]
                if fmt.startswith("s16"):
                    chunk = np.round(chunk * 32767).astype(np.int16)
                elif fmt.startswith("s32"):
                    chunk = np.round(chunk * (2 ** 31 - 1)).astype(np.int32)
                f = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=fmt, layout="mono")
                f.sample_rate, f.pts = SR, k
                c.mux(a.encode(f))
            c.mux(a.encode())
    return path


def pyav_view(path):
    """A plain, fully probed PyAV open: ([(seconds since the video stream's start, RGB picture, picture type:
    3 is B, FFmpeg's AV_PICTURE_TYPE_B)] in display order, video stream start s, audio stream start s or None)."""
    import av
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        v0 = float(vs.start_time * vs.time_base)
        a0 = float(c.streams.audio[0].start_time * c.streams.audio[0].time_base) if c.streams.audio else None
        frames = [(float(f.pts * f.time_base) - v0, f.to_ndarray(format="rgb24"), int(f.pict_type))
                  for f in c.decode(vs)]
    return frames, v0, a0


def run_prepare(*args):
    """prepare.main in this process (torch is imported once for the whole file); the run must succeed."""
    assert prepare.main([str(a) for a in args]) in (0, None), args


FAST = ["--backbone", "random", "--size", "64", "--vocab-size", "300"]


# ----------------------------------------------------------------------------------------------------
# 1. the frozen CNN

def torchvision_features(frames, state=None):
    """(n, S, S, 3) uint8 RGB -> (n, S/32, S/32, 512) float32 from torchvision alone: resnet18 (random init
    under seed 0, else `state`), its children conv1 .. layer4 taken by hand, in eval mode, after the mean/std
    of torchvision's IMAGENET1K_V1 transform."""
    import torch
    import torchvision
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.resnet18()
    if state is not None:
        net.load_state_dict(state)
    body = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                               net.layer1, net.layer2, net.layer3, net.layer4).eval()
    transform = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (transform.mean, transform.std))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255     # (n, 3, S, S) in [0, 1]
    with torch.no_grad():
        return body((x - mean) / std).permute(0, 2, 3, 1).numpy()


CNN_VIDEOS = {"a.mp4": 16, "b/c.mp4": 18}  # frames at 10 fps: 1.6 s and 1.8 s


@pytest.fixture(scope="module")
def cnn_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn") / "videos"
    for k, (name, n) in enumerate(CNN_VIDEOS.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / name, range(n), TENTH, flip=k == 1)
    return root


def assert_torchvision_features(cache_dir, root, state=None):
    """Every clip frame's stored features equal torchvision_features of the centre crop of the frame sample_frames
    gives for its time at 8/7 size, ImageNet's evaluation transform (2 evaluation clips of 16 frames over K = 10 x
    seconds grid frames, placed by clip_plan)."""
    cache = FeatureCache(cache_dir)
    assert sorted(v["id"] for v in cache.videos) == sorted(CNN_VIDEOS)
    for name, n in CNN_VIDEOS.items():
        item = cache[cache.index(name)]
        targets, index, _ = clip_plan(n, 2, 16, "eval")
        frames = sample_frames(root / name, targets, 73)[0][:, 4:68, 4:68]  # (U, 64, 64, 3): 64 of 73 = 64 x 8/7
        want = torchvision_features(frames, state)[index]              # (C, T, 2, 2, 512)
        got = item["patches"][item["window"]].astype(np.float32)
        assert got.shape == want.shape == (2, 16, 2, 2, 512) and item["frames"].tolist() == [16, 16]
        # float16 storage: 3 significant digits
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max(), err_msg=name)


def test_random_backbone_is_torchvision_resnet18_under_seed_0(cnn_root, tmp_path):
    out = tmp_path / "cache"
    run_prepare("--root", cnn_root, "--out", out, "--test-clips", "2", "--workers", "0", *FAST)
    assert FeatureCache(out).manifest["backbone"] == "random"
    assert_torchvision_features(out, cnn_root)


@pytest.mark.parametrize("where", ["--backbone-weights", "hub cache"])
def test_imagenet_backbone_loads_the_saved_weights(cnn_root, tmp_path, monkeypatch, where):
    """Random weights saved as torchvision's file, batch-norm statistics included (a loader that dropped them,
    or ran batch norm in training mode, would give other features)."""
    import torch
    import torchvision
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        net = torchvision.models.resnet18()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                torch.nn.init.uniform_(m.weight, 0.5, 1.5)
                torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    state = net.state_dict()
    if where == "--backbone-weights":
        path, flags = tmp_path / "my_resnet18.pth", ["--backbone-weights", tmp_path / "my_resnet18.pth"]
    else:  # where torchvision's resnet18(weights="IMAGENET1K_V1") puts its download
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        path, flags = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth", []
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    out = tmp_path / "cache"
    run_prepare("--root", cnn_root, "--out", out, "--test-clips", "2", "--workers", "0", "--backbone", "imagenet",
                *flags, "--size", "64")
    assert FeatureCache(out).manifest["backbone"] == "imagenet"
    assert_torchvision_features(out, cnn_root, state)


# ----------------------------------------------------------------------------------------------------
# 2. kill -9 and re-run == one uninterrupted run

K700_FLAGS = ["--shard-size", "2", "--pretrain-frames", "16", *FAST]  # 3 shards of 2 videos, 16 frames each


def make_k700(root, n=6):
    """n clips of 2 s (K700 layout, the last one in val), titles in titles.csv, audio on every other one."""
    rows = ["youtube_id,title"]
    t = np.arange(2 * SR) / SR
    for i in range(n):
        label = ["abseiling", "juggling"][i % 2]
        folder = root / ("val" if i == n - 1 else "train") / label
        folder.mkdir(parents=True, exist_ok=True)
        tone = (0.3 * np.sin(2 * np.pi * (300 + 40 * i) * t)).astype(np.float32) if i % 2 == 0 else None
        write_video(folder / f"clip{i:02d}_000000_000010.mp4", range(20), TENTH, audio=tone, flip=i % 3 == 0)
        rows.append(f"clip{i:02d},clip number {i} of {label}")
    (root / "titles.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def k700_single(tmp_path_factory):
    """(root, the --out every test here writes to, a single uninterrupted run's cache made there then moved)."""
    base = tmp_path_factory.mktemp("k700")
    root, out = make_k700(base / "k700"), base / "cache"
    run_prepare("--root", root, "--out", out, "--workers", "0", *K700_FLAGS)
    out.rename(base / "single")
    return root, out, base / "single"


def cache_files(folder):
    """{path relative to folder: path} of every file under it, hidden ones (temp files) included."""
    return {(Path(d) / f).relative_to(folder).as_posix(): Path(d) / f
            for d, _, files in os.walk(folder) for f in files}


def assert_same_cache(resumed, single):
    """Every file, manifest.json included (same --root, --out and flags: it records them), the same bytes."""
    a, b = cache_files(resumed), cache_files(single)
    assert sorted(a) == sorted(b), ("only in the resumed cache", sorted(set(a) - set(b)),
                                    "only in the single run's", sorted(set(b) - set(a)))
    assert {"manifest.json", "listing.json", "tokenizer.bpe", "shard_00002/patches.npy"} <= set(a)
    for rel in sorted(a):
        assert a[rel].read_bytes() == b[rel].read_bytes(), f"{rel} differs"


def is_shard(name):
    return re.fullmatch(r"shard_\d{5}", name) is not None


def entries(out):
    try:
        return [e.name for e in os.scandir(out)]
    except FileNotFoundError:
        return []


def mid_run(out):
    """A shard finished and renamed into place, and no manifest yet."""
    names = entries(out)
    return any(map(is_shard, names)) and "manifest.json" not in names


def shard_in_progress(out):
    """A shard being written: an entry naming a shard that is not a finished shard folder (prepare builds each
    shard under a temp name and renames it when complete)."""
    return any("shard" in name and not is_shard(name) for name in entries(out))


def group_size(pgid):
    """Processes in process group pgid other than its leader: the decode workers (Linux /proc)."""
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != pgid:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            except OSError:
                continue
            n += int(fields[2]) == pgid
    return n


def kill_mid_run(root, out, flags, ready, tmp):
    """`python prepare.py` in a process group of its own, SIGKILLed as a whole (main process and decode
    workers, as a scheduler does) as soon as ready(pgid) holds; tried again (fresh --out) in the rare case the
    run moved on between the check and the kill, so that ready() no longer holds once it is dead."""
    env = dict(os.environ, TMPDIR=str(tmp))  # the killed run's hand-off folder stays there, not in /tmp
    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--root", str(root), "--out", str(out),
                                 *map(str, flags)], cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline and not ready(proc.pid):
                time.sleep(0.0005)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if proc.returncode == -signal.SIGKILL and ready(proc.pid, after=True):
            return
    pytest.fail("the kill never landed mid-run")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the decode workers in /proc")
@pytest.mark.parametrize("workers", [0, 2])
def test_kill_9_then_rerun_equals_one_run_file_for_file(k700_single, tmp_path, workers):
    """workers 0: killed while a shard is being written (its temp entry is there), after an earlier one was
    renamed into place; workers 2: killed with the decode workers running, likewise after a finished shard.
    The re-run decodes in this process (--workers 0, as the single run: the manifest records the flag)."""
    root, out, single = k700_single
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    workers_seen = []

    def ready(pgid, after=False):
        if workers:  # after the kill the workers are gone too: what counts is that they ran when it landed
            if not after:
                workers_seen.append(group_size(pgid) >= workers)
            return mid_run(out) and workers_seen[-1]
        return mid_run(out) and shard_in_progress(out)
    try:
        kill_mid_run(root, out, ["--workers", workers, *K700_FLAGS], ready, tmp)
        assert sum(map(is_shard, entries(out))) in (1, 2)
        with pytest.raises(FileNotFoundError):
            FeatureCache(out)
        run_prepare("--root", root, "--out", out, "--workers", "0", *K700_FLAGS)
        assert_same_cache(out, single)
        assert len(FeatureCache(out)) == 6
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the next test writes to the same --out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the decode workers in /proc")
@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)])
def test_a_signal_stops_the_workers_in_one_line_and_leaves_no_temp_shard(k700_single, tmp_path, sig, group):
    """SIGTERM to prepare's main process alone (timeout, docker stop), or SIGINT or SIGTERM to its whole process group
    (Ctrl-C in a terminal, SLURM's scancel: the decode workers get it too): one line on stderr, no traceback from any,
    exit status 128 + the signal, the workers stopped, the unfinished shard's temp folder gone, finished shards
    kept, and the re-run completes the cache to a single run's bytes."""
    root, out, single = k700_single
    proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--root", str(root), "--out", str(out),
                             "--workers", "2", *K700_FLAGS], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not (mid_run(out) and group_size(proc.pid) >= 2):
            time.sleep(0.001)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr and "Error" not in stderr, stderr
        said = [line for line in stderr.replace("\r", "\n").splitlines()
                if line.startswith("prepare: ") and "/dev/shm" not in line]  # not the bar, nor a small /dev/shm
        assert len(said) == 1 and re.fullmatch(
            r"prepare: interrupted with [12] of 3 shards finished; the same command continues", said[0]), stderr
        deadline = time.time() + 10
        while group_size(proc.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert group_size(proc.pid) == 0, "decode workers outlived the main process"
        assert not shard_in_progress(out) and sum(map(is_shard, entries(out))) >= 1
        run_prepare("--root", root, "--out", out, "--workers", "0", *K700_FLAGS)
        assert_same_cache(out, single)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(out, ignore_errors=True)  # the next test writes to the same --out


# ----------------------------------------------------------------------------------------------------
# 3. timestamps, checked against PyAV on each container

# a variable frame rate: gaps of 30 ms to 400 ms, some longer than every gap before them
VFR_MS = [0, 30, 430, 680, 780, 880, 920, 960, 1000, 1040, 1070, 1470, 1500, 1750, 2150, 2180, 2580, 2980,
          3230, 3480, 3510, 3610, 3640, 4040]


@pytest.mark.parametrize("name, codec, options, pts, time_base, b_frames", [
    ("vfr_h264.mkv", "libx264", {}, VFR_MS, MS, True),      # the 32-byte probe's failure
    ("vfr_h264.mp4", "libx264", {}, VFR_MS, MS, True),
    ("vfr_vp9.webm", "libvpx-vp9", {}, VFR_MS, MS, False),
    ("mpeg4.avi", "mpeg4", {"bf": "2"}, range(30), fractions.Fraction(1, 25), True),  # UCF-101's; AVI: one rate
    ("mpeg2.mpg", "mpeg2video", {"bf": "2"}, range(30), fractions.Fraction(1, 25), True),
])
def test_sample_frames_keeps_the_frame_pyav_shows(tmp_path, name, codec, options, pts, time_base, b_frames):
    path = write_video(tmp_path / name, pts, time_base, codec, options)
    frames, _, _ = pyav_view(path)
    times = [t for t, _, _ in frames]
    assert len(frames) == len(pts) and (3 in {kind for _, _, kind in frames}) == b_frames
    targets = np.arange(math.floor(times[-1] * 10 + 1e-6) + 1)   # every 10 fps time up to the last frame
    got = sample_frames(path, targets, 64)[0]                      # (U, 64, 64, 3): 64 px in, no resizing
    # the frame on screen at t: the last one whose time is <= t (before the first frame: the first)
    want = [max([i for i, t in enumerate(times) if t <= k / 10 + 1e-6] or [0]) for k in targets]
    pixels = np.stack([f for _, f, _ in frames]).astype(np.int16)
    dist = np.abs(got[:, None].astype(np.int16) - pixels[None]).mean(axis=(2, 3, 4))  # (U, frames)
    shown = dist.argmin(axis=1).tolist()
    assert shown == want, [(f"t={k / 10:.1f} s", s, w) for k, s, w in zip(targets, shown, want) if s != w]
    assert dist.min(axis=1).max() < 8  # the same decoded picture, up to colour conversion


def test_audio_time_zero_is_the_video_streams_start(tmp_path):
    """An .mkv whose video starts 0.3 s after its audio; the audio is silent for 1 s, then a tone."""
    wave = np.zeros(3 * SR, np.float32)
    wave[SR:] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * SR) / SR)
    root = tmp_path / "videos"
    root.mkdir()
    path = write_video(root / "late.mkv", [300 + 40 * i for i in range(40)], MS, audio=wave, audio_codec="flac")
    _, v0, a0 = pyav_view(path)
    assert abs(v0 - a0 - 0.3) < 1e-3  # the file is what this test means
    onset = 1.0 + a0 - v0  # the tone's start, in seconds after the first video frame
    got, why = load_audio(path)
    assert why is None
    assert abs(np.flatnonzero(np.abs(got) > 0.1)[0] / SR - onset) < 0.002
    # the same alignment through a run: the 1.6 s video is one clip from grid frame 0, whose mel crop
    # column j is centred at 10 ms x j - 475 ms (README: the crop [10 s, 10 s + 256) centred on frames s..s+15)
    out = tmp_path / "cache"
    run_prepare("--root", root, "--out", out, "--test-clips", "1", "--workers", "0", *FAST)
    mel = FeatureCache(out)[0]["audio"][0].astype(np.float32)  # (80, 256)
    energy = mel.max(axis=0)
    rise = np.flatnonzero(energy > (energy.min() + energy.max()) / 2)[0]
    assert abs(rise - (onset + 0.475) / 0.01) <= 2, (rise, onset)


def test_audio_that_ends_before_the_video_starts_is_no_audio_not_silence(tmp_path):
    """0.5 s of a tone, then a video that starts at 1 s: nothing of the audio is left at t >= 0, which is said as
    such (prepare_errors.jsonl), not taken for a silent track."""
    wave = (0.5 * np.sin(2 * np.pi * 440 * np.arange(SR // 2) / SR)).astype(np.float32)
    path = write_video(tmp_path / "after.mkv", [1000 + 100 * i for i in range(10)], MS, audio=wave, audio_codec="flac")
    _, v0, a0 = pyav_view(path)
    assert v0 - a0 > 0.9  # the file is what this test means
    assert load_audio(path) == (None, "the audio ends before the first video frame")

"""prepare.py: 10 fps sampling by timestamps, audio alignment, layouts, bad input, resume, shards, FeatureCache.

Media are written here with PyAV (each frame draws its own index as 8 black/white blocks, so the test can
read back which source frame was kept) or copied real files from tests/data (fire2.mp4: variable frame
rate + 180 degree rotation; tests_data_test.avi/.wav: a matched video/audio pair).
"""
import fractions
import json
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
from prepare import FeatureCache, clip_plan, decode_video, load_audio, log_mel_windows, sample_frames

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
PY = sys.executable
SR_ = prepare.SAMPLE_RATE


# ----------------------------------------------------------------------------------------------------
# media writers

def _index_image(i, side=64):
    """(side, side, 3) uint8: bit b of i -> block b (4 columns x 2 rows) white, else black."""
    img = np.zeros((side, side, 3), np.uint8)
    q = side // 4
    for b in range(8):
        if (i >> b) & 1:
            r, c = divmod(b, 4)
            img[r * (side // 2):(r + 1) * (side // 2), c * q:(c + 1) * q] = 255
    return img


def _read_index(img):
    """Inverse of _index_image on a decoded (lossy) frame of any square size."""
    side = img.shape[0]
    q, h = side // 4, side // 2
    bits = [img[r * h + 2:(r + 1) * h - 2, c * q + 2:(c + 1) * q - 2].mean() > 127
            for r in range(2) for c in range(4)]
    return sum(int(b) << k for k, b in enumerate(bits))


def write_video(path, n, rate=25, pts=None, size=(64, 64), codec="libx264", pix_fmt="yuv420p", audio=None,
                title=None, content=None, options=None):
    """Write an mp4/avi with PyAV. pts: explicit frame times in ms (variable frame rate).

    audio: (wave float32 (m,), rate) mono, muxed as AAC (mp4) or MP3 (avi). content(i) -> RGB frame.
    """
    import av
    w, h = size
    c = av.open(str(path), "w", options=options or {})
    if title is not None:
        c.metadata["title"] = title
    s = c.add_stream(codec, rate=rate if pts is None else 1000)
    s.width, s.height, s.pix_fmt = w, h, pix_fmt
    if pts is not None:
        s.time_base = fractions.Fraction(1, 1000)
    a = None
    if audio is not None:
        wave, sr = audio
        a = c.add_stream("aac" if str(path).endswith(".mp4") else "libmp3lame", rate=sr)
        a.layout = "mono"
    for i in range(n):
        img = content(i) if content else np.resize(_index_image(i, min(w, h)), (h, w, 3)) if w != h else _index_image(i, w)
        f = av.VideoFrame.from_ndarray(img, format="rgb24")
        if pts is not None:
            f.pts, f.time_base = pts[i], fractions.Fraction(1, 1000)
        for p in s.encode(f):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    if a is not None:
        wave, sr = audio
        step = 1024
        for k in range(0, len(wave), step):
            chunk = wave[k:k + step].astype(np.float32)[None, :]
            af = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            af.sample_rate, af.pts = sr, k
            for p in a.encode(af):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    c.close()
    return path


def _expected(times_s, targets):
    """Brute force: index of the last frame whose time <= k/10 (the frame on screen), per target."""
    return [max([i for i, t in enumerate(times_s) if t <= k / 10 + 1e-9] or [0]) for k in targets]


# ----------------------------------------------------------------------------------------------------
# frames

@pytest.mark.parametrize("rate", [25, fractions.Fraction(30000, 1001), 30, 60])
def test_frame_timestamps_constant_rate(tmp_path, rate):
    n = int(round(2.05 * float(rate)))  # 2.05 s of video: 10 fps grid frames 0..20
    path = write_video(tmp_path / "v.mp4", n, rate=rate)
    targets = np.arange(24)  # the last three lie past the end of the video
    frames, real, src, misses, _ = sample_frames(path, targets, 64)
    times = [i / rate for i in range(n)]
    want = _expected([float(t) for t in times], targets)
    # exact rational check for the boundary cases (29.97: frame 3 is at 0.1001 s, after the 0.1 s target)
    assert list(src[:21]) == want[:21]
    assert [_read_index(f) for f in frames[:21]] == want[:21]
    end = n / float(rate)
    assert list(real) == [k / 10 < end - 1e-9 for k in targets]
    assert (frames[21:] == frames[20]).all()  # padding repeats the last real frame
    assert misses == 0


def test_frame_timestamps_variable_rate(tmp_path):
    # gaps of 30..400 ms, some longer than every earlier one (the sampler must re-decode those frames)
    pts = [0, 30, 60, 100, 110, 250, 300, 420, 430, 440, 600, 900, 905, 1300, 1310, 1320, 1700]
    path = write_video(tmp_path / "vfr.mp4", len(pts), pts=pts)
    targets = np.arange(17)
    frames, real, src, misses, _ = sample_frames(path, targets, 64)
    want = _expected([p / 1000 for p in pts], targets)
    assert list(src) == want
    assert [_read_index(f) for f in frames] == want
    assert real.all() and misses >= 1


def test_frame_sampling_real_vfr_rotated_phone_clip():
    import av
    import cv2
    path = DATA / "fire2.mp4"  # ~10.5 fps VFR, 180 degree display matrix, 1280x720
    with av.open(str(path)) as c:
        raw = [(float(f.time), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    times = [t for t, _ in raw]
    targets = np.arange(24)
    frames, real, src, misses, _ = sample_frames(path, targets, 64)
    assert list(src) == _expected(times, targets)
    # PyAV hands out the stored (upside-down) pictures; OpenCV applies the rotation: compare both ways
    first = raw[src[5]][1]
    m = min(first.shape[:2])
    y, x = (first.shape[0] - m) // 2, (first.shape[1] - m) // 2
    square = cv2.resize(first[y:y + m, x:x + m], (64, 64), interpolation=cv2.INTER_AREA).astype(float)
    upright = np.abs(frames[5] - square[::-1, ::-1]).mean()
    stored = np.abs(frames[5] - square).mean()
    assert upright < 6 and stored > 3 * upright, (upright, stored)


def test_odd_size_grayscale_single_frame(tmp_path):
    odd = write_video(tmp_path / "odd.mp4", 12, rate=12, size=(35, 19), pix_fmt="yuv444p",
                      content=lambda i: np.full((19, 35, 3), 20 * i, np.uint8))
    frames, real, _, _, _ = sample_frames(odd, np.arange(5), 64)
    assert frames.shape == (5, 64, 64, 3) and real.all()
    gray = write_video(tmp_path / "gray.mp4", 10, rate=10, pix_fmt="gray",
                       content=lambda i: np.full((64, 64, 3), 25 * i, np.uint8))
    frames, _, src, _, _ = sample_frames(gray, np.arange(10), 32)
    assert frames.shape == (10, 32, 32, 3) and list(src) == list(range(10))
    # grey in, grey out on 3 equal channels; levels may be range-expanded (the file does not tag its range)
    assert (frames[..., 0] == frames[..., 1]).all() and (frames[..., 1] == frames[..., 2]).all()
    assert (np.diff(frames.mean(axis=(1, 2, 3))) > 5).all()  # each source frame kept, in order
    single = write_video(tmp_path / "one.mp4", 1, rate=25)
    result = decode_video(dict(path=str(single), size=32, clips=3, frames=16, sampling="eval", audio_frames=256))
    assert result["ok"] and result["nreal"].tolist() == [1, 1, 1]
    assert result["frames"].shape[0] == 1 and (result["index"] == 0).all()  # the one frame, stored once, repeated


def test_clip_plan_worked_examples():
    targets, index, starts = clip_plan(30, 3, 16, "eval")
    assert starts.tolist() == [0, 7, 14] and len(targets) == 30 and index.shape == (3, 16)
    assert (targets[index] == starts[:, None] + np.arange(16)).all()
    targets, index, starts = clip_plan(100, 1, 20, "pretrain")  # K700: the central 2 s of a 10 s clip
    assert starts.tolist() == [40] and targets.tolist() == list(range(40, 60))
    targets, index, starts = clip_plan(5, 10, 16, "eval")  # shorter than a clip: all windows at 0, the last repeated
    assert starts.tolist() == [0] * 10 and targets.tolist() == list(range(5))
    assert (targets[index] == np.minimum(np.arange(16), 4)).all()
    targets, index, starts = clip_plan(24, 1, 100, "pretrain")  # pre-training keeps a whole clip shorter than 10 s
    assert starts.tolist() == [0] and targets.tolist() == list(range(24)) and index.shape == (1, 100)


# ----------------------------------------------------------------------------------------------------
# audio

def test_mel_from_avi_mp3_matches_wav_and_is_aligned():
    wave_avi, why = load_audio(DATA / "tests_data_test.avi")   # MP3 44.1 kHz stereo in the AVI
    wave_wav, _ = load_audio(DATA / "tests_data_test.wav")     # the same track as 16 kHz PCM
    assert why is None
    n = min(len(wave_avi), len(wave_wav))
    assert abs(len(wave_avi) - len(wave_wav)) < 0.02 * SR_
    assert np.corrcoef(wave_avi[:n], wave_wav[:n])[0, 1] > 0.999
    starts = np.array([0, 12, 49])
    mel_avi = log_mel_windows(wave_avi, starts, 256)
    mel_wav = log_mel_windows(wave_wav, starts, 256)
    assert mel_avi.shape == (3, 80, 256)
    loud = mel_wav > -5  # compare where there is signal (silence is log(1e-6) in both)
    assert np.abs(mel_avi - mel_wav)[loud].mean() < 0.3
    # the whole pipeline gives the same crops as computing them from the wav by hand
    result = decode_video(dict(path=str(DATA / "tests_data_test.avi"), size=32, clips=4, frames=16,
                               sampling="eval", audio_frames=256))
    K = 66  # 6.56 s at 10 fps
    _, _, st = clip_plan(K, 4, 16, "eval")
    ref = log_mel_windows(wave_wav, st, 256)
    assert np.abs(result["mel"].astype(np.float32) - ref)[ref > -5].mean() < 0.3


def test_mel_window_alignment_with_a_click():
    # a 20 ms burst centred at 3.0 s: in the clip starting at grid frame k0, crop [10 s, 10 s + 256) is
    # centred on video frames s..s+15, i.e. on time k0/10 + s/10 + 0.8 s
    wave = np.zeros(6 * SR_, np.float32)
    c = 3 * SR_
    wave[c - 160:c + 160] = np.sin(np.arange(320) * 0.9)
    for k0, s in [(10, 12), (0, 22), (5, 17)]:  # k0/10 + s/10 + 0.8 == 3.0
        mel = log_mel_windows(wave, np.array([k0]), 256 + 10 * 20)[0]  # T = 36 -> A = 456
        crop = mel[:, 10 * s:10 * s + 256]
        energy = crop.max(axis=0)
        peak = np.flatnonzero(energy > energy.max() - 1)
        assert abs(peak.mean() - 127.5) <= 1.0, (k0, s, peak)
    mel = log_mel_windows(wave, np.array([0, 100]), 256)  # past the end: zeros -> log(1e-6)
    assert np.allclose(mel[1][:, -50:], np.log(1e-6), atol=1e-3)


def test_missing_silent_and_present_audio(tmp_path):
    none = write_video(tmp_path / "none.mp4", 20, rate=10)
    silent = write_video(tmp_path / "silent.mp4", 20, rate=10, audio=(np.zeros(32000, np.float32), 16000))
    t = np.arange(32000) / 16000
    tone = write_video(tmp_path / "tone.mp4", 20, rate=10, audio=(0.3 * np.sin(2 * np.pi * 440 * t).astype(np.float32), 16000))
    job = dict(size=32, clips=1, frames=16, sampling="pretrain", audio_frames=256)
    r_none, r_silent, r_tone = (decode_video(dict(job, path=str(p))) for p in (none, silent, tone))
    assert r_none["ok"] and r_none["mel"] is None and "no audio stream" in r_none["notes"][0][0]
    assert r_silent["ok"] and r_silent["mel"] is None and "silent" in r_silent["notes"][0][0]
    assert r_tone["mel"].shape == (1, 80, 256) and r_tone["mel"].dtype == np.float16


@pytest.mark.parametrize("name, codec", [("ps.mpg", "mpeg2video"), ("clip.ts", "libx264"), ("clip.flv", "flv"),
                                         ("clip.mkv", "libx264"), ("clip.mp4", "libx264")])
def test_containers_with_stated_and_measured_durations(tmp_path, name, codec):
    # MPEG-PS, MPEG-TS and FLV state no exact duration (it is measured from the packets); Matroska and MP4 do.
    # Every case: right frames, audio present, no notes.
    t = np.arange(3 * 22050) / 22050  # FLV's MP3 takes 11.025 / 22.05 / 44.1 kHz
    path = write_video(tmp_path / name, 30, rate=10, codec=codec,
                       audio=(0.3 * np.sin(2 * np.pi * 440 * t).astype(np.float32), 22050))
    r = decode_video(dict(path=str(path), size=64, clips=1, frames=16, sampling="pretrain", audio_frames=256))
    assert r["ok"] and r["mel"].shape == (1, 80, 256) and not r["notes"]
    shown = [_read_index(r["frames"][k]) for k in r["index"][0]]
    assert shown == list(range(7, 23))  # the central 16 of 30 frames at 10 fps


# ----------------------------------------------------------------------------------------------------
# whole runs

def run_prepare(*args, check=True):
    """prepare.main in this process (torch and torchvision are imported once for the whole file).

    Returns an object with returncode, stdout and stderr like subprocess.run; SystemExit(message) from
    bad arguments or layouts becomes returncode 1 with the message in stderr. These tests check the cache machinery
    on feature caches of 20 frames (the CNN's output is checked too); tests/test_augment.py: --store frames, whole clips.
    """
    args = [*args, *([] if "--store" in args else ["--store", "features", "--pretrain-frames", "20"])]
    import contextlib
    import io
    import types
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = prepare.main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int):
                err.write(str(e.code))
    p = types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())
    if check and rc != 0:
        raise AssertionError(f"prepare.py {args} -> {rc}\n{p.stdout}\n{p.stderr}")
    return p


FAST = ["--backbone", "random", "--size", "64", "--workers", "0", "--vocab-size", "300"]


def run_line(stdout):
    """The figures of a run's line 'prepare: N videos, F frames through the CNN in S s (R frames/s); the main process
    waited D s for decoding (--workers W) and C s for the CNN (device)'."""
    m = re.search(r"prepare: (\d+) videos, ([\d,]+) frames through the CNN in ([\d.]+) s \([\d,]+ frames/s\); the main "
                  r"process waited ([\d.]+) s for decoding \(--workers \d+\) and ([\d.]+) s for the CNN \(.+\)", stdout)
    assert m, stdout
    return dict(videos=int(m[1]), frames=int(m[2].replace(",", "")), seconds=float(m[3]), wait_decode=float(m[4]),
                wait_cnn=float(m[5]))


def make_k700(root, n_train=5, n_val=2):
    """A tiny K700 layout: 2.5 s clips with tones, a titles.csv, and clips that fall back to a title tag."""
    rng = np.random.default_rng(0)
    rows = ["youtube_id,title"]
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        label = ["abseiling", "playing cello"][i % 2]
        yid = f"vid_{i:02d}x-Y"  # youtube ids hold "_" and "-"
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        t = np.arange(int(2.5 * 16000)) / 16000
        wave = (0.2 * np.sin(2 * np.pi * (300 + 50 * i) * t) + 0.01 * rng.normal(size=len(t))).astype(np.float32)
        has_audio = i != 1
        tag = f"tagged title {i} ü" if i % 3 == 2 else None
        write_video(folder / f"{yid}_{10 * i:06d}_{10 * i + 10:06d}.mp4", 25 + i, rate=10 + i,
                    audio=(wave, 16000) if has_audio else None, title=tag)
        if tag is None:
            rows.append(f'{yid},"{label} video, number {i} ""quoted"""')
    root.mkdir(parents=True, exist_ok=True)
    (root / "titles.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def k700_single(tmp_path_factory):
    """One clean single run over a tiny K700 corpus: the reference for resume and shard tests."""
    root = make_k700(tmp_path_factory.mktemp("k700") / "k700")
    out = root.parent / "single"
    run_prepare("--root", root, "--out", out, "--shard-size", "2", *FAST)
    return root, out


def assert_same_cache(a, b):
    for name in sorted(p.name for p in Path(a).glob("shard_*")):
        for f in sorted((Path(a) / name).iterdir()):
            assert f.read_bytes() == (Path(b) / name / f.name).read_bytes(), f"{name}/{f.name} differs"
    assert sorted(p.name for p in Path(a).glob("shard_*")) == sorted(p.name for p in Path(b).glob("shard_*"))
    for f in ("prepare_errors.jsonl", "tokenizer.bpe", "listing.json"):
        assert (Path(a) / f).read_bytes() == (Path(b) / f).read_bytes(), f
    ma, mb = (json.loads((Path(p) / "manifest.json").read_text()) for p in (a, b))
    for key in ("shards", "shapes", "num_videos", "missing", "bytes_per_video", "tokenizer", "backbone"):
        assert ma[key] == mb[key], key


def test_k700_cache_contents_and_reader(k700_single):
    root, out = k700_single
    cache = FeatureCache(out)
    m = cache.manifest
    assert m["dataset"] == "k700" and m["backbone"] == "random" and m["backbone_seed"] == 0
    assert m["shapes"] == dict(clips=1, frames=20, grid=2, feature_dim=512, n_mels=80, audio_frames=296, max_tokens=128,
                               store="features", frame_size=64)
    assert len(cache) == m["num_videos"] == 7 and m["missing"] == dict(audio=1, text=0)
    assert [v["split"] for v in cache.videos].count("val") == 2
    for i, v in enumerate(cache.videos):
        s = cache[i]
        video = s["patches"][s["window"]]
        assert video.shape == (1, 20, 2, 2, 512) and video.dtype == np.float16
        assert (video >= 0).all() and np.isfinite(video).all()  # post-ReLU
        assert s["audio"].shape == (1, 80, 296) and s["tokens"].shape == (128,)
        assert cache.index(v["id"]) == i
        assert s["has_audio"] == (v["id"] != "vid_01x-Y_000010_000020")
        # titles round-trip through the stored ids (ids[:n-1] is the text, then eot, then pad)
        ids = s["tokens"].tolist()
        n = ids.index(cache.tokenizer.eot_id)
        assert cache.tokenizer.decode(ids[:n]) == v["title"] and set(ids[n + 1:]) <= {cache.tokenizer.pad_id}
    i = cache.index("vid_04x-Y_000040_000050")  # 2.9 s long, 14 fps: all 20 central frames are real
    assert cache[i]["frames"].tolist() == [20]
    assert cache.videos[i]["title"] == 'abseiling video, number 4 "quoted"'
    assert cache.videos[cache.index("vid_02x-Y_000020_000030")]["title"] == "tagged title 2 ü"  # from the tag
    with pytest.raises(KeyError, match="nope"):
        cache.index("nope")
    # a shard that disagrees with the manifest is refused with the file named
    bad = out.parent / "bad"
    shutil.copytree(out, bad)
    np.save(bad / "shard_00000" / "frames.npy", np.zeros((2, 3), np.int16))
    with pytest.raises(ValueError, match="frames.npy"):
        FeatureCache(bad)
    shutil.copy(out / "shard_00000" / "frames.npy", bad / "shard_00000" / "frames.npy")
    FeatureCache(bad)
    # a window index past the video's own patches (it would read the next video's frames) is refused too
    window = np.load(bad / "shard_00000" / "window.npy")
    window[0, 0, -1] = np.load(bad / "shard_00000" / "first_patch.npy")[1]
    np.save(bad / "shard_00000" / "window.npy", window)
    with pytest.raises(ValueError, match="do not index"):
        FeatureCache(bad)
    # a shard with no videos (every one skipped) is read as empty
    shutil.copy(out / "shard_00000" / "window.npy", bad / "shard_00000" / "window.npy")
    empty = bad / "shard_09999"
    empty.mkdir()
    for key, (dtype, dims) in prepare.SHARD_ARRAYS.items():
        np.save(empty / f"{key}.npy", np.zeros((0,) + tuple(m["shapes"][d] for d in dims), dtype))
    np.save(empty / "patches.npy", np.zeros((0, 2, 2, 512), np.float16))
    (empty / "videos.jsonl").write_text("")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"].append(empty.name)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert len(FeatureCache(bad)) == len(cache)
    (bad / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        FeatureCache(bad)
    # a truncated shard file or a corrupt manifest: one line naming the file and what to do
    shutil.copy(out / "manifest.json", bad / "manifest.json")
    patches = bad / "shard_00001" / "patches.npy"
    patches.write_bytes(patches.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"shard_00001/patches.npy: unreadable .*delete .*bad and run prepare.py"):
        FeatureCache(bad)
    (bad / "manifest.json").write_text('{"format": "lava-cache", ')
    with pytest.raises(ValueError, match=r"manifest.json: unreadable \(JSONDecodeError: .*the cache is damaged"):
        FeatureCache(bad)


def test_a_failed_first_run_never_blocks_the_corrected_one(k700_single, tmp_path, monkeypatch):
    """issue 13's new user: --backbone imagenet without the weights stops before writing anything, and the advised
    --backbone random re-run into the same --out succeeds; settings are locked only once a shard is finished, so a
    listing and a tokenizer made with another --vocab-size are made again."""
    root, single = k700_single
    out = tmp_path / "out"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))
    p = run_prepare("--root", root, "--out", out, "--shard-size", "2", *FAST[2:], check=False)
    assert p.returncode == 1 and "weights not found" in p.stderr and "--backbone random" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # one line that says what to do
    assert not out.exists()
    run_prepare("--root", root, "--out", out, "--shard-size", "2", "--list-only", *FAST[:-1], "280")
    run_prepare("--root", root, "--out", out, "--shard-size", "2", *FAST)
    assert_same_cache(out, single)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_a_device_torch_cannot_use_stops_in_one_line_before_writing(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    write_video(root / "a.mp4", 3, rate=10)
    for device, why in (("cuda", "torch sees 0 CUDA GPU(s) here"), ("gpu", "Expected one of")):
        p = run_prepare("--root", root, "--device", device, *FAST, check=False)
        assert p.returncode == 1 and p.stderr.startswith(f"prepare.py: --device {device}: {why}"), p.stderr
        assert p.stderr.endswith("; use --device cpu or auto") and "\n" not in p.stderr
        assert not (root / "lava_cache").exists()


def test_a_run_with_no_usable_video_fails_in_one_line(tmp_path):
    """...and leaves nothing that blocks the corrected re-run: with a good video added, the same command makes the
    cache, and a re-run with other settings is not refused for the failed run's empty shard."""
    root = tmp_path / "mine"
    root.mkdir()
    for name in ("a.mp4", "b.avi", "c.mkv"):
        (root / name).write_bytes(os.urandom(3000))
    p = run_prepare("--root", root, *FAST, check=False)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]  # after the progress bar's
    errors = root / "lava_cache" / "prepare_errors.jsonl"
    assert last == f"prepare: 0 of 3 videos usable (see {errors}): fix or replace the files and re-run"
    assert len(errors.read_text().splitlines()) == 3
    assert not (root / "lava_cache" / "manifest.json").exists()
    other = [*FAST, "--size", "32"]
    p = run_prepare("--root", root, *other, check=False)  # other settings, not refused: the same one line
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == last
    write_video(root / "good.mp4", 8, rate=10)
    run_prepare("--root", root, *other)  # the same command, the files fixed: the listing is made again
    cache = FeatureCache(root / "lava_cache")
    assert [v["id"] for v in cache.videos] == ["good.mp4"] and cache.manifest["listed_videos"] == 4
    assert cache.manifest["shapes"]["grid"] == 1


def test_help_shows_the_defaults_without_importing_the_heavy_libraries():
    code = ("import contextlib, io, sys, prepare\nout = io.StringIO()\nwith contextlib.redirect_stdout(out):\n"
            "    try:\n        prepare.main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(out.getvalue())\nprint(sorted(m for m in ('torch', 'cv2', 'av') if m in sys.modules))")
    p = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    text = " ".join(p.stdout.split())
    assert p.stdout.strip().endswith("[]")  # --help stays fast: torch, cv2 and av are imported only to prepare
    for default in ("--size SIZE the CNN's input side (a multiple of 32), cropped from SIZE x 8/7 (default: 224)",
                    "(default: 48000)", "(default: 10)", "(default: 256)", "cache folder (default: ROOT/lava_cache)"):
        assert default in text, default
    assert "(default: None)" not in text


def test_resume_after_kill_equals_single_run(k700_single, tmp_path):
    root, single = k700_single
    out = tmp_path / "out"
    # a real process, killed with SIGKILL as soon as its first shard has been renamed into place
    cmd = [PY, str(ROOT / "prepare.py"), "--root", str(root), "--out", str(out), "--shard-size", "2", *FAST,
           "--store", "features", "--pretrain-frames", "20"]  # as run_prepare
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 100
    while not (out / "shard_00000").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "shard_00000").is_dir() and not (out / "manifest.json").exists(), "not killed mid-run"
    with pytest.raises(FileNotFoundError, match="did not finish"):
        FeatureCache(out)
    left = [k for k in range(4) if not (out / prepare.shard_name(k)).is_dir()]
    p = run_prepare("--root", root, "--out", out, "--shard-size", "2", *FAST)
    assert f"{4 - len(left)} finished shard(s) kept, {len(left)} to go" in p.stdout
    assert_same_cache(out, single)
    assert run_line(p.stdout)["videos"] == sum(2 if k < 3 else 1 for k in left)  # the re-run decoded only those
    assert list(out.glob(".*tmp*")) == []  # the killed run's temp shard was cleared


def test_sharded_run_and_merge_equals_single_run(k700_single, tmp_path):
    root, single = k700_single
    out = tmp_path / "sharded"
    common = ["--root", root, "--out", out, "--shard-size", "2", "--num-shards", "2", *FAST]
    p0 = run_prepare(*common, "--shard-index", "0")
    assert "not finished yet" in p0.stdout and not (out / "manifest.json").exists()
    run_prepare(*common, "--workers", "2", "--shard-index", "1")  # decode in 2 processes (last flag wins)
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000", "shard_00001", "shard_00002", "shard_00003"]
    run_prepare("--root", root, "--out", out, "--shard-size", "2", "--merge", *FAST)
    assert_same_cache(out, single)
    # changed settings into a cache that holds finished shards are refused, in one line that says what to do
    p = run_prepare("--root", root, "--out", out, "--shard-size", "2", *FAST[:3], "32", *FAST[4:], check=False)
    assert p.returncode != 0 and "other settings" in p.stderr and "use another --out or delete it" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    # a flag that does not reach a pre-training cache's bytes (--test-clips) is no change: the re-run resumes
    p = run_prepare("--root", root, "--out", out, "--shard-size", "2", "--test-clips", "3", *FAST)
    assert_same_cache(out, single)


def test_cnn_batches_give_each_video_its_own_features(k700_single, tmp_path):
    """--batch-size 7: videos straddle batches, yet every stored feature is the backbone applied to that video's
    own frames."""
    import torch
    root, single = k700_single
    out = tmp_path / "b7"
    p = run_prepare("--root", root, "--out", out, "--shard-size", "2", "--batch-size", "7", *FAST)
    net = prepare.build_backbone("random", None, "cpu")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (prepare.IMAGENET_MEAN, prepare.IMAGENET_STD))
    cache, ref = FeatureCache(out), FeatureCache(single)
    job = dict(size=64, clips=1, frames=20, sampling="pretrain", audio_frames=296)
    unique_frames = 0
    for i, v in enumerate(cache.videos):
        r = decode_video(dict(job, path=str(root / v["path"])))
        unique_frames += len(r["frames"])
        x = (torch.from_numpy(r["frames"]).permute(0, 3, 1, 2).float() - mean) / std
        with torch.no_grad():
            want = net(x).permute(0, 2, 3, 1).numpy()[r["index"]]   # (C, T, G, G, 512)
        got = cache[i]["patches"][cache[i]["window"]].astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
        # and the same as with one batch per shard, up to float16 rounding of another summation order
        other = ref[ref.index(v["id"])]
        np.testing.assert_allclose(got, other["patches"][other["window"]].astype(np.float32), rtol=2e-3, atol=2e-3)
    # the run's last line counts exactly those frames, and its waits fit in its time (each printed to 0.01 s)
    run = run_line(p.stdout)
    assert run["frames"] == unique_frames and run["videos"] == 7
    assert 0 < run["wait_cnn"] and run["wait_decode"] + run["wait_cnn"] <= run["seconds"] + 0.02


def test_shard_write_errors_stop_the_run_and_a_rerun_completes(k700_single, tmp_path, monkeypatch):
    """An error writing features (here a full disk on the third shard) stops the run, nothing half-written is
    left in place, and a re-run completes to the same cache."""
    root, single = k700_single
    out = tmp_path / "out"
    write = prepare.ShardWriter._write_patches

    def disk_full_on_shard_2(self, *args):
        if self.final.name == prepare.shard_name(2):
            raise OSError(28, "No space left on device")
        write(self, *args)
    monkeypatch.setattr(prepare.ShardWriter, "_write_patches", disk_full_on_shard_2)
    with pytest.raises(OSError, match="No space left"):
        run_prepare("--root", root, "--out", out, "--shard-size", "2", *FAST)
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000", "shard_00001"]
    assert not (out / "manifest.json").exists() and list(out.glob(".*tmp*")) == []
    monkeypatch.setattr(prepare.ShardWriter, "_write_patches", write)
    run_prepare("--root", root, "--out", out, "--shard-size", "2", *FAST)
    assert_same_cache(out, single)

    # Ctrl-C in the main process (here on the first video of shard 1): one line, exit status 130, shard 0 complete
    # in place and no temp folder left
    out = tmp_path / "out2"
    tokens, calls = prepare._tokens, []

    def fail_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return tokens(*args)
    monkeypatch.setattr(prepare, "_tokens", fail_on_third)
    p = run_prepare("--root", root, "--out", out, "--shard-size", "2", *FAST, check=False)
    assert p.returncode == 130 and p.stderr.strip().splitlines()[-1] == (
        "prepare: interrupted with 1 of 4 shards finished; the same command continues")
    assert [p.name for p in out.glob("shard_*")] == ["shard_00000"] and list(out.glob(".*tmp*")) == []
    assert (out / "shard_00000" / "videos.jsonl").is_file()
    monkeypatch.setattr(prepare, "_tokens", tokens)
    run_prepare("--root", root, "--out", out, "--shard-size", "2", *FAST)
    assert_same_cache(out, single)

    # Ctrl-C while shard 1's writer is being made, its temp folder already there (a signal right after shard 0's
    # rename, as tests/test_prepare_pins.py sends them): that folder goes too
    out = tmp_path / "out3"
    header = prepare.ShardWriter._write_header

    def interrupt_in_shard_1(self, n):
        if self.final.name == prepare.shard_name(1):
            raise KeyboardInterrupt
        header(self, n)
    monkeypatch.setattr(prepare.ShardWriter, "_write_header", interrupt_in_shard_1)
    p = run_prepare("--root", root, "--out", out, "--shard-size", "2", *FAST, check=False)
    assert p.returncode == 130 and [p.name for p in out.glob("shard_*")] == ["shard_00000"]
    assert list(out.glob(".*tmp*")) == []


def test_shard_abort_on_a_full_disk_still_removes_the_temp_folder(tmp_path):
    # abort() runs while an error is leaving prepare: when the disk is full, closing patches.npy (whose buffer
    # still holds bytes) fails again; that must not mask the error nor leave the temp folder behind
    shapes = dict(clips=1, frames=20, grid=2, feature_dim=512, n_mels=80, audio_frames=296, max_tokens=128)
    writer = prepare.ShardWriter(tmp_path, prepare.shard_name(0), shapes, encoder=None)

    class FullDisk:
        def close(self):
            raise OSError(28, "No space left on device")
    writer.patches.close()
    writer.patches = FullDisk()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_frame_encoder_batches_equal_frames_alone():
    # the encoder reuses one input buffer: each call's features are the frames' own, whatever the batch, and
    # stay valid after the buffer is refilled
    enc = prepare.FrameEncoder("random", None, "cpu", size=32, batch_size=3)
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    enc.batch[:] = frames
    together = enc(3)
    alone = []
    for frame in frames:
        enc.batch[0] = frame
        alone.append(enc(1)[0])
    np.testing.assert_allclose(together, np.stack(alone), rtol=1e-3, atol=1e-3)  # another batch size
    enc.batch[:] = 0
    assert not np.allclose(enc(3), together)
    np.testing.assert_allclose(together, np.stack(alone), rtol=1e-3, atol=1e-3)  # not a view of the buffer
    enc.batch[:] = frames
    assert np.array_equal(enc(3), together)  # the same batch, the same bytes: what a byte-identical resume needs
    assert together.shape == (3, 1, 1, 512) and together.dtype == np.float16 and enc.frames_done == 12


def test_bad_inputs_never_stop_a_run(tmp_path):
    import av
    root = tmp_path / "k700"
    good = root / "train" / "a"
    good.mkdir(parents=True)
    t = np.arange(16000 * 2) / 16000
    write_video(good / "good_000000_000010.mp4", 20, rate=10, audio=(0.2 * np.sin(600 * t).astype(np.float32), 16000))
    write_video(good / "gray_000000_000010.mp4", 20, rate=10, pix_fmt="gray")
    write_video(good / "odd_000000_000010.mp4", 20, rate=10, size=(35, 19), pix_fmt="yuv444p")  # odd sides
    write_video(good / "single_000000_000010.mp4", 1, rate=10)
    (good / "zero_000000_000010.mp4").write_bytes(b"")
    (good / "junk_000000_000010.mp4").write_bytes(os.urandom(5000))
    data = (good / "good_000000_000010.mp4").read_bytes()
    (good / "trunc_000000_000010.mp4").write_bytes(data[: len(data) // 3])  # index at the end: unreadable
    noise = np.random.default_rng(0).integers(0, 255, (40, 64, 64, 3), dtype=np.uint8)  # frames dominate the bytes
    write_video(good / "cut_000000_000010.mp4", 40, rate=10, options={"movflags": "faststart"}, content=noise.__getitem__)
    data = (good / "cut_000000_000010.mp4").read_bytes()
    (good / "cut_000000_000010.mp4").write_bytes(data[: len(data) // 2])  # index first: half decodes
    with av.open(str(good / "audioonly_000000_000010.mp4"), "w") as c:  # no video stream
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        for k in range(0, 16000, 1024):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
            f.sample_rate, f.pts = 16000, k
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    dup = root / "train" / "b"
    dup.mkdir()
    shutil.copy(good / "good_000000_000010.mp4", dup / "good_000000_000010.mp4")  # same id, another label
    (root / "titles.csv").write_bytes(b"youtube_id,title\ngood,caf\xe9 \xff title\ngray,\"   \"\nodd,odd one\n"
                                      b"odd,odd again\nsingle,one frame\n")
    p = run_prepare("--root", root, "--shard-size", "3", *FAST)
    cache = FeatureCache(root / "lava_cache")
    ids = [v["id"] for v in cache.videos]
    assert ids == ["cut_000000_000010", "good_000000_000010", "gray_000000_000010", "odd_000000_000010",
                   "single_000000_000010"]
    errors = [json.loads(line) for line in (root / "lava_cache" / "prepare_errors.jsonl").read_text().splitlines()]
    by_path = {}
    for e in errors:
        by_path.setdefault(e["path"].split("/")[-1].split(":")[0], []).append(e)
    for name in ("zero", "junk", "trunc", "audioonly"):
        e = by_path[f"{name}_000000_000010.mp4"]
        assert any(x["action"] == "skipped" for x in e), (name, e)
    assert "zero-byte" in by_path["zero_000000_000010.mp4"][0]["reason"]
    assert any("duplicate id" in e["reason"] and e["path"] == "train/b/good_000000_000010.mp4" for e in errors)
    assert any("not valid UTF-8" in e["reason"] for e in errors)
    assert any("duplicate title row" in e["reason"] for e in errors)
    v = cache.videos
    assert any("truncated" in e["reason"] for e in by_path["cut_000000_000010.mp4"])
    assert 5 <= cache[0]["frames"][0] < 20  # the decodable half, clip planned on it
    assert v[1]["title"] == "caf\ufffd \ufffd title"
    assert v[2]["title"] is None and not cache[2]["has_text"]  # blank title -> missing text
    assert v[3]["title"] == "odd one"
    assert cache[4]["frames"].tolist() == [1]  # the single frame, repeated, 1 real
    assert f"{len(errors)} skipped or degraded files; see {root / 'lava_cache' / 'prepare_errors.jsonl'}" in p.stdout


def _fragile(job):
    """A stand-in decoder for decode_stream: returns its number, dies like a segfaulting decoder, or hangs."""
    if job == "crash":
        os._exit(11)
    if job == "hang":
        time.sleep(60)
    return job


def _torch_threads(job):
    import torch
    return torch.get_num_threads()


def test_decode_workers_run_torch_on_one_thread():
    # each worker decodes one video on one core; the mel transform must not spread over the others
    assert list(prepare.decode_stream([0, 1], workers=1, fn=_torch_threads)) == [1, 1]


def test_decode_stream_survives_a_crashing_and_a_hanging_decoder():
    jobs = [0, 1, "crash", 3, 4, "hang", 6]
    out = list(prepare.decode_stream(jobs, workers=1, timeout=3, fn=_fragile))
    assert out[:2] == [0, 1] and out[3:5] == [3, 4] and out[6] == 6
    assert out[2]["ok"] is False and "crashed" in out[2]["reason"]
    assert out[5]["ok"] is False and "longer than" in out[5]["reason"]


def test_decode_stream_survives_a_crash_while_the_consumer_is_busy():
    # the usual case in prepare: the main thread is away feeding the CNN when a decoder dies, so the pool is
    # already broken when the next video is submitted; that must not stop the run either
    out = []
    for result in prepare.decode_stream([0, 1, "crash", 3, 4, 5], workers=2, timeout=10, fn=_fragile):
        out.append(result)
        time.sleep(0.3)
    assert out[:2] == [0, 1] and out[3:] == [3, 4, 5]
    assert out[2]["ok"] is False and "crashed" in out[2]["reason"]


def test_decode_stream_hands_frames_over_in_shared_memory(tmp_path):
    # the workers' frames reach the main process as torch tensors in shared memory (mapped, not copied through
    # the pool's pipe): the results equal in-process decoding, also when the consumer stops early
    videos = [write_video(tmp_path / f"v{k}.mp4", 12 + 5 * k, rate=10) for k in range(3)]
    jobs = [dict(path=str(v), size=32, clips=2, frames=8, sampling="eval", audio_frames=176) for v in videos]
    inline = list(prepare.decode_stream(jobs, workers=0))
    pooled = list(prepare.decode_stream(jobs, workers=2))
    for a, b in zip(inline, pooled):
        assert isinstance(b["frames"], np.ndarray) and np.array_equal(a["frames"], b["frames"])
        assert b["frames"].base.is_shared()  # a view of the tensor the worker handed over
        assert np.array_equal(a["index"], b["index"]) and np.array_equal(a["mel"], b["mel"]) and a["notes"] == b["notes"]
    stream = prepare.decode_stream(jobs, workers=2)
    assert np.array_equal(next(stream)["frames"], inline[0]["frames"])
    stream.close()


def _shm_full(k):
    """A worker whose shared-memory segments cannot grow past 1 MiB (a file-size limit stands in for a full
    /dev/shm, whose tmpfs answers the same way); video 1 hands over 6 MB of frames, the others 1 KiB."""
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    return dict(ok=True, k=k, frames=np.full((40 if k == 1 else 1, 224 if k == 1 else 16, 224 if k == 1 else 16, 3),
                                             k, np.uint8))


def test_decode_stream_falls_back_to_the_pipe_when_shared_memory_is_full():
    # a video whose frames do not fit in /dev/shm (docker's 64 MB default) travels through the pool's pipe: the
    # run goes on and its frames arrive whole, where the hand-off's RuntimeError once stopped the run
    out = list(prepare.decode_stream([0, 1, 2], workers=2, timeout=60, fn=_shm_full))
    assert [r["k"] for r in out] == [0, 1, 2] and out[1]["frames"].shape == (40, 224, 224, 3)
    assert all((r["frames"] == r["k"]).all() for r in out)
    assert out[0]["frames"].base.is_shared() and not hasattr(out[1]["frames"].base, "is_shared")


def test_decode_stream_tears_its_pools_down_before_returning(monkeypatch):
    # the pool's manager thread and processes must be finished when decode_stream is done, on the normal path
    # and when the consumer stops early with a decoder hung: a teardown still running at interpreter exit races
    # CPython's exit hook, which wrote to the closing pipe (the stray "OSError: [Errno 9] Bad file descriptor")
    seen, spawn = [], prepare._spawn_pool

    def spy(workers):
        ex = spawn(workers)
        shutdown = ex.shutdown

        def recorded(*args, **kwargs):  # what shutdown() is to wait for
            seen.append((ex._executor_manager_thread, ex._executor_manager_thread_wakeup, list(ex._processes.values())))
            shutdown(*args, **kwargs)
        ex.shutdown = recorded
        return ex
    monkeypatch.setattr(prepare, "_spawn_pool", spy)
    assert list(prepare.decode_stream([0, 1, 2, 3], workers=2, fn=_fragile)) == [0, 1, 2, 3]
    results = prepare.decode_stream([0, 1, "hang", 3], workers=2, fn=_fragile)
    assert next(results) == 0
    t0 = time.time()
    results.close()  # videos still in flight, one of them hung: killed, and torn down before close() returns
    assert time.time() - t0 < 30 and len(seen) == 2
    for thread, wakeup, processes in seen:
        assert thread is not None and not thread.is_alive() and wakeup._closed
        assert processes and not any(p.is_alive() for p in processes)


def test_kill_pool_never_raises():
    class Broken:
        _processes = None

        def shutdown(self, *a, **k):
            raise OSError(9, "Bad file descriptor")
    prepare._kill_pool(Broken())


# ----------------------------------------------------------------------------------------------------
# layouts

def test_layout_detection_and_errors(tmp_path):
    (tmp_path / "ucf" / "UCF-101" / "Archery").mkdir(parents=True)
    write_video(tmp_path / "ucf" / "UCF-101" / "Archery" / "v_Archery_g01_c01.avi", 12, rate=25, codec="mpeg4")
    (tmp_path / "hmdb" / "videos" / "brush_hair").mkdir(parents=True)
    (tmp_path / "hmdb" / "testTrainMulti_7030_splits").mkdir()
    (tmp_path / "k700" / "train").mkdir(parents=True)
    (tmp_path / "mine" / "deep" / "er").mkdir(parents=True)
    write_video(tmp_path / "mine" / "deep" / "er" / "clip.mkv", 5, rate=10)
    (tmp_path / "empty").mkdir()
    assert prepare.detect_layout(tmp_path / "ucf") == "ucf101"
    assert prepare.detect_layout(tmp_path / "hmdb") == "hmdb51"
    assert prepare.detect_layout(tmp_path / "k700") == "k700"
    assert prepare.detect_layout(tmp_path / "mine") == "folder"
    for bad in ("empty", "missing"):  # a one-line error (SystemExit, no traceback) naming every layout
        with pytest.raises(SystemExit) as e:
            prepare.detect_layout(tmp_path / bad)
        assert all(name in str(e.value) for name in ("k700", "UCF-101", "testTrainMulti_7030_splits", "folder"))
        assert "\n" not in str(e.value) and "README: Laying out real data" in str(e.value)
    for layout, folder in (("ucf101", "mine"), ("hmdb51", "hmdb")):  # --dataset names a layout --root lacks
        with pytest.raises(SystemExit) as e:
            prepare.list_videos(tmp_path / folder, layout, tmp_path / "out")
        assert f"no video files under {tmp_path / folder / ('UCF-101' if layout == 'ucf101' else 'videos')}" in str(
            e.value) and "\n" not in str(e.value)
    videos, _ = prepare.list_videos(tmp_path / "ucf", "ucf101", tmp_path / "out")
    assert videos == [dict(id="Archery/v_Archery_g01_c01.avi", path="UCF-101/Archery/v_Archery_g01_c01.avi",
                           label="Archery", split=None, title=None)]
    p = run_prepare("--root", tmp_path / "empty", *FAST, check=False)
    assert p.returncode != 0 and "ucf101" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    # a user's own folder: recursive, titles from titles.csv (by path) or the file's own tag, else none
    write_video(tmp_path / "mine" / "tagged.mp4", 8, rate=10, title="my tagged clip")
    write_video(tmp_path / "mine" / "plain.mp4", 8, rate=10)
    (tmp_path / "mine" / "titles.csv").write_text("path,title\ndeep/er/clip.mkv,from the csv\n")
    run_prepare("--root", tmp_path / "mine", "--test-clips", "2", *FAST)
    cache = FeatureCache(tmp_path / "mine" / "lava_cache")
    assert cache.manifest["dataset"] == "folder" and cache.manifest["shapes"]["clips"] == 2
    assert {v["id"]: v["title"] for v in cache.videos} == {
        "deep/er/clip.mkv": "from the csv", "plain.mp4": None, "tagged.mp4": "my tagged clip"}
    assert [cache[i]["has_text"] for i in range(3)] == [True, False, True]


def test_ucf_eval_run_end_to_end(tmp_path):
    root = tmp_path / "ucf101"
    for cls, n in (("Archery", 31), ("HandstandPushups", 9)):  # 3.1 s and 0.9 s at 10 fps source
        (root / "UCF-101" / cls).mkdir(parents=True)
        write_video(root / "UCF-101" / cls / f"v_{cls}_g01_c01.avi", n, rate=10, codec="mpeg4")
    p = run_prepare("--root", root, "--test-clips", "3", *FAST)
    assert " in 1 shard(s), " in p.stdout and "listing notes" not in p.stdout  # not "(0 listing notes)"
    cache = FeatureCache(root / "lava_cache")
    assert cache.manifest["shapes"]["clips"] == 3 and cache.manifest["shapes"]["frames"] == 16
    assert cache.manifest["tokenizer"] is None and cache.tokenizer is None
    assert [v["id"] for v in cache.videos] == ["Archery/v_Archery_g01_c01.avi", "HandstandPushups/v_HandstandPushups_g01_c01.avi"]
    long, short = cache[0], cache[1]
    long_video, short_video = (item["patches"][item["window"]] for item in (long, short))  # (C, T, G, G, F)
    assert long_video.shape == (3, 16, 2, 2, 512) and long["frames"].tolist() == [16, 16, 16]
    assert short["frames"].tolist() == [9, 9, 9] and not short["has_text"] and not short["has_audio"]
    assert (short["tokens"] == 299).all()  # all padding: --vocab-size 300 -> pad id 299
    # overlapping windows share frames: windows start at grid frames 0, 8, 15 of 31
    assert long["window"][:, 0].tolist() == [0, 8, 15]
    assert np.array_equal(long_video[0, 8:], long_video[1, :8])
    assert np.array_equal(short_video[0, 9:], np.broadcast_to(short_video[0, 8], (7, 2, 2, 512)))
    # and each distinct grid frame is stored once: 31 frames of features for the 3 x 16 windows; the short video's
    # three windows are the same 16 grid frames (9 real, then the last one repeated: 9 stored)
    assert len(long["patches"]) == 31 and len(short["patches"]) == 9
    assert (short["window"] == np.minimum(np.arange(16), 8)).all()
    assert np.load(root / "lava_cache" / "shard_00000" / "patches.npy", mmap_mode="r").shape == (40, 2, 2, 512)


def test_titles_csv_path_keys_and_rows_that_match_no_video(tmp_path, monkeypatch):
    """A path key written ./x.mp4 or as an absolute path under ROOT (a relative --root too) is the path under ROOT;
    the rows that match no video are counted in one prepare_errors row with an example key and the accepted keys."""
    monkeypatch.chdir(tmp_path)
    root = Path("mine")
    (root / "sub").mkdir(parents=True)
    for name in ("chaplin.mp4", "sub/fire2.mp4", "plain.mp4"):
        write_video(root / name, 3, rate=10)
    (root / "titles.csv").write_text(f"path,title\n./chaplin.mp4,the kid\n{tmp_path}/mine/sub/fire2.mp4,fire at night\n"
                                     "./gone.mp4,lost\n/elsewhere/plain.mp4,lost too\n")
    videos, errors = prepare.list_videos(root, "folder", root / "lava_cache")
    assert {v["id"]: v["title"] for v in videos} == {"chaplin.mp4": "the kid", "plain.mp4": None,
                                                     "sub/fire2.mp4": "fire at night"}
    (tmp_path / "link").symlink_to(tmp_path / "mine")  # --root through a symlink, keys written with the real path
    assert {v["id"]: v["title"] for v in prepare.list_videos(Path("link"), "folder", Path("link/lava_cache"))[0]}[
        "sub/fire2.mp4"] == "fire at night"
    assert errors == [dict(path="mine/titles.csv", reason="2 of 4 rows match no video (e.g. key 'gone.mp4'); a key is "
                           "a video's youtube_id (k700), its path under mine, its id or its file name without "
                           "extension", action="rows ignored")]


def test_titles_csv_header_with_byte_order_mark(tmp_path):
    # spreadsheet exports start with a UTF-8 BOM; the header must still be found whatever the column order
    path = tmp_path / "titles.csv"
    path.write_bytes("\ufefftitle,youtube_id\r\n\"a, quoted\",abcdefghijk\r\n".encode())
    errors = []
    assert prepare.read_titles_csv(path, errors) == {"abcdefghijk": "a, quoted"} and errors == []
    path.write_bytes(b"youtube_id,name\nabcdefghijk,x\n")
    assert prepare.read_titles_csv(path, errors) == {} and "no `title` column" in errors[0]["reason"]
    # a row without its title column, then a quote left open that swallows the rest: counted, not silently lost
    path.write_text('youtube_id,title\nabcdefghijk,one\n\nshortrow\nlmnopqrstuv,"open quote\nzzzzzzzzzzz,lost\n')
    errors = []
    assert prepare.read_titles_csv(path, errors) == {"abcdefghijk": "one", "lmnopqrstuv": "open quote zzzzzzzzzzz,lost"}
    assert errors == [dict(path=f"{path}:5", reason="the title spans several lines (a quote left open?)",
                           action="kept, lines joined"),
                      dict(path=str(path), reason="rows without both a youtube_id and a title: 1 (e.g. line 4)",
                           action="rows ignored")]
    # notes name physical lines, also after a title quoted over two lines (csv rows and file lines differ)
    path.write_text('youtube_id,title\nabcdefghijk,"two\nlines"\nshortrow\nabcdefghijk,again\n')
    errors = []
    assert prepare.read_titles_csv(path, errors) == {"abcdefghijk": "two lines"}
    assert [e["path"] for e in errors] == [f"{path}:2", f"{path}:5", str(path)] and "line 4" in errors[2]["reason"]


def test_a_rescan_that_would_retrain_another_tokenizer_is_refused(tmp_path):
    """Finished shards hold token ids: a titled video added where no finished shard looks (after them) would retrain
    the tokenizer, and with it the meaning of those ids, so that re-scan is refused too. A stray shard_* folder that is
    not a shard (a backup) is not taken for one."""
    root, out = tmp_path / "mine", tmp_path / "mine" / "lava_cache"
    root.mkdir()
    rows = "path,title\na.mp4,a dog on a bike\nb.mp4,a cat on a mat\n"
    for name in ("a.mp4", "b.mp4"):
        write_video(root / name, 8, rate=10)
    (root / "titles.csv").write_text(rows)
    run_prepare("--root", root, "--test-clips", "1", "--shard-size", "2", *FAST)
    (out / "shard_00000.bak").mkdir()
    write_video(root / "c.mp4", 8, rate=10)
    (root / "titles.csv").write_text(rows + "c.mp4,zzzz zzzz zzzz\n")  # shard_00001's: shard_00000 is unchanged
    (out / "listing.json").unlink()
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    p = run_prepare("--root", root, "--test-clips", "1", "--shard-size", "2", *FAST, check=False)
    assert p.returncode == 1 and p.stderr == (
        f"prepare.py: the titles under {root} changed since the shards in {out} were built (a retrained tokenizer "
        f"would change their token ids); use a new --out, or delete {out}, to rebuild"), p.stderr
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    # shards built with no title at all (no tokenizer: all padding), then a titled video after them: refused too
    (root / "titles.csv").unlink()
    (root / "c.mp4").unlink()
    shutil.rmtree(out)
    run_prepare("--root", root, "--test-clips", "1", "--shard-size", "2", *FAST)
    write_video(root / "c.mp4", 8, rate=10)
    (root / "titles.csv").write_text("path,title\nc.mp4,zzzz zzzz zzzz\n")
    (out / "listing.json").unlink()
    p = run_prepare("--root", root, "--test-clips", "1", "--shard-size", "2", *FAST, check=False)
    assert p.returncode == 1 and "the titles under" in p.stderr and not (out / "listing.json").exists(), p.stderr


def test_a_rescan_that_changes_a_finished_shard_is_refused(tmp_path):
    """listing.json deleted to re-scan ROOT: the finished shards are kept only if each holds exactly its slice of the
    new listing (its videos and its skipped files); a video added or removed is refused in one line, nothing written."""
    root, out = tmp_path / "mine", tmp_path / "mine" / "lava_cache"
    root.mkdir()
    write_video(root / "a.mp4", 8, rate=10)
    write_video(root / "b.mp4", 8, rate=10)
    (root / "bad.mp4").write_bytes(os.urandom(3000))  # skipped: in the shard's errors.jsonl, not its videos.jsonl
    run_prepare("--root", root, "--test-clips", "1", *FAST)
    (out / "listing.json").unlink()
    p = run_prepare("--root", root, "--test-clips", "1", *FAST)  # the same videos: the shard is kept
    assert "1 finished shard(s) kept, 0 to go" in p.stdout and FeatureCache(out).manifest["listed_videos"] == 3
    write_video(root / "new_video.mp4", 8, rate=10)
    p = run_prepare("--root", root, "--test-clips", "1", *FAST)
    assert f"3 videos from {out / 'listing.json'} (delete it to re-scan {root}; finished shards must " in p.stdout
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file() and f.name != "listing.json"}
    for change in ("added", "removed"):
        if change == "removed":
            (root / "new_video.mp4").unlink()
            (root / "b.mp4").unlink()
        (out / "listing.json").unlink(missing_ok=True)
        p = run_prepare("--root", root, "--test-clips", "1", *FAST, check=False)
        path = "new_video.mp4 added to" if change == "added" else "b.mp4 removed from"
        assert p.returncode == 1 and p.stderr == (
            f"prepare.py: the videos under {root} changed since the shards in {out} were built (e.g. {path} "
            f"shard_00000); use a new --out, or delete {out}, to rebuild"), p.stderr
        assert not (out / "listing.json").exists()
        assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    (root / "b.mp4").write_bytes(b"")  # back in the listing (skipped again): only a new title differs now
    (root / "titles.csv").write_text("path,title\na.mp4,a new title\n")
    assert "a.mp4 retitled in shard_00000" in run_prepare("--root", root, "--test-clips", "1", *FAST, check=False).stderr
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before

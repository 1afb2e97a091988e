"""prepare.py: a video dataset folder -> a feature cache that pretrain.py and probe.py read (README: Feature cache).

    python prepare.py --root data/k700 --workers 12   # README: Feature cache (shard jobs, --merge; any re-run resumes)

The inputs of LAVA (Section 3), per video, in the order of this file:
  1. frames at 10 fps (clip_plan, sample_frames): k700 keeps the whole clip (up to --pretrain-frames, 100 = 10 s),
     for pretrain.py's 16-frame windows, random crops and flips; ucf101, hmdb51 and any folder keep --test-clips
     (10) uniformly spaced 16-frame windows of the centre crop, their distinct frames stored once;
  2. audio: 16 kHz mono log-mel, 80 bins, a window aligned with each clip (load_audio, log_mel_windows), and the
     mean and std of the training clips' log-mel (manifest audio_stats) that the model standardises with;
  3. video: pre-training caches store the frames as JPEG (--store frames), and pretrain.py runs the frozen
     ResNet-18 on each random crop; evaluation caches (and --store features) store its layer4 features of the
     centre crop, (G, G, 512) per frame (build_backbone, frame_features, FrameEncoder);
  4. text: the title (titles.csv, else the file's `title` tag) as BPE ids (bpe.py, _tokens).
main() runs them over a dataset; then the machinery: layouts, decode workers, shards and FeatureCache, the reader.
"""
import argparse
import contextlib
import csv
import functools
import itertools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bpe import BPETokenizer, write_atomic

CACHE_FORMAT, CACHE_VERSION = "lava-cache", 3
FPS = 10                                  # the paper's clips: 16 frames at 10 fps
SAMPLE_RATE, N_FFT, HOP, N_MELS = 16000, 400, 160, 80  # 25 ms windows, 10 ms hop: 10 mel frames per video frame
MAX_TOKENS = 128                          # title length in BPE ids
FEATURE_DIM = 512                         # ResNet-18 layer4 channels
EVAL_FRAMES = 16                          # the model's clip length
TIME_TOL = 1e-5                           # s; frame timestamps are exact rationals printed as doubles
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STORED_SCALE = 8 / 7                      # --store frames keeps 256 px for 224 px crops: ImageNet's resize/crop ratio
_FULL_SCALE = {np.dtype(np.int16): 2 ** 15, np.dtype(np.int32): 2 ** 31, np.dtype(np.uint8): 2 ** 7}  # integer PCM
VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp", ".ogv", ".wmv"}


# ==================================== The method, one video at a time ====================================
# 1. frames: which 10 fps frames, then OpenCV decodes the file once and keeps the frame on screen at each time

def clip_plan(num_frames, clips, frames, sampling):
    """Which 10 fps frames each clip holds, for a video of num_frames (K) frames on the 10 fps grid: (targets (U,)
    sorted unique frame indices to decode, index (clips, frames) into targets, starts (clips,) first grid frame of
    each clip). clip_plan(30, 3, 16, "eval") -> starts [0, 7, 14]: windows overlap, U = 30 frames serve 48 slots."""
    K = max(1, int(num_frames))
    if sampling == "pretrain" or clips == 1 or K <= frames:  # the central frames (a short video: from the first)
        starts = [max(0, (K - frames) // 2)] * clips
    else:  # uniformly spaced windows from the first frame to the last
        starts = [int(round(c * (K - frames) / (clips - 1))) for c in range(clips)]
    # (C, T) 10 fps frame indices; past the video's end the last frame repeats (one stored frame)
    grid = np.minimum(np.asarray(starts)[:, None] + np.arange(frames)[None, :], K - 1)
    targets, index = np.unique(grid, return_inverse=True)
    return targets, index.reshape(grid.shape), np.asarray(starts)


def sample_frames(path, targets, size):
    """Decode `path` once; return the source frames on screen at times targets / 10 s (targets: sorted (U,) grid
    indices): (frames uint8 (U, size, size, 3) RGB, real (U,) bool (False: past the end, the last frame repeated),
    src (U,) source frame numbers, misses, end: seconds up to which frames were seen).

    The frame for time t is the one whose timestamp (CAP_PROP_POS_MSEC) is <= t while the next one's is > t, so
    29.97 fps and variable-rate files land on the right frames. grab() decodes every frame; retrieve() (the colour
    conversion) runs only when the next target lies within one frame interval (the longest seen, +1% unless all
    were equal), as OpenCV retrieves only the frame just grabbed. A VFR gap longer than any before can hide the
    right frame: a fresh capture decodes up to it again (`misses`). The kept frames never depend on the margins.
    """
    import cv2
    cap = _open_cv(path)
    if not cap.isOpened():
        raise BadVideo("OpenCV cannot open it (not a video, no video stream, or unreadable)")
    fps_meta = cap.get(cv2.CAP_PROP_FPS)
    fps_meta = fps_meta if 0 < fps_meta < 1000 else 25.0  # 0, NaN or inf when the container states none
    times, n = np.asarray(targets, dtype=np.float64) / FPS, len(targets)
    out, real, src = np.empty((n, size, size, 3), np.uint8), np.zeros(n, bool), np.full(n, -1, np.int64)
    i, j, misses = 0, -1, 0            # i: next target to serve; j: number of the frame just grabbed
    prev_pts, max_dt, min_dt = None, 0.0, math.inf   # frame intervals seen so far
    cand, cand_src, buf = None, -1, None  # the last retrieved frame (squared), its number; retrieve()'s reused buffer
    try:
        while i < n and cap.grab():
            j += 1
            pts = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            if prev_pts is not None:  # missing or non-monotonic timestamps: the nominal rate
                pts = pts if pts > prev_pts else prev_pts + 1.0 / fps_meta
                max_dt, min_dt = max(max_dt, pts - prev_pts), min(min_dt, pts - prev_pts)
            prev_pts = pts
            if times[i] < pts - TIME_TOL and cand_src != j - 1:  # j >= 1: before any retrieve(), cand_src is -1
                # frame j-1 was on screen but not retrieved (a VFR gap): decode 0 .. j-1 again, retrieve the last
                again = _open_cv(path)
                img = again.retrieve()[1] if all(again.grab() for _ in range(j)) else None  # all(): stops at a failure
                again.release()  # (an exception leaves it to the destructor, when the error is handled)
                misses += 1
                if img is not None:
                    cand, cand_src = _square(img, size), j - 1
            while i < n and times[i] < pts - TIME_TOL and cand is not None:
                out[i], real[i], src[i] = cand, True, cand_src
                i += 1
            # constant rate so far: the next frame lands at pts + dt exactly, so a frame dt before the
            # target is not needed (25 fps: 1 retrieve per kept frame instead of 1.5); else a 1% margin
            margin = max_dt - TIME_TOL if max_dt - min_dt < TIME_TOL else 1.01 * max_dt + TIME_TOL
            if i < n and (max_dt == 0.0 or times[i] - pts < margin) and cand_src != j:
                ok, buf = cap.retrieve(buf)
                if ok and buf is not None:
                    cand, cand_src = _square(buf, size), j
    finally:
        cap.release()
    if cand is None:
        raise BadVideo("no decodable video frame")
    # the stream ended: the last frame stays on screen one more interval; later times are padding (it repeated)
    end = prev_pts + (max_dt if max_dt > 0 else 1.0 / fps_meta)
    for k in range(i, n):
        out[k], src[k] = cand, cand_src
        real[k] = cand_src == j and times[k] < end - TIME_TOL
    return out, real, src, misses, end


def _square(img, size):
    """Any decoded picture -> RGB uint8 (size, size, 3): centre square, resized. Shrinking: an exact k x k box
    filter (INTER_AREA's fast path) to 1-2x the target, then bilinear: INTER_AREA's anti-aliasing for less work."""
    import cv2
    h, w = img.shape[:2]
    m = min(h, w)
    img = img[(h - m) // 2:(h - m) // 2 + m, (w - m) // 2:(w - m) // 2 + m]
    k = m // size
    if k >= 2:
        n = (m // k) * k                       # trim a few edge pixels so the box filter tiles exactly
        o = (m - n) // 2
        img = cv2.resize(img[o:o + n, o:o + n], (n // k, n // k), interpolation=cv2.INTER_AREA)
    if img.shape[0] != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)  # on the small picture; OpenCV's FFmpeg capture hands out BGR only


def _open_cv(path):
    """cv2.VideoCapture on FFmpeg, one decoder thread (a worker decodes one video per core), rotation applied.
    FFmpeg's full probe: a short one (probesize 32) shifted Matroska frame times by the B-frame reorder delay."""
    import cv2
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    return cap


# ------- 2. audio: PyAV -> 16 kHz mono, t = 0 at the first video frame -> log-mel windows per clip --------

def log_mel_windows(wave, starts, audio_frames):
    """Log-mel crops aligned with video clips: (C, 80, A) float32 for clip starts (C,) on the 10 fps grid.

    Mel frame m of the file is centred at m * 10 ms - 5 ms; a clip starting at 10 fps frame k0 takes frames
    m0 = 10 k0 - 47 .. m0 + A - 1, so its crop [10 s, 10 s + 256) is centred at k0/10 + s/10 + 0.8 s, the middle of
    video frames s .. s+15 (each on screen for 100 ms). Samples outside the file are zeros (constant padding), so
    the mel there is log(1e-6), the value of silence."""
    import torch
    m0 = FPS * np.asarray(starts, dtype=np.int64) - 47
    lo, hi = int(m0.min()), int(m0.max()) + audio_frames  # mel frames [lo, hi) cover every clip
    # x[f * HOP] is the centre of mel frame lo + f, i.e. sample (lo + f) * HOP - HOP // 2 of the wave
    x = np.zeros((hi - lo - 1) * HOP + 1, np.float32)
    a = lo * HOP - HOP // 2
    s0, s1 = max(a, 0), min(a + len(x), len(wave))
    if s1 > s0:
        x[s0 - a:s1 - a] = wave[s0:s1]
    mel = torch.log(_transform()(torch.from_numpy(x)) + 1e-6).numpy()  # (80, hi - lo); no tensor needs grad
    return np.stack([mel[:, m - lo:m - lo + audio_frames] for m in m0])


@functools.lru_cache(maxsize=None)
def _transform(rate=None):
    """torchaudio, built once per process: the mel filterbank (80 bins, 25 ms windows, 10 ms hop), or with `rate`
    the windowed-sinc resampler `rate` -> SAMPLE_RATE, on (n,) float32 tensors."""
    import torch
    import torchaudio
    if rate is not None:
        return torchaudio.transforms.Resample(rate, SAMPLE_RATE, dtype=torch.float32)
    return torchaudio.transforms.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=N_FFT, win_length=N_FFT,
                                                hop_length=HOP, n_mels=N_MELS, center=True, pad_mode="constant")


def load_audio(path):
    """(wave float32 (n,) 16 kHz mono with t = 0 at the first video frame, or None, reason or None) of one file,
    a video or a .wav/.flac. Decoding errors midway keep what was decoded (reason set)."""
    import av
    try:
        with av.open(str(path), metadata_errors="replace") as container:
            return _decode_audio(container, *_demux(container)[1:])
    except Exception as e:
        return None, f"cannot read its audio: {type(e).__name__}: {e}"


def _demux(container):
    """One pass over the file's packets, nothing decoded: (seconds of video from the first video packet's time to
    the end of the last one, or None; the first audio stream's packets; reason or None). The last packet lasts its
    stated duration, else (FLV states none) the median interval. A demuxing error keeps the packets before it."""
    streams = container.streams.video[:1] + container.streams.audio[:1]
    video, audio, reason = [], [], None  # video: (time, duration) of each packet, in the stream's time base
    try:
        for packet in container.demux(*streams):
            t = packet.pts if packet.pts is not None else packet.dts
            if packet.stream.type == "audio" and packet.size:
                audio.append(packet)
            elif packet.stream.type == "video" and t is not None:  # None: the demuxer's final empty packet
                video.append((int(t), int(packet.duration or 0)))
    except Exception as e:  # broken packets: keep what came before
        reason = f"audio decoding stopped early: {type(e).__name__}: {e}"
    if not video:
        return None, audio, reason
    times = np.sort([t for t, _ in video])
    last_time, last_duration = max(video)
    last_duration = last_duration or (int(np.median(np.diff(times))) if len(times) > 1 else 0)
    return float((last_time - int(times[0]) + last_duration) * streams[0].time_base) or None, audio, reason


def _decode_audio(container, packets, reason=None, until=None):
    """The audio packets of _demux -> load_audio's (wave, reason). `until`: stop once this many seconds are in hand
    (pre-training needs only the central clip's audio). The offset between the audio and video streams' start
    times is applied (zeros in front or samples dropped), since OpenCV counts frame times from the video's start."""
    import torch
    if not container.streams.audio:
        return None, "no audio stream"
    stream, vs = container.streams.audio[0], (container.streams.video or [None])[0]
    v0 = float(vs.start_time * vs.time_base) if vs is not None and vs.start_time is not None else 0.0
    tb = float(stream.time_base) if stream.time_base else None  # float once: Fractions per frame are slow
    chunks, first = [], None   # chunks: (sample rate, mono samples) of each frame; first: the first frame's time
    try:
        for frame in (f for packet in [*packets, None] for f in stream.decode(packet)):  # None flushes the decoder
            t = frame.pts * tb if frame.pts is not None and tb else None
            first = t if first is None else first
            if until is not None and t is not None and t - v0 > until:
                break
            x = frame.to_ndarray()  # (channels, n) planar, (1, n * channels) packed
            if not frame.format.is_planar:
                x = x.reshape(-1, len(frame.layout.channels)).T
            # the mean of the channels (swresample's stereo->mono downmix would scale by 1/sqrt(2): mels 0.35 nats off)
            mono = x.mean(axis=0, dtype=np.float32) - (128 if x.dtype == np.uint8 else 0)
            chunks.append((frame.sample_rate, mono / _FULL_SCALE.get(x.dtype, 1)))  # in [-1, 1]
    except Exception as e:  # broken packets: keep what decoded
        reason = f"audio decoding stopped early: {type(e).__name__}: {e}"
    # one resampling call per run of same-rate frames (torchaudio's windowed sinc, whose cost is mostly per call)
    parts = []
    for rate, run in itertools.groupby(chunks, key=lambda chunk: chunk[0]):
        x = torch.from_numpy(np.concatenate([mono for _, mono in run]))
        parts.append((_transform(rate)(x) if rate != SAMPLE_RATE else x).numpy())
    if not parts or not sum(len(p) for p in parts):
        return None, reason or "audio stream decodes to nothing"
    wave = np.concatenate(parts).astype(np.float32)
    shift = int(round(((first if first is not None else v0) - v0) * SAMPLE_RATE))
    wave = np.pad(wave, (shift, 0)) if shift > 0 else wave[-shift:]  # zeros in front, or samples dropped
    if not len(wave):
        return None, reason or "the audio ends before the first video frame"
    return wave, reason


# -------------------------- 3. video features: the frozen ResNet-18 up to layer4 --------------------------

def build_backbone(kind, weights_path, device):
    """torchvision resnet18 children up to layer4 (drops avgpool and fc), eval, frozen, channels_last. ImageNet
    weights missing or unreadable: a one-line ValueError, which prepare, pretrain and probe each print as theirs."""
    import torch
    import torchvision
    with torch.random.fork_rng(devices=[]):  # seed 0: every --backbone random cache sees the same backbone
        torch.manual_seed(0)
        net = torchvision.models.resnet18(weights=None)
    if kind == "imagenet":
        url, hub = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, Path(torch.hub.get_dir()) / "checkpoints"
        path = Path(weights_path) if weights_path else hub / Path(url).name
        if not path.is_file():
            raise ValueError(f"ImageNet ResNet-18 weights not found at {path}: pass --backbone-weights PATH ({url}; "
                             "README: ImageNet weights)")
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ValueError(f"cannot load ResNet-18 weights from {path} ({' '.join(str(e).split())}): pass "
                             "torchvision's resnet18-f37072fd.pth with --backbone-weights") from None
    body = torch.nn.Sequential(*list(net.children())[:-2])  # conv1 .. layer4: (B,3,S,S) -> (B,512,S/32,S/32)
    body.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)  # on its device once, for uint8
    body.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)    # frames (frame_features)
    body.eval().requires_grad_(False)
    return body.to(device=device, memory_format=torch.channels_last)


def frame_features(net, frames):
    """uint8 RGB frames (..., S, S, 3) on net's device -> layer4 features (..., G, G, 512), G = S / 32, post-ReLU,
    in one batch: ImageNet's mean/std, channels_last, bf16 on CUDA (float32 on the CPU). Also pretrain's, probe's."""
    import torch
    x = frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2).float()                   # (n, 3, S, S)
    x = ((x - net.mean) / net.std).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(frames.device.type, dtype=torch.bfloat16, enabled=frames.is_cuda):
        return net(x).permute(0, 2, 3, 1).unflatten(0, frames.shape[:-3])


def decode_jpegs(jpeg, spans):
    """A --store frames cache's frames: jpeg (bytes,) uint8, spans (n, 2) (offset, length) -> (n, S, S, 3) RGB."""
    import cv2
    return np.stack([cv2.cvtColor(cv2.imdecode(jpeg[o:o + n], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for o, n in spans])


class FrameEncoder:
    """uint8 RGB frames -> float16 patch features, one synchronous batch at a time: fill enc.batch[:n] (batch_size,
    S, S, 3) in place, then enc(n) -> (n, G, G, 512) float16 numpy of those n frames (frame_features)."""

    def __init__(self, kind, weights_path, device, size, batch_size):
        import torch
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = build_backbone(kind, weights_path, self.device)
        self.host = torch.empty((batch_size, size, size, 3), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        self.batch = self.host.numpy()  # a numpy view of the same memory (pinned on CUDA: the upload is a DMA copy)
        self.frames_done, self.wait_s = 0, 0.0  # frames encoded, seconds spent here: the CNN's share of the run

    def __call__(self, n):
        t0 = time.perf_counter()
        features = frame_features(self.net, self.host[:n].to(self.device, non_blocking=True)).half().cpu().numpy()
        self.frames_done += n
        self.wait_s += time.perf_counter() - t0  # .cpu() waited for the CNN
        return features


# -------- 1 + 2 for one video, in a decode worker process (the CNN batches many videos in _prepare) ---------

class BadVideo(Exception):
    """A file that cannot give frames; its message is the reason written to prepare_errors.jsonl."""


def decode_video(job):
    """job: {"path", "size", "clips", "frames", "sampling", "audio_frames", "store"} -> result dict; never raises.
    result: ok, frames uint8 (U, S, S, 3): the centre S = size crop of frames at 8/7 size (store "frames": the whole
    8/7-size frames' JPEGs end to end (bytes,) and jpeg_sizes (U,)), index (C, T) into frames, nreal (C,) int16, mel
    float16 (C, 80, A) or None, mel_moments (2,) (mean, mean square of the mel columns training windows read, for
    audio_stats), notes [(reason, action)]; or ok False and reason."""
    import av
    try:
        path = Path(job["path"])
        notes = []
        if not path.is_file() or path.stat().st_size == 0:
            raise BadVideo("zero-byte file" if path.is_file() else "file not found")
        # the clips are placed on the packets' duration (a header's can be a bit-rate estimate: MPEG-PS, TS, FLV)
        with av.open(str(path), metadata_errors="replace") as container:  # not a video: av's error is the reason
            if not container.streams.video:
                raise BadVideo("no video stream")
            duration, packets, reason = _demux(container)
            stated = container.duration / 1e6 if container.duration else None  # AV_TIME_BASE units
            if duration is None:
                notes.append(("duration unknown from the packets", "clips planned on the stated duration, else 1 s"))
                duration = stated or 1.0
            elif stated and duration < stated - 0.5:
                notes.append((f"video packets end at {duration:.2f} s of the {stated:.2f} s its container states "
                              "(truncated?)", "clips planned on the packets"))
            K = max(1, math.ceil(duration * FPS - 1e-6))  # grid frames k with k/10 s < duration
            targets, index, starts = clip_plan(K, job["clips"], job["frames"], job["sampling"])
            # audio up to the end of the last mel crop (+ one FFT window): see log_mel_windows
            until = ((FPS * int(starts.max()) - 47 + job["audio_frames"]) * HOP + N_FFT) / SAMPLE_RATE
            wave, reason = _decode_audio(container, packets, reason, until)

        side = round(job["size"] * STORED_SCALE)  # frames at 8/7 of the CNN's input, as ImageNet's resize 256
        frames, real, _, _, end = sample_frames(path, targets, side)
        if not real.all() and end < duration - 0.5:
            # the frames stop well before the packets (undecodable data): clips planned again on what decodes
            notes.append((f"video decodes to {end:.2f} s of its {duration:.2f} s (truncated?)",
                          "clips planned on the decodable part"))
            K = max(1, math.ceil(end * FPS - 1e-6))
            targets, index, starts = clip_plan(K, job["clips"], job["frames"], job["sampling"])
            frames, real, _, _, end = sample_frames(path, targets, side)
        inside = starts[:, None] + np.arange(index.shape[1]) < K  # (C, T) False where clip_plan repeats the last
        nreal = (real[index] & inside).sum(axis=1).astype(np.int16)  # (C,) real frames per clip (a prefix of each)
        if int(real.sum()) <= 1 and len(real) > 1:
            notes.append(("a single decodable frame", "repeated over the clip"))

        if wave is not None and float(np.abs(wave).max(initial=0.0)) < 1e-4:
            wave, reason = None, "silent audio track"
        mel = None if wave is None else log_mel_windows(wave, starts, job["audio_frames"]).astype(np.float16)
        if reason:
            notes.append((reason, "has_audio False" if mel is None else "audio kept up to the error"))
        # the log-mel columns pretrain.py's windows can read (starts 0 .. nreal - 16), not the padding beyond them
        seen = [] if mel is None else [m[:, :10 * (max(int(n), 16) - 16) + 256] for m, n in zip(mel, nreal)]
        seen = np.concatenate([x.ravel() for x in seen]).astype(np.float64) if seen else np.zeros(0)
        moments = [seen.mean(), np.square(seen).mean()] if len(seen) else [0.0, 0.0]
        result = dict(ok=True, index=index.astype(np.int32), nreal=nreal, mel=mel, notes=notes, mel_moments=moments)
        if job.get("store") == "frames":  # their JPEGs, q90: 1-2 MB per 10 s clip at 256 px (OpenCV encodes BGR)
            import cv2
            jpegs = [cv2.imencode(".jpg", f[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1] for f in frames]
            return dict(result, frames=np.concatenate(jpegs), jpeg_sizes=np.array([len(j) for j in jpegs]))
        o = (side - job["size"]) // 2  # features: the centre crop through the CNN (ImageNet's evaluation: 224 of 256)
        return dict(result, frames=np.ascontiguousarray(frames[:, o:o + job["size"], o:o + job["size"]]))
    except Exception as e:  # BadVideo, or anything else a broken file can make a library raise
        return dict(ok=False, reason=str(e) if isinstance(e, BadVideo) else f"{type(e).__name__}: {e}")


def train_tokenizer(videos, vocab_size):
    """4. text: BPE trained on the train-split titles only (val titles stay unseen; a layout without splits uses them
    all), or None without titles; deterministic, so shard jobs that each train it agree."""
    titles = [v["title"] for v in videos if v["title"]]
    train = [v["title"] for v in videos if v["title"] and v["split"] in ("train", None)] or titles
    return BPETokenizer().train(train, vocab_size) if titles else None


def _tokens(tokenizer, title, vocab_size):
    """4. text: (128,) int32 ids and whether there is a title; no title: all padding (no tokenizer: vocab_size - 1)."""
    if not title:  # (a title implies a tokenizer: it is trained whenever the listing has titles)
        return np.full(MAX_TOKENS, tokenizer.pad_id if tokenizer else vocab_size - 1, np.int32), False
    return tokenizer.encode_title(title, max_len=MAX_TOKENS)[0], True


# ========= main: dataset folder -> listing -> tokenizer -> shards (decode, CNN, files) -> manifest ==========

class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # main's --help: the module docstring's layout, every default that is set
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv=None):
    """prepare.py's command line; Ctrl-C or SIGTERM ends it with one line and exit status 128 + the signal's number
    (130, 143: what schedulers read), the unfinished shard's temp folder removed, the decode workers stopped."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    add = p.add_argument
    add("--root", required=True, type=Path, help="dataset folder: k700/, ucf101/, hmdb51/ or any folder of videos")
    add("--out", type=Path, help="cache folder (default: ROOT/lava_cache)")
    add("--dataset", default="auto", choices=["auto", "k700", "ucf101", "hmdb51", "folder"], help="layout of --root")
    add("--sampling", default="auto", choices=["auto", "pretrain", "eval"], help="pretrain: 1 clip, the whole video up "
        "to --pretrain-frames; eval: --test-clips windows (auto: pretrain for k700)")
    add("--pretrain-frames", type=int, default=100, help="10 fps frames per pre-training video (central; 100: 10 s)")
    add("--store", default="auto", choices=["auto", "frames", "features"], help="pretrain sampling: frames "
        "(JPEG, SIZE x 8/7 px: pretrain.py crops, flips and runs the CNN, as the paper) or features (of the centre "
        "crop, once: approximates the paper, no crop or flip; the CPU demo); eval sampling: features (auto)")
    add("--test-clips", type=int, default=10, help="uniformly spaced 16-frame clips per evaluation video")
    add("--size", type=int, default=224, help="the CNN's input side (a multiple of 32), cropped from SIZE x 8/7")
    add("--backbone", default="imagenet", choices=["imagenet", "random"],
        help="frozen ResNet-18 weights: ImageNet (paper) or random init under seed 0 (demo, tests)")
    add("--backbone-weights", type=Path, help="torchvision's resnet18-f37072fd.pth (default: the torch hub cache)")
    add("--device", default="auto", help="torch device for the CNN (auto: cuda if available)")
    add("--batch-size", type=int, default=256, help="frames per CNN batch")
    add("--workers", type=int, default=max(0, min(16, (os.cpu_count() or 1) - 1)), help="decode processes (0: none)")
    add("--video-timeout", type=float, default=600, help="seconds one video may take to decode (with --workers)")
    add("--shard-size", type=int, default=256, help="videos per shard")
    add("--num-shards", type=int, default=1, help="split the shards over this many jobs (a SLURM array)")
    add("--shard-index", type=int, default=0, help="this job builds the shards k with k %% num-shards == index")
    add("--merge", action="store_true", help="only write the manifest, after all shard jobs")
    add("--list-only", action="store_true", help="only list the videos and train the tokenizer")
    add("--vocab-size", type=int, default=48000, help="BPE vocabulary (trained on train-split titles)")
    args = p.parse_args(argv)
    if args.size % 32 or args.size < 32:
        p.error(f"--size {args.size}: must be a positive multiple of 32 (ResNet-18 downsamples by 32)")
    if args.pretrain_frames < 16:
        p.error("--pretrain-frames must be >= 16 (the model's clip length)")
    if min(args.test_clips, args.shard_size, args.batch_size) < 1:
        p.error("--test-clips, --shard-size and --batch-size must be >= 1")
    if not 0 <= args.shard_index < args.num_shards:
        p.error(f"--shard-index {args.shard_index} must be in [0, --num-shards {args.num_shards})")
    args.out = args.out or args.root / "lava_cache"
    args.backbone_weights = args.backbone_weights and args.backbone_weights.resolve()  # read again by pretrain, probe
    try:
        return _prepare(args)
    except KeyboardInterrupt as e:  # Ctrl-C (the decode workers ignore it), or SIGTERM (_interrupt)
        listing = args.out / "listing.json"
        done = len(list(args.out.glob("shard_*")))
        total = f" of {json.loads(listing.read_text())['num_shards']}" if listing.is_file() else ""
        print(f"prepare: interrupted with {done}{total} shards finished; the same command continues", file=sys.stderr)
        raise SystemExit(128 + (e.args[0] if e.args else signal.SIGINT)) from None


def _interrupt(signum, frame):
    """SIGTERM (a timeout, docker stop, a scheduler's requeue) unwinds prepare like Ctrl-C, carrying its number."""
    raise KeyboardInterrupt(signum)


def torch_device(name):
    """--device (auto: cuda if present) -> torch.device; a misspelt name or a GPU torch does not see: a one-line
    ValueError (prepare.py, pretrain.py and probe.py all check their --device with it)."""
    import torch
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    try:
        device = torch.device(name)
    except RuntimeError as e:  # "Expected one of cpu, cuda, ... device type at start of device string: gpu"
        raise ValueError(f"--device {name}: {e}; use --device cpu or auto") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here; use --device cpu "
                         "or auto")
    return device


def _prepare(args):
    root, out = args.root, args.out
    args.dataset = detect_layout(root) if args.dataset == "auto" else args.dataset
    # auto: Kinetics is the pre-training set, the others are evaluated; pre-training caches store the frames
    args.sampling = ("pretrain" if args.dataset == "k700" else "eval") if args.sampling == "auto" else args.sampling
    args.store = ("frames" if args.sampling == "pretrain" else "features") if args.store == "auto" else args.store
    if args.store == "frames" and args.sampling == "eval":
        raise SystemExit("prepare.py: --store frames is for pre-training caches (--sampling pretrain), not eval")
    clips, frames = (1, args.pretrain_frames) if args.sampling == "pretrain" else (args.test_clips, EVAL_FRAMES)
    shapes = _shapes(args, clips, frames)
    args_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    # missing weights, a misspelt device or a missing GPU stop the run before --out is touched
    if args.backbone == "imagenet" and not (args.list_only or args.merge):
        try:
            build_backbone("imagenet", args.backbone_weights, "cpu")
        except ValueError as e:
            raise SystemExit(f"prepare.py: {e}, or --backbone random (a demo)") from None
    if args.store == "features" and not (args.list_only or args.merge):
        try:
            args.device = str(torch_device(args.device))  # resolved once: the CNN below runs on it
        except ValueError as e:
            raise SystemExit(f"prepare.py: {e}") from None

    # 0. the settings that decide the bytes (clips and frames, not the flags: --test-clips does not matter to a
    #    pre-training cache) are locked once a shard is finished under them; before that a run with other settings
    #    starts over (listing and tokenizer included), so a failed first run never blocks the corrected one
    content = dict(cache_version=CACHE_VERSION, dataset=args.dataset, sampling=args.sampling, clips=clips,
                   frames=frames, size=args.size, store=args.store, backbone=args.backbone, vocab_size=args.vocab_size,
                   backbone_weights=args_dict["backbone_weights"], shard_size=args.shard_size)
    old = json.loads((out / "prepare_config.json").read_text()) if (out / "prepare_config.json").is_file() else content
    diff = {k: (old.get(k), v) for k, v in content.items() if old.get(k) != v}
    if diff and any(out.glob("shard_*")):
        raise SystemExit(f"prepare.py: {out} holds shards made with other settings {diff} (old, new); use another "
                         "--out or delete it")
    if diff:  # a new listing, and with it a new tokenizer
        (out / "listing.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "prepare_config.json", json.dumps(content, indent=2) + "\n")

    # 1. the listing, frozen at the first run so every re-run and every shard job sees the same shards
    if (out / "listing.json").is_file():
        listing = json.loads((out / "listing.json").read_text(encoding="utf-8"))
        print(f"prepare: {len(listing['videos'])} videos from {out / 'listing.json'} (delete it to re-scan {root}; "
              "finished shards must match the new listing)")
    else:
        videos, errors = list_videos(root, args.dataset, out, args.workers)
        finished = any(out.glob("shard_*"))
        if finished:  # the shards hold token ids: the tokenizer of the new listing's titles must be the one they used
            _check_finished_shards(out, root, videos, args.shard_size)
            new = train_tokenizer(videos, args.vocab_size)
            old = BPETokenizer.load(out / "tokenizer.bpe") if (out / "tokenizer.bpe").is_file() else None
            if (new is None) != (old is None) or (new is not None and new.merges != old.merges):
                raise SystemExit(f"prepare.py: the titles under {root} changed since the shards in {out} were built "
                                 "(a retrained tokenizer would change their token ids); use a new --out, or delete "
                                 f"{out}, to rebuild")
        listing = dict(dataset=args.dataset, videos=videos, errors=errors,
                       num_shards=math.ceil(len(videos) / args.shard_size))
        write_atomic(out / "listing.json", json.dumps(listing, ensure_ascii=False) + "\n")
        notes = f" ({len(errors)} listing notes)" if errors else ""
        print(f"prepare: {len(videos)} {args.dataset} videos under {root}{notes}")
        if not finished:  # trained on the listing's titles: trained again below (with shards: checked equal, kept)
            for name in ("tokenizer.bpe", "tokenizer.vocab"):
                (out / name).unlink(missing_ok=True)
    videos = listing["videos"]

    # 2. the tokenizer, before any shard (shards store token ids)
    tok_name = "tokenizer.bpe" if any(v["title"] for v in videos) else None
    tokenizer = BPETokenizer.load(out / tok_name) if tok_name and (out / tok_name).is_file() else None
    if tok_name and tokenizer is None:
        t0 = time.time()
        tokenizer = train_tokenizer(videos, args.vocab_size)
        tokenizer.save(out / tok_name)  # .bpe then .vocab, each written atomically
        print(f"prepare: BPE tokenizer, vocab {tokenizer.vocab_size}, {time.time() - t0:.1f} s")
    if args.list_only:
        print(f"prepare: listing and tokenizer in {out}; now run the shard jobs")
        return 0
    merge = functools.partial(merge_shards, out, listing, args_dict, shapes, tok_name)
    if args.merge:
        return merge(strict=True)

    # 3. this job's shards that are not finished yet; stale temp folders of earlier (killed) runs go
    mine = range(args.shard_index, listing["num_shards"], args.num_shards)  # shards k with k % num_shards == index
    for stale in (d for k in mine for d in out.glob(f".{shard_name(k)}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)
    todo = [k for k in mine if not (out / shard_name(k)).is_dir()]
    if len(todo) < len(mine):
        print(f"prepare: {len(mine) - len(todo)} finished shard(s) kept, {len(todo)} to go")
    if not todo:
        return merge()

    # 4. decode workers -> the CNN in batches that never cross a shard -> shard files; the last line says whether
    #    this process waited for decoded videos (more --workers would help, if there are cores) or for the CNN
    import cv2
    import torch
    device = args.device  # resolved above for --store features, the only store that runs the CNN here
    encoder = (FrameEncoder(args.backbone, args.backbone_weights, device, args.size, args.batch_size)
               if args.store == "features" else None)  # --store frames: the CNN runs in pretrain.py
    cv2.setNumThreads(1)  # as in the decode workers (_worker_init); with --workers 0 decoding runs here
    job = dict(size=args.size, clips=clips, frames=frames, sampling=args.sampling, store=args.store,
               audio_frames=shapes["audio_frames"])
    shards = [(k, videos[k * args.shard_size:(k + 1) * args.shard_size]) for k in todo]
    jobs = [dict(job, path=str(root / v["path"])) for _, vs in shards for v in vs]
    results = decode_stream(jobs, args.workers, args.video_timeout)
    bar = tqdm(total=len(jobs), unit="video", desc=f"prepare {args.dataset}", dynamic_ncols=True)
    n_err, wait_decode = 0, 0.0  # videos skipped; seconds spent waiting for decoded videos
    writer = None
    t_start = time.perf_counter()
    try:
        for k, vs in shards:
            writer = ShardWriter(out, shard_name(k), shapes, encoder)
            for v in vs:
                t0 = time.perf_counter()
                result = next(results)
                wait_decode += time.perf_counter() - t0
                if bar.n == 0:  # the rate counts from the first decoded video: the workers' start-up is no rate
                    bar.reset()
                writer.add(v, *_tokens(tokenizer, v["title"], args.vocab_size), result)
                n_err += not result["ok"]
                bar.update(1)
                bar.set_postfix(skipped=n_err, shard=k, refresh=False)
            writer.finish()
    except BaseException:
        if writer is not None:  # the unfinished shard's temp folder goes (after finish() there is none)
            writer.abort()
        for tmp in out.glob(f".shard_*.tmp-{os.getpid()}-*"):  # and one whose writer a signal stopped being made
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        results.close()  # stops the decode processes now, also when a shard failed
    seconds = time.perf_counter() - t_start
    ran, cnn = f"{len(jobs)} videos in {seconds:.2f} s", ""  # --store frames: no CNN here
    if encoder is not None:
        ran = (f"{len(jobs)} videos, {encoder.frames_done:,} frames through the CNN in {seconds:.2f} s "
               f"({encoder.frames_done / seconds:,.0f} frames/s)")
        device = torch.cuda.get_device_name(encoder.device) if encoder.device.type == "cuda" else device
        cnn = f" and {encoder.wait_s:.2f} s for the CNN ({device})"
    print(f"prepare: {ran}; the main process waited {wait_decode:.2f} s for decoding (--workers {args.workers}){cnn}")
    return merge()


def _check_finished_shards(out, root, videos, shard_size):
    """A re-scan (listing.json deleted) keeps the finished shards only if each was built from exactly its slice of
    the new listing: the paths of its videos.jsonl rows and of the files it skipped (errors.jsonl), and the titles
    of its rows (a changed title would change the retrained tokenizer, and with it the token ids in every shard)."""
    for folder in sorted(out.glob("shard_" + "[0-9]" * 5)):
        k = int(folder.name.removeprefix("shard_"))
        rows = [json.loads(line) for f in ("videos.jsonl", "errors.jsonl")
                for line in (folder / f).read_text("utf-8").splitlines() if line]
        built = {r["path"] for r in rows if r.get("action", "skipped") == "skipped"}  # (videos.jsonl: no action)
        want = {v["path"]: v["title"] for v in videos[k * shard_size:(k + 1) * shard_size]}
        retitled = [r["path"] for r in rows if "action" not in r and want.get(r["path"], r["title"]) != r["title"]]
        if built != set(want) or retitled:
            path = min(set(want) - built or built - set(want) or retitled)
            change = "added to" if path not in built else "removed from" if path not in want else "retitled in"
            raise SystemExit(f"prepare.py: the videos under {root} changed since the shards in {out} were built (e.g. "
                             f"{path} {change} {folder.name}); use a new --out, or delete {out}, to rebuild")


def _shapes(args, clips, frames):
    frame_size = round(args.size * STORED_SCALE) if args.store == "frames" else args.size  # stored, cropped
    return dict(clips=clips, frames=frames, grid=args.size // 32, feature_dim=FEATURE_DIM, n_mels=N_MELS,
                audio_frames=256 + 10 * (frames - 16), max_tokens=MAX_TOKENS, store=args.store, frame_size=frame_size)


# ================================ Machinery that scales the method =================================
# dataset layouts -> a list of videos {"id", "path", "label", "split", "title"}

def detect_layout(root):
    """Name of the layout under `root` (a Path); a one-line SystemExit naming every layout when there is none."""
    if (root / "UCF-101").is_dir():
        return "ucf101"
    if (root / "videos").is_dir() and (root / "testTrainMulti_7030_splits").is_dir():
        return "hmdb51"
    if (root / "train").is_dir() or (root / "val").is_dir():
        return "k700"
    if root.is_dir() and next(_video_files(root), None) is not None:
        return "folder"
    why = "holds no videos in a layout prepare.py reads" if root.is_dir() else "is not a directory"
    raise SystemExit(f"prepare.py: --root {root} {why} (k700: train/, val/; ucf101: UCF-101/; hmdb51: videos/ + "
                     "testTrainMulti_7030_splits/; folder: any video files; README: Laying out real data)")


def _video_files(folder, skip=()):
    """Video files under `folder`, recursively, in sorted order (deterministic shard contents)."""
    skip = {Path(s).resolve() for s in skip}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d[0] != "." and (Path(dirpath) / d).resolve() not in skip)
        names = sorted(f for f in filenames if f[0] != "." and Path(f).suffix.lower() in VIDEO_EXTS)
        yield from (Path(dirpath) / f for f in names)


def list_videos(root, dataset, out, workers=0):
    """(videos of the `dataset` layout under root, sorted by id, titles filled in; errors). Duplicate ids: the first."""
    videos, errors = [], []
    dirs = {"k700": ["train", "val"], "ucf101": ["UCF-101"], "hmdb51": ["videos"], "folder": ["."]}[dataset]
    for d in dirs:
        for f in _video_files(root / d, skip=[out]):
            under = f.relative_to(root / d)
            v = dict(id=under.as_posix(), path=f.relative_to(root).as_posix(), split=None, title=None,
                     label=under.parts[0] if len(under.parts) > 1 or dataset != "folder" else None)
            if dataset == "k700":  # <youtube_id>_<start>_<end>; youtube ids hold "_" themselves: split from the right
                parts = f.stem.rsplit("_", 2)
                v.update(id=f.stem, split=d, label=under.parts[0] if len(under.parts) == 2 else None,
                         youtube_id=parts[0] if len(parts) == 3 and (parts[1] + parts[2]).isdigit() else f.stem)
            videos.append(v)
    if not videos:  # also when --dataset names a layout that --root does not have
        raise SystemExit(f"prepare.py: no video files under {' or '.join(str(root / d) for d in dirs)} (the {dataset} "
                         "layout; README: Laying out real data)")
    if dataset in ("k700", "folder"):  # UCF-101 and HMDB-51 ship no titles
        table = read_titles_csv(root / "titles.csv", errors) if (root / "titles.csv").is_file() else {}
        known = set()  # every key that names a video
        for v in videos:
            keys = (v.get("youtube_id"), v["path"], v["id"], Path(v["path"]).stem)
            known.update(keys)
            v["title"] = next((table[k] for k in keys if k in table), None)
        unknown = [k for k in table if k not in known]
        if unknown:
            errors.append(dict(path=str(root / "titles.csv"), reason=f"{len(unknown)} of {len(table)} rows match no "
                               f"video (e.g. key {unknown[0]!r}); a key is a video's youtube_id (k700), its path under "
                               f"{root}, its id or its file name without extension", action="rows ignored"))
        # a clip with no titles.csv row falls back to its own metadata tag (PyAV opens each file: workers for many)
        missing = [v for v in videos if v["title"] is None]
        tags = decode_stream([str(root / v["path"]) for v in missing], workers if len(missing) >= 200 else 0,
                             fn=read_metadata_title)
        for v, raw in zip(missing, tqdm(tags, total=len(missing), desc="title tags", disable=len(missing) < 200)):
            v["title"] = _clean_title(raw, v["path"], errors)
    unique = {}  # id -> video, in id order
    for v in sorted(videos, key=lambda v: (v["id"], v["path"])):
        v.pop("youtube_id", None)
        if v["id"] in unique:
            errors.append(dict(path=v["path"], reason=f"duplicate id {v['id']!r} (also {unique[v['id']]['path']})",
                               action="skipped"))
        unique.setdefault(v["id"], v)
    return list(unique.values()), errors


def read_titles_csv(path, errors):
    """titles.csv -> {key: title}; key column `youtube_id`, `path` or `id`, then `title`; csv-quoted. A path key
    may start with ./ or be absolute under the csv's folder (ROOT): the key is then the path under ROOT."""
    # surrogateescape: a row's bad bytes degrade that title (_clean_title reports it), not the whole file
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader, rows, end = csv.reader(f), [], 0
        for row in reader:  # (first physical line, cells): a quoted title may span lines
            rows.append((end + 1, row))
            end = reader.line_num
    header = [h.strip().lstrip("\ufeff").lower() for h in (rows or [(1, [])])[0][1]]  # a BOM from spreadsheets
    if "title" not in header:
        errors.append(dict(path=str(path), reason="titles.csv has no `title` column", action="file ignored"))
        return {}
    key, title = next((header.index(k) for k in ("youtube_id", "path", "id") if k in header), 0), header.index("title")
    titles, root, short = {}, os.path.realpath(path.parent), []
    for lineno, row in rows[1:]:
        if len(row) <= max(key, title):
            if any(cell.strip() for cell in row):  # blank lines carry nothing
                short.append(lineno)
            continue
        if "\n" in row[title]:  # legal in a quoted field, but usually a quote left open, swallowing the rows after it
            errors.append(dict(path=f"{path}:{lineno}", reason="the title spans several lines (a quote left open?)",
                               action="kept, lines joined"))
        k = row[key].strip().removeprefix("./")  # a path under ROOT may be written ./x.mp4 or /abs/ROOT/x.mp4
        if os.path.isabs(k) and os.path.realpath(k).startswith(root + os.sep):  # (symlinks resolved on both sides)
            k = Path(os.path.relpath(os.path.realpath(k), root)).as_posix()
        if k in titles:
            errors.append(dict(path=f"{path}:{lineno}", reason=f"duplicate title row (key {k!r})",
                               action="first row kept"))
        titles.setdefault(k, _clean_title(row[title], f"{path}:{lineno}", errors))
    if short:
        errors.append(dict(path=str(path), reason=f"rows without both a {header[key]} and a title: {len(short)} (e.g. "
                           f"line {short[0]})", action="rows ignored"))
    return titles


def read_metadata_title(path):
    """The container's `title` tag (yt-dlp --embed-metadata writes it), or None; never raises."""
    import av
    try:
        with av.open(str(path), metadata_errors="replace") as c:
            tags = [c.metadata, *(s.metadata for s in c.streams.video[:1])]
            return next((m[k] for m in tags for k in ("title", "TITLE") if m.get(k)), None)
    except Exception:  # unreadable files are reported once, by the decoder
        return None


def _clean_title(raw, where, errors):
    """Title text or None; undecodable bytes replaced and whitespace runs (newlines too) folded to a space."""
    if raw is None:
        return None
    if any("\udc80" <= c <= "\udcff" for c in raw):  # bytes that titles.csv's surrogateescape decoding kept
        errors.append(dict(path=where, reason="title is not valid UTF-8", action="bad bytes replaced by U+FFFD"))
        raw = raw.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    return " ".join(raw.split()) or None


# ---------------------------------------- decode worker processes -----------------------------------------

def decode_stream(jobs, workers, timeout=None, fn=decode_video):
    """fn(job) for each job, in job order (shards never depend on which process finished first). workers > 0: that
    many spawned processes, at most 2 x workers jobs in flight, the frames handed over as torch tensors in shared
    memory (mapped, not copied). A worker that dies (a decoder crash) or runs past `timeout` seconds breaks the pool:
    it is killed and the jobs in flight run again one at a time, so the failure is pinned on its own file."""
    if workers <= 0:
        yield from map(fn, jobs)
        return
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free < 2 * workers * 25e6:
        print("prepare: /dev/shm is short of room for 2 x --workers videos of up to 25 MB: videos that do not fit go "
              "through a pipe, slower (docker run --shm-size 4g, or fewer --workers)", file=sys.stderr)
    jobs, pending, nxt, solo_until = list(jobs), [], 0, 0
    ex = _spawn_pool(workers)
    try:
        while nxt < len(jobs) or pending:
            while nxt < len(jobs) and len(pending) < (1 if nxt < solo_until else 2 * workers):
                try:
                    pending.append((nxt, ex.submit(_in_shared_memory, fn, jobs[nxt])))
                    nxt += 1
                except BrokenProcessPool:  # a worker died while we were away: with jobs in flight, result() below
                    if pending:            # says so; else a fresh pool
                        break
                    _kill_pool(ex)
                    ex = _spawn_pool(workers)
            i, future = pending[0]
            try:
                result = future.result(timeout=timeout)
            except (BrokenProcessPool, TimeoutError) as e:  # (since Python 3.11 concurrent.futures' is the builtin)
                _kill_pool(ex)
                ex = _spawn_pool(workers)
                if len(pending) > 1:  # run everything that was in flight again, one at a time
                    nxt, solo_until = i, pending[-1][0] + 1
                    pending.clear()
                    continue
                result = dict(ok=False, reason=f"decoding took longer than --video-timeout {timeout} s"
                              if isinstance(e, TimeoutError) else "the decoder crashed (worker process died)")
            pending.pop(0)
            if isinstance(result, dict) and hasattr(result.get("frames"), "numpy"):
                result["frames"] = result["frames"].numpy()  # a view of the shared memory, no copy
            yield result
    finally:
        if pending:  # stopped early: jobs in flight, maybe a hung decoder
            _kill_pool(ex)
        else:
            ex.shutdown()


def _in_shared_memory(fn, job):
    """Worker side of decode_stream: fn(job), its frames moved into shared memory (/dev/shm full: pickled)."""
    result = fn(job)
    if isinstance(result, dict) and isinstance(result.get("frames"), np.ndarray):
        import torch
        with contextlib.suppress(RuntimeError, OSError):
            result["frames"] = torch.from_numpy(result["frames"]).share_memory_()
    return result


def _spawn_pool(workers):
    """Decode processes, spawned: forking a process that holds torch/OpenMP thread pools can deadlock the child."""
    import torch.multiprocessing
    return ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn"), initializer=_worker_init)


def _worker_init():
    """One thing at a time per decode process: no nested thread pools (torch reads OMP_NUM_THREADS on import)."""
    import cv2
    cv2.setNumThreads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    warnings.filterwarnings("ignore")
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, scancel: sent to the process group; the main one stops us
        signal.signal(signum, signal.SIG_IGN)


def _kill_pool(ex):
    """Stop a pool now, hung decoders included (shutdown() alone waits for them), and return once its manager thread
    is done: one still tearing down at exit races CPython's exit hook ("Bad file descriptor"). Never raises."""
    with contextlib.suppress(Exception):  # never mask the error that is leaving, nor fail a finished run
        for p in list((ex._processes or {}).values()):
            p.kill()
        ex.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------- shards and the manifest -----------------------------------------

# the per-shard arrays, one row per video: name -> (dtype, shape after the leading n; names index manifest["shapes"])
SHARD_ARRAYS = {
    "first_patch": (np.int64, ()),             # the video's first row in patches.npy
    "window": (np.int32, ("clips", "frames")),  # clip c's frame t is the video's distinct frame window[c, t]
    "frames": (np.int16, ("clips",)),
    "audio": (np.float16, ("clips", "n_mels", "audio_frames")),
    "tokens": (np.int32, ("max_tokens",)),
    "has_audio": (np.bool_, ()),
    "has_text": (np.bool_, ()),
    "mel_mean": (np.float64, ()),              # mean and mean square of the log-mel that training windows read
    "mel_square": (np.float64, ()),
}
# and patches.npy: the shard's videos' distinct frames (windows overlap: each is stored once), video after video, as
# features (P, G, G, F) float16, or (--store frames) where each JPEG lies in jpeg.npy: (P, 2) int64 (offset, length)
PATCHES, JPEG = "patches", "jpeg"


def npy_specs(shapes):
    """A shard's .npy files for manifest["shapes"]: {name: (dtype, shape after the leading n)}."""
    specs = {key: (dtype, tuple(shapes[d] for d in dims)) for key, (dtype, dims) in SHARD_ARRAYS.items()}
    if shapes.get("store") == "frames":
        return {**specs, PATCHES: (np.int64, (2,)), JPEG: (np.uint8, ())}
    return {**specs, PATCHES: (np.float16, (shapes["grid"], shapes["grid"], shapes["feature_dim"]))}


def shard_name(k):
    return f"shard_{k:05d}"


def _jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


class ShardWriter:
    """One shard, built in a temp folder and renamed into place by finish(): complete or absent. The CNN sees the
    shard's frames in order, in batches of exactly --batch-size that never cross a shard, so a resumed run batches
    like a single run and writes the same bytes; each batch's features go straight onto the end of patches.npy.
    encoder None (--store frames): the JPEGs go straight onto the end of jpeg.npy, their spans into patches.npy."""

    def __init__(self, out, name, shapes, encoder):
        self.final, self.shapes, self.encoder = Path(out) / name, shapes, encoder
        # a folder of its own (pid + random suffix): an aborted writer's files can never be taken for another's
        self.tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}.tmp-{os.getpid()}-"))
        self.patches = open(self.tmp / f"{PATCHES if encoder else JPEG}.npy", "wb")
        self._write_header(0)  # rewritten by finish(), once P is known
        self.num_patches, self.filled, self.rows, self.errors = 0, 0, [], []  # filled: frames in encoder.batch
        self.spans, self.jpeg_bytes = [], 0  # --store frames: (offset, length) of each JPEG in jpeg.npy, its length

    def add(self, video, tokens, has_text, result):
        """One decoded video (a decode_video result) into the next row; its frames into the CNN's input buffer."""
        if not result["ok"]:
            self.errors.append(dict(path=video["path"], reason=result["reason"], action="skipped"))
            return
        self.errors += [dict(path=video["path"], reason=r, action=a) for r, a in result["notes"]]
        mel = result["mel"]
        audio = mel if mel is not None else np.zeros([self.shapes[d] for d in SHARD_ARRAYS["audio"][1]])  # (C, 80, A)
        self.rows.append((video, dict(first_patch=self.num_patches, window=result["index"], frames=result["nreal"],
                                      audio=audio, tokens=tokens, has_audio=mel is not None, has_text=has_text,
                                      mel_mean=result["mel_moments"][0], mel_square=result["mel_moments"][1])))
        frames = result["frames"]  # (U, S, S, 3) uint8, or --store frames: (bytes,) their JPEGs
        self.num_patches += len(result.get("jpeg_sizes", frames))  # U
        if self.encoder is None:
            sizes = result["jpeg_sizes"]  # (U,)
            self.spans += zip(self.jpeg_bytes + np.cumsum(sizes) - sizes, sizes)
            self.jpeg_bytes += len(frames)
            self.patches.write(frames.tobytes())
            return
        while len(frames):  # a batch may hold the end of one video and the start of the next
            take = min(len(frames), self.encoder.batch_size - self.filled)
            self.encoder.batch[self.filled:self.filled + take] = frames[:take]
            self.filled, frames = self.filled + take, frames[take:]
            if self.filled == self.encoder.batch_size:
                self._write_patches()

    def _write_patches(self):
        """The frames in the encoder's input buffer through the CNN, their features onto the end of patches.npy."""
        self.patches.write(np.ascontiguousarray(self.encoder(self.filled)))  # (n, G, G, F) float16, C order
        self.filled = 0

    def _write_header(self, n):
        # numpy pads an .npy header so that a first axis of up to 21 digits fits in the same bytes: the header
        # can be rewritten in place at the end, once the file's length is known
        dtype, dims = npy_specs(self.shapes)[PATCHES] if self.encoder else (np.uint8, ())
        header = dict(descr=np.dtype(dtype).str, fortran_order=False, shape=(n, *dims))
        np.lib.format.write_array_header_1_0(self.patches, header)

    def finish(self):
        """The last frames through the CNN, every file written and synced, then the atomic rename."""
        if self.filled:
            self._write_patches()
        with self.patches:
            self.patches.seek(0)
            self._write_header(self.num_patches if self.encoder else self.jpeg_bytes)
        if self.encoder is None:
            np.save(self.tmp / f"{PATCHES}.npy", np.array(self.spans, np.int64).reshape(-1, 2))
        for key, (dtype, dims) in SHARD_ARRAYS.items():
            shape = (len(self.rows), *(self.shapes[d] for d in dims))
            np.save(self.tmp / f"{key}.npy", np.array([row[key] for _, row in self.rows], dtype).reshape(shape))
        videos = [{k: v[k] for k in ("id", "path", "label", "split", "title")} for v, _ in self.rows]
        (self.tmp / "videos.jsonl").write_text(_jsonl(videos), encoding="utf-8")
        (self.tmp / "errors.jsonl").write_text(_jsonl(self.errors), encoding="utf-8")
        _fsync_dir(self.tmp)
        os.replace(self.tmp, self.final)  # atomic: the shard exists complete or not at all

    def abort(self):
        """The run failed before finish(): remove the temp folder. Never raises (an error is already leaving)."""
        with contextlib.suppress(OSError):
            self.patches.close()  # flushes its buffer: fails again if the disk is still full
        shutil.rmtree(self.tmp, ignore_errors=True)


def _fsync_dir(folder):
    for f in Path(folder).iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def merge_shards(out, listing, args_dict, shapes, tokenizer_name, strict=False):
    """All shards present -> prepare_errors.jsonl + manifest.json (written last), a summary printed; reads no video.
    Shards missing: says so, exit status 1 if `strict` (--merge: a SLURM dependency chain notices), else 0."""
    names = [shard_name(k) for k in range(listing["num_shards"])]
    missing = [nm for nm in names if not (out / nm).is_dir()]
    if missing:
        print(f"prepare: {len(missing)} of {len(names)} shards not finished yet ({missing[0]} ...): the manifest "
              f"is written once they all exist (run the other shard indices, then --merge)")
        return 1 if strict else 0

    def cat(file):  # every shard's file, end to end: an .npy's (videos, ...) array, a .jsonl's rows
        if file.endswith(".npy"):
            return np.concatenate([np.load(out / nm / file) for nm in names])
        return [json.loads(line) for nm in names for line in (out / nm / file).read_text("utf-8").splitlines() if line]
    errors = listing["errors"] + cat("errors.jsonl")  # the listing's, then each shard's
    write_atomic(out / "prepare_errors.jsonl", _jsonl(errors))
    has_audio, has_text = cat("has_audio.npy"), cat("has_text.npy")  # (videos,) bool
    if not len(has_audio):  # no manifest, and no empty shards or listing left to block the corrected re-run
        for nm in names:
            shutil.rmtree(out / nm)
        (out / "listing.json").unlink()
        print(f"prepare: 0 of {len(listing['videos'])} videos usable (see {out}/prepare_errors.jsonl): fix or replace "
              "the files and re-run", file=sys.stderr)
        return 1
    nbytes = sum(f.stat().st_size for nm in names for f in (out / nm).glob("*.npy"))
    # the log-mel's mean and std over the training videos with audio (each video weighs the same), which the audio
    # encoder standardises with (AST: dataset statistics); val and test clips stay unseen
    train = np.array([v["split"] in ("train", None) for v in cat("videos.jsonl")])
    moments = np.stack([cat("mel_mean.npy"), cat("mel_square.npy")], axis=1)[train & has_audio]  # (videos used, 2)
    mean, square = moments.mean(axis=0) if len(moments) else (0.0, 1.0)
    audio_stats = dict(mean=float(mean), std=float(math.sqrt(max(square - mean ** 2, 1e-12))), videos=len(moments))
    m = dict(format=CACHE_FORMAT, version=CACHE_VERSION, dataset=args_dict["dataset"], config=args_dict,
             backbone=args_dict["backbone"], backbone_seed=0 if args_dict["backbone"] == "random" else None,
             shards=names, shapes=shapes, num_videos=len(has_audio), bytes_per_video=round(nbytes / len(has_audio)),
             missing=dict(audio=int((~has_audio).sum()), text=int((~has_text).sum())), tokenizer=tokenizer_name,
             listed_videos=len(listing["videos"]), errors=len(errors), audio_stats=audio_stats)
    write_atomic(out / "manifest.json", json.dumps(m, indent=2, ensure_ascii=False) + "\n")
    print(f"prepare: cache {out}: {len(has_audio)} videos in {len(names)} shard(s), {m['bytes_per_video'] / 2**20:.2f} "
          f"MiB per video, missing audio {m['missing']['audio']}, missing text {m['missing']['text']}")
    if errors:
        print(f"prepare: {len(errors)} skipped or degraded files; see {out / 'prepare_errors.jsonl'}")
    return 0


# --------------------- the reader: FeatureCache (pretrain.py and probe.py import it) ----------------------

class FeatureCache:
    """Read-only view of a finished cache, every shard array memory-mapped (README: Feature cache, "Reading it"):
        cache[i] -> dict(patches=(U,G,G,F) float16, window=(C,T) int32, frames=(C,) int16,
                         audio=(C,80,A) float16, tokens=(128,) int32, has_audio=bool, has_text=bool, jpeg)
        item["patches"][item["window"][c]] -> (T,G,G,F): reads only clip c's frames from the memory map
        a --store frames cache: patches (U, 2) JPEG spans, and item["jpeg"] the shard's bytes: decode_jpegs
        cache.videos[i] -> {"id", "path", "label", "split", "title"};  cache.index(video_id) -> i
    Files, shapes, dtypes and patch indices are checked: a truncated, hand-edited or mixed-up cache fails here in one
    line naming the file (FileNotFoundError: no finished cache; ValueError: damaged, or another format)."""

    def __init__(self, path):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: " + (
                "the run did not finish: re-run the same prepare.py command (finished shards are kept), or --merge "
                "once all shard jobs are done" if any(self.path.glob("shard_*")) else "not a finished LAVA feature "
                "cache; make one with `python prepare.py --root DATASET_DIR --out CACHE_DIR`"))

        def damaged(file, why):
            return ValueError(f"{file}: {why}; the cache is damaged: delete {self.path} and run prepare.py again")

        def read(file, load):  # missing, truncated or corrupt files raise here
            try:
                return load(file)
            except (OSError, ValueError, EOFError) as e:
                raise damaged(file, f"unreadable ({type(e).__name__}: {e})") from None
        self.manifest = m = read(manifest_path, lambda f: json.loads(f.read_text()))
        if m.get("format") != CACHE_FORMAT or m.get("version") != CACHE_VERSION:
            raise ValueError(f"{manifest_path}: format {m.get('format')!r} version {m.get('version')!r}, not "
                             f"{CACHE_FORMAT!r} version {CACHE_VERSION}: build it again with this prepare.py")
        shapes = m["shapes"]
        self.shards, self.videos, self._starts = [], [], []  # _starts: each shard's first video
        for folder in (self.path / name for name in m["shards"]):
            arrays = {}  # (n, *dims) memory maps (patches: (P, *dims)), paged in on access
            for key, (dtype, want) in npy_specs(shapes).items():
                file = folder / f"{key}.npy"
                a = read(file, lambda f: np.load(f, mmap_mode="r"))
                if a.dtype != dtype or a.shape[1:] != want:
                    raise damaged(file, f"{a.dtype} {a.shape}, the manifest says {np.dtype(dtype)} (n, {want})")
                arrays[key] = a
            rows = read(folder / "videos.jsonl",
                        lambda f: [json.loads(line) for line in f.read_text("utf-8").splitlines() if line])
            if len({len(rows)} | {len(arrays[key]) for key in SHARD_ARRAYS}) != 1:
                raise damaged(folder, "arrays and videos.jsonl disagree on the number of videos")
            # each row's patches run from its first_patch to the next row's (the last: to P); every window index
            # must fall inside them, or a clip would silently read another video's frames
            first = np.asarray(arrays["first_patch"])
            arrays["patch_end"] = ends = np.append(first[1:], len(arrays[PATCHES]))
            windows = np.asarray(arrays["window"]).reshape(len(first), shapes["clips"] * shapes["frames"])
            if len(first) and (first[0] != 0 or (ends < first).any() or (windows < 0).any()
                               or (windows.max(axis=1) >= ends - first).any()):
                raise damaged(folder, f"first_patch.npy / window.npy do not index {PATCHES}.npy consistently")
            self._starts.append(len(self.videos))
            self.videos += rows
            self.shards.append(arrays)
        if m.get("num_videos") not in (None, len(self.videos)):
            raise damaged(manifest_path, f"num_videos {m['num_videos']} but the shards hold {len(self.videos)}")
        # prepare.py drops duplicate ids; the first wins regardless (reversed: earlier rows overwrite later ones)
        self._index = {row["id"]: i for i, row in reversed(list(enumerate(self.videos)))}
        self.tokenizer = BPETokenizer.load(self.path / m["tokenizer"]) if m.get("tokenizer") else None

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        i = range(len(self.videos))[i]  # negative i counts from the end; IndexError outside
        s = int(np.searchsorted(self._starts, i, side="right")) - 1  # the shard holding video i
        a, j = self.shards[s], i - self._starts[s]
        patches = a[PATCHES][int(a["first_patch"][j]):int(a["patch_end"][j])]
        return dict(patches=patches, window=a["window"][j], frames=a["frames"][j], audio=a["audio"][j],
                    tokens=a["tokens"][j], has_audio=bool(a["has_audio"][j]), has_text=bool(a["has_text"][j]),
                    jpeg=a.get(JPEG))

    def index(self, video_id):
        if video_id not in self._index:
            raise KeyError(f"video id {video_id!r} is not in the cache {self.path}")
        return self._index[video_id]


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())

"""Synthetic LAVA corpus: real media files in the official K700 / UCF-101 / HMDB-51 layouts.

    python synth.py --out demo/data                                   # tiny default corpus, seconds
    python synth.py --out demo/data --k700-clips 800 --k700-val-clips 100 \\
        --ucf-groups 9 --ucf-clips-per-group 3 --hmdb-clips-per-class 25  # demo-sized: 1,316 files
    python synth.py --out /tmp/corpus --only ucf101,hmdb51 --seed 1   # just the probe datasets

Writes the official on-disk layouts (README, "Laying out real data"), so every reader meets what it meets on
real data: OUT/k700/ (H.264 + AAC mp4, annotations/{train,val}.csv, titles.csv with some clips left out),
OUT/ucf101/ (MPEG-4 or H.264 AVI, MP3/PCM or no audio, CRLF split lists), OUT/hmdb51/ (MPEG-4 AVI, mostly
silent, 1/2/0 split files). Beside them, for tests and reruns only: OUT/synth_manifest.jsonl (one line per
file: its latent class and every random choice) and OUT/synth_state.json (the config each folder was
written with: the same flags reuse it, other flags replace it, a folder synth did not write is never touched).

What the content carries, and why:
  * `--classes` latent actions (default 8) shared by the three datasets, each with a dataset-specific name
    (K700 "kicking soccer ball", UCF "SoccerKick", HMDB "kick_ball").
  * video: one large high-contrast disc moving in direction 2*pi*c/K over a lightly tinted grey background.
    Opposite classes (c and c + K/2) are exact time reversals of each other in distribution, so a clip's
    time-averaged frame reveals at most the axis, never the class: recognising it needs temporal order.
    Start point, travel, size, colour, tint, fps, frame size and duration are per-clip nuisance.
  * audio: a tone at 220 * 2**(c/4) Hz with random harmonics, envelope, phase, loudness and noise; nothing
    in it is synced to the video (a shared per-clip cue would let contrastive learning match instances
    without learning classes).
  * K700 titles: 1-2 class keywords among random filler words (some keywords swapped for another class's
    as label noise), some with non-ASCII characters, commas and quotes.
  * Nothing else depends on the class: file sizes, durations, colours and codecs are drawn independently.

Every file's content comes from its own numpy Generator seeded by (seed, dataset, index), so the same
--seed gives identical decoded frames and samples whatever --workers is.
"""
import argparse
import csv
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import string
import sys
import time
from fractions import Fraction
from statistics import NormalDist
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------
# the latent actions and their names in each dataset

# (K700 label, UCF class, HMDB class, title keywords). Keywords are unique across classes and never
# appear among the filler words, so a title's class is carried by its keywords only.
ACTIONS = [
    ("kicking soccer ball", "SoccerKick", "kick_ball", ("soccer", "kick", "goal")),
    ("throwing frisbee", "FrisbeeThrow", "throw_disc", ("frisbee", "throwing", "ultimate")),
    ("bowling", "Bowling", "bowl", ("bowling", "strike", "pins")),
    ("juggling balls", "JugglingBalls", "juggle", ("juggling", "juggle", "circus")),
    ("skateboarding", "SkateBoarding", "skate", ("skateboard", "kickflip", "skatepark")),
    ("swinging on swing", "SwingPlay", "swing", ("swing", "swinging", "playground")),
    ("shooting basketball", "BasketballShot", "shoot_ball", ("basketball", "dunk", "hoops")),
    ("riding a bike", "BikeRiding", "ride_bike", ("bike", "cycling", "bmx")),
]

FILLER = ("my best video ever funny the day we tried lol vlog official hd full compilation first time how to "
          "at home with friends new epic fail watch part live kids family summer trip slow motion amazing "
          "tutorial beginner practice session weekend challenge reaction highlights insane crazy moments "
          "in of and on for this is what happens when you 2017 2018 episode 3 compilation pov look "
          "dad mom brother sister school park beach city vs pro tips learn easy hard").split()
# A few titles carry non-ASCII text so the byte-level tokenizer sees multi-byte characters.
NON_ASCII = ("café", "niño", "über", "façade", "naïve", "🔥", "😂", "👍", "❤️", "São Paulo", "日本", "Ελλάδα",
             "привет", "ñandú", "🎉🎉")


def action_names(classes):
    """The names of `classes` latent actions: a list of dicts with keys k700, ucf, hmdb, keywords.

    The first 8 (the demo's count) come from ACTIONS; beyond that, numbered names so any count works.
    """
    names = []
    for c in range(classes):
        if c < len(ACTIONS):
            k700, ucf, hmdb, keywords = ACTIONS[c]
        else:
            k700, ucf, hmdb = f"action number {c}", f"ActionNumber{c}", f"action_{c}"
            keywords = (f"act{c}", f"move{c}", f"sport{c}")
        names.append(dict(k700=k700, ucf=ucf, hmdb=hmdb, keywords=keywords))
    return names


# ----------------------------------------------------------------------------------------------------
# content: video frames, audio samples, titles


def direction(latent, classes):
    """Unit vector (dx, dy) in image coordinates (y down) of the motion of class `latent`: angle 2*pi*c/K."""
    theta = 2 * math.pi * latent / classes
    return np.array([math.cos(theta), -math.sin(theta)])  # minus: counter-clockwise as seen on screen


# BT.601 limited range, the matrix swscale uses for rgb24 <-> yuv420p at these sizes, so decoders that
# convert back to RGB (OpenCV, PyAV to_ndarray("rgb24")) see the colours we meant.
_RGB_TO_YUV = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]])
_YUV_OFFSET = np.array([16.0, 128.0, 128.0])
# Quantiles of N(0, 1) at 256 levels: pixel noise as a table lookup of random bytes costs a third of
# drawing Gaussians, and 256 levels is finer than the 8-bit pixels it perturbs.
_NORMAL_LUT = np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)], dtype=np.float32)


def render_frames(rng, latent, classes, n_frames, width, height, noise=0.03):
    """(n_frames, height * 3 // 2, width) uint8 yuv420p planes (PyAV's layout) of one clip of class `latent`.

    Rendered straight into YUV: building RGB and letting swscale convert cost 3x more. `height` and
    `width` must be multiples of 4 (chroma planes at half resolution, packed in rows of `width`).
    Every nuisance draw happens before the class enters, in a fixed order, so two calls with equal rng
    states and opposite classes (c, c + K/2) give exactly time-reversed clean frames (noise=0): the
    time-averaged frame carries the motion axis at most, never the direction.
    """
    assert height % 4 == 0 and width % 4 == 0, (width, height)
    side = min(width, height)
    tint = 0.5 + rng.uniform(-0.1, 0.1, 3)            # (3,) lightly tinted grey: colour must not dominate
    dark = rng.random() < 0.5                          # high contrast either way against mid grey
    colour = rng.uniform(0.0, 0.2, 3) if dark else rng.uniform(0.8, 1.0, 3)
    radius = rng.uniform(0.14, 0.22) * side            # large object: survives a 32x downsampling CNN
    travel = rng.uniform(0.35, 0.6) * side             # distance covered over the whole clip (speed nuisance)
    mid = np.array([width, height]) / 2 + rng.uniform(-0.1, 0.1, 2) * side  # position at the clip's midpoint
    if noise > 0:   # luma-only noise, std `noise` in RGB units (x219 in limited-range Y)
        pixel_noise = _NORMAL_LUT.take(np.frombuffer(rng.bytes(n_frames * height * width), np.uint8))
        pixel_noise = pixel_noise.reshape(n_frames, height, width) * np.float32(noise * 219)
    else:
        pixel_noise = np.float32(0)

    # Symmetric frame times in [-0.5, 0.5]: reversing time maps frame i to frame n-1-i exactly.
    t = (np.arange(n_frames) - (n_frames - 1) / 2) / max(n_frames - 1, 1)   # (T,)
    centres = mid[None, :] + travel * t[:, None] * direction(latent, classes)[None, :]  # (T, 2) x, y
    xs = np.arange(width, dtype=np.float32) + 0.5                           # pixel centres, (W,)
    ys = np.arange(height, dtype=np.float32) + 0.5                          # (H,)
    dx2 = (xs[None, :] - centres[:, 0, None].astype(np.float32)) ** 2       # (T, W)
    dy2 = (ys[None, :] - centres[:, 1, None].astype(np.float32)) ** 2       # (T, H)
    dist = np.sqrt(dy2[:, :, None] + dx2[:, None, :])                       # (T, H, W)
    alpha = np.clip(np.float32(radius + 0.5) - dist, 0.0, 1.0)              # anti-aliased coverage, (T, H, W)
    # Chroma coverage: mean of each 2x2 block, (T, H/2, W/2) (four strided adds: 10x faster than .mean).
    alpha2 = (alpha[:, 0::2, 0::2] + alpha[:, 1::2, 0::2] + alpha[:, 0::2, 1::2] + alpha[:, 1::2, 1::2]) * np.float32(0.25)

    bg, fg = ((_RGB_TO_YUV @ rgb + _YUV_OFFSET).astype(np.float32) for rgb in (tint, colour))  # (3,) Y, Cb, Cr
    out = np.empty((n_frames, height * 3 // 2, width), dtype=np.uint8)
    luma = alpha * (fg[0] - bg[0]) + pixel_noise + np.float32(bg[0] + 0.5)  # +0.5: round, not floor
    out[:, :height] = np.clip(luma, 0, 255)
    for k, row in ((1, height), (2, height + height // 4)):                 # U then V, each H/4 rows of W
        chroma = alpha2 * (fg[k] - bg[k]) + np.float32(bg[k] + 0.5)
        out[:, row:row + height // 4] = np.clip(chroma, 0, 255).reshape(n_frames, height // 4, width)
    return out


def pitch(latent, classes):
    """Tone frequency of class `latent`: 220 * 2**(c/4) Hz (quarter octaves); for more than 16 classes the
    steps shrink so the top class stays at 3520 Hz, well inside the 8 kHz band of 16 kHz log-mels."""
    step = min(0.25, 4.0 / classes)
    return 220.0 * 2 ** (latent * step)


def render_audio(rng, latent, classes, seconds, rate, channels):
    """(channels, samples) float32 in [-1, 1]: the class tone with unshared random detail and noise."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    f0 = pitch(latent, classes) * (1 + rng.normal(0, 0.01))   # +-1% jitter, far below the 19% class step
    harmonics = np.concatenate([[1.0], rng.uniform(0, 0.5, 2)])     # timbre nuisance
    phases = rng.uniform(0, 2 * math.pi, 3)
    tone = sum(h * np.sin(2 * math.pi * (k + 1) * f0 * t + p) for k, (h, p) in enumerate(zip(harmonics, phases)))
    # Slow random envelope: loudness varies within the clip but is not tied to anything in the video.
    env_f, env_a, env_p = rng.uniform(0.3, 4.0, 3), rng.uniform(0, 0.5, 3), rng.uniform(0, 2 * math.pi, 3)
    coarse = np.arange(0, n / rate + 0.01, 0.01)   # the envelope is slow: evaluate at 100 Hz, interpolate
    envelope = np.interp(t, coarse, np.clip(
        1 + sum(a * np.sin(2 * math.pi * f * coarse + p) for f, a, p in zip(env_f, env_a, env_p)), 0.05, None))
    signal = tone * envelope / np.sqrt(np.mean((tone * envelope) ** 2))   # unit RMS
    snr = rng.uniform(2.0, 10.0)                                         # amplitude SNR, 6 to 20 dB
    gain = rng.uniform(0.05, 0.2)                                        # loudness nuisance; peaks < 1
    out = np.stack([signal + rng.normal(0, 1 / snr, n) for _ in range(channels)]) * gain  # noise per channel
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def make_title(rng, latent, names, noise):
    """A YouTube-like title: 3-9 filler words with 1-2 class keywords at random places.

    With probability `noise` each keyword comes from a uniformly random class instead (label noise, as in
    web-crawled titles). Casing, punctuation and non-ASCII decorations are random too.
    """
    words = list(rng.choice(FILLER, size=rng.integers(3, 10)))
    for _ in range(rng.integers(1, 3)):
        source = rng.integers(len(names)) if rng.random() < noise else latent
        keyword = str(rng.choice(names[source]["keywords"]))
        words.insert(rng.integers(len(words) + 1), keyword)
    style = rng.random()
    if style < 0.2:
        words = [w.upper() for w in words]
    elif style < 0.5:
        words = [w.capitalize() for w in words]
    title = " ".join(words)
    decoration = rng.random()
    if decoration < 0.1:
        title = f"{title} {rng.choice(NON_ASCII)}"
    elif decoration < 0.15:
        title = f'{title}, "{rng.choice(FILLER)}"'      # comma and quotes: titles.csv must be csv-quoted
    elif decoration < 0.3:
        title = f"{title} {rng.choice(['!', '!!', '|', '-', '#shorts', '(HD)', '?'])}"
    return title


# ----------------------------------------------------------------------------------------------------
# writing one file (runs in a worker process)

DATASET_CODES = {"k700": 0, "ucf101": 1, "hmdb51": 2}   # enter each file's seed, so datasets differ


def parse_fps(text):
    """'15,25,29.97' -> [Fraction(15), Fraction(25), Fraction(30000, 1001)]: a non-integer rate within 0.006
    of N/1.001 is NTSC's N*1000/1001 made exact; '30000/1001' is read as the fraction it writes."""
    rates = []
    for rate in (Fraction(item).limit_denominator(1001) for item in text.split(",")):
        ntsc = round(rate * Fraction(1001, 1000))
        rates.append(Fraction(ntsc * 1000, 1001) if rate.denominator > 1 and abs(rate * 1.001 - ntsc) < 0.006 else rate)
    return rates


def file_rngs(seed, dataset, index):
    """Independent Generators (video, audio, title, format) for one file: switching a file's audio off
    leaves its frames unchanged, and the content never depends on which worker wrote it."""
    sequence = np.random.SeedSequence([seed, DATASET_CODES[dataset], index])
    return [np.random.default_rng(s) for s in sequence.spawn(4)]


def multiple_of_4(x):
    """Round to a multiple of 4 (>= 4): render_frames packs half-resolution chroma in rows of the width."""
    return max(4, int(round(x / 4)) * 4)


def encode(path, frames, fps, vcodec, audio=None, rate=None, acodec=None):
    """Write `frames` (T, H*3/2, W) uint8 yuv420p and optional `audio` (channels, samples) float32 to `path`."""
    height, width = frames.shape[1] * 2 // 3, frames.shape[2]
    with av.open(str(path), "w") as container:
        video = container.add_stream(vcodec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.thread_count = 1     # parallelism is across files; one thread keeps x264 exact
        if vcodec == "libx264":
            video.options = {"preset": "ultrafast", "crf": "28"}   # small files; noise mostly survives
        else:
            video.bit_rate = 120_000
            video.codec_context.codec_tag = "XVID"  # what real UCF-101 / HMDB-51 AVIs declare
        stream = None
        if audio is not None:
            layout = "stereo" if audio.shape[0] == 2 else "mono"
            stream = container.add_stream(acodec, rate=rate, layout=layout)
            # Speed over quality (the audio encoder dominates a file's cost otherwise): AAC's "fast" coder is
            # 4x faster than the default two-loop search; LAME level 9 is its fastest.
            if acodec == "aac":
                stream.bit_rate, stream.options = 64_000, {"aac_coder": "fast"}
            elif acodec == "libmp3lame":
                stream.bit_rate, stream.options = 64_000, {"compression_level": "9"}
        for image in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="yuv420p")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if stream is not None:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio), format="fltp", layout=stream.layout.name)
            frame.sample_rate = rate
            for packet in stream.encode(frame):   # PyAV re-chunks to the codec's frame size and format
                container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


# Per-dataset media formats, like the real datasets (K700 from YouTube: H.264/AAC mp4; UCF-101: XVID
# AVI with MP3 or none; HMDB-51: XVID AVI, mostly silent). Each file draws uniformly from its lists.
FORMATS = {
    "k700": dict(vcodec=["libx264"],
                 audio=[("aac", 22050, 1), ("aac", 22050, 1), ("aac", 48000, 1), ("aac", 22050, 2)]),
    "ucf101": dict(vcodec=["mpeg4", "mpeg4", "mpeg4", "libx264"],
                   audio=[("libmp3lame", 22050, 1), ("libmp3lame", 44100, 1), ("pcm_s16le", 22050, 1)]),
    "hmdb51": dict(vcodec=["mpeg4"], audio=[("pcm_s16le", 22050, 1), ("libmp3lame", 22050, 1)]),
}
# Audio encoding dominates a file's cost and grows with the sample rate, hence mostly 22.05 kHz mono;
# the 44.1/48 kHz and stereo options keep readers' resampling (to 16 kHz) and downmixing exercised.


def make_file(job):
    """Render and write one file; returns its manifest record. `job` is a plain dict (picklable)."""
    rng_video, rng_audio, rng_title, rng_format = file_rngs(job["seed"], job["dataset"], job["index"])
    formats = FORMATS[job["dataset"]]
    # Format draws: frame rate, short side (size or 1.25x so readers must resize), aspect, duration, codecs.
    fps = job["fps_choices"][rng_format.integers(len(job["fps_choices"]))]
    short = multiple_of_4(job["size"]) if rng_format.random() < 0.5 else multiple_of_4(job["size"] * 1.25)
    aspect = (4 / 3, 16 / 9)[rng_format.integers(2)]
    width, height = multiple_of_4(short * aspect), short
    seconds = job["seconds"] * rng_format.uniform(0.9, 1.1)
    n_frames = max(2, int(round(seconds * fps)))
    vcodec = formats["vcodec"][rng_format.integers(len(formats["vcodec"]))]
    acodec, rate, channels = formats["audio"][rng_format.integers(len(formats["audio"]))]

    frames = render_frames(rng_video, job["latent"], job["classes"], n_frames, width, height, job["noise"])
    audio = None
    if job["has_audio"]:
        audio = render_audio(rng_audio, job["latent"], job["classes"], n_frames / fps, rate, channels)
    path = Path(job["out"]) / job["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    encode(path, frames, fps, vcodec, audio, rate, acodec)

    title = None
    if job.get("has_title"):
        title = make_title(rng_title, job["latent"], job["names"], job["title_noise"])
    return dict(dataset=job["dataset"], index=job["index"], path=job["path"], latent=job["latent"],
                label=job["label"], fps=str(fps), frames=n_frames, width=width, height=height,
                seconds=n_frames / float(fps), vcodec=vcodec, has_audio=job["has_audio"],
                acodec=acodec if job["has_audio"] else None, sample_rate=rate if job["has_audio"] else None,
                channels=channels if job["has_audio"] else None, title=title, extra=job["extra"])


# ----------------------------------------------------------------------------------------------------
# planning each dataset: class, name and split of every file (main process, one Generator per dataset)

YOUTUBE_ALPHABET = string.ascii_letters + string.digits + "-_"


def plan_k700(args, names, common):
    rng = np.random.default_rng([args.seed, DATASET_CODES["k700"], 10**6])   # plan stream, disjoint from files
    jobs, used = [], set()
    for split, n in (("train", args.k700_clips), ("val", args.k700_val_clips)):
        for latent in rng.permutation(np.arange(n) % args.classes).tolist():   # balanced, in random order
            while True:   # unique 11-character ids, like YouTube's (may start with '-' or '_')
                youtube_id = "".join(rng.choice(list(YOUTUBE_ALPHABET), size=11))
                if youtube_id not in used:
                    used.add(youtube_id)
                    break
            # Real annotations name a 10 s segment of the source video; our clips are shorter cuts of it.
            start = int(rng.integers(0, 600))
            label = names[latent]["k700"]
            jobs.append(dict(common, dataset="k700", index=len(jobs), latent=latent, label=label,
                             seconds=args.k700_seconds,
                             path=f"k700/{split}/{label}/{youtube_id}_{start:06d}_{start + 10:06d}.mp4",
                             has_audio=bool(rng.random() >= args.k700_no_audio),
                             has_title=bool(rng.random() >= args.k700_no_title),
                             extra=dict(split=split, youtube_id=youtube_id, time_start=start,
                                        time_end=start + 10)))
    return jobs


def ucf_test_groups(groups, split):
    """1-based test groups of UCF split `split` (1..3): official 25 groups -> 7(k-1)+1 .. 7k; scaled to
    `groups` as m = round(7 * groups / 25) groups per split (a third for 3, 6 or 9 groups)."""
    m = max(1, round(7 * groups / 25))
    return list(range(m * (split - 1) + 1, m * split + 1))


def plan_ucf(args, names, common):
    rng = np.random.default_rng([args.seed, DATASET_CODES["ucf101"], 10**6])
    jobs = []
    for latent in range(args.classes):
        name = names[latent]["ucf"]
        for group in range(1, args.ucf_groups + 1):
            for clip in range(1, args.ucf_clips_per_group + 1):
                jobs.append(dict(common, dataset="ucf101", index=len(jobs), latent=latent, label=name,
                                 seconds=args.eval_seconds, has_audio=bool(rng.random() >= args.ucf_no_audio),
                                 path=f"ucf101/UCF-101/{name}/v_{name}_g{group:02d}_c{clip:02d}.avi",
                                 extra=dict(group=group, clip=clip)))
    return jobs


def plan_hmdb(args, names, common):
    rng = np.random.default_rng([args.seed, DATASET_CODES["hmdb51"], 10**6])
    jobs = []
    for latent in range(args.classes):
        name = names[latent]["hmdb"]
        for k in range(args.hmdb_clips_per_class):
            # Real HMDB names: <source movie>_<class>_<body part>_<camera>_<people>_<view>_<quality>_<n>.
            movie = "_".join(w.capitalize() for w in rng.choice(FILLER, size=rng.integers(1, 4)))
            tags = [str(rng.choice(t)) for t in (("f", "h", "u"), ("cm", "nm"), ("np1", "np2"),
                                                 ("fr", "ba", "le", "ri"), ("goo", "med", "bad"))]
            video = f"{movie}_{name}_{'_'.join(tags)}_{k}.avi"   # k keeps names unique within the class
            jobs.append(dict(common, dataset="hmdb51", index=len(jobs), latent=latent, label=name,
                             seconds=args.eval_seconds, has_audio=bool(rng.random() < args.hmdb_audio),
                             path=f"hmdb51/videos/{name}/{video}", extra=dict(video=video)))
    return jobs


# ----------------------------------------------------------------------------------------------------
# index files, written after the media from the returned records


def write_k700_index(out, records, names, args):
    root = Path(out) / "k700"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, split_value in (("train", "train"), ("val", "validate")):   # real files say "validate"
        rows = sorted((r for r in records if r["extra"]["split"] == split), key=lambda r: r["extra"]["youtube_id"])
        with open(root / "annotations" / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")      # LF, as the real annotation files
            writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            for r in rows:
                e = r["extra"]
                writer.writerow([r["label"], e["youtube_id"], e["time_start"], e["time_end"], split_value])
    with open(root / "titles.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")          # quotes titles holding commas or quotes
        writer.writerow(["youtube_id", "title"])
        for r in sorted(records, key=lambda r: r["extra"]["youtube_id"]):
            if r["title"] is not None:
                writer.writerow([r["extra"]["youtube_id"], r["title"]])


def write_ucf_index(out, records, names, args):
    root = Path(out) / "ucf101" / "ucfTrainTestlist"
    root.mkdir(parents=True, exist_ok=True)
    classes = [n["ucf"] for n in names]
    crlf = "\r\n"                                            # the official lists are CRLF
    (root / "classInd.txt").write_bytes("".join(f"{i + 1} {c}{crlf}" for i, c in enumerate(classes)).encode())
    records = sorted(records, key=lambda r: r["path"])
    for split in (1, 2, 3):
        test = set(ucf_test_groups(args.ucf_groups, split))
        train_lines, test_lines = [], []
        for r in records:
            relative = r["path"][len("ucf101/UCF-101/"):]   # "Class/v_Class_gXX_cYY.avi"
            if r["extra"]["group"] in test:
                test_lines.append(f"{relative}{crlf}")
            else:
                train_lines.append(f"{relative} {classes.index(r['label']) + 1}{crlf}")
        (root / f"trainlist0{split}.txt").write_bytes("".join(train_lines).encode())
        (root / f"testlist0{split}.txt").write_bytes("".join(test_lines).encode())


def hmdb_codes(rng, n, unused):
    """Codes for n clips of one class in one split: about `unused` of them 0, then 70/30 train (1) / test (2)."""
    n_unused = int(round(n * unused))
    n_test = int(round((n - n_unused) * 0.3))
    codes = np.array([0] * n_unused + [2] * n_test + [1] * (n - n_unused - n_test))
    return rng.permutation(codes).tolist()


def write_hmdb_index(out, records, names, args):
    root = Path(out) / "hmdb51" / "testTrainMulti_7030_splits"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([args.seed, DATASET_CODES["hmdb51"], 10**6 + 1])
    for latent, n in enumerate(names):
        videos = sorted(r["extra"]["video"] for r in records if r["latent"] == latent)
        for split in (1, 2, 3):
            codes = hmdb_codes(rng, len(videos), args.hmdb_unused)
            lines = "".join(f"{v} {c} \n" for v, c in zip(videos, codes))   # trailing space, as the real files
            (root / f"{n['hmdb']}_test_split{split}.txt").write_text(lines)


# ----------------------------------------------------------------------------------------------------
# command line


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every flag's default."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--out", required=True, help="output folder; gets k700/, ucf101/, hmdb51/ and synth_manifest.jsonl")
    p.add_argument("--seed", type=int, default=0, help="master seed: same seed, same decoded content")
    p.add_argument("--only", default="k700,ucf101,hmdb51",
                   help="comma-separated datasets to write (k700, ucf101, hmdb51)")
    p.add_argument("--classes", type=int, default=8,
                   help="latent actions shared by all datasets; even, so every direction has its time reversal")
    p.add_argument("--k700-clips", type=int, default=64, help="K700-like train clips (balanced over classes)")
    p.add_argument("--k700-val-clips", type=int, default=16, help="K700-like val clips")
    p.add_argument("--k700-seconds", type=float, default=2.4,
                   help="mean K700 clip length in seconds (each clip 0.9x-1.1x); >= 2.25 gives every clip at "
                        "least 20 frames at 10 fps (pretrain.py draws 16-frame windows from the whole clip)")
    p.add_argument("--k700-no-audio", type=float, default=0.15, help="share of K700 clips without an audio stream")
    p.add_argument("--k700-no-title", type=float, default=0.15, help="share of K700 clips without a title row")
    p.add_argument("--title-noise", type=float, default=0.1,
                   help="probability that a title keyword is drawn from a random class instead of the clip's")
    p.add_argument("--ucf-groups", type=int, default=6,
                   help="UCF groups per class (>= 3); split k tests groups m(k-1)+1..mk, m = round(7*groups/25)")
    p.add_argument("--ucf-clips-per-group", type=int, default=2, help="UCF clips per group (cYY)")
    p.add_argument("--ucf-no-audio", type=float, default=0.2, help="share of UCF videos without an audio stream")
    p.add_argument("--hmdb-clips-per-class", type=int, default=10, help="HMDB videos per class")
    p.add_argument("--hmdb-audio", type=float, default=0.3,
                   help="share of HMDB videos WITH an audio stream (most real HMDB clips are silent)")
    p.add_argument("--hmdb-unused", type=float, default=0.1,
                   help="share of each HMDB class marked 0 (unused) in each split; the rest is 70/30 train/test")
    p.add_argument("--eval-seconds", type=float, default=3.0, help="mean UCF/HMDB video length in seconds (+-10%%)")
    p.add_argument("--size", type=int, default=64,
                   help="short side of the frames; each file is this or 1.25x, at 4:3 or 16:9, so readers resize and crop")
    p.add_argument("--fps", default="15,25,29.97",
                   help="comma-separated source frame rates, one drawn per file (not 10, so readers resample)")
    p.add_argument("--noise", type=float, default=0.03, help="std of the per-pixel Gaussian noise (frames in [0, 1])")
    p.add_argument("--overwrite", action="store_true",
                   help="regenerate dataset folders even when an earlier run wrote them with the same config "
                        "(folders synth.py did not write are never replaced)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes writing files in parallel (1 = in this process)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.only = [d.strip() for d in args.only.split(",") if d.strip()]
    unknown = set(args.only) - set(DATASET_CODES)
    if unknown:
        p.error(f"--only: unknown datasets {sorted(unknown)}; choose from {sorted(DATASET_CODES)}")
    if args.classes < 2 or args.classes % 2:
        p.error("--classes must be even and >= 2 (opposite directions are time reversals)")
    if args.ucf_groups < 3:
        p.error("--ucf-groups must be >= 3 (each of the 3 splits tests its own groups)")
    args.fps_choices = parse_fps(args.fps)
    return args


def generation_config(args):
    """Everything that decides the files' content: every flag except --out, --only, --workers and
    --overwrite, plus a hash of this file, so a changed generator never reuses old files."""
    config = {k: v for k, v in vars(args).items() if k not in ("out", "only", "workers", "overwrite", "fps_choices")}
    config["synth_sha256"] = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return config


def run(args):
    """Generate everything `args` asks for; returns the records (one per file) of the --only datasets.

    A dataset folder in --out is reused when an earlier run wrote it completely with the same generation
    config (so `make demo` can rerun without invalidating prepare's cache inside it), replaced when synth
    wrote it otherwise (stale files would be read as extra videos), and never touched when synth did not
    write it (OUT/synth_state.json is synth's record of what it wrote).
    """
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path, state_path = out / "synth_manifest.jsonl", out / "synth_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    config = generation_config(args)
    old_records = []
    if manifest_path.exists():
        old_records = [json.loads(line) for line in manifest_path.read_text(encoding="utf-8").splitlines()]

    todo, reused = [], []
    for d in args.only:
        if (out / d).exists():
            if d not in state:
                sys.exit(f"synth: {out / d} exists and synth.py did not write it; refusing to replace it")
            if state[d] == dict(complete=True, config=config) and not args.overwrite:
                reused.append(d)
                continue
            shutil.rmtree(out / d)
        todo.append(d)
    for d in todo:   # marked before writing: an interrupted run leaves a folder synth may replace
        state[d] = dict(complete=False, config=config)
    state_path.write_text(json.dumps(state, indent=1))

    names = action_names(args.classes)
    common = dict(out=str(out), seed=args.seed, classes=args.classes, size=args.size, noise=args.noise,
                  fps_choices=args.fps_choices, names=names, title_noise=args.title_noise)
    planners = {"k700": plan_k700, "ucf101": plan_ucf, "hmdb51": plan_hmdb}
    jobs = [job for dataset in DATASET_CODES if dataset in todo for job in planners[dataset](args, names, common)]

    records = []
    bar = tqdm(total=len(jobs), desc="synth", unit="file", disable=not jobs)
    if args.workers <= 1:
        for job in jobs:
            records.append(make_file(job))
            bar.update()
    else:
        # fork: workers start in milliseconds and inherit the imports; files are independent of the worker.
        context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
        with context.Pool(args.workers) as pool:
            for record in pool.imap_unordered(make_file, jobs, chunksize=4):
                records.append(record)
                bar.update()
    bar.close()
    records.sort(key=lambda r: (DATASET_CODES[r["dataset"]], r["index"]))

    by_dataset = {d: [r for r in records if r["dataset"] == d] for d in todo}
    for dataset, rows in by_dataset.items():
        dict(k700=write_k700_index, ucf101=write_ucf_index, hmdb51=write_hmdb_index)[dataset](out, rows, names, args)
    # Records of datasets this run did not rewrite stay in the manifest.
    records = json.loads(json.dumps(records))   # the same plain types as records read back from the manifest
    kept = [r for r in old_records if r["dataset"] not in todo and (out / r["dataset"]).exists()]
    with open(manifest_path, "w", encoding="utf-8") as f:
        for r in kept + records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for d in todo:
        state[d] = dict(complete=True, config=config)
    state_path.write_text(json.dumps(state, indent=1))

    print(f"synth: {len(records)} files in {time.time() - start:.1f} s with {args.workers} workers -> {out}")
    for dataset, rows in by_dataset.items():
        print(f"  {dataset:7s} {len(rows):5d} files, {args.classes} classes, "
              f"{sum((out / r['path']).stat().st_size for r in rows) / 2**20:.1f} MiB")
    for dataset in reused:
        print(f"  {dataset:7s} up to date (same config), reused; --overwrite regenerates it")
    return sorted(records + [r for r in kept if r["dataset"] in reused],
                  key=lambda r: (DATASET_CODES[r["dataset"]], r["index"]))


if __name__ == "__main__":
    run(parse_args())

"""Shared fixtures: a small feature cache in prepare.py's on-disk format, written directly with numpy.

Stage tests of pretrain.py and probe.py need a cache but not the cost of decoding videos and running a
CNN; the pipeline test (test_pipeline.py) covers the real path from media files to results.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the kit is flat files at the repo root, not a package


def write_feature_cache(out, n_videos=24, dataset="k700", clips=1, frames=20, grid=2, feature_dim=512,
                        num_classes=4, shard_size=10, missing_audio=(), missing_text=(), seed=0, store="features"):
    """Write a cache of `n_videos` random samples to `out` and return its path.

    Sample i has label i % num_classes; the video features carry a class-dependent offset so that a probe has
    something to find. Videos listed in `missing_audio` / `missing_text` are marked absent. store="frames": a
    --store frames cache of JPEG frames of 32 x grid px crops (stored at 8/7 of that), colour by class.
    """
    from bpe import BPETokenizer
    from prepare import CACHE_FORMAT, CACHE_VERSION

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = [f"class_{i % num_classes}" for i in range(n_videos)]
    titles = [f"a video of {label} number {i}" for i, label in enumerate(labels)]
    splits = ["train" if i % 6 else "val" for i in range(n_videos)] if dataset == "k700" else [None] * n_videos

    tokenizer = BPETokenizer()
    tokenizer.train([t for t, s in zip(titles, splits) if s != "val"], vocab_size=300)
    tokenizer.save(out / "tokenizer.bpe")

    audio_frames = 256 + 10 * (frames - 16)
    class_offsets = rng.normal(size=(num_classes, feature_dim)).astype(np.float32)
    shard_names = []
    for shard_index, start in enumerate(range(0, n_videos, shard_size)):
        ids = range(start, min(start + shard_size, n_videos))
        n = len(ids)
        video = rng.random((n, clips, frames, grid, grid, feature_dim), dtype=np.float32)
        video += np.stack([class_offsets[i % num_classes] for i in ids])[:, None, None, None, None, :]
        tokens = np.stack([tokenizer.encode_title(titles[i])[0] for i in ids]).astype(np.int32)
        has_text = np.array([i not in missing_text for i in ids])
        tokens[~has_text] = tokenizer.pad_id
        has_audio = np.array([i not in missing_audio for i in ids])
        audio = rng.normal(size=(n, clips, 80, audio_frames)).astype(np.float16)
        audio[~has_audio] = 0

        name = f"shard_{shard_index:05d}"
        shard = out / name
        shard.mkdir()
        # every clip frame its own patch (no frame shared between clips): patches (n * C * T, G, G, F)
        if store == "frames":
            import cv2
            side = round(32 * grid * 8 / 7)
            pixels = rng.integers(0, 256, (n, clips * frames, side, side, 3), dtype=np.uint8)
            pixels[..., 0] = (np.array([i % num_classes for i in ids]) * 60)[:, None, None, None]
            jpegs = [cv2.imencode(".jpg", f)[1] for f in pixels.reshape(-1, side, side, 3)]
            sizes = np.array([len(j) for j in jpegs])
            np.save(shard / "jpeg.npy", np.concatenate(jpegs))
            np.save(shard / "patches.npy", np.stack([np.cumsum(sizes) - sizes, sizes], axis=1))
        else:
            np.save(shard / "patches.npy", np.maximum(video, 0).astype(np.float16).reshape(-1, grid, grid, feature_dim))
        np.save(shard / "first_patch.npy", np.arange(n, dtype=np.int64) * clips * frames)
        np.save(shard / "window.npy", np.broadcast_to(np.arange(clips * frames, dtype=np.int32).reshape(clips, frames),
                                                      (n, clips, frames)))
        np.save(shard / "frames.npy", np.full((n, clips), frames, dtype=np.int16))
        np.save(shard / "audio.npy", audio)
        np.save(shard / "tokens.npy", tokens)
        np.save(shard / "has_audio.npy", has_audio)
        np.save(shard / "has_text.npy", has_text)
        mel = audio.astype(np.float64).reshape(n, -1)
        np.save(shard / "mel_mean.npy", mel.mean(1))
        np.save(shard / "mel_square.npy", np.square(mel).mean(1))
        with open(shard / "videos.jsonl", "w") as f:
            for i in ids:
                video_id = f"{labels[i]}/video_{i:04d}.avi"
                f.write(json.dumps(dict(id=video_id, path=video_id, label=labels[i], split=splits[i],
                                        title=titles[i] if i not in missing_text else None)) + "\n")
        shard_names.append(name)

    manifest = dict(format=CACHE_FORMAT, version=CACHE_VERSION, dataset=dataset,
                    config=dict(fake=True, seed=seed, backbone="random", backbone_weights=None),
                    backbone="random", shards=shard_names, num_videos=n_videos,
                    shapes=dict(clips=clips, frames=frames, grid=grid, feature_dim=feature_dim, n_mels=80,
                                audio_frames=audio_frames, max_tokens=128, store=store,
                                frame_size=round(32 * grid * 8 / 7) if store == "frames" else 32 * grid),
                    audio_stats=dict(mean=0.0, std=1.0, videos=n_videos),  # the N(0, 1) audio above
                    missing=dict(audio=len(missing_audio), text=len(missing_text)),
                    bytes_per_video=None, tokenizer="tokenizer.bpe")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture
def feature_cache(tmp_path):
    """A 24-video K700-like cache (20 frames, 2x2 grid) with a few missing audio tracks and titles."""
    return write_feature_cache(tmp_path / "cache", missing_audio=(3, 7), missing_text=(5,))

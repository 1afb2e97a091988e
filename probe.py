"""probe.py: the paper's linear evaluation of frozen LAVA encoders on UCF-101 / HMDB-51 (Section 3), its
pre-training-epoch series (Figure 3), and the embeddings of any cache (your own videos) with a text search over them.
Commands: README, Linear evaluation and Your own videos.

The paper's evaluation (Section 3: "a linear classifier on top of the frozen LAVA video encoder using a 1e-4 learning
rate and a batch size of 32 ... logits are averaged across multiple clips per test set video. Top-1 accuracy is
averaged across all 3 splits"; HMDB-51 video only), in this file's order: 1. `LinearProbe` and `select_hyperparameters`
(the epochs and weight decay the paper does not give); 2. `extract_embeddings`; 3. `evaluate_probe`; 4. `main`.
"""
import argparse
import glob
import hashlib
import json
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ucf101", "hmdb51"], help="downstream dataset (for a linear probe)")
    p.add_argument("--root", help="dataset folder (split lists), or your videos' folder or, with --embed/--search, "
                   "their cache (default: ucf101/ or hmdb51/)")
    p.add_argument("--cache", help="feature cache written by prepare.py (default: <root>/lava_cache)")
    p.add_argument("--checkpoint", help="pretrain.py checkpoint or 'random' (default: the latest runs/*/ckpt_last.pt)")
    p.add_argument("--config-from", metavar="CKPT", help="config of --checkpoint random (default: latest run's)")
    p.add_argument("--seed", type=int, default=0, help="random init, validation split, batches (default %(default)s)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--split", type=int, choices=[1, 2, 3], help="evaluate one official split")
    group.add_argument("--all-splits", action="store_true", help="evaluate splits 1, 2, 3 (the default)")
    p.add_argument("--modalities", help="comma list of video, audio+video (default: both for ucf101, video for hmdb51)")
    p.add_argument("--checkpoints", metavar="GLOB", help="probe each checkpoint of GLOB, plot (Figure 3) <out>.png "
                   "(default <out>: their folder's probe_<dataset>_series.json)")
    p.add_argument("--summary", nargs="+", metavar="FILE", help="print one table of these results JSONs and exit")
    p.add_argument("--per-class", nargs="?", const="all", metavar="CLASSES", help="top-1 (mean over splits) of each "
                   "class, or of CLASSES (comma list), after a run of one checkpoint or with --summary")
    p.add_argument("--embed", action="store_true", help="one .npz of all embeddings (default: in <cache>/embeddings/)")
    p.add_argument("--search", metavar="QUERY", help="print the videos whose g_vt embedding is closest to QUERY's")
    p.add_argument("--top", type=int, default=10, help="videos --search prints (default %(default)s)")
    p.add_argument("--out", help="results JSON and its .md table (default: <run dir>/probe_<dataset>[_random].json)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out holding a result of another scope")
    p.add_argument("--allow-partial", action="store_true", help="evaluate the listed videos present (a warning)")
    p.add_argument("--epochs-grid", default="10,30,100,300", help="probe epochs to choose from (default %(default)s)")
    p.add_argument("--weight-decay-grid", default="0,1e-3", help="weight decays to choose from (default %(default)s)")
    p.add_argument("--batch-clips", type=int, default=64, help="clips per encoder batch (default %(default)s)")
    p.add_argument("--backbone-weights", help="ImageNet ResNet-18 for a --store frames cache (default: prepare's)")
    p.add_argument("--recompute", action="store_true", help="ignore the stored embeddings (<cache>/embeddings/)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (default %(default)s)")
    args = p.parse_args(argv)
    if args.search is not None and not args.search.strip():  # before the checks below, where "" reads as not given
        p.error("--search: an empty query; give the words to search for")
    if args.top < 1:
        p.error(f"--top: the number of videos --search prints, at least 1 (got {args.top})")
    if not (args.summary or args.embed or args.search or args.dataset):
        p.error("--dataset is required (except with --embed, --search or --summary)")
    if args.per_class and args.checkpoints:
        p.error("--per-class prints after a run of one --checkpoint, or with --summary; not with --checkpoints")
    if (args.embed or args.search) and not (args.root or args.cache):
        p.error("--embed and --search need --root (your videos' folder) or --cache")
    try:  # the grids as tuples here, so that a typo is a usage line, not a traceback
        args.epochs_grid = tuple(int(x) for x in args.epochs_grid.split(","))
        args.weight_decay_grid = tuple(float(x) for x in args.weight_decay_grid.split(","))
        if min(args.epochs_grid) < 1 or min(args.weight_decay_grid) < 0:
            raise ValueError
    except ValueError:
        p.error("--epochs-grid takes comma-separated integers >= 1, --weight-decay-grid comma-separated numbers >= 0")
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # --help and flag errors answer before torch loads (its import takes seconds)

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils import check_consistent_length, check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data
from tqdm import tqdm

import prepare
import pretrain
from bpe import BPETokenizer, write_atomic
from model import LAVA, SPACES, LAVAConfig

PAPER_TABLE1 = {"ucf101": {"video": 81.3, "audio+video": 84.3}, "hmdb51": {"video": 50.1}}  # 3-split mean top-1
# Table 2, split-1 top-1: (pre-training losses, downstream modality, UCF-101, HMDB-51)
PAPER_TABLE2 = [("AV", "video", 68.6, 41.5), ("AV", "audio+video", 72.4, None),
                ("AV+VT", "video", 74.91, 49.4), ("AV+VT", "audio+video", 79.36, None),
                ("AV+VT+AVT", "video", 81.1, 51.8), ("AV+VT+AVT", "audio+video", 84.2, None)]
PAPER_TABLE3 = {"video": {1: 73.1, 10: 80.0, 25: 81.3}, "audio+video": {1: 76.0, 10: 82.3, 25: 84.3}}  # UCF vs epochs
DATASET_NAMES = {"ucf101": "UCF-101", "hmdb51": "HMDB-51"}
MODALITIES = ("video", "audio+video")
MISSING_AUDIO_TREATMENT = ("audio+video: a video without audio gets the mean audio embedding of the split's training "
                           "videos with audio (0 after standardisation: its audio half adds nothing to the logits)")
LOGIT_ROWS = 8192  # rows per step of LinearProbe's logits: float64 copies of real UCF (95k x 2048) would be 1.5 GB


class ProbeError(Exception):
    """A problem with the user's input (files, flags, checkpoint): main() prints it without a traceback."""


# ---- 1. the linear probe: one linear layer on frozen clip embeddings, clip logits averaged per video ----

class LinearProbe(ClassifierMixin, BaseEstimator):
    """A linear layer on standardised frozen features, trained with Adam on the cross-entropy of clip rows.

    lr, batch_size: the paper's 1e-4 and 32; epochs: not given (`select_hyperparameters` picks them); weight_decay:
    Adam's L2 on the weights, not the bias; standardize by the training mean and std, so 1e-4 steps mean the same
    whatever the encoder's scale and a constant (imputed) feature becomes exactly 0; random_state seeds the batch order,
    the only randomness (zero init). Fitted: classes_, mean_ and scale_ (d,), coef_ (K, d), intercept_ (K,), n_epochs_.
    With `groups` (a video id per row) every method averages each video's clip logits before the softmax/argmax: one
    output row per video, in first-appearance order. (ClassifierMixin first, so that its scikit-learn tags apply.)"""

    def __init__(self, epochs=100, lr=1e-4, batch_size=32, weight_decay=0.0, standardize=True, random_state=0,
                 device="cpu"):
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.standardize = standardize
        self.random_state = random_state
        self.device = device

    def fit(self, X, y, groups=None, progress=None):
        """progress: a label for a progress bar on a terminal (None: no bar)."""
        epochs = self._fit_epochs(X, y, groups)
        for _ in tqdm(epochs, desc=progress, total=self.epochs, disable=True if progress is None else None):
            pass
        return self

    def _fit_epochs(self, X, y, groups=None):
        """Train, yielding each epoch's number with coef_/intercept_ set so far (one run scores a whole epochs grid)."""
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        if int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if groups is not None:
            group_labels(y, groups)  # raises if one video's clips carry different labels
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"LinearProbe needs samples of at least 2 classes; got 1 class ({self.classes_[0]!r})")
        self.mean_ = X.mean(axis=0, dtype=np.float64) if self.standardize else np.zeros(X.shape[1])
        std = X.std(axis=0, dtype=np.float64) if self.standardize else np.ones(X.shape[1])
        self.scale_ = np.where(std < 1e-12, 1.0, std)  # a constant feature stays 0 instead of dividing by 0
        Z = torch.tensor((X - self.mean_) / self.scale_, dtype=torch.float32, device=self.device)  # (n, d)
        labels = torch.tensor(y_index, dtype=torch.int64, device=self.device)                    # (n,)
        # zero init: the result depends only on the seeded batch order (and nothing draws from torch's global RNG)
        weight = torch.zeros(len(self.classes_), X.shape[1], device=self.device, requires_grad=True)    # (K, d)
        bias = torch.zeros(len(self.classes_), device=self.device, requires_grad=True)                  # (K,)
        # fused: the whole Adam update in one kernel, 1.2x faster steps at UCF-101's size (BENCHMARKS.md, Linear probe)
        optimizer = torch.optim.Adam([dict(params=[weight], weight_decay=float(self.weight_decay)),
                                      dict(params=[bias], weight_decay=0.0)], lr=self.lr, fused=True)
        gen = torch.Generator().manual_seed(int(check_random_state(self.random_state).randint(2**31 - 1)))
        for epoch in range(1, int(self.epochs) + 1):
            for idx in torch.randperm(len(Z), generator=gen).to(self.device).split(int(self.batch_size)):
                loss = F.cross_entropy(F.linear(Z[idx], weight, bias), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            self.coef_ = weight.detach().cpu().double().numpy()
            self.intercept_ = bias.detach().cpu().double().numpy()
            self.n_epochs_ = epoch
            yield epoch

    def _logits(self, X, groups=None):
        # X (n, d) -> float64 logits (n, K), or (g, K) averaged per group in first-appearance order (the paper's
        # "logits are averaged across multiple clips per test set video"); a row's logits never depend on the other rows
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        chunks = (np.asarray(X[i:i + LOGIT_ROWS], dtype=np.float64) for i in range(0, X.shape[0], LOGIT_ROWS))
        logits = np.concatenate([(c - self.mean_) / self.scale_ @ self.coef_.T + self.intercept_ for c in chunks])
        if groups is None:
            return logits
        check_consistent_length(logits, groups)
        keys, codes = first_appearance(groups)
        sums = np.zeros((len(keys), logits.shape[1]))
        np.add.at(sums, codes, logits)
        return sums / np.bincount(codes)[:, None]

    def decision_function(self, X, groups=None):
        """Logits (n, K) (or (n_videos, K) with groups); for 2 classes the margin logit_1 - logit_0, shape (n,)."""
        logits = self._logits(X, groups)
        return logits[:, 1] - logits[:, 0] if len(self.classes_) == 2 else logits

    def predict_proba(self, X, groups=None):
        return softmax(self._logits(X, groups), axis=1)

    def predict(self, X, groups=None):
        logits = self._logits(X, groups)  # first: it raises NotFittedError before classes_ is read
        return self.classes_[np.argmax(logits, axis=1)]

    def score(self, X, y, groups=None):
        """Top-1 accuracy in [0, 1]; per video with groups (y per row, one label per video)."""
        y = np.asarray(y) if groups is None else group_labels(y, groups)
        return float(np.mean(self.predict(X, groups) == y))


def first_appearance(groups):
    """groups (n,) -> (keys (g,), codes (n,)): the distinct groups in order of first appearance, and each row's
    position in `keys`. E.g. ["b", "a", "b", "c"] -> (["b", "a", "c"], [0, 1, 0, 2])."""
    uniq, first, inverse = np.unique(column_or_1d(groups), return_index=True, return_inverse=True)
    order = np.argsort(first)                     # positions in uniq, in order of first appearance
    return uniq[order], np.argsort(order)[inverse.reshape(-1)]


def group_labels(y, groups):
    """Per-row labels (n,) -> one label per group (first-appearance order); ValueError if a group's rows disagree."""
    check_consistent_length(y, groups)
    keys, codes = first_appearance(groups)
    labels = np.asarray(y)[np.unique(codes, return_index=True)[1]]  # each group's first row
    bad = codes[labels[codes] != y]                                 # the group of each row unlike its group's first
    if len(bad):
        raise ValueError(f"the rows of group {keys[bad.min()]!r} carry different labels: one video has one label")
    return labels


def validation_split(y, split_groups, val_fraction=0.2, random_state=0):
    """Hold out about `val_fraction` of the training rows as whole groups, stratified by class (StratifiedGroupKFold,
    first fold) -> (train_rows, val_rows). UCF-101's groups are the "gXX" groups the official splits hold out (so
    validation, like test, sees new actors and scenes), HMDB-51's the videos."""
    n_splits = max(2, min(round(1 / val_fraction), len(np.unique(split_groups))))  # 1 group: sklearn's own error
    largest = np.unique(y, return_counts=True)[1].max()
    if largest < n_splits:  # scikit-learn's "n_splits=5 cannot be greater than the number of members in each class"
        raise ProbeError(f"the probe's validation split (1/{n_splits} of the training videos of each class) needs "
                         f"{n_splits} training clips per class; every class here has fewer (at most {largest})")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    with warnings.catch_warnings(action="ignore", category=UserWarning):  # small splits: "least populated class ..."
        return next(folds.split(np.zeros(len(y)), y, split_groups))


def select_hyperparameters(X, y, groups, split_groups=None, epochs_grid=(10, 30, 100, 300),
                           weight_decay_grid=(0.0, 1e-3), random_state=0, progress="probe", **probe_params):
    """Choose (epochs, weight_decay) for `LinearProbe` on a validation part of the TRAINING rows only: X (n, d), y (n,),
    groups (n,) the video of each clip row, split_groups (n,) the unit held out together (default: groups). One probe
    per weight decay trains max(epochs_grid) epochs, scored (video top-1) at each epoch count of the grid -> (best
    dict(epochs, weight_decay, val_top1, n_val_videos, n_fit_videos), all points); ties: fewer epochs, less decay."""
    groups, y = np.asarray(groups), np.asarray(y)
    tr, va = validation_split(y, groups if split_groups is None else np.asarray(split_groups), 0.2, random_state)
    table = []
    for wd in weight_decay_grid:
        probe = LinearProbe(epochs=max(epochs_grid), weight_decay=wd, random_state=random_state, **probe_params)
        for epoch in tqdm(probe._fit_epochs(X[tr], y[tr]), f"{progress}, wd {wd}", max(epochs_grid), disable=None):
            if epoch in epochs_grid:  # a line per point, also in a log; on a terminal above the bar (tqdm.write)
                table.append(dict(epochs=epoch, weight_decay=wd, val_top1=100 * probe.score(X[va], y[va], groups[va])))
                tqdm.write(f"{progress}: wd {wd}, epoch {epoch}/{max(epochs_grid)}, val top-1 "
                           f"{table[-1]['val_top1']:.1f}", file=sys.stderr)
    best = max(table, key=lambda r: (r["val_top1"], -r["epochs"], -r["weight_decay"]))
    return dict(best, n_val_videos=len(np.unique(groups[va])), n_fit_videos=len(np.unique(groups[tr]))), table


# ---- 2. frozen embeddings: every clip of the cache through the encoders once ----

@torch.no_grad()
def extract_embeddings(model, cache, batch_clips=64, device="cpu", backbone_weights=None):
    """The frozen encoders (eval mode) over every clip of the cache -> dict(z_v (N, C, W), z_a (N, C, W), has_audio
    (N,)), z_a 0 where has_audio is False. Window: the central T = cfg.video.frames real frames of each stored clip
    (all 16 of a UCF/HMDB clip, the central 16 of a Kinetics clip) and the mel frames aligned with them (mel offset
    = 10 x frame). A --store frames cache: the centre crop of the frames through the frozen CNN, as at test time
    (backbone_weights: its ImageNet weights file, default the one prepare.py used)."""
    model.eval()
    cfg, shapes = model.config, cache.manifest["shapes"]
    N, C, T, S = len(cache), shapes["clips"], cfg.video.frames, 32 * shapes["grid"]
    cnn, weights = None, backbone_weights or cache.manifest["config"]["backbone_weights"]
    if shapes.get("store") == "frames":
        try:
            cnn = prepare.build_backbone(cache.manifest["backbone"], weights, device)
        except ValueError as e:  # the weights moved since prepare.py: "pass --backbone-weights PATH"
            raise ProbeError(str(e)) from None
    encode = lambda fn, x: fn(torch.from_numpy(x).to(device)).float().cpu().numpy()
    encode_video = model.encode_video if cnn is None else lambda x: model.encode_video(prepare.frame_features(cnn, x))

    def clip_video(item, c, s):  # clip c's frames s .. s + T - 1: features (T, G, G, F), or centre crops (T, S, S, 3)
        frames = item["patches"][item["window"][c, s:s + T]]
        if cnn is None:
            return frames.astype(np.float32)
        o = (shapes["frame_size"] - S) // 2  # JPEGs at S' = 8/7 S -> centre crops; encode_video runs a batch's at once
        return prepare.decode_jpegs(item["jpeg"], frames)[:, o:o + S, o:o + S]

    z_v, z_a = np.zeros((N, C, cfg.video.width), np.float32), np.zeros((N, C, cfg.audio.width), np.float32)
    has_audio = np.zeros(N, bool)
    per_batch = max(1, batch_clips // C)                # videos per batch, so a batch holds about batch_clips clips
    for start in tqdm(range(0, N, per_batch), desc="embeddings", unit="batch", disable=None, file=sys.stderr):
        rows = np.arange(start, min(start + per_batch, N))
        items = [cache[i] for i in rows]                # each item read once: its has_audio comes with it
        has_audio[rows] = [it["has_audio"] for it in items]
        starts = [np.maximum(0, (np.minimum(it["frames"], shapes["frames"]) - T) // 2) for it in items]  # (C,) each
        video = np.stack([clip_video(it, c, s) for it, st in zip(items, starts) for c, s in enumerate(st)])
        z_v[rows] = encode(encode_video, video).reshape(len(rows), C, -1)
        if has_audio[rows].any():
            a0 = pretrain.MEL_PER_FRAME  # x frame: the mel columns aligned with each window
            mel = np.stack([it["audio"][c, :, a0 * s:a0 * s + cfg.audio.frames] for it, st in zip(items, starts)
                            if it["has_audio"] for c, s in enumerate(st)]).astype(np.float32)  # (b' C, 80, 256)
            z_a[rows[has_audio[rows]]] = encode(model.encode_audio, mel).reshape(-1, C, cfg.audio.width)
    return dict(z_v=z_v, z_a=z_a, has_audio=has_audio)


@torch.no_grad()
def project(model, z, space, clip_mean=False):
    """Encoder outputs z (..., width) -> L2-normalised g_space(z) (..., embed_dim), the same map as LAVA.forward.
    clip_mean: z (n, C, width) -> (n, embed_dim), the mean of each row's C projections, re-normalised (as CLIP does)."""
    t = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(next(model.parameters()).device)
    g = F.normalize(model.heads[space](t), dim=-1)
    if clip_mean:
        g = F.normalize(g.mean(dim=1), dim=-1)
    return g.cpu().numpy()


@torch.no_grad()
def encode_titles(model, info, titles, batch=256):
    """Titles -> z_t (n, W): the run's tokenizer.bpe (pretrain.py copies it into the run folder) as prepare.py applies
    it (128 ids, cut to the text encoder's max_len as pre-training does), then the text encoder."""
    path = Path(info["run_dir"]) / "tokenizer.bpe"
    if not path.is_file():
        raise ProbeError(f"{path} not found: copy the pre-training run's tokenizer.bpe beside the checkpoint")
    tokenizer = BPETokenizer.load(path)
    cfg = model.config.text
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ProbeError(f"the run's tokenizer has {tokenizer.vocab_size} ids but the text encoder {cfg.vocab_size}")
    tokens = np.stack([tokenizer.encode_title(t, max_len=128)[0][:cfg.max_len] for t in titles]).astype(np.int64)
    device = next(model.parameters()).device
    return np.concatenate([model.encode_text(torch.from_numpy(tokens[i:i + batch]).to(device)).float().cpu().numpy()
                           for i in range(0, len(tokens), batch)])


# ---- 3. one split: the linear probe on a modality's features ----

def modality_features(emb, modality, train_idx):
    """(N, C, D) features. video: z_v. audio+video: [z_v, z_a], where a video without audio (about half of real
    UCF-101) gets the mean z_a of the split's training videos with audio: 0 after the probe's standardisation, adding
    nothing to the logits, unlike the encoder's output for silence (arbitrary, confidently non-neutral) or -mean/std."""
    if modality == "video":
        return emb["z_v"]
    if modality != "audio+video":
        raise ValueError(f"modality_features: unknown modality {modality!r} (video or audio+video)")
    has = emb["has_audio"].astype(bool)
    z_a = emb["z_a"].copy()
    train_with_audio = train_idx[has[train_idx]]
    if len(train_with_audio) == 0:
        warnings.warn("no training video has audio: audio+video reduces to video")
    z_a[~has] = z_a[train_with_audio].mean(axis=(0, 1)) if len(train_with_audio) else 0.0  # (D,)
    return np.concatenate([emb["z_v"], z_a], axis=-1)


def evaluate_probe(emb, resolved, modality, ids, grid, seed=0, device="cpu", ucf_groups=False, progress="probe"):
    """Train and test one linear probe on one split; returns a results row (top-1 in percent, videos counted)."""
    (tr_idx, tr_y), (te_idx, te_y) = resolved["train"], resolved["test"]
    features = modality_features(emb, modality, tr_idx)                                          # (N, C, D)
    C = features.shape[1]
    # clip rows: X (n*C, D), y (n*C,), groups (n*C,) = the cache index of each row's video
    Xtr, ytr, gtr = features[tr_idx].reshape(len(tr_idx) * C, -1), np.repeat(tr_y, C), np.repeat(tr_idx, C)
    Xte, yte, gte = features[te_idx].reshape(len(te_idx) * C, -1), np.repeat(te_y, C), np.repeat(te_idx, C)
    split_groups = np.array([ucf_group(ids[i]) for i in gtr]) if ucf_groups else gtr
    # one thread while the probe trains: on 32-row steps a second one only spins (BENCHMARKS.md, Linear probe training)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best, table = select_hyperparameters(Xtr, ytr, gtr, split_groups, grid["epochs"], grid["weight_decay"],
                                             random_state=seed, progress=progress, device=device)
        tqdm.write(f"{progress}: refit on {len(tr_idx)} training videos, {best['epochs']} epochs", file=sys.stderr)
        probe = LinearProbe(epochs=best["epochs"], weight_decay=best["weight_decay"], random_state=seed, device=device)
        probe.fit(Xtr, ytr, gtr, progress=f"{progress}, refit")
    finally:
        torch.set_num_threads(threads)
    has = emb["has_audio"].astype(bool)
    y_video, pred = group_labels(yte, gte), probe.predict(Xte, gte)  # (n_test,), as top1's: clip logits averaged
    names = resolved.get("classes", [str(c) for c in range(te_y.max() + 1)])  # per-class keys (default: the labels)
    return dict(top1=100 * probe.score(Xte, yte, gte), n_train=len(tr_idx), n_test=len(te_idx), n_train_clips=len(Xtr),
                n_test_clips=len(Xte), hyperparameters=dict(epochs=best["epochs"], weight_decay=best["weight_decay"]),
                validation_top1=best["val_top1"], validation_videos=best["n_val_videos"], validation=table,
                missing_audio=dict(train=int((~has[tr_idx]).sum()), test=int((~has[te_idx]).sum())),
                per_class={name: 100 * float(np.mean(pred[y_video == c] == c)) if (y_video == c).any() else None
                           for c, name in enumerate(names)})  # None: no test video of the class (--allow-partial)


# ---- 4. the run: main -> evaluate_checkpoint -> evaluate_probe -> LinearProbe, for one checkpoint or a series ----

def main(argv=None):
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    try:
        if args.summary:
            print(summary_table(args.summary, args.per_class) + "\n\n" + "\n".join(str(Path(s)) for s in args.summary))
            return 0
        try:  # a misspelt device, or a GPU torch cannot see: one line
            args.device = str(prepare.torch_device(args.device))
        except ValueError as e:
            raise ProbeError(str(e)) from None
        t0 = time.time()
        root = Path(args.root or args.dataset or ".")  # --embed/--search with --cache need no root
        # --embed/--search take any cache, --root's own folder too; a probe: ROOT/lava_cache (ROOT: the split lists)
        default_cache = pretrain.cache_of(root) if args.embed or args.search else root / "lava_cache"
        try:
            cache = prepare.FeatureCache(args.cache or default_cache)
        except ValueError as e:  # a damaged cache: prepare.py's one-line message says what to do
            raise ProbeError(str(e)) from None
        if args.embed or args.search:  # any cache, labels and splits or not (README: Your own videos)
            model, info = load_model(args, args.checkpoint, cache)
            if args.search and "vt" not in info["trained_spaces"]:  # before the embeddings: an untrained g_vt head
                raise ProbeError("--search ranks in the g_vt space: this run was pre-trained with --losses "
                                 f"{','.join(info['trained_spaces'])}, without it; use a run with vt")
            emb = load_or_extract_embeddings(model, cache, info, args)
            if args.embed:
                embed(args, cache, model, info, emb)
            if args.search:  # the --top videos by cosine of their g_vt video embedding (clip mean) and the query's g_vt
                query = project(model, encode_titles(model, info, [args.search]), "vt")[0]      # (E,)
                scores = project(model, emb["z_v"], "vt", clip_mean=True) @ query               # (N,)
                print(f"{'rank':>4}  {'score':>7}  video")
                for rank, i in enumerate(np.argsort(-scores, kind="stable")[:args.top], 1):
                    title = cache.videos[i].get("title")
                    print(f"{rank:4d}  {scores[i]:7.4f}  {cache.videos[i]['path']}" + (f"  ({title})" if title else ""))
            return 0
        if cache.manifest.get("dataset") in ("k700", "ucf101", "hmdb51") and cache.manifest["dataset"] != args.dataset:
            raise ProbeError(f"--dataset {args.dataset}: the cache {cache.path} holds {cache.manifest['dataset']} "
                             f"videos; pass the {DATASET_NAMES[args.dataset]} cache (--cache, or --root)")
        modalities = (args.modalities or ("video,audio+video" if args.dataset == "ucf101" else "video")).split(",")
        if set(modalities) - set(MODALITIES):
            raise ProbeError(f"--modalities: unknown {sorted(set(modalities) - set(MODALITIES))} (video, audio+video)")
        read_split = read_ucf101_split if args.dataset == "ucf101" else read_hmdb51_split
        split_data = {k: read_split(root, k) for k in ([args.split] if args.split else [1, 2, 3])}  # before heavy work
        if args.per_class:  # a misspelt class fails now, not after the run
            wanted_classes(args.per_class, split_data[min(split_data)]["classes"])
        resolved = {k: resolve_split(data, cache, args.allow_partial, k) for k, data in split_data.items()}
        scope = dict(dataset=args.dataset, split_ids=list(resolved), modalities=modalities)
        if not args.checkpoints:
            model, info = load_model(args, args.checkpoint, cache)
            args.checkpoint = info["checkpoint"]  # the latest run's, if none was given
            name = f"probe_{args.dataset}{'_random' if args.checkpoint == 'random' else ''}.json"
            out = Path(args.out or Path(info["run_dir"]) / name)
            check_scope(out, dict(scope, task="linear-probe", checkpoint=info["checkpoint"]), args.overwrite)
            result = evaluate_checkpoint(args, model, info, cache, resolved, modalities)
        else:  # Figure 3: every checkpoint of the glob, each with its own weights and embeddings
            paths = sorted(glob.glob(args.checkpoints))
            if not paths:
                raise ProbeError(f"--checkpoints {args.checkpoints!r} matches no file")
            out = Path(args.out or Path(paths[0]).parent / f"probe_{args.dataset}_series.json")
            check_scope(out, dict(scope, task="checkpoint-series", checkpoints=args.checkpoints), args.overwrite)
            check_series(args.checkpoints, paths)  # every file read and compared before hours of probing
            series = [evaluate_checkpoint(args, *load_model(args, path, cache), cache, resolved, modalities)
                      for path in paths]
            keep = ("checkpoint", "checkpoint_sha256", "epoch", "mean", "std", "per_class_mean", "splits")
            result = dict(scope, task="checkpoint-series", checkpoints=args.checkpoints, args=vars(args),
                          model_config=series[0]["model_config"], series=[{k: r[k] for k in keep} for r in series])
        result["time_s"] = time.time() - t0
        out.parent.mkdir(parents=True, exist_ok=True)  # the JSON (and its .md table or .png plot), each atomically
        as_json = lambda x: x.item() if isinstance(x, np.generic) else str(x)  # numpy scalars as numbers, paths as text
        write_atomic(out, json.dumps(result, indent=2, default=as_json))
        if args.checkpoints:
            plot_series(result["series"], out.with_suffix(".png"), args.dataset, list(resolved))
            for s in result["series"]:
                epoch = "?" if s["epoch"] is None else f"{s['epoch']:g}"  # 1, not 1.0; 2.5 mid-epoch
                print(f"epoch {epoch}: " + ", ".join(f"{m} {v:.1f}" for m, v in s["mean"].items()))
        else:
            write_atomic(out.with_suffix(".md"), markdown_table(result, "all" if args.per_class else None))
            print(markdown_table(result, args.per_class))  # --per-class CLASSES: theirs here, every class in the .md
        print(f"wrote {out} and {out.with_suffix('.png' if args.checkpoints else '.md')} ({result['time_s']:.0f} s)")
        return 0
    except (ProbeError, OSError) as e:  # the user's input, a missing file, read-only storage: one line
        print(f"probe.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see the end of the file): every file written is whole
        print("probe: interrupted; the same command continues (stored embeddings are reused)", file=sys.stderr)
        return 128 + (e.args[0] if e.args else signal.SIGINT)  # 130, or 143 for SIGTERM, as a shell reports them


def check_series(pattern, paths):
    """--checkpoints: a ProbeError naming the first file of `paths` that is not a readable checkpoint, or the first
    whose model config differs from the first's (a series compares one model over pre-training)."""
    configs = {}
    for path in paths:
        try:
            configs[path] = pretrain.flat(pretrain.load_checkpoint(path, mmap=True)["config"]["model"])
        except (OSError, ValueError) as e:
            raise ProbeError(f"--checkpoints {pattern!r}: {e}") from None
        first = configs[paths[0]]
        differ = [k for k in sorted(configs[path].keys() | first.keys()) if configs[path].get(k) != first.get(k)]
        if differ:
            raise ProbeError(f"--checkpoints {pattern!r}: {path} has another model config than {paths[0]} "
                             f"({', '.join(differ)})")


def evaluate_checkpoint(args, model, info, cache, resolved, modalities):
    """Every split x modality for one checkpoint (`load_model`) -> the results dict (a linear-probe JSON)."""
    emb = load_or_extract_embeddings(model, cache, info, args)
    grid = dict(epochs=args.epochs_grid, weight_decay=args.weight_decay_grid)
    rows = []
    for k, (res, n_missing) in resolved.items():
        for m in modalities:
            t = time.time()
            row = evaluate_probe(emb, res, m, emb["ids"], grid, args.seed, args.device, args.dataset == "ucf101",
                                 progress=f"split {k} {m}")
            rows.append(dict(split=k, modalities=m, **row, missing_videos=n_missing, time_s=time.time() - t))
            print(f"split {k} {m}: top-1 {row['top1']:.1f} on {row['n_test']} test videos", file=sys.stderr)
    top1 = {m: [r["top1"] for r in rows if r["modalities"] == m] for m in modalities}
    mean = {m: float(np.mean(v)) for m, v in top1.items()}
    std = {m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in top1.items()}  # sample std over splits
    per_class = {m: [r["per_class"] for r in rows if r["modalities"] == m] for m in modalities}  # a dict per split
    scored = {m: {c: [p[c] for p in ps if p.get(c) is not None] for c in sorted(set().union(*ps))}
              for m, ps in per_class.items()}  # the splits with test videos of the class
    return dict(
        task="linear-probe", dataset=args.dataset, cache=str(cache.path), checkpoint=info["checkpoint"],
        checkpoint_sha256=info["checkpoint_sha256"], epoch=info["epoch"], config_source=info["config_source"],
        args=vars(args), model_config=info["model_config"], pretrain_args=info["pretrain_args"],
        cache_manifest=cache.manifest, embeddings=emb["path"], split_ids=list(resolved), modalities=modalities,
        splits=rows, mean=mean, std=std, partial=any(sum(n.values()) for _, n in resolved.values()),
        per_class_mean={m: {c: float(np.mean(v)) if v else None for c, v in sc.items()} for m, sc in scored.items()},
        hyperparameter_grid=dict(grid, lr=LinearProbe().lr, batch_size=LinearProbe().batch_size, standardize=True,
                                 val_fraction=0.2, val_groups={"ucf101": "UCF gXX groups"}.get(args.dataset, "videos")),
        missing_audio=dict(videos_in_cache=len(cache), videos_without_audio=len(cache) - int(emb["has_audio"].sum()),
                           treatment=MISSING_AUDIO_TREATMENT),
        paper=dict(table1=PAPER_TABLE1.get(args.dataset), table2_split1=PAPER_TABLE2))


def embed(args, cache, model, info, emb):
    """--embed: every video's embeddings, per clip and per video, and their projections g_<space>_<modality> into
    each latent space, in one .npz (its keys: README, Your own videos); 0 where a modality is missing."""
    untrained = [s for s in SPACES if s not in info["trained_spaces"]]
    if untrained:  # a Table 2 ablation run: those heads are still their random init
        heads = ", ".join(f"g_{s}_*" for s in untrained)
        warnings.warn(f"--embed: the run was pre-trained without {', '.join(untrained)}: its {heads} arrays come from "
                      "untrained projection heads")
    titles = np.array([v.get("title") or "" for v in cache.videos])
    z = dict(v=emb["z_v"], a=emb["z_a"], t=np.zeros((len(cache), model.config.text.width), np.float32))
    has = dict(v=np.ones(len(cache), bool), a=emb["has_audio"].astype(bool), t=titles != "")
    if has["t"].any():
        z["t"][has["t"]] = encode_titles(model, info, titles[has["t"]])
    out = dict(ids=emb["ids"], paths=np.array([v["path"] for v in cache.videos]), titles=titles, z_v=z["v"], z_a=z["a"],
               z_t=z["t"], z_v_video=z["v"].mean(1), z_a_video=z["a"].mean(1), has_audio=has["a"], has_text=has["t"],
               checkpoint=np.array(info["checkpoint"]), checkpoint_sha256=np.array(info["checkpoint_sha256"] or ""))
    for space, modalities in SPACES.items():
        for m in modalities:
            out[f"g_{space}_{m}"] = np.zeros((len(cache), model.config.embed_dim), np.float32)
            out[f"g_{space}_{m}"][has[m]] = project(model, z[m][has[m]], space, clip_mean=m != "t")
    path = Path(args.out or Path(cache.path) / "embeddings" / f"embed_{info['embedding_key']}.npz")
    save_npz(path, out)
    print(f"wrote {path}: {len(cache)} videos, {int(has['a'].sum())} with audio, {int(has['t'].sum())} with a title")


# ==== Machinery: official split files, checkpoints, the embedding files, results tables, the command line ====

def read_ucf101_split(root, split):
    """UCF-101 split `split` (1..3) from `<root>/ucfTrainTestlist/` -> dict(classes, train, test, unused): classes in
    classInd.txt order (1-based there, 0-based here); train/test: lists of (video id verbatim, e.g.
    "HandstandPushups/v_HandStandPushups_g08_c01.avi", label index from the folder: test lines carry no label)."""
    paths = [Path(root) / "ucfTrainTestlist" / name for name in ("classInd.txt", f"trainlist0{split}.txt",
                                                                  f"testlist0{split}.txt")]
    for path in paths:
        if not path.is_file():
            raise ProbeError(f"missing official split file {path} (README: Laying out real data)")
    classes = {name: int(i) - 1 for i, name in map(str.split, _lines(paths[0]))}    # name -> label 0..K-1
    if sorted(classes.values()) != list(range(len(classes))):
        raise ProbeError(f"{paths[0]}: class indices are not 1..{len(classes)}")
    rows = dict(classes=sorted(classes, key=classes.get), train=[], test=[], unused=[])
    for part, path in zip(("train", "test"), paths[1:]):
        for lineno, line in enumerate(_lines(path), 1):
            video_id, *given = line.replace("\\", "/").split()  # given: the label, on training lines
            folder_name = video_id.split("/")[0]
            if folder_name not in classes:
                raise ProbeError(f"{path}:{lineno}: class folder {folder_name!r} is not in classInd.txt")
            label = classes[folder_name]
            if given and int(given[0]) - 1 != label:  # a labelled line must agree with its folder
                raise ProbeError(f"{path}:{lineno}: label {given[0]} but folder {folder_name!r} is class {label + 1}")
            if part == "train" and not given:
                raise ProbeError(f"{path}:{lineno}: a training line needs '<path> <label>', got {line!r}")
            rows[part].append((video_id, label))
    return rows


def read_hmdb51_split(root, split):
    """HMDB-51 split `split` from `<root>/testTrainMulti_7030_splits/<class>_test_split<k>.txt` (lines `<video>.avi
    <code>`: 1 train, 2 test, 0 unused) -> as `read_ucf101_split`; classes sorted, ids "<class>/<video>.avi"."""
    folder = Path(root) / "testTrainMulti_7030_splits"
    suffix = f"_test_split{split}.txt"
    files = sorted(folder.glob(f"*{suffix}"))
    if not files:
        raise ProbeError(f"missing official split files {folder}/<class>{suffix} (HMDB-51: one per class and split)")
    classes = [f.name[: -len(suffix)] for f in files]
    rows = {1: [], 2: [], 0: []}
    for label, (name, path) in enumerate(zip(classes, files)):
        for lineno, line in enumerate(_lines(path), 1):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ProbeError(f"{path}:{lineno}: expected '<video>.avi <0|1|2>', got {line!r}")
            rows[int(parts[1])].append((f"{name}/{parts[0]}", label))
    return dict(classes=classes, train=rows[1], test=rows[2], unused=rows[0])


def _lines(path):
    # official lists use CRLF and sometimes trailing spaces; blank lines carry nothing
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def ucf_group(video_id):
    """'Class/v_Class_g08_c01.avi' -> 'Class/g08': UCF-101's groups (same actors and scene) that the official
    splits hold out together; other ids are their own group."""
    m = re.search(r"_g(\d+)_c\d+", video_id)
    return f"{video_id.split('/')[0]}/g{m.group(1)}" if m else video_id


def resolve_split(split_data, cache, allow_partial, split):
    """Official (id, label) lists -> ({part: (cache indices, labels)}, {part: number missing}). Missing videos:
    ProbeError with counts (--allow-partial: a warning). Listed twice, or labelled unlike the cache: ProbeError."""
    names, counts = np.unique([v for part in ("train", "test") for v, _ in split_data[part]], return_counts=True)
    if (counts > 1).any():
        raise ProbeError(f"split {split}: the official lists name {names[counts > 1][0]} twice (or in train and test)")
    known = {v["id"] for v in cache.videos}
    missing = {part: [v for v, _ in split_data[part] if v not in known] for part in ("train", "test")}
    out = dict(classes=split_data["classes"])  # evaluate_probe names its per-class top-1 by them
    for part in ("train", "test"):
        found = [(cache.index(video_id), label) for video_id, label in split_data[part] if video_id in known]
        for i, label in found:
            if cache.videos[i].get("label") not in (None, split_data["classes"][label]):
                raise ProbeError(f"{cache.videos[i]['id']}: the split lists class {split_data['classes'][label]!r}, "
                                 f"the cache {cache.path} says {cache.videos[i]['label']!r}")
        out[part] = (np.array([i for i, _ in found], dtype=int), np.array([y for _, y in found], dtype=int))
    n_missing = {part: len(v) for part, v in missing.items()}
    if any(n_missing.values()):
        msg = (f"split {split}: {n_missing['train']} of {len(split_data['train'])} training and {n_missing['test']} of "
               f"{len(split_data['test'])} test videos named in the official lists are not in the cache {cache.path} "
               f"(e.g. {(missing['train'] + missing['test'])[:3]})")
        if not allow_partial:
            raise ProbeError(msg + ". Prepare the whole dataset, or pass --allow-partial (not comparable to the paper)")
        warnings.warn(f"--allow-partial: {msg}; evaluating on the rest")
    if len(out["train"][0]) == 0 or len(out["test"][0]) == 0:
        raise ProbeError(f"split {split}: no training or no test video of the official lists is in the cache")
    return out, n_missing


def load_model(args, checkpoint, cache):
    """(LAVA in eval mode on args.device, info dict) for a checkpoint path (None: the latest run's) or "random": a
    fixed random init (seed --seed) of the config of --config-from or the latest run. Any misfit: ProbeError."""
    random_init = checkpoint == "random"
    if args.config_from and not random_init:
        raise ProbeError("--config-from gives the config of --checkpoint random; a checkpoint has its own")
    source = args.config_from if random_init else checkpoint
    if not source:  # the latest run's checkpoint
        found = sorted(Path("runs").glob("*/ckpt_last.pt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ProbeError("no runs/*/ckpt_last.pt: pass --checkpoint PATH (or 'random' with --config-from)")
        source = found[-1]
        print(f"{'config of' if random_init else 'checkpoint'}: {source} (the latest runs/*/ckpt_last.pt)",
              file=sys.stderr)
    try:  # pretrain.py's reader: a missing, truncated or foreign file is a one-line OSError or ValueError
        ckpt = pretrain.load_checkpoint(source)
    except (OSError, ValueError) as e:
        raise ProbeError(f"{'--config-from' if random_init else '--checkpoint'}: {e}") from None
    config = LAVAConfig.from_dict(ckpt["config"]["model"])
    torch.manual_seed(args.seed)  # the same seed every time: a random baseline is one fixed network (or, loaded over)
    model = LAVA(config)
    if not random_init:
        try:
            model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise ProbeError(f"checkpoint {source}: its weights do not fit its own config ({e})") from None
        with open(source, "rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
        # epochs of pre-training done: pretrain.py stores the epoch to continue in (0-based) and its batches done
        epoch, sampler = ckpt.get("epoch"), ckpt.get("sampler") or {}
        if epoch is not None and sampler.get("steps_per_epoch"):
            epoch = round(epoch + sampler.get("step_in_epoch", 0) / sampler["steps_per_epoch"], 4)
        info = dict(checkpoint=str(source), checkpoint_sha256=sha, config_source="checkpoint",
                    embedding_key=sha[:16], epoch=epoch, pretrain_args=ckpt["config"].get("args"),
                    trained_on=(ckpt.get("cache_manifest") or {}).get("backbone"))
    else:
        # embeddings key = hash of the weights themselves, so a change in model.py's init never reuses stale files
        h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
        for name, tensor in model.state_dict().items():
            h.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        info = dict(checkpoint="random", checkpoint_sha256=None, config_source=f"config of {source}",
                    embedding_key="random-" + h.hexdigest()[:16], epoch=0, pretrain_args=None, trained_on=None)
    # the latent spaces whose heads the run trained (its --losses); random weights make no such claim: all
    losses = (info["pretrain_args"] or {}).get("losses") or ",".join(SPACES)
    info.update(model_config=config.to_dict(), run_dir=Path(source).parent, trained_spaces=losses.split(","))
    v, a, s = config.video, config.audio, cache.manifest["shapes"]
    problems = [message for bad, message in (
        (v.feature_dim != s["feature_dim"], f"video feature_dim {v.feature_dim} vs cache {s['feature_dim']}"),
        (v.grid != s["grid"], f"video grid {v.grid} vs cache grid {s['grid']} (prepare --size)"),
        (v.frames > s["frames"], f"video frames {v.frames} > cache frames per clip {s['frames']}"),
        (a.n_mels != s["n_mels"], f"audio n_mels {a.n_mels} vs cache {s['n_mels']}"),
        (a.frames > s["audio_frames"], f"audio frames {a.frames} > cache audio frames {s['audio_frames']}")) if bad]
    if problems:
        raise ProbeError(f"checkpoint {info['checkpoint']} does not fit the cache {cache.path}: " + "; ".join(problems))
    if info["trained_on"] and info["trained_on"] != cache.manifest.get("backbone"):
        warnings.warn(f"the checkpoint was pre-trained on '{info['trained_on']}' backbone features but {cache.path} "
                      f"holds '{cache.manifest.get('backbone')}' features: the encoder has never seen such inputs")
    return model.to(args.device).eval(), info


def load_or_extract_embeddings(model, cache, info, args):
    """`extract_embeddings` + ids (N,) and path, from disk when this (checkpoint, cache) pair was done before (not
    with --recompute). The file records the cache manifest's hash: a cache re-prepared since then invalidates it."""
    path = Path(cache.path) / "embeddings" / f"{info['embedding_key']}.npz"
    manifest_sha = np.array(hashlib.sha256(json.dumps(cache.manifest, sort_keys=True).encode()).hexdigest())
    ids = np.array([v["id"] for v in cache.videos])
    if path.is_file() and not args.recompute:
        with np.load(path, allow_pickle=False) as f:
            stored = {k: f[k] for k in f.files}
        if stored.get("manifest_sha") == manifest_sha and np.array_equal(stored["ids"], ids):
            print(f"embeddings: {path} (cached)", file=sys.stderr)
            return dict(stored, path=str(path))
        print(f"embeddings: {path} is stale (cache changed); recomputing", file=sys.stderr)
    t0 = time.time()
    emb = dict(extract_embeddings(model, cache, args.batch_clips, args.device, args.backbone_weights), ids=ids,
               manifest_sha=manifest_sha)
    save_npz(path, emb)
    print(f"embeddings: {len(cache)} videos in {time.time() - t0:.1f} s -> {path}", file=sys.stderr)
    return dict(emb, path=str(path))


def markdown_table(result, per_class=None):
    """Markdown laid out like the paper's Table 1, paper rows beside ours, then every split. The paper rows: Table 1
    (3-split mean, all three losses), or Table 2 (split 1, per loss set) for a run of split 1 only or of other losses
    (the paper's row of its loss set, or all of Table 2 if there is none)."""
    ds = result["dataset"]
    mean, std = result["mean"], result["std"]
    random_init = result["checkpoint"] == "random"
    ours = "random init" if random_init else f"`{result['checkpoint']}`"
    losses = [x.strip() for x in ((result.get("pretrain_args") or {}).get("losses") or "").split(",")]
    mods = "none" if random_init else "+".join(x.upper() for x in ("av", "vt", "avt") if x in losses) or "?"
    data = "-" if random_init else (result.get("pretrain_args") or {}).get("data", "?")
    cols = lambda cell: f"{cell} | -" if ds == "ucf101" else f"- | {cell}"     # the UCF | HMDB columns
    table2 = result["split_ids"] == [1] or (not random_init and mods != "AV+VT+AVT")
    lines = [f"# Linear probe: {DATASET_NAMES.get(ds, ds)}, {ours}", "",
             f"Table 1 layout: top-1 (%): ours mean +- std over splits {result['split_ids']}, paper "
             + ("Table 2 (split 1)" if table2 else "3-split mean"), "",
             "| Method | Pre-train data | Mod. | UCF | HMDB |", "| --- | --- | --- | --- | --- |"]
    name = lambda m: "video only" if m == "video" else m
    if table2:
        lines += [f"| LAVA* ({name(m)}), paper Table 2, split 1 | K700 (0.1) | {loss} | {ucf} | {hmdb or '-'} |"
                  for loss, m, ucf, hmdb in [t for t in PAPER_TABLE2 if t[0] == mods] or PAPER_TABLE2]
    else:
        lines += [f"| LAVA* ({name(m)}), paper | K700 (0.1) | AVT | {PAPER_TABLE1['ucf101'].get(m, '-')} | "
                  f"{PAPER_TABLE1['hmdb51'].get(m, '-')} |" for m in MODALITIES]
    lines += [f"| LAVA ({m}), this kit: {ours}{partial_note(result, m)} | {data} | {mods} | "
              f"{cols(f'{mean[m]:.1f} +- {std[m]:.1f}')} |" for m in result["modalities"] if m in mean]
    lines += ["", "| split | modality | top-1 | train videos | test videos | epochs | weight decay | val top-1 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['split']} | {r['modalities']} | {r['top1']:.1f} | {r['n_train']} | {r['n_test']} | "
              + "{epochs} | {weight_decay} | ".format(**r["hyperparameters"]) + f"{r['validation_top1']:.1f} |"
              for r in result["splits"]]
    ma = result["missing_audio"]
    lines += ["", f"Videos without audio: {ma['videos_without_audio']} of {ma['videos_in_cache']} in the cache"
              + (f"; {ma['treatment']}." if "audio+video" in result["modalities"] else " (video-only probe: unused).")]
    return "\n".join(lines) + "\n" + (f"\n{per_class_table(result, per_class)}" if per_class else "")


def partial_note(result, modality):
    """' (partial: 16 of 16 training, 8 of 10 test videos)', summed over the splits of `modality`, for a result
    evaluated with --allow-partial on videos missing from the cache; '' for a whole one."""
    rows = [r for r in result["splits"] if r["modalities"] == modality]
    n = {part: sum(r[f"n_{part}"] for r in rows) for part in ("train", "test")}
    listed = {part: n[part] + sum((r.get("missing_videos") or {}).get(part, 0) for r in rows) for part in n}
    if n == listed:
        return ""
    return f" (partial: {n['train']} of {listed['train']} training, {n['test']} of {listed['test']} test videos)"


def wanted_classes(wanted, classes):
    """--per-class's "all" or comma list -> those class names; a ProbeError names any that is not in `classes`."""
    names = list(classes) if wanted == "all" else [c.strip() for c in wanted.split(",")]
    if set(names) - set(classes):
        raise ProbeError(f"--per-class: unknown classes {sorted(set(names) - set(classes))} (e.g. {[*classes][:3]})")
    return names


def per_class_table(result, wanted="all"):
    """--per-class: Markdown top-1 of each class (mean over splits), lowest first, for every class or the comma list
    `wanted`, then their mean beside the overall top-1 (paper: its 5 classes absent from Kinetics 79.9, all 81.3)."""
    if "per_class_mean" not in result:
        raise ProbeError(f"{result['checkpoint']}: a result without per-class top-1 (probe.py before --per-class)")
    pcm = result["per_class_mean"]                          # {modality: {class: top-1 %, None: no test video}}
    first = pcm[result["modalities"][0]]
    names = sorted(wanted_classes(wanted, first), key=lambda c: (first[c] is None, first[c] or 0))  # "-" last
    scored = [c for c in names if first[c] is not None]
    lines = ["| class | " + " | ".join(pcm) + " |", "|" + " --- |" * (len(pcm) + 1)]
    lines += [f"| {c} | " + " | ".join("-" if pcm[m][c] is None else f"{pcm[m][c]:.1f}" for m in pcm) + " |"
              for c in names]
    lines.append("")
    if scored:
        lines.append(f"mean of these {len(scored)} classes: " + ", ".join(
            f"{m} {np.mean([pcm[m][c] for c in scored]):.1f} (overall top-1 {result['mean'][m]:.1f})" for m in pcm))
    if len(scored) < len(names):
        lines.append("-: no test video of the class in the cache (--allow-partial)")
    return "\n".join(lines) + "\n"


def check_scope(out, scope, overwrite):
    """A results file is replaced only by a run of the same scope (task, dataset, splits, modalities, checkpoint)."""
    if overwrite or not out.is_file():
        return
    try:
        old = dict(json.loads(out.read_text()))
    except (ValueError, TypeError):  # not a results JSON: another scope
        old = {}
    diff = ", ".join(f"{k} {old.get(k)!r}" for k, v in scope.items() if old.get(k) != v)
    if diff:
        raise ProbeError(f"{out} holds a result of another scope ({diff}): --overwrite replaces it, or another --out")


def save_npz(path, arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")  # per process: parallel --split runs share the path
    try:  # atomic: a crashed or interrupted run leaves no half file that a later run would trust, nor the tmp
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def summary_table(paths, per_class=None):
    """One Markdown table of several results JSONs (dataset, checkpoint, modality, mean +- std)."""
    lines = ["| dataset | checkpoint | modality | top-1 mean +- std | splits | paper (Table 1) |", "|" + " --- |" * 6]
    configs = {}
    tables = []  # --per-class: one table per result, after the summary
    for path in paths:
        try:
            r = json.loads(Path(path).read_text())
        except ValueError:  # `--summary runs/X/probe_ucf101*` also matches the .md tables (and a .jsonl, a .png)
            print(f"--summary: skipped {path}, not a JSON file", file=sys.stderr)
            continue
        if not isinstance(r, dict) or r.get("task") != "linear-probe":  # a probe_<ds>_series.json too
            print(f"--summary: skipped {path}, not a linear-probe result (a series: see its .png)", file=sys.stderr)
            continue
        configs.setdefault(r["dataset"], set()).add(json.dumps(r.get("model_config"), sort_keys=True))
        lines += [f"| {r['dataset']} | {r['checkpoint']} | {m} | {r['mean'][m]:.1f} +- {r['std'][m]:.1f}"
                  f"{partial_note(r, m)} | "
                  f"{len({s['split'] for s in r['splits'] if s['modalities'] == m})} | "
                  f"{PAPER_TABLE1.get(r['dataset'], {}).get(m, '-')} |" for m in r["mean"]]
        tables += [f"\n{path}:\n{per_class_table(r, per_class)}"] if per_class else []
    lines += [f"\nWARNING: the {ds} results come from different model configs: not a like-for-like comparison"
              for ds, cfgs in configs.items() if len(cfgs) > 1]
    return "\n".join(lines + tables)


def plot_series(series, out_png, dataset, splits):
    """Figure 3: top-1 vs pre-training epoch, our mean over `splits` beside the paper's 3-split means (Table 3)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing to close
    ax = Figure(figsize=(6, 4), layout="tight").subplots()
    for m, color in zip(MODALITIES, ("tab:blue", "tab:green")):
        pts = [(s["epoch"], s["mean"][m], s["std"][m]) for s in series if m in s["mean"] and s["epoch"] is not None]
        if pts:
            e, y, sd = map(np.array, zip(*sorted(pts)))
            ax.errorbar(e, y, yerr=sd, marker="o", capsize=3, color=color, label=f"this kit, splits {splits}: {m}")
        if dataset == "ucf101":  # the paper's Table 3 / Figure 3 points, same colour, dashed
            pe, py = zip(*sorted(PAPER_TABLE3[m].items()))
            ax.plot(pe, py, "--", marker="s", alpha=0.5, color=color, label=f"paper, 3-split mean: {m}")
    ax.set(xlabel="pre-training epochs", ylabel="top-1 (%)", title=f"{DATASET_NAMES[dataset]} linear probe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.figure.savefig(out_png, dpi=120)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, prepare._interrupt)  # a scheduler's stop unwinds like Ctrl-C, with its number
    warnings.formatwarning = lambda message, *_: f"probe.py: warning: {message}\n"  # not file:line and source line
    sys.exit(main(ARGS))

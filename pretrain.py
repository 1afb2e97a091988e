r"""Pre-train LAVA (paper Section 3) on a prepare.py feature cache: one file, CPU or one GPU or torchrun.

    python pretrain.py --data k700 --out runs/lava_k700 --compile   # one GPU: the paper's run (README: Pre-training)
    # 8 GPUs, then 2 nodes x 8 (on every node): --batch-size is the GLOBAL batch, negatives gathered across GPUs
    torchrun --standalone --nproc_per_node 8 pretrain.py --data k700 --batch-size 256 --out runs/lava_k700_8gpu
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 --rdzv_id lava --rdzv_backend c10d \
        --rdzv_endpoint $MASTER_HOST:29500 pretrain.py --data k700 --batch-size 512 --out runs/lava_k700_16gpu

Reads only the cache, never videos; augmentation is a function of (seed, epoch, sample index), so a stopped run
continues to the same weights (bitwise on the CPU): the same command continues the run in --out, Ctrl-C or SIGTERM
saves the step in progress (exit 130 / 143). No gradient accumulation: with in-batch negatives it is not a larger batch.
"""
import argparse
import functools
import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

CLIP_FRAMES = 16      # video frames per training clip (paper: 16 x 224 x 224 at 10 fps)
AUDIO_FRAMES = 256    # log-mel frames per training clip (paper: [80, 256])
MEL_PER_FRAME = 10    # 10 ms mel hop at 10 fps video: frame s starts at mel column 10 * s (README: Feature cache)


# ---- config: presets, every value of which is also a flag of its own (--width ... --epochs) that overrides it ----

PRESETS = {
    # Section 3 (4 layers, width 1024, batch 32, Adam 1e-5, cosine, 25 epochs); 16 heads, 512-d spaces, no warmup: ours
    "paper": dict(width=1024, depth=4, heads=16, embed_dim=512, dropout=0.0, center_tokens=False,
                  audio_frames_per_token=1, batch_size=32, lr=1e-5, epochs=25, warmup_steps=0),
    # the demo's (shared/notes/demo-corpus.md; centring: +40 points there); our lr: 1e-5 would barely move in 250 steps
    "small": dict(width=128, depth=2, heads=4, embed_dim=128, dropout=0.0, center_tokens=True, audio_frames_per_token=8,
                  batch_size=64, lr=1e-3, epochs=20, warmup_steps=20),
    # for tests and smoke runs: an epoch of a few hundred clips in seconds on the CPU
    "tiny": dict(width=32, depth=1, heads=2, embed_dim=32, dropout=0.0, center_tokens=True, audio_frames_per_token=16,
                 batch_size=16, lr=1e-3, epochs=2, warmup_steps=0),
}
RUN_ONLY = {"data", "out", "resume", "restart", "workers", "device", "threads", "compile", "compile_mode", "max_steps",
            "log_every", "save_every", "keep_epochs", "no_progress", "backbone_weights"}  # weights stay as they are


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's lines and shows every default; a preset's flag lists each preset's value."""

    def _get_help_string(self, action):
        if action.dest in PRESETS["paper"]:
            return f"{action.help} (" + ", ".join(f"{m} {p[action.dest]}" for m, p in PRESETS.items()) + ")"
        return action.help if action.default is None else super()._get_help_string(action)  # None: said in words


def parse_args(argv=None):
    """The flags, with preset values filled into those left unset and --losses in canonical order (stdlib only)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data and run folder")
    g.add_argument("--data", default="k700", help="dataset folder, Kinetics-700 or your own videos (prepare.py --root)")
    g.add_argument("--cache", help="cache written by prepare.py (default: DATA/lava_cache, or DATA if it is one)")
    g.add_argument("--out", help="run folder; a run there is continued (default: --resume's folder, else "
                   "runs/lava_<cache name>_<model>_<losses>: the cache folder's name, or its parent's for "
                   "lava_cache, e.g. runs/lava_k700_paper_av+vt+avt)")
    g.add_argument("--resume", help="checkpoint to continue with these flags; auto: OUT/ckpt_last.pt (default: none)")
    g.add_argument("--restart", action="store_true", help="replace the run in --out (start over or from --resume PATH)")
    g.add_argument("--workers", type=int, help="DataLoader processes per rank, 0: none (default: half its cores, <= 8)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model init, the sample order and the augmentation")
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N (torchrun: LOCAL_RANK)")
    g.add_argument("--threads", type=int, help="CPU: intra-op threads (default: this rank's cores minus --workers)")
    g = p.add_argument_group("model (the --model preset's values unless given)")
    g.add_argument("--model", default="paper", choices=sorted(PRESETS), help="preset of the values listed below")
    g.add_argument("--width", type=int, help="hidden size of all three encoders")
    g.add_argument("--depth", type=int, help="transformer layers per encoder")
    g.add_argument("--heads", type=int, help="attention heads per layer")
    g.add_argument("--embed-dim", type=int, help="size of the joint spaces the projections g_av, g_vt, g_avt map to")
    g.add_argument("--dropout", type=float, help="dropout inside the encoders")
    g.add_argument("--center-tokens", action=argparse.BooleanOptionalAction, help="subtract each clip's mean token")
    g.add_argument("--audio-frames-per-token", type=int, help="mel frames per audio token (paper: 1, an MLP per frame)")
    g = p.add_argument_group("training (the --model preset's values unless given)")
    g.add_argument("--losses", default="av,vt,avt", help="comma list of av, vt, avt (Table 2 ablation: av  or  av,vt)")
    g.add_argument("--epochs", type=int, help="epochs over the training videos")
    g.add_argument("--batch-size", type=int, help="GLOBAL batch over all ranks; must divide by the number of ranks")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps before the cosine")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay of >= 2-d weights (0: Adam)")
    g.add_argument("--temperature", type=float, default=0.07, help="NCE temperature tau (the paper's)")
    g.add_argument("--loss-form", default="symmetric", choices=["symmetric", "paper_eq1"],
                   help="NCE form (losses.nce): symmetric InfoNCE (the authors' code) or Eq. 1 as printed")
    g.add_argument("--audio-noise", type=float, default=0.1, help="Gaussian noise std (standardised log-mel units)")
    g.add_argument("--normalize-centroid", action="store_true", help="re-normalise the centroid (paper: plain mean)")
    g.add_argument("--detach-centroid", action="store_true", help="no gradient through the centroid (paper: one)")
    g.add_argument("--shuffle-pairs", action="store_true", help="control: audio and title from another clip")
    g.add_argument("--backbone-weights", help="ImageNet ResNet-18 for a --store frames cache (default: prepare's)")
    g.add_argument("--compile", action="store_true", help="torch.compile the forward (checkpoints: the plain module)")
    g.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: torch's)")
    g.add_argument("--max-steps", type=int, help="stop after this many steps (default: all; the cosine spans --epochs)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=20, help="steps per log line (and check the loss is finite)")
    g.add_argument("--save-every", type=int, default=2000, help="steps between ckpt_last.pt saves (0: epochs' only)")
    g.add_argument("--keep-epochs", action="store_true", help="keep epoch_XXX.pt after every epoch (probe.py's series)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines still print)")
    args = p.parse_args(argv)
    vars(args).update({k: v for k, v in PRESETS[args.model].items() if getattr(args, k) is None})
    names = [s.strip() for s in args.losses.split(",") if s.strip()]
    if not names or set(names) - {"av", "vt", "avt"}:
        p.error(f"--losses: expected a comma list of av, vt, avt, got {args.losses!r}")
    args.losses = ",".join(s for s in ("av", "vt", "avt") if s in names)  # canonical order
    for low, flags in ((1, "batch_size epochs width depth heads embed_dim audio_frames_per_token log_every max_steps"),
                       (0, "workers threads seed warmup_steps save_every")):  # --max-steps 0: an error, not "all"
        for name in flags.split():
            if getattr(args, name) is not None and getattr(args, name) < low:
                p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.width % args.heads:
        p.error(f"--width {args.width} must be divisible by --heads {args.heads}")
    if AUDIO_FRAMES % args.audio_frames_per_token:
        p.error(f"--audio-frames-per-token {args.audio_frames_per_token} must divide the {AUDIO_FRAMES} audio frames")
    args.cache = args.cache or str(cache_of(args.data))
    return args


def cache_of(folder):
    """A dataset folder's cache, FOLDER/lava_cache, or FOLDER itself when it is one (finished, or with prepare.py's
    first files in it); probe.py's --embed/--search --root too."""
    is_cache = any(os.path.isfile(Path(folder) / f) for f in ("manifest.json", "prepare_config.json"))
    return Path(folder) if is_cache else Path(folder) / "lava_cache"


def fail(message):  # a user's error: one line on stderr and exit 2, argparse's code for bad input (no traceback)
    print(f"pretrain: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    ARGS = parse_args()  # --help and flag errors answer before torch loads (its import takes seconds)

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from losses import lava_loss
from model import LAVA, AudioConfig, LAVAConfig, TextConfig, VideoConfig
import prepare


def build_config(args, manifest, tokenizer):
    """LAVAConfig for this cache: input shapes from the manifest, sizes from the (preset-filled) flags."""
    shapes = manifest["shapes"]
    size = dict(width=args.width, depth=args.depth, heads=args.heads, dropout=args.dropout)
    # pad_id = vocab_size - 1 (the top id): pad_id + 1 rows; a cache without titles (--losses av only) gets 2 rows
    pad_id = tokenizer.pad_id if tokenizer is not None else 1
    return LAVAConfig(
        video=VideoConfig(feature_dim=shapes["feature_dim"], frames=CLIP_FRAMES, grid=shapes["grid"],
                          center_tokens=args.center_tokens, **size),
        audio=AudioConfig(n_mels=shapes["n_mels"], frames=AUDIO_FRAMES, frames_per_token=args.audio_frames_per_token,
                          mel_mean=manifest["audio_stats"]["mean"], mel_std=manifest["audio_stats"]["std"], **size),
        text=TextConfig(vocab_size=pad_id + 1, max_len=shapes["max_tokens"], pad_id=pad_id, **size),
        embed_dim=args.embed_dim)


# ---- data: Section 3's training sample, and the order of samples that lets a killed run resume exactly ----

class PretrainClips(Dataset):
    """Training samples (Section 3); item (i, epoch) -> dict of tensors for the i-th train video, each random draw a
    function of (seed, epoch, i), from 16 frames at a random start s anywhere in the clip:

    video  (16, S, S, 3) uint8     --store frames: a random S x S crop (S = 32 x grid) of the larger frames, h-flipped
                                   with p = 0.5 (the paper's augmentations, on pixels: the frozen CNN runs in the step)
      or   (16, G, G, F) float16   --store features: centre-crop features, no crop or flip (approximates the paper)
    audio  (n_mels, 256) float32   the same frames' log-mel columns [10 s, 10 s + 256) + noise (std audio_noise in
                                   standardised units)
    tokens (L,) int64              BPE title tokens (all pad when there is no title)
    has_audio, has_text  bool      presence, for the loss masks
    shuffle_pairs: audio and title come from another video (a permutation fixed per epoch): the control run.
    """

    def __init__(self, cache_path, indices, seed=0, audio_noise=0.1, shuffle_pairs=False):
        self.cache_path = str(cache_path)
        self.indices = list(indices)
        self.seed = seed
        self.audio_noise = audio_noise
        self.shuffle_pairs = shuffle_pairs
        self.cache = None  # opened lazily in each worker: a memory map must not be pickled into it

    def __getstate__(self):  # DataLoader workers (spawn) and copies get the path, not the open cache
        return dict(self.__dict__, cache=None)

    def window(self, item, rng):
        """(clip c, start s) of a random 16-frame window within the clip's real frames (those past it repeat)."""
        C, T = item["window"].shape
        c = int(rng.integers(C))
        real = int(min(max(int(item["frames"][c]), 1), T))
        return c, int(rng.integers(max(real, CLIP_FRAMES) - CLIP_FRAMES + 1))

    def __getitem__(self, key):
        i, epoch = key
        rng = np.random.default_rng([self.seed, epoch, i])
        self.cache = self.cache or prepare.FeatureCache(self.cache_path)
        item = self.cache[self.indices[i]]
        c, s = self.window(item, rng)
        frames = item["window"][c, s:s + CLIP_FRAMES]              # (16,) this video's distinct frames
        if item["jpeg"] is None:
            v = item["patches"][frames]                            # (16, G, G, F): only these read from the map
        else:
            crop = 32 * self.cache.manifest["shapes"]["grid"]
            pixels = prepare.decode_jpegs(item["jpeg"], item["patches"][frames])  # (16, S', S', 3), S' = S x 8/7
            y, x = rng.integers(pixels.shape[1] - crop + 1, size=2)
            v = np.ascontiguousarray(pixels[:, y:y + crop, x:x + crop][:, :, ::-1 if rng.random() < 0.5 else 1])

        if self.shuffle_pairs:  # draws after the video's: the video of a shuffled run is the paired run's
            j = pair_permutation(self.seed, epoch, len(self.indices))[i]
            item = self.cache[self.indices[j]]
            c, s = self.window(item, rng)
        a0 = MEL_PER_FRAME * s  # prepare.py keeps T >= 16 frames and the 10 (T - 16) + 256 mel columns all starts need
        a = item["audio"][c, :, a0:a0 + AUDIO_FRAMES].astype(np.float32)  # (n_mels, 256)
        if item["has_audio"] and self.audio_noise > 0:  # the last draw; absent audio stays zeros (masked out anyway)
            a += self.audio_noise * self.cache.manifest["audio_stats"]["std"] * rng.standard_normal(a.shape, np.float32)
        return dict(video=torch.from_numpy(v), audio=torch.from_numpy(a),
                    tokens=torch.from_numpy(item["tokens"].astype(np.int64)),
                    has_audio=torch.tensor(bool(item["has_audio"])), has_text=torch.tensor(bool(item["has_text"])))


@functools.lru_cache(maxsize=2)
def pair_permutation(seed, epoch, n):  # --shuffle-pairs' partners: once per epoch, a stream of its own (spawn_key)
    return np.random.default_rng(np.random.SeedSequence([seed, epoch], spawn_key=(1,))).permutation(n)


class ResumableSampler(Sampler):
    """Yields (index, epoch) pairs: this rank's share of every global batch of an epoch, resumable mid-epoch.

    Epoch e's order is a permutation fixed by (seed, e), its last n % B samples dropped; global batch k is perm[k*B :
    (k+1)*B] and rank r takes [r*b, (r+1)*b) of it (b = B / world): the ranks' embeddings gathered in rank order are
    the batch one process would see. set_epoch(e, k) starts at global batch k. n=5, B=2: (3, 0), (0, 0), (4, 0), (1, 0).
    """

    def __init__(self, n, global_batch, rank=0, world_size=1, seed=0):
        self.n = n
        self.global_batch = global_batch
        self.rank = rank
        self.seed = seed
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = n // global_batch
        self.set_epoch(0)

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):  # this rank's samples left in the epoch
        return (self.steps_per_epoch - self.start_step) * self.local_batch

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        for k in range(self.start_step, self.steps_per_epoch):
            lo = k * self.global_batch + self.rank * self.local_batch
            for i in perm[lo:lo + self.local_batch]:
                yield int(i), self.epoch


def train_indices(cache):
    """Cache indices pre-training uses: Kinetics' split "train", or every video of a folder cache (your own videos)."""
    dataset = cache.manifest.get("dataset")
    if dataset in ("ucf101", "hmdb51"):
        fail(f"pre-training needs a Kinetics or your own videos' cache; {cache.path} is a {dataset} cache (probe.py's)")
    idx = [i for i, v in enumerate(cache.videos) if dataset == "folder" or v.get("split") == "train"]
    if not idx:
        fail(f"{cache.path} ({dataset}) has no videos with split == 'train' to pre-train on")
    return idx


def ignore_signals(worker_id):  # DataLoader workers leave Ctrl-C and SIGTERM (sent to the process group) to main
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, sampler, workers, device, seed):
    # worker seeds from `generator`, not the global RNG (the model's stream stays the same on resume; samples use none)
    return DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0, worker_init_fn=ignore_signals,
                      prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(seed))


def to_device(batch, device, trim_pad_id=None, cnn=None):
    """A collated batch on `device` (non-blocking), video f16 -> f32; uint8 frames through the frozen `cnn` first.
    trim_pad_id (CPU; CUDA keeps fixed shapes): drop token columns that pad every title (masked: same embeddings)."""
    if trim_pad_id is not None:
        used = (batch["tokens"] != trim_pad_id).any(dim=0).nonzero()  # batch["tokens"]: (b, L) int64
        length = int(used.max()) + 1 if len(used) else 1
        batch = dict(batch, tokens=batch["tokens"][:, :math.ceil(length / 8) * 8])  # (b, L'), L' <= L
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}  # PretrainClips' five tensors
    video = moved["video"]                                            # (b, 16, G, G, F) or frames (b, 16, S, S, 3)
    if video.dtype == torch.uint8:  # Section 3: the frozen ResNet-18's frame-wise patch features of this crop
        video = prepare.frame_features(cnn, video)                   # (b, 16, G, G, F)
    present = {"a": moved["has_audio"], "v": torch.ones_like(moved["has_audio"]), "t": moved["has_text"]}
    return video.float(), moved["audio"], moved["tokens"], present   # audio: (b, n_mels, 256)


# ---- the step: Eq. 5's loss, Adam, the cosine schedule (benchmark.py times the same functions) ----

def loss_fn(model, video, audio, tokens, present, autocast, losses, **options):
    """LAVA loss of one batch: encoders under `autocast` (bf16 on CUDA), the NCE terms in float32 (losses.lava_loss)."""
    with autocast:
        emb = model(video, audio, tokens, spaces=losses)  # {space: {modality: (b, embed_dim)}}
    return lava_loss(emb, present, losses=losses, **options)


def make_optimizer(model, args, device):
    """AdamW (= the paper's Adam at --weight-decay 0), fused on CUDA; decay only >= 2-d weights like nanoGPT."""
    groups = [dict(params=[p for p in model.parameters() if p.dim() >= 2], weight_decay=args.weight_decay),
              dict(params=[p for p in model.parameters() if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


def make_schedule(warmup_steps, total_steps, lr, min_lr):
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then a cosine to min_lr."""
    def lr_lambda(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        floor = min_lr / lr if lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr_lambda


# ---- machinery: checkpoints written atomically, the log and its plot ----

def atomic_save(path, write):
    """write(file), fsync, os.replace: a kill leaves the old file whole, an exception (a second Ctrl-C) no temp file."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, mmap=False):
    """A checkpoint of main's (probe.py reads them with it) on the CPU; a bad file: a one-line OSError or ValueError.
    mmap: tensors stay on disk until read (probe.py checks a whole --checkpoints series' configs this way)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} not found" + (" (a directory)" if Path(path).is_dir() else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated zip, a text file, a pickle of classes weights_only refuses
        raise ValueError(f"{path} is not a readable checkpoint: truncated or corrupt ({type(e).__name__})") from None
    config = ckpt.get("config") if isinstance(ckpt, dict) else None  # probe.py builds its model from config["model"]
    if not isinstance(config, dict) or not {"model", "step"} <= ckpt.keys() or not {"model", "args"} <= config.keys():
        raise ValueError(f"{path} is not a pretrain.py checkpoint (needs 'model', 'step', config 'model' and 'args')")
    return ckpt


def flat(config):
    """A config's nested dict in one level: {"text": {"pad_id": 266}, "embed_dim": 512} -> {"text.pad_id": 266, ...}."""
    out = {}
    for k, v in config.items():
        out.update({f"{k}.{j}": w for j, w in v.items()} if isinstance(v, dict) else {k: v})
    return out


def plot_losses(log_path, png_path):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing to close
    recs = [json.loads(line) for line in Path(log_path).read_text().splitlines()]  # main writes a line first
    ax = Figure(figsize=(7, 4), layout="tight").subplots()
    x = [r["epoch_progress"] for r in recs]
    for k in [k for k in ("loss", "av", "vt", "avt") if k in recs[0]]:
        ax.plot(x, [r[k] for r in recs], label="total" if k == "loss" else k, lw=2 if k == "loss" else 1)
    ax.set(xlabel="epoch", ylabel="NCE loss", title=f"pre-training loss ({Path(log_path).parent.name})")
    ax.legend()
    ax.grid(alpha=0.3)
    atomic_save(png_path, lambda f: ax.figure.savefig(f, format="png", dpi=100))


# ---- main: config, DDP setup, data, model, optimizer, compile, loop ----

def main(argv=None):
    # -------------------------------------------------------------------------------- config, DDP setup, device
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    spaces = tuple(args.losses.split(","))
    # torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python pretrain.py` is rank 0 of 1
    rank, world, local_rank = (int(os.getenv(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    ddp = world > 1
    master = rank == 0
    try:  # a misspelt device, or a GPU torch cannot see: one line
        device = prepare.torch_device(args.device)
    except ValueError as e:
        fail(e)
    args.device = str(device)
    if device.type == "cuda":
        # torchrun: one GPU per rank; otherwise the given one (set_device needs an index, torch 2.11)
        device = torch.device("cuda", local_rank if ddp else device.index or 0)
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls outside autocast
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} (global) must divide by the {world} ranks")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    cores = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # this rank's share
    args.workers = max(1, min(8, cores // 2)) if args.workers is None else args.workers
    if device.type == "cpu":
        # the workers need their cores too: oversubscribed OpenMP threads spin against other processes (README)
        args.threads = args.threads or max(1, cores - args.workers)
        torch.set_num_threads(args.threads)

    # -------------------------------------------------------------------------------- run folder: continue or refuse
    explicit = args.resume not in (None, "auto")
    if args.out is None:  # named by the settings, not the time: the same command (every rank) continues the run
        cache = Path(os.path.abspath(args.cache))  # not resolve(): a lava_cache symlink keeps its folder's name
        name = f"{cache.parent.name if cache.name == 'lava_cache' else cache.name}_{args.model}"
        args.out = str(Path(args.resume).parent) if explicit else f"runs/lava_{name}_{args.losses.replace(',', '+')}"
    out = Path(args.out)
    last, log_path = out / "ckpt_last.pt", out / "log.jsonl"
    # --resume PATH, or the run in --out: the same command continues it, with other settings only when asked
    ckpt_path = Path(args.resume) if explicit else last
    try:
        ckpt = load_checkpoint(ckpt_path) if explicit or (last.exists() and not args.restart) else None
    except (OSError, ValueError) as e:
        fail(f"--resume: {e}" if args.resume else f"{out} holds a run: {e}; start over with --restart")
    if explicit and last.exists() and ckpt_path.resolve().parent != out.resolve() and not args.restart:
        fail(f"{out} holds another run than {ckpt_path}'s: --restart replaces it, or use another --out")
    theirs = ckpt["config"]["args"] if ckpt is not None and args.resume is None else {}  # {}: nothing to compare
    # a flag newer than the run (its checkpoint lacks it) ran as that flag's default, which keeps the old behaviour
    theirs = {**vars(parse_args([])), **theirs} if theirs else {}
    if theirs and Path(theirs["cache"]).resolve() == Path(args.cache).resolve():
        theirs["cache"] = args.cache  # the same cache reached by another path (relative, a symlink)
    diff = [f"--{k.replace('_', '-')} {theirs.get(k)} (now {v})" for k, v in sorted(vars(args).items())
            if theirs and k not in RUN_ONLY and theirs.get(k) != v]
    if diff:
        fail(f"{out} holds a run with other settings: {', '.join(diff)}; --resume auto continues it with these, "
             "--restart starts over (replacing it), or use another --out")

    # -------------------------------------------------------------------------------- data
    try:
        cache = prepare.FeatureCache(args.cache)
    except (OSError, ValueError) as e:  # missing (names prepare.py --root ...), unfinished or of another format
        fail(e)
    indices = train_indices(cache)
    sampler = ResumableSampler(len(indices), args.batch_size, rank, world, args.seed)
    steps_per_epoch = sampler.steps_per_epoch
    if steps_per_epoch == 0:
        fail(f"{len(indices)} training videos are fewer than one batch of {args.batch_size}")
    loader = make_loader(PretrainClips(args.cache, indices, seed=args.seed, audio_noise=args.audio_noise,
                                       shuffle_pairs=args.shuffle_pairs), sampler, args.workers, device, args.seed)
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps or total_steps)
    epoch_of = lambda step: math.ceil(step / steps_per_epoch)  # the epoch optimizer step `step` is in, from 1
    position = lambda step: f"epoch {epoch_of(step)}, step {step}"  # as in the log

    # -------------------------------------------------------------------------------- model, optimizer, backbone
    config = build_config(args, cache.manifest, cache.tokenizer)
    if cache.tokenizer is None and spaces != ("av",):
        fail(f"--losses {args.losses} needs titles, but {args.cache} has no tokenizer: use --losses av")
    torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    raw_model = LAVA(config).to(device)  # checkpoints save raw_model: no DDP "module." or compile "_orig_mod."
    optimizer = make_optimizer(raw_model, args, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, make_schedule(args.warmup_steps, total_steps, args.lr, args.min_lr))
    cnn = None  # a --store frames cache: the frozen ResNet-18 runs in the step, on each batch's random crops
    if cache.manifest["shapes"].get("store") == "frames":
        prep = cache.manifest["config"]
        try:
            cnn = prepare.build_backbone(prep["backbone"], args.backbone_weights or prep["backbone_weights"], device)
        except ValueError as e:  # the ImageNet weights prepare.py used have moved: --backbone-weights
            fail(e)
        cnn = torch.compile(cnn, mode=args.compile_mode) if args.compile else cnn
    step, last_saved = 0, None  # optimizer steps done (the epoch and its batches done: divmod(step, steps_per_epoch))
    if ckpt is not None:
        s = ckpt["sampler"]
        if ckpt["config"]["model"] != config.to_dict():
            was, now = flat(ckpt["config"]["model"]), flat(config.to_dict())
            changed = [f"{k} {was.get(k)} (now {now.get(k)})" for k in sorted(was | now) if was.get(k) != now.get(k)]
            fail(f"{ckpt_path} holds another model than these flags and cache make: {', '.join(changed[:4])}"
                 f"{', ...' if len(changed) > 4 else ''}; pass its --model and size flags, or its --data/--cache")
        if (s["seed"], s["global_batch"], s["n"]) != (args.seed, args.batch_size, len(indices)):
            fail(f"{ckpt_path} needs --seed {s['seed']}, --batch-size {s['global_batch']} and {s['n']} cache videos")
        for key, obj in (("model", raw_model), ("optimizer", optimizer), ("scheduler", scheduler)):
            obj.load_state_dict(ckpt[key])  # strict for the model (the default): every weight and no other
        torch.set_rng_state(ckpt["rng"]["torch"])  # after the inits' draws (the backbone's too); none follow
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        step = last_saved = ckpt["step"]
        if master:
            print(f"continuing {out} from {position(step)} of {last_step}")

    # -------------------------------------------------------------------------------- DDP wrap, compile
    # No loss scaling: every rank's loss is the global batch's and the gather's backward sums the ranks' gradients
    # (losses._AllGather). A Table 2 ablation leaves parameters without gradients: DDP must be told to expect that.
    model = DDP(raw_model, device_ids=[local_rank] if device.type == "cuda" else None,
                find_unused_parameters=spaces != ("av", "vt", "avt")) if ddp else raw_model
    model = torch.compile(model, mode=args.compile_mode) if args.compile else model  # after DDP: DDPOptimizer buckets
    trim_pad_id = config.text.pad_id if device.type == "cpu" else None  # see to_device
    loss_options = dict(losses=spaces, temperature=args.temperature, form=args.loss_form,
                        normalize_centroid=args.normalize_centroid, detach_centroid=args.detach_centroid)

    # -------------------------------------------------------------------------------- run folder files
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if args.restart and last.exists():
            print(f"--restart: replacing the run in {out}")
            for old in [last, log_path, *out.glob("epoch_*.pt"), out / "loss.png", *out.glob("probe_*.json"),
                        *out.glob("probe_*.md"), *out.glob("probe_*.png")]:  # probe.py's results of the old run
                old.unlink(missing_ok=True)
        n_params = sum(p.numel() for p in raw_model.parameters())
        (out / "config.json").write_text(json.dumps(dict(
            model=config.to_dict(), args=vars(args), world_size=world, n_params=n_params, train_videos=len(indices),
            steps_per_epoch=steps_per_epoch, total_steps=total_steps, cache_manifest=cache.manifest), indent=2))
        if cache.tokenizer is not None:  # what probe.py --embed and --search encode titles and queries with
            (out / "tokenizer.bpe").write_bytes((Path(args.cache) / cache.manifest["tokenizer"]).read_bytes())
        # a continued run forgets the log lines the stopped run wrote after its checkpoint
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        log_path.write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= step))
        print(f"{n_params / 1e6:.1f}M parameters | {len(indices)} train videos | {steps_per_epoch} steps/epoch of "
              f"{args.batch_size} clips ({world} rank(s) x {sampler.local_batch}) | {device} | {args.losses} | {out}")
        print("video: " + (f"random crops + h-flips, frozen ResNet-18 ({cache.manifest['backbone']}) in the step"
                           if cnn is not None else "cached features, no crop or flip (approximates the paper)"))
    if ddp:
        dist.barrier()

    # -------------------------------------------------------------------------------- training loop
    bar = tqdm(total=last_step * args.batch_size, initial=step * args.batch_size, unit="clip", unit_scale=True,
               dynamic_ncols=True, mininterval=1.0, disable=not master or args.no_progress)
    window, t_window = [], time.perf_counter()  # per-step [total, *terms] losses since the last log line (no sync)
    # Ctrl-C / SIGTERM: the step in progress ends and is saved (continuing is exact); torchrun's ranks may see the
    # signal at different steps and would hang in the gather, so they stop at once, as after a second Ctrl-C
    signals = []

    def on_signal(signum, frame):
        signals.append(signum)
        if ddp or len(signals) > 1:
            raise KeyboardInterrupt
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while step < last_step and not signals:
            sampler.set_epoch(*divmod(step, steps_per_epoch))     # this epoch's order, from the batch it stopped at
            for batch in loader:
                loss, terms = loss_fn(model, *to_device(batch, device, trim_pad_id, cnn), autocast, **loss_options)
                loss.backward()
                lr = optimizer.param_groups[0]["lr"]  # the lr this step used (the log's; the scheduler moves on)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(args.batch_size)
                window.append(torch.stack([loss.detach()] + [terms[k].detach() for k in spaces]))
                epochs_done, step_in_epoch = divmod(step, steps_per_epoch)
                stop = step >= last_step or bool(signals)  # read once: a later signal ends the next step, saved too
                save_now = (args.save_every and step % args.save_every == 0) or step_in_epoch == 0 or stop

                if step % args.log_every == 0 or save_now:
                    # Log the mean since the last line once every step's loss is finite: all ranks compute the same
                    # loss, the global batch's (losses.gather), so all stop at the same step, before a checkpoint.
                    vals = torch.stack(window).cpu()                      # (n_steps, 1 + len(spaces))
                    bad = (~torch.isfinite(vals[:, 0])).nonzero().flatten().tolist()
                    if bad:
                        raise SystemExit(
                            f"non-finite loss {vals[bad[0], 0].item()} at {position(step - len(vals) + 1 + bad[0])}: "
                            "stopping. " + (f"The last good checkpoint {last} (step {last_saved}) is untouched."
                                            if last_saved is not None else "No checkpoint was written before it."))
                    mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # bytes at the peak
                    mean = vals.mean(0).tolist()
                    rec = dict(step=step, epoch=epoch_of(step), epoch_progress=step / steps_per_epoch,
                               loss=mean[0], **dict(zip(spaces, mean[1:])), lr=lr, mem_gb=mem / 1e9, time=time.time(),
                               clips_per_s=len(vals) * args.batch_size / (time.perf_counter() - t_window))
                    window, t_window = [], time.perf_counter()
                    if master:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        # epoch 3 step 120 | loss 2.3104 (av 1.1000 vt 0.9000 avt 0.3104) | lr 1.0e-05 | 812 clips/s
                        shown = " ".join(f"{k} {rec[k]:.4f}" for k in spaces)
                        bar.write(f"epoch {rec['epoch']} step {step} | loss {mean[0]:.4f} ({shown}) | lr {lr:.1e} | "
                                  f"{rec['clips_per_s']:.0f} clips/s")
                        sys.stdout.flush()

                if save_now and master:  # ckpt_last.pt; epoch_XXX.pt (XXX: epochs done) at epoch ends if --keep-epochs
                    state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                                 scheduler=scheduler.state_dict(), epoch=epochs_done, cache_manifest=cache.manifest,
                                 # the only random numbers a step draws are dropout's (the data's come from seeded
                                 # generators of their own); every rank draws the same ones, so rank 0's are all ranks'
                                 rng=dict(torch=torch.get_rng_state(),
                                          cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
                                 sampler=dict(epoch=epochs_done, step_in_epoch=step_in_epoch, seed=args.seed,
                                              steps_per_epoch=steps_per_epoch, global_batch=args.batch_size,
                                              n=len(indices)),
                                 config=dict(model=config.to_dict(), args=vars(args)))
                    # the epoch file first: a kill between the two leaves the previous ckpt_last.pt, so the continued
                    # run redoes these steps and writes the epoch file again (the other order would skip it for good)
                    if step_in_epoch == 0 and args.keep_epochs:
                        atomic_save(out / f"epoch_{epochs_done:03d}.pt", lambda f: torch.save(state, f))
                    atomic_save(last, lambda f: torch.save(state, f))
                    if step_in_epoch == 0 or step >= last_step:
                        plot_losses(log_path, out / "loss.png")
                if save_now:
                    last_saved = step
                    t_window = time.perf_counter()  # clips/s counts training, not checkpoint writes and plots
                if stop:
                    break
    except KeyboardInterrupt:  # torchrun's ranks, or a second Ctrl-C: the same command continues from the last save
        signals = signals or [signal.SIGINT]
    finally:
        bar.close()
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if ddp:
            dist.destroy_process_group()
    if signals:
        if master:
            where = f"continues from {last} ({position(last_saved)})" if last_saved is not None else "starts over"
            print(f"pretrain: interrupted at {position(step)}; the same command {where}", file=sys.stderr)
        raise SystemExit(128 + signals[0])  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
    if master:
        print(f"done: step {step}, checkpoint {last}")


if __name__ == "__main__":
    main(ARGS)

"""pretrain.py: augmentation, sampler, the paper's defaults and lr schedule, overfitting, the CLI run folder, exact
resume after SIGKILL, torchrun (weights and Adam moments of 2 ranks = 1 process), NaN stop.

CLI runs are subprocesses on a conftest cache (24 videos, 20 of them "train", 20 frames, 2x2 grid) with the tiny
preset and one intra-op thread (2 shared cores: more threads only spin against other processes).
"""
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
import torch

from conftest import ROOT, write_feature_cache
import pretrain
from model import LAVA, LAVAConfig
from prepare import FeatureCache

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# every run, in-process or not, on one intra-op thread: equal thread counts keep float sums in the same order
LINE = re.compile(r"^epoch \d+ step \d+ \| loss -?\d+\.\d{4} \((av|vt|avt) .*\) \| lr \d\.\de[-+]\d\d \| \d+ clips/s$")


@pytest.fixture
def one_thread():
    """In-process runs on one thread too (pretrain.main sets the count; this puts pytest's back)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(*args, check=True, timeout=120):
    """Run pretrain.py in a subprocess; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *map(str, args), "--threads", "1"], env=ENV,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def read_log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def last_logged_step(run_dir):
    """The step of a running run's last whole log line (0 before any): a line being written is skipped."""
    path = Path(run_dir) / "log.jsonl"
    lines = [l for l in path.read_text().splitlines() if l.endswith("}")] if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def load_model(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = LAVA(LAVAConfig.from_dict(ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"], strict=True)
    return ckpt, model


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"

# ----------------------------------------------------------------------------------------------------------
# data


def test_feature_cache_window_no_flip_and_aligned_audio(tmp_path):
    """Video frame t holds value t (+0.25 * column), mel column j holds j: the crop must satisfy audio = 10 * s.
    The patches are stored last frame first and window.npy says so: clips must be read through the window.
    A --store features cache is never flipped (a mirrored patch grid is not the features of mirrored pixels)."""
    cache_dir = write_feature_cache(tmp_path / "cache", n_videos=12, frames=20, missing_audio=(4,))
    for shard in sorted(cache_dir.glob("shard_*")):
        patches = np.load(shard / "patches.npy", mmap_mode="r+")         # (n * 20, 2, 2, 512), video after video
        window = np.load(shard / "window.npy")                           # (n, 1, 20)
        t = np.arange(20)[:, None, None, None] + 0.25 * np.arange(2)[None, None, :, None]  # frame + column / 4
        patches.reshape(-1, 20, 2, 2, 512)[:] = np.broadcast_to(t[::-1], (20, 2, 2, 512))
        np.save(shard / "window.npy", np.broadcast_to(np.arange(19, -1, -1, dtype=np.int32), window.shape))
        audio = np.load(shard / "audio.npy", mmap_mode="r+")             # (n, 1, 80, 296)
        audio[:] = np.where(np.abs(audio) > 0, np.arange(296, dtype=np.float16), 0)  # missing audio stays 0
        patches.flush(), audio.flush()
    frames = np.load(cache_dir / "shard_00000" / "frames.npy", mmap_mode="r+")
    frames[1, 0] = 16                                                   # video 1: only 16 real frames -> s = 0
    frames.flush()
    cache = FeatureCache(cache_dir)
    indices = list(range(len(cache)))
    ds = pretrain.PretrainClips(cache_dir, indices, seed=3, audio_noise=0.0)
    starts = set()
    for epoch in range(6):
        for i in indices:
            item = ds[(i, epoch)]
            v, a = item["video"].float(), item["audio"]
            assert v.shape == (16, 2, 2, 512) and a.shape == (80, 256) and item["tokens"].dtype == torch.int64
            s = int(v[0, 0, 0, 0])
            assert torch.equal(v[:, 0, 0, 0], torch.arange(s, s + 16).float() + v[0, 0, 0, 0] - s)  # 16 consecutive
            assert torch.equal(v[:, :, 1, 0] - v[:, :, 0, 0], torch.full((16, 2), 0.25))  # never mirrored
            assert 0 <= s <= 4 and (i != 1 or s == 0)
            if item["has_audio"]:
                assert torch.equal(a[0], torch.arange(10 * s, 10 * s + 256).float())  # aligned with the window
            else:
                assert i == 4 and not a.any()
            starts.add(s)
    assert starts == {0, 1, 2, 3, 4}
    # randomness is a function of (seed, epoch, index): same in a fresh (pickled) copy, different next epoch
    import pickle
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[(5, 2)]["video"], ds[(5, 2)]["video"])
    assert any(not torch.equal(ds[(i, 0)]["video"], ds[(i, 1)]["video"]) for i in indices)
    # Gaussian noise on the log-mel, the requested std in the model's standardised units, on present audio only
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["audio_stats"]["std"] = 2.0
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    noisy = pretrain.PretrainClips(cache_dir, indices, seed=3, audio_noise=0.5)
    d = noisy[(2, 0)]["audio"] - ds[(2, 0)]["audio"]
    assert abs(float(d.std()) - 1.0) < 0.04 and abs(float(d.mean())) < 0.04
    assert not noisy[(4, 0)]["audio"].any()


def test_sampler_ranks_tile_the_global_batch_and_resume_mid_epoch():
    one = pretrain.ResumableSampler(23, 6, seed=1)
    two = [pretrain.ResumableSampler(23, 6, rank=r, world_size=2, seed=1) for r in range(2)]
    for epoch in range(3):
        for s in [one] + two:
            s.set_epoch(epoch)
        full = list(one)
        assert len(full) == 18 and len({i for i, _ in full}) == 18 and {e for _, e in full} == {epoch}
        parts = [list(s) for s in two]
        # rank r's k-th local batch of 3 is the r-th half of the k-th global batch of 6
        rebuilt = [x for k in range(3) for p in parts for x in p[3 * k:3 * k + 3]]
        assert rebuilt == full
        one.set_epoch(epoch, start_step=2)
        assert list(one) == full[12:] and len(one) == 6
    one.set_epoch(0)
    first = [i for i, _ in one]
    one.set_epoch(1)
    assert first != [i for i, _ in one]

def cosine(lr, warmup, total, step):
    """The schedule written out: lr * (k+1)/warmup for optimizer step k < warmup, then a cosine from lr to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))


def test_paper_defaults_and_the_learning_rate_schedule():
    """No flags = Section 3's run: batch 32, Adam at lr 1e-5, a cosine schedule, 25 epochs, tau 0.07, all losses."""
    args = pretrain.parse_args([])
    assert (args.model, args.batch_size, args.lr, args.epochs, args.temperature) == ("paper", 32, 1e-5, 25, 0.07)
    assert (args.losses, args.warmup_steps, args.min_lr, args.weight_decay) == ("av,vt,avt", 0, 0.0, 0.0)
    # the optimizer is Adam: 3 steps of make_optimizer's leave the weights and moments of torch.optim.Adam(lr=1e-5)
    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    ref.load_state_dict(ours.state_dict())
    opts = pretrain.make_optimizer(ours, args, torch.device("cpu")), torch.optim.Adam(ref.parameters(), lr=1e-5)
    for x in torch.randn(3, 2, 4):
        for model, opt in zip((ours, ref), opts):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert all(torch.equal(opts[0].state[p][k], opts[1].state[q][k]) for k in ("exp_avg", "exp_avg_sq"))
    # the schedule's shape: the paper's cosine from 1e-5 to 0 with no warm-up (the paper gives none), and the
    # small preset's 20 warm-up steps; values at a few optimizer steps of a 1000-step run
    for warmup in (0, 20):
        f = pretrain.make_schedule(warmup, 1000, args.lr, args.min_lr)
        for step in (0, 1, 10, 19, 20, 21, 250, 510, 999, 1000):
            assert args.lr * f(step) == pytest.approx(cosine(args.lr, warmup, 1000, step), rel=1e-12, abs=1e-20), step
    f = pretrain.make_schedule(0, 1000, args.lr, args.min_lr)
    assert (f(0), f(500), f(1000)) == (1.0, pytest.approx(0.5), 0.0)             # peak, half way, final
    assert pretrain.make_schedule(20, 1000, 1.0, 0.0)(0) == 1 / 20                 # warm-up starts at lr / 20
    assert pretrain.make_schedule(0, 1000, 1.0, 0.1)(1000) == pytest.approx(0.1)   # --min-lr is the floor


# ----------------------------------------------------------------------------------------------------------
# training


def test_tiny_model_overfits_one_batch(feature_cache, one_thread):
    torch.manual_seed(0)
    args = pretrain.parse_args(["--cache", str(feature_cache), "--model", "tiny"])
    cache = FeatureCache(feature_cache)
    model = LAVA(pretrain.build_config(args, cache.manifest, cache.tokenizer))
    ds = pretrain.PretrainClips(feature_cache, pretrain.train_indices(cache))
    batch = torch.utils.data.default_collate([ds[(i, 0)] for i in range(8)])  # has a missing audio and title
    video, audio, tokens, present = pretrain.to_device(batch, torch.device("cpu"))
    assert not present["a"].all() and not present["t"].all()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, terms = pretrain.loss_fn(model, video, audio, tokens, present, pretrain.nullcontext(),
                                       ("av", "vt", "avt"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(terms) == {"av", "vt", "avt"}
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_cli_run_folder_and_loss_decreases(feature_cache, tmp_path):
    out = tmp_path / "run"
    # no token centring: the conftest cache's class signal is a per-clip offset, which centring would remove
    proc = run("--cache", feature_cache, "--model", "tiny", "--out", out, "--batch-size", 4, "--epochs", 6,
               "--lr", 3e-3, "--log-every", 1, "--workers", 1, "--keep-epochs", "--no-progress", "--no-center-tokens")
    for name in ("config.json", "log.jsonl", "ckpt_last.pt", "loss.png", "tokenizer.bpe", "epoch_001.pt",
                 "epoch_006.pt"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    lines = [l for l in proc.stdout.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 30 and all(LINE.match(l) for l in lines), lines[:2]
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    for key in ("epoch", "loss", "av", "vt", "avt", "lr", "clips_per_s", "mem_gb"):
        assert all(np.isfinite(r[key]) for r in log), key
    # the lr column: the lr each step used, on the cosine from 3e-3 to 0 over the 30 steps (0-based step = step - 1)
    want_lr = [cosine(3e-3, 0, 30, r["step"] - 1) for r in log]
    assert [r["lr"] for r in log] == pytest.approx(want_lr, rel=1e-9, abs=1e-15)
    assert log[0]["lr"] == 3e-3
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])  # epochs 1, 6
    assert last < 0.85 * first, (first, last)
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["model"] == "tiny" and config["args"]["width"] == 32 and config["steps_per_epoch"] == 5
    ckpt, model = load_model(out / "ckpt_last.pt")                        # weights_only=True, strict=True
    assert ckpt["step"] == 30 and ckpt["epoch"] == 6 and ckpt["sampler"]["step_in_epoch"] == 0
    assert ckpt["cache_manifest"]["dataset"] == "k700" and ckpt["config"]["args"]["losses"] == "av,vt,avt"
    assert ckpt["config"]["model"]["video"]["center_tokens"] is False
    first_epoch, _ = load_model(out / "epoch_001.pt")
    assert first_epoch["step"] == 5 and first_epoch["epoch"] == 1


def assert_same_run(ref, run_dir):
    """ckpt_last.pt's weights and Adam moments, and every logged loss, bitwise those of the run in `ref`."""
    want = torch.load(ref / "ckpt_last.pt", weights_only=True)
    got = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    assert_same_state(want["model"], got["model"])
    assert want["optimizer"]["state"].keys() == got["optimizer"]["state"].keys()
    for k in want["optimizer"]["state"]:
        assert_same_state(want["optimizer"]["state"][k], got["optimizer"]["state"][k])
    # the continued log has every step once, and its losses match the uninterrupted run's bitwise
    assert [r["step"] for r in read_log(run_dir)] == list(range(1, 21))
    assert [r["loss"] for r in read_log(run_dir)] == [r["loss"] for r in read_log(ref)]


def test_sigkill_or_ctrl_c_then_the_same_command_continues_bitwise(feature_cache, tmp_path, one_thread):
    # 10 steps per epoch; dropout makes the RNG state part of what a resume must restore
    common = ["--cache", feature_cache, "--model", "tiny", "--batch-size", 2, "--epochs", 2, "--dropout", 0.1,
              "--warmup-steps", 4, "--log-every", 1, "--save-every", 3, "--no-progress", "--threads", 1]
    ref = tmp_path / "ref"
    pretrain.main([str(a) for a in common] + ["--out", str(ref), "--workers", "0"])  # in-process: one import less

    # SIGKILL: once the run is in its second epoch and its last checkpoint is mid-epoch, kill it (SIGSTOP first,
    # so the checkpoint cannot change between looking at it and the kill); 2 workers, unlike the reference
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *map(str, common), "--out", killed,
                             "--workers", "2"], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_step = None
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
            if not (killed / "ckpt_last.pt").exists() or last_logged_step(killed) < 11:
                continue
            proc.send_signal(signal.SIGSTOP)
            ckpt = torch.load(killed / "ckpt_last.pt", map_location="cpu", weights_only=True)
            if ckpt["sampler"]["step_in_epoch"] != 0:
                proc.kill()
                ckpt_step = ckpt["step"]
                break
            proc.send_signal(signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()
    assert ckpt_step is not None and 11 <= ckpt_step < 20, "the run was not caught mid-epoch"
    assert proc.returncode == -signal.SIGKILL

    # the same command again (--workers does not change the weights) continues it; the message's epoch is the log's
    proc = run(*common, "--out", killed, "--workers", 1)
    assert f"continuing {killed} from epoch 2, step {ckpt_step} of 20\n" in proc.stdout
    assert_same_run(ref, killed)
    # 4 warm-up steps, then the cosine to 0 at step 20 (tiny preset lr 1e-3)
    ref_log = read_log(ref)
    assert [r["lr"] for r in ref_log] == pytest.approx([cosine(1e-3, 4, 20, r["step"] - 1) for r in ref_log], abs=1e-15)

    # Ctrl-C (SIGINT to the process group, the DataLoader workers too, as a terminal sends it) or a scheduler's
    # SIGTERM to the group (scancel) once a step is logged: the step in progress ends and is saved, one line, exit 130
    # or 143, no worker killed under the main process; the same command then continues to the same weights
    for signum, workers in ((signal.SIGINT, 2), (signal.SIGTERM, 1)):
        stopped = tmp_path / f"stopped_{signum}"
        command = [sys.executable, str(ROOT / "pretrain.py"), *map(str, common), "--out", stopped, "--workers", workers]
        proc = subprocess.Popen(list(map(str, command)), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.time() + 90
            while time.time() < deadline and last_logged_step(stopped) == 0:
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGSTOP)  # the signal is then handled within a step, not after the run ended
            assert 0 < last_logged_step(stopped) < 20
            os.killpg(proc.pid, signum)
            os.kill(proc.pid, signal.SIGCONT)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 128 + signum and "Traceback" not in err, err
        stop = re.fullmatch(r"pretrain: interrupted at epoch (\d), step (\d+); the same command continues from (\S+) "
                            r"\(epoch \1, step \2\)\n", err)
        assert stop and Path(stop[3]) == stopped / "ckpt_last.pt", err
        assert torch.load(stopped / "ckpt_last.pt", weights_only=True)["step"] == int(stop[2])
        assert not [p.name for p in stopped.iterdir() if p.name.startswith(".")]  # no temp file left
        proc = run(*common, "--out", stopped, "--workers", workers)
        assert f"continuing {stopped} from epoch {stop[1]}, step {stop[2]} of 20\n" in proc.stdout
        assert_same_run(ref, stopped)


def test_torchrun_two_gloo_ranks_match_one_process(feature_cache, tmp_path, one_thread):
    common = ["--cache", feature_cache, "--model", "tiny", "--batch-size", 8, "--lr", 1e-2, "--max-steps", 3,
              "--log-every", 1, "--workers", 0, "--no-progress", "--seed", 1, "--threads", 1]
    one = tmp_path / "one"
    pretrain.main([str(a) for a in common] + ["--out", str(one)])
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(ROOT / "pretrain.py"), *map(str, common), "--out", two],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "2 rank(s) x 4" in proc.stdout
    a, b = read_log(one), read_log(two)
    assert [r["step"] for r in b] == [1, 2, 3]
    # Same global batch of 8: step 1's losses match (negatives gathered from the other rank), and so do steps 2
    # and 3, after updates from the gathered gradients.
    for ra, rb in zip(a, b):
        for k in ("loss", "av", "vt", "avt"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (ra["step"], k)
    # The weights after 3 steps match too, and so do Adam's moments: Adam's update is nearly blind to a gradient
    # scaled by the rank count, its first and second moments (sums of g and g^2) are not.
    want, got = torch.load(one / "ckpt_last.pt", weights_only=True), torch.load(two / "ckpt_last.pt", weights_only=True)
    width = want["config"]["model"]["video"]["width"]
    for k in want["model"]:
        w, g = want["model"][k].clone(), got["model"][k].clone()
        if k.endswith("attn.qkv.bias"):
            # the key bias adds the same q . b_k to every score of a query, which softmax ignores: its true gradient
            # is 0, and Adam turns float noise there into moves of +-lr either way, so it is left out
            w[width:2 * width] = g[width:2 * width] = 0
        # atol: 1% of one Adam step at lr 1e-2; the summation order (gloo's all_reduce vs one batch) moves a weight
        # whose gradient is small by a few 1e-5 (seen: one element of audio_in, its moment 4.6e-4 off, relative)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=k)
    for i, state in want["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):                  # whole-tensor error: float noise where a moment is ~0
            err = (got["optimizer"]["state"][i][k] - state[k]).norm() / state[k].norm()
            assert err < 1e-4, (i, k, err)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, one_thread):
    cache_dir = write_feature_cache(tmp_path / "cache")
    cache = FeatureCache(cache_dir)
    train = pretrain.train_indices(cache)
    sampler = pretrain.ResumableSampler(len(train), 4, seed=0)
    poisoned = train[[i for i, _ in sampler][2 * 4]]        # first sample of step 3 in epoch 0
    shard, row = divmod(poisoned, 10)                       # conftest writes shards of 10 videos
    patches = np.load(cache_dir / f"shard_{shard:05d}" / "patches.npy", mmap_mode="r+")
    first = np.load(cache_dir / f"shard_{shard:05d}" / "first_patch.npy")
    patches[first[row] + 5] = np.inf                         # its frame 5 (window.npy is 0..19 here)
    patches.flush()
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        pretrain.main(["--cache", str(cache_dir), "--model", "tiny", "--out", str(out), "--batch-size", "4",
                       "--epochs", "2", "--log-every", "5", "--save-every", "1", "--workers", "0", "--no-progress",
                       "--threads", "1"])
    msg = str(stop.value.code)
    assert re.search(r"non-finite loss (nan|inf|-inf) at epoch 1, step 3: ", msg), msg
    assert "(step 2) is untouched" in msg, msg
    ckpt, model = load_model(out / "ckpt_last.pt")
    assert ckpt["step"] == 2 and all(torch.isfinite(p).all() for p in model.state_dict().values())
    assert all(r["step"] <= 2 for r in read_log(out))


def test_table2_ablation_trains_only_the_requested_terms(feature_cache, tmp_path, one_thread):
    out = tmp_path / "av"
    pretrain.main(["--cache", str(feature_cache), "--model", "tiny", "--out", str(out), "--losses", "vt,av",
                   "--batch-size", "4", "--max-steps", "2", "--log-every", "1", "--workers", "0", "--no-progress",
                   "--threads", "1", "--seed", "2"])
    log = read_log(out)
    assert [set(r) & {"av", "vt", "avt"} for r in log] == [{"av", "vt"}] * 2
    ckpt, trained = load_model(out / "ckpt_last.pt")
    assert ckpt["config"]["args"]["losses"] == "av,vt"
    torch.manual_seed(2)
    init = LAVA(LAVAConfig.from_dict(ckpt["config"]["model"]))            # the run's initial weights (same seed)
    moved = {k for k, v in trained.state_dict().items() if not torch.equal(v, init.state_dict()[k])}
    assert "heads.avt.weight" not in moved and "heads.av.weight" in moved and "heads.vt.weight" in moved
    assert any(k.startswith("text_encoder.") for k in moved)


def test_kill_while_writing_an_epoch_file_resumes_and_writes_it(feature_cache, tmp_path, one_thread, monkeypatch):
    """A run that dies while saving epoch_001.pt leaves a ckpt_last.pt from before that epoch's end, so the resumed
    run redoes those steps and writes epoch_001.pt (saving ckpt_last.pt first would skip it for good)."""
    out, save = tmp_path / "run", pretrain.atomic_save
    common = ["--cache", str(feature_cache), "--model", "tiny", "--out", str(out), "--batch-size", "4", "--epochs",
              "2", "--keep-epochs", "--save-every", "2", "--workers", "0", "--no-progress", "--threads", "1"]

    def dies_in_epoch_file(path, write):
        if Path(path).name == "epoch_001.pt":
            raise KeyboardInterrupt  # stands in for the kill (or a second Ctrl-C): nothing after it runs
        save(path, write)

    monkeypatch.setattr(pretrain, "atomic_save", dies_in_epoch_file)
    with pytest.raises(SystemExit) as stop:
        pretrain.main(common)
    assert stop.value.code == 130
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["step"] < 5  # 20 train videos / 4 = 5 steps an epoch
    monkeypatch.setattr(pretrain, "atomic_save", save)
    pretrain.main(common + ["--resume", "auto"])
    assert [torch.load(out / f"epoch_{e:03d}.pt", weights_only=True)["step"] for e in (1, 2)] == [5, 10]


def test_sigterm_inside_the_plot_redraw_saves_then_the_same_command_continues(feature_cache, tmp_path, one_thread,
                                                                             monkeypatch, capsys):
    """SIGTERM while loss.png is drawn (at epoch 1's end): the run stops after that step with exit 143 and one line;
    the same command continues from its checkpoint and ends where an uninterrupted run would."""
    out, plot = tmp_path / "run", pretrain.plot_losses
    common = ["--cache", str(feature_cache), "--model", "tiny", "--out", str(out), "--batch-size", "4", "--epochs",
              "2", "--workers", "0", "--no-progress", "--threads", "1"]

    def plot_then_sigterm(log_path, png_path):
        os.kill(os.getpid(), signal.SIGTERM)
        plot(log_path, png_path)  # goes on: the handler only notes the signal

    monkeypatch.setattr(pretrain, "plot_losses", plot_then_sigterm)
    with pytest.raises(SystemExit) as stop:
        pretrain.main(common)
    assert stop.value.code == 143
    assert capsys.readouterr().err == (f"pretrain: interrupted at epoch 1, step 5; the same command continues from "
                                       f"{out / 'ckpt_last.pt'} (epoch 1, step 5)\n")
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["step"] == 5 and (out / "loss.png").is_file()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back for whatever runs next in this process
    monkeypatch.setattr(pretrain, "plot_losses", plot)
    pretrain.main(common)
    assert f"continuing {out} from epoch 1, step 5 of 10\n" in capsys.readouterr().out
    assert [r["step"] for r in read_log(out)] == [5, 10]  # a line at each save (--log-every 20)


def test_a_run_in_out_continues_or_refuses_and_restart_replaces_it(feature_cache, tmp_path, one_thread, capsys):
    out = tmp_path / "run"
    common = ["--cache", str(feature_cache), "--model", "tiny", "--out", str(out), "--workers", "0", "--no-progress",
              "--threads", "1", "--log-every", "1"]
    # one epoch of one step (20 train videos, batch 16): its log line has the lr it trained at, not the cosine's end
    pretrain.main(common + ["--epochs", "1", "--keep-epochs"])
    assert [(r["step"], r["lr"]) for r in read_log(out)] == [(1, 1e-3)]
    assert "lr 1.0e-03" in capsys.readouterr().out
    pretrain.main(common + ["--epochs", "1"])   # the same settings: continued (finished: nothing to do)
    assert f"continuing {out} from epoch 1, step 1 of 1\n" in capsys.readouterr().out
    # a run of an older kit, before --shuffle-pairs and --detach-centroid: it ran as their defaults do
    ckpt = torch.load(out / "ckpt_last.pt", weights_only=True)
    for newer in ("shuffle_pairs", "detach_centroid"):
        del ckpt["config"]["args"][newer]
    torch.save(ckpt, out / "ckpt_last.pt")
    pretrain.main(common + ["--epochs", "1"])
    assert f"continuing {out} from epoch 1, step 1 of 1\n" in capsys.readouterr().out

    def refused(*flags):
        with pytest.raises(SystemExit) as stop:
            pretrain.main(common + list(flags))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("pretrain: "), err
        return err

    assert "--shuffle-pairs False (now True)" in refused("--epochs", "1", "--shuffle-pairs")
    (tmp_path / "link").symlink_to(feature_cache)  # the same cache by another path: the same run
    pretrain.main(common + ["--epochs", "1", "--cache", str(tmp_path / "link")])
    assert f"continuing {out} from epoch 1, step 1 of 1\n" in capsys.readouterr().out
    err = refused("--epochs", "3", "--lr", "2e-3")   # other settings: refused, nothing touched
    assert "--epochs 1 (now 3), --lr 0.001 (now 0.002)" in err and "--resume auto" in err and "--restart" in err
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["step"] == 1
    probed = ["probe_ucf101.json", "probe_ucf101.md", "probe_hmdb51_random.json", "probe_ucf101_series.png"]
    for name in probed + ["notes.md"]:  # probe.py's results of the old run, and a file of the user's
        (out / name).write_text("{}")
    pretrain.main(common + ["--epochs", "3", "--restart", "--max-steps", "2"])  # starts over: the old run's files go
    assert f"--restart: replacing the run in {out}\n" in capsys.readouterr().out
    assert not (out / "epoch_001.pt").exists() and [r["step"] for r in read_log(out)] == [1, 2]
    assert not [name for name in probed if (out / name).exists()] and (out / "notes.md").is_file()
    pretrain.main(common + ["--epochs", "3"])  # the full run after a --max-steps trial: the same run, continued
    assert f"continuing {out} from epoch 2, step 2 of 3\n" in capsys.readouterr().out
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["step"] == 3

    # --resume PATH continues in its own folder; into an --out that holds another run only with --restart
    other = tmp_path / "other" / "ckpt_last.pt"
    other.parent.mkdir()
    shutil.copy(out / "ckpt_last.pt", other)
    pretrain.main(common + ["--epochs", "4", "--resume", str(out / "ckpt_last.pt")])
    assert f"continuing {out} from epoch 3, step 3 of 4\n" in capsys.readouterr().out
    err = refused("--epochs", "5", "--resume", str(other))
    assert f"{out} holds another run than {other}'s: --restart replaces it" in err
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]                    # untouched
    pretrain.main(common + ["--epochs", "5", "--resume", str(other), "--restart"])
    assert f"continuing {out} from epoch 3, step 3 of 5\n" in capsys.readouterr().out
    assert [r["step"] for r in read_log(out)] == [4, 5]                           # other's run, from its step 3

    # a checkpoint trained on another cache (other audio statistics) or with other sizes: the differences named
    other_cache = shutil.copytree(feature_cache, tmp_path / "other_cache")
    manifest = json.loads((other_cache / "manifest.json").read_text())
    manifest["audio_stats"].update(mean=-5.5, std=4.0)
    (other_cache / "manifest.json").write_text(json.dumps(manifest))
    err = refused("--epochs", "5", "--cache", str(other_cache), "--resume", str(out / "ckpt_last.pt"))
    assert "audio.mel_mean 0.0 (now -5.5), audio.mel_std 1.0 (now 4.0); pass its --model and size flags, or its " \
           "--data/--cache" in err, err
    err = refused("--epochs", "5", "--width", "64", "--heads", "4", "--resume", str(out / "ckpt_last.pt"))
    assert "audio.heads 2 (now 4), audio.width 32 (now 64), text.heads 2 (now 4), text.width 32 (now 64), ...;" in err

    # --resume on a missing file, a truncated checkpoint, a text file named .pt; a run folder with a corrupt one
    (tmp_path / "half.pt").write_bytes((out / "ckpt_last.pt").read_bytes()[:5000])
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert refused("--resume", str(tmp_path / "missing.pt")).endswith("missing.pt not found\n")
    for bad in ("half.pt", "notes.pt"):
        assert "is not a readable checkpoint" in refused("--resume", str(tmp_path / bad))
    torch.save(dict(model={}, config=dict(model={}), step=1), tmp_path / "no_args.pt")  # probe.py reads args too
    assert refused("--resume", str(tmp_path / "no_args.pt")).endswith(
        "is not a pretrain.py checkpoint (needs 'model', 'step', config 'model' and 'args')\n")
    (out / "ckpt_last.pt").write_bytes((tmp_path / "half.pt").read_bytes())
    assert "--restart" in refused("--epochs", "3")


def test_without_out_the_same_command_continues_in_a_folder_named_by_the_settings(tmp_path, one_thread, capsys,
                                                                                  monkeypatch):
    """The default --out is runs/lava_<cache name>_<model>_<losses>, not a time: a stopped run (here a --max-steps
    trial) is continued by the same command; --data naming the cache folder itself is the same cache."""
    write_feature_cache(tmp_path / "scratch" / "abc123")  # k700/lava_cache a symlink to the cache on other storage:
    (tmp_path / "k700").mkdir()                           # the run is still named after k700
    (tmp_path / "k700" / "lava_cache").symlink_to(tmp_path / "scratch" / "abc123")
    monkeypatch.chdir(tmp_path)
    command = ["--data", "k700", "--model", "tiny", "--losses", "avt,av", "--workers", "0", "--no-progress",
               "--threads", "1"]
    pretrain.main(command + ["--max-steps", "1"])
    pretrain.main(command)
    out = Path("runs/lava_k700_tiny_av+avt")
    assert f"continuing {out} from epoch 1, step 1 of 2\n" in capsys.readouterr().out
    assert os.listdir("runs") == [out.name] and [r["step"] for r in read_log(out)] == [1, 2]
    pretrain.main(["--data", "k700/lava_cache"] + command[2:])
    assert f"continuing {out} from epoch 2, step 2 of 2\n" in capsys.readouterr().out
    (tmp_path / "unfinished" / "shard_00000").mkdir(parents=True)  # --data naming a cache prepare has not finished
    (tmp_path / "unfinished" / "prepare_config.json").write_text("{}")
    with pytest.raises(SystemExit):
        pretrain.main(["--data", "unfinished"] + command[2:])
    assert "unfinished/manifest.json not found: the run did not finish" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),       # an error, not "no limit"
    (["--log-every", "0"], "--log-every must be >= 1, got 0"),
    (["--workers", "-1"], "--workers must be >= 0, got -1"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--model", "tiny", "--heads", "5"], "--width 32 must be divisible by --heads 5"),
    (["--audio-frames-per-token", "3"], "--audio-frames-per-token 3 must divide the 256 audio frames"),
    (["--device", "cuda"], "pretrain: --device cuda: torch sees 0 CUDA GPU(s) here; use --device cpu or auto"),
    (["--device", "gpu"], "device type at start of device string: gpu; use --device cpu or auto"),
])
def test_bad_flags_end_in_one_line(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on a machine without CUDA
    with pytest.raises(SystemExit) as stop:
        pretrain.main(flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err.splitlines()[-1] and "Traceback" not in err, err


def test_cache_kinds_folder_trains_on_all_probe_caches_and_missing_ones_refused(tmp_path, one_thread, capsys):
    folder = write_feature_cache(tmp_path / "myvids" / "lava_cache", dataset="folder")  # split None: your own videos
    pretrain.main(["--data", str(tmp_path / "myvids"), "--model", "tiny", "--out", str(tmp_path / "run"),
                   "--max-steps", "1", "--workers", "0", "--no-progress", "--threads", "1"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_videos"] == 24
    assert pretrain.train_indices(FeatureCache(folder)) == list(range(24))
    ucf = write_feature_cache(tmp_path / "ucf101" / "lava_cache", dataset="ucf101")
    for data, want in ((ucf.parent, f"pre-training needs a Kinetics or your own videos' cache; {ucf} is a ucf101 "
                                    "cache (probe.py's)\n"),
                       (tmp_path / "nothing", "python prepare.py --root")):
        with pytest.raises(SystemExit) as stop:
            pretrain.main(["--data", str(data), "--model", "tiny", "--out", str(tmp_path / "no"), "--workers", "0"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and want in err, err


def test_help_shows_defaults_and_presets_before_torch_loads():
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "pretrain.py"), "--help"], env=ENV,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "| torch" not in proc.stderr and "numpy" not in proc.stderr
    help_text = " ".join(proc.stdout.split())                            # argparse wraps at the terminal width
    for shown in ("(default: 0.07)", "(default: 2000)", "(paper 32, small 64, tiny 16)", "(paper 1e-05, small 0.001, "
                  "tiny 0.001)", "(default: k700)", "preset of the values listed below"):
        assert shown in help_text, shown
    assert "--rdzv_backend c10d \\\n        --rdzv_endpoint" in proc.stdout  # the docstring's line break kept

"""probe.py on your own videos (--embed, --search) on a folder cache prepared from the real media in tests/data,
and the one-line refusals: a results file of another scope, a corrupt or truncated checkpoint."""
import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pretrain
import probe
from bpe import BPETokenizer
from model import LAVA
from prepare import FeatureCache
from conftest import write_feature_cache
from test_probe import FAST, make_checkpoint, make_ucf_root

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TITLE = "a campfire burning at night"


@pytest.fixture(scope="module")
def myvids(tmp_path_factory):
    """myvids/: fire2.mp4 (titled in titles.csv) and tests_data_test.avi (no title), prepared with the random CNN;
    runs/x/ckpt_last.pt: a tiny LAVA (pretrain.PRESETS['tiny'] sized by build_config for this cache) saved as
    pretrain.py saves it, with the cache's tokenizer.bpe beside it as pretrain.py copies it."""
    tmp = tmp_path_factory.mktemp("embed")
    vids = tmp / "myvids"
    vids.mkdir()
    for name in ("fire2.mp4", "tests_data_test.avi"):
        shutil.copy(DATA / name, vids)
    (vids / "titles.csv").write_text(f"path,title\nfire2.mp4,{TITLE}\n")
    subprocess.run([sys.executable, "prepare.py", "--root", str(vids), "--backbone", "random", "--size", "64",
                    "--workers", "0"], cwd=ROOT, check=True, capture_output=True)
    cache = FeatureCache(vids / "lava_cache")
    config = pretrain.build_config(argparse.Namespace(**pretrain.PRESETS["tiny"]), cache.manifest, cache.tokenizer)
    torch.manual_seed(0)
    model = LAVA(config).eval()
    run = tmp / "runs" / "x"
    run.mkdir(parents=True)
    ckpt = {"model": model.state_dict(), "step": 2, "epoch": 1, "cache_manifest": cache.manifest,
            "config": {"model": config.to_dict(), "args": {"losses": "av,vt,avt", "model": "tiny"}}}
    pretrain.atomic_save(run / "ckpt_last.pt", lambda f: torch.save(ckpt, f))
    shutil.copy(vids / "lava_cache" / "tokenizer.bpe", run / "tokenizer.bpe")
    return vids, run / "ckpt_last.pt", model, cache


@torch.no_grad()
def direct(model, cache, i):
    """Video i's clip windows through encode_video / encode_audio (central 16 frames, aligned mel), eval mode."""
    item, s = cache[i], (cache.manifest["shapes"]["frames"] - 16) // 2
    z_v = model.encode_video(torch.tensor(item["patches"][item["window"][:, s:s + 16]].astype(np.float32)))
    z_a = model.encode_audio(torch.tensor(item["audio"][:, :, 10 * s:10 * s + 256].astype(np.float32)))
    return z_v, z_a                                                                          # (C, W) each


@torch.no_grad()
def per_video(model, z, space):
    g = F.normalize(model.heads[space](z), dim=-1).mean(0)
    return (g / g.norm()).numpy()


def test_embed_writes_every_space_and_matches_direct_calls(myvids, tmp_path, capsys):
    vids, ckpt, model, cache = myvids
    out = tmp_path / "e.npz"
    assert probe.main(["--embed", "--root", str(vids), "--checkpoint", str(ckpt), "--out", str(out),
                       "--device", "cpu"]) == 0
    assert f"wrote {out}: 2 videos" in capsys.readouterr().out
    with np.load(out) as f:
        e = {k: f[k] for k in f.files}
    C, W, E = cache.manifest["shapes"]["clips"], model.config.video.width, model.config.embed_dim
    assert e["ids"].tolist() == [v["id"] for v in cache.videos] and len(e["ids"]) == 2
    assert e["z_v"].shape == e["z_a"].shape == (2, C, W) and e["z_v_video"].shape == e["z_t"].shape == (2, W)
    assert {k for k in e if k.startswith("g_")} == {"g_av_a", "g_av_v", "g_vt_v", "g_vt_t", "g_avt_a", "g_avt_v",
                                                    "g_avt_t"}
    assert all(e[k].shape == (2, E) for k in e if k.startswith("g_"))
    assert str(e["checkpoint_sha256"]) == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    fire = [v["path"].endswith("fire2.mp4") for v in cache.videos]
    assert e["has_text"].tolist() == fire and e["titles"][fire.index(True)] == TITLE
    assert e["has_audio"].tolist() == [cache[i]["has_audio"] for i in range(2)]
    tok = BPETokenizer.load(ckpt.parent / "tokenizer.bpe")
    for i in range(2):
        z_v, z_a = direct(model, cache, i)
        np.testing.assert_allclose(e["z_v"][i], z_v.numpy(), atol=1e-5)
        np.testing.assert_allclose(e["z_v_video"][i], z_v.mean(0).numpy(), atol=1e-5)
        for space in ("av", "vt", "avt"):
            np.testing.assert_allclose(e[f"g_{space}_v"][i], per_video(model, z_v, space), atol=1e-5)
        if e["has_audio"][i]:
            np.testing.assert_allclose(e["z_a"][i], z_a.numpy(), atol=1e-5)
            np.testing.assert_allclose(e["g_av_a"][i], per_video(model, z_a, "av"), atol=1e-5)
        else:
            assert not e["z_a"][i].any() and not e["g_av_a"][i].any()
        if e["has_text"][i]:  # the run's tokenizer on the title, cut to the encoder's max_len, then g_vt
            tokens = tok.encode_title(TITLE, max_len=128)[0][:model.config.text.max_len]
            with torch.no_grad():
                z_t = model.encode_text(torch.tensor(tokens.astype(np.int64))[None])[0]
                g_t = F.normalize(model.heads["vt"](z_t), dim=-1).numpy()
            np.testing.assert_allclose(e["z_t"][i], z_t.numpy(), atol=1e-5)
            np.testing.assert_allclose(e["g_vt_t"][i], g_t, atol=1e-5)
        else:
            assert not e["z_t"][i].any() and not e["g_vt_t"][i].any()


def test_search_prints_the_cosines_sorted(myvids, capsys):
    vids, ckpt, model, cache = myvids
    capsys.readouterr()
    assert probe.main(["--search", "fire at night", "--root", str(vids), "--checkpoint", str(ckpt), "--device",
                       "cpu"]) == 0
    rows = [re.match(r"\s*(\d+)\s+(-?[\d.]+)\s+(\S+)", line) for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 2 and [int(r[1]) for r in rows] == [1, 2]
    scores = [float(r[2]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    tok = BPETokenizer.load(ckpt.parent / "tokenizer.bpe")
    tokens = tok.encode_title("fire at night", max_len=128)[0][:model.config.text.max_len]
    with torch.no_grad():
        q = F.normalize(model.heads["vt"](model.encode_text(torch.tensor(tokens.astype(np.int64))[None])[0]), dim=-1)
    for r, score in zip(rows, scores):
        i = [v["path"] for v in cache.videos].index(r[3])
        assert score == pytest.approx(float(per_video(model, direct(model, cache, i)[0], "vt") @ q.numpy()), abs=1e-4)
    # the run's tokenizer is required and must fit the text encoder: one line each
    (ckpt.parent / "tokenizer.bpe").rename(ckpt.parent / "tok.bak")
    try:
        assert probe.main(["--search", "fire", "--root", str(vids), "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
        err = capsys.readouterr().err  # after the embeddings' line, one line that says what to do
        assert err.splitlines()[-1] == (f"probe.py: error: {ckpt.parent / 'tokenizer.bpe'} not found: copy the "
                                        "pre-training run's tokenizer.bpe beside the checkpoint")
        assert "Traceback" not in err
    finally:
        (ckpt.parent / "tok.bak").rename(ckpt.parent / "tokenizer.bpe")


@pytest.mark.parametrize("losses, titled", [("av", False), ("av,avt", True)])
def test_search_needs_a_run_pre_trained_with_vt(myvids, tmp_path, capsys, losses, titled):
    """A run without vt (no titles: no tokenizer.bpe; or titles but no vt loss) has an untrained g_vt head: refused
    before any embedding is computed. Its random init (--checkpoint random --config-from) stays a baseline."""
    vids, ckpt, model, cache = myvids
    state = torch.load(ckpt, weights_only=True)
    state["config"]["args"]["losses"] = losses
    other = tmp_path / "runs" / "y" / "ckpt_last.pt"
    other.parent.mkdir(parents=True)
    torch.save(state, other)
    if titled:
        shutil.copy(ckpt.parent / "tokenizer.bpe", other.parent)
    search = ["--search", "fire", "--root", str(vids), "--device", "cpu"]
    assert probe.main(search + ["--checkpoint", str(other)]) == 2
    assert capsys.readouterr().err == ("probe.py: error: --search ranks in the g_vt space: this run was pre-trained "
                                       f"with --losses {losses}, without it; use a run with vt\n")
    if titled:
        assert probe.main(search + ["--checkpoint", "random", "--config-from", str(other)]) == 0
        with pytest.warns(UserWarning, match=r"--embed: the run was pre-trained without vt: its g_vt_\* arrays come"):
            assert probe.main(["--embed", "--root", str(vids), "--checkpoint", str(other), "--device", "cpu"]) == 0


def test_embed_names_the_latest_run_it_takes_and_a_root_may_be_the_cache(myvids, tmp_path, capsys, monkeypatch):
    vids, ckpt, model, cache = myvids
    monkeypatch.chdir(ckpt.parents[2])  # runs/x/ckpt_last.pt, the only run
    embed = ["--embed", "--device", "cpu", "--out", str(tmp_path / "e.npz")]
    assert probe.main(embed + ["--root", str(vids)]) == 0
    assert "checkpoint: runs/x/ckpt_last.pt (the latest runs/*/ckpt_last.pt)\n" in capsys.readouterr().err
    assert probe.main(embed + ["--root", str(vids), "--checkpoint", str(ckpt)]) == 0
    assert "the latest runs" not in capsys.readouterr().err
    # --root given the cache folder itself: that cache, not <root>/lava_cache
    assert probe.main(embed + ["--root", str(vids / "lava_cache"), "--checkpoint", str(ckpt)]) == 0
    assert f"wrote {tmp_path / 'e.npz'}: 2 videos" in capsys.readouterr().out


def test_a_frames_cache_finds_moved_imagenet_weights_with_backbone_weights(tmp_path, capsys):
    """A --store frames cache runs its frames through prepare's ImageNet ResNet-18 at embedding time: a weights file
    moved since prepare.py is one line naming --backbone-weights, and found with it."""
    import torchvision

    cache = write_feature_cache(tmp_path / "cache", n_videos=4, dataset="folder", clips=1, frames=16, grid=1,
                                store="frames")
    weights = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["backbone"] = manifest["config"]["backbone"] = "imagenet"  # as prepare.py --backbone imagenet writes it
    manifest["config"]["backbone_weights"] = str(weights)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    moved = weights.rename(tmp_path / "moved.pth")
    ckpt = make_checkpoint(tmp_path / "runs/x/ckpt_last.pt", cache, grid=1)
    embed = ["--embed", "--cache", str(cache), "--checkpoint", str(ckpt), "--device", "cpu", "--out",
             str(tmp_path / "e.npz")]
    with pytest.warns(UserWarning, match="pre-trained on 'random' backbone features"):
        assert probe.main(embed) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"probe.py: error: ImageNet ResNet-18 weights not found at {weights}: "
                                               "pass --backbone-weights PATH"), err
        assert "Traceback" not in err and not (tmp_path / "e.npz").exists()
        assert probe.main(embed + ["--backbone-weights", str(moved)]) == 0
    assert f"wrote {tmp_path / 'e.npz'}: 4 videos" in capsys.readouterr().out


def test_a_results_file_of_another_scope_is_not_replaced(tmp_path, capsys):
    root = make_ucf_root(tmp_path / "ucf101")
    ckpt = make_checkpoint(tmp_path / "runs/x/ckpt_last.pt", root / "lava_cache")
    out = tmp_path / "p.json"
    base = ["--dataset", "ucf101", "--root", str(root), "--checkpoint", str(ckpt), "--modalities", "video", "--out",
            str(out)] + FAST
    assert probe.main(base + ["--split", "1"]) == 0
    first = out.read_text()
    capsys.readouterr()
    assert probe.main(base + ["--split", "2"]) == 2                       # another split: refused, file kept
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "--overwrite" in err and out.read_text() == first
    assert probe.main(base + ["--split", "1"]) == 0                       # the same scope: replaced
    assert probe.main(base + ["--split", "2", "--overwrite"]) == 0
    assert json.loads(out.read_text())["split_ids"] == [2]


def test_a_corrupt_or_truncated_checkpoint_is_one_line(tmp_path, capsys):
    root = make_ucf_root(tmp_path / "ucf101")
    ckpt = make_checkpoint(tmp_path / "runs/x/ckpt_last.pt", root / "lava_cache")
    truncated, text = tmp_path / "truncated.pt", tmp_path / "notes.pt"
    truncated.write_bytes(ckpt.read_bytes()[:len(ckpt.read_bytes()) // 2])
    text.write_text("not a checkpoint\n")
    base = ["--dataset", "ucf101", "--root", str(root), "--split", "1"] + FAST
    for flags, path in ((["--checkpoint"], truncated), (["--checkpoint"], text),
                        (["--checkpoint", "random", "--config-from"], truncated)):
        capsys.readouterr()
        assert probe.main(base + flags + [str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flags[-1]}: {path} is not a readable checkpoint" in err, err

"""probe.py: official split parsing on the real lists, the LinearProbe estimator (clip averaging, sklearn
conformance, Adam update, separable data), leakage-free hyper-parameter choice, the CLI end to end on a small cache,
bad input, progress, Ctrl-C / SIGTERM and interrupted or refused writes."""
import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.utils import check_random_state
from sklearn.utils.estimator_checks import parametrize_with_checks
from tqdm import tqdm

from conftest import write_feature_cache
import probe
from probe import LinearProbe, ProbeError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: intra-op threads only contend on the shared 2-core test machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# official splits (the real lists, copied from ../shared/data into tests/data)

@pytest.mark.parametrize("split, n_train, n_test", [(1, 9537, 3783), (2, 9586, 3734), (3, 9624, 3696)])
def test_ucf101_official_split_counts(split, n_train, n_test):
    s = probe.read_ucf101_split(DATA / "ucf101", split)
    assert len(s["classes"]) == 101 and s["classes"][0] == "ApplyEyeMakeup" and s["classes"][100] == "YoYo"
    assert (len(s["train"]), len(s["test"])) == (n_train, n_test)
    assert len({v for v, _ in s["train"]} | {v for v, _ in s["test"]}) == 13320  # every video in each split
    # the folder/file spelling quirk: ids verbatim, label from the folder (classInd: 37 HandstandPushups)
    hs = [(v, label) for v, label in s["train"] + s["test"] if "v_HandStandPushups_" in v]
    assert hs and all(v.startswith("HandstandPushups/") and label == 36 for v, label in hs)
    # UCF holds out whole gXX groups: no group is on both sides
    groups = lambda part: {probe.ucf_group(v) for v, _ in s[part]}
    assert not groups("train") & groups("test")


@pytest.mark.parametrize("split", [1, 2, 3])
def test_hmdb51_official_split_counts(split):
    s = probe.read_hmdb51_split(DATA / "hmdb51", split)
    assert len(s["classes"]) == 51 and s["classes"][0] == "brush_hair"
    assert (len(s["train"]), len(s["test"]), len(s["unused"])) == (3570, 1530, 1666)
    for part, per_class in (("train", 70), ("test", 30)):
        assert np.all(np.bincount([label for _, label in s[part]], minlength=51) == per_class)
    if split == 1:  # the first line of brush_hair_test_split1.txt, code 1
        assert s["train"][0] == ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", 0)


def test_missing_split_files_are_clear_errors(tmp_path):
    with pytest.raises(ProbeError, match="ucfTrainTestlist"):
        probe.read_ucf101_split(tmp_path, 1)
    with pytest.raises(ProbeError, match="testTrainMulti_7030_splits"):
        probe.read_hmdb51_split(tmp_path, 2)
    folder = tmp_path / "ucfTrainTestlist"
    folder.mkdir()
    shutil.copy(DATA / "ucf101/ucfTrainTestlist/classInd.txt", folder)
    shutil.copy(DATA / "ucf101/ucfTrainTestlist/trainlist01.txt", folder)
    with pytest.raises(ProbeError, match="testlist01.txt"):
        probe.read_ucf101_split(tmp_path, 1)


def test_a_video_listed_twice_is_a_clear_error():
    """Twice in one list or in both train and test: refused before the cache is looked at (cache=None here)."""
    for train, test in (([("a/x.avi", 0)], [("a/x.avi", 0)]), ([("a/x.avi", 0), ("a/x.avi", 0)], [("a/y.avi", 0)])):
        with pytest.raises(ProbeError, match="split 2: the official lists name a/x.avi twice"):
            probe.resolve_split(dict(classes=["a"], train=train, test=test, unused=[]), None, False, 2)


# ----------------------------------------------------------------------------------------------------------------
# the estimator

def hand_probe(coef, intercept=None):
    """A fitted LinearProbe whose layer is set by hand (identity standardisation)."""
    k, d = coef.shape
    p = LinearProbe(epochs=1).fit(np.eye(k, d), np.arange(k))
    p.mean_, p.scale_ = np.zeros(d), np.ones(d)
    p.coef_, p.intercept_ = np.asarray(coef, float), np.zeros(k) if intercept is None else np.asarray(intercept, float)
    return p


def test_multi_clip_averaging_matches_hand_computation():
    p = hand_probe(np.eye(3))
    # video "v1": clips vote 0, 1, 1 (majority 1) but the averaged logits [5, 2, 0] / 3 pick class 0
    # video "v0": one clip, class 2; the rows of the videos are interleaved, "v1" appears first
    X = np.array([[5, 0, 0], [0, 0, 4], [0, 1, 0], [0, 1, 0]], float)
    groups = np.array(["v1", "v0", "v1", "v1"])
    assert list(p.predict(X)) == [0, 2, 1, 1]                            # per clip
    logits = p.decision_function(X, groups)
    np.testing.assert_allclose(logits, [[5 / 3, 2 / 3, 0], [0, 0, 4]])   # first-appearance order: v1, v0
    assert list(p.predict(X, groups)) == [0, 2]
    e = np.exp([5 / 3, 2 / 3, 0])
    np.testing.assert_allclose(p.predict_proba(X, groups)[0], e / e.sum())
    assert p.score(X, [0, 2, 0, 0], groups) == 1.0                      # per video: both right
    assert p.score(X, [0, 2, 0, 0]) == 0.5                              # per clip: 2 of 4
    with pytest.raises(ValueError, match="different labels"):
        p.score(X, [0, 2, 1, 0], groups)
    # with standardisation and a bias: the same average, computed row by row in plain numpy
    rng = np.random.default_rng(0)
    Xr, yr = rng.normal(size=(12, 5)), np.arange(12) % 3
    g = np.array([3, 3, 1, 2, 1, 2, 0, 0, 3, 1, 2, 0])
    q = LinearProbe(epochs=3).fit(Xr, yr, groups=np.arange(12))
    rows = [((x - q.mean_) / q.scale_) @ q.coef_.T + q.intercept_ for x in Xr]
    want = [np.mean([rows[i] for i in range(12) if g[i] == v], axis=0) for v in (3, 1, 2, 0)]
    np.testing.assert_allclose(q.decision_function(Xr, g), want, rtol=1e-10)
    assert list(probe.first_appearance(g)[0]) == [3, 1, 2, 0]


def test_binary_decision_function_is_the_margin():
    p = hand_probe(np.array([[1.0, 0.0], [0.0, 1.0]]))
    X = np.array([[2.0, 1.0], [0.0, 3.0]])
    np.testing.assert_allclose(p.decision_function(X), [-1.0, 3.0])
    np.testing.assert_allclose(p.decision_function(X, [7, 7]), [1.0])


def test_clone_keeps_params_and_drops_fit():
    p = LinearProbe(epochs=7, weight_decay=0.1, standardize=False, random_state=3)
    p.fit(np.random.default_rng(0).normal(size=(20, 4)), np.arange(20) % 2)
    c = clone(p)
    assert c.get_params() == p.get_params() and not hasattr(c, "coef_")
    assert c.set_params(epochs=2).epochs == 2 and p.epochs == 7


def test_same_seed_same_probe_and_zero_init_needs_no_other_randomness():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(50, 6)), rng.integers(0, 3, 50)
    a, b = LinearProbe(epochs=4, random_state=5).fit(X, y), LinearProbe(epochs=4, random_state=5).fit(X, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    c = LinearProbe(epochs=4, random_state=6).fit(X, y)
    assert not np.array_equal(a.coef_, c.coef_)  # the seed is the batch order
    state = torch.get_rng_state()
    LinearProbe(epochs=1).fit(X, y)
    assert torch.equal(torch.get_rng_state(), state)  # torch's global generator is left alone


@parametrize_with_checks([LinearProbe(epochs=5)])
def test_sklearn_estimator_checks(estimator, check):
    # every applicable check passes without expected failures: `groups` is optional, and without it the estimator
    # is a plain per-row classifier (the checks never pass groups)
    check(estimator)


def reference_fit(X, y, epochs, lr, batch_size, weight_decay, seed):
    """The probe as a reader would write it: zero-initialised W, b on standardised X, torch.optim.Adam (L2 on W, not
    b), F.cross_entropy, a new batch order each epoch from a generator seeded like LinearProbe's random_state."""
    k = len(np.unique(y))
    Z = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32)
    W = torch.zeros(k, X.shape[1], requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([{"params": [W], "weight_decay": weight_decay}, {"params": [b], "weight_decay": 0.0}], lr=lr)
    gen = torch.Generator().manual_seed(int(check_random_state(seed).randint(2**31 - 1)))
    yt = torch.tensor(y)
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=gen)
        for start in range(0, len(X), batch_size):
            idx = order[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(Z[idx] @ W.T + b, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return W.detach().numpy(), b.detach().numpy()


def test_probe_training_matches_a_reference_adam_loop():
    """Adam steps with L2 on the weights only, batch order from the seed (a non-default lr and batch)."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(70, 5)), rng.integers(0, 4, 70)
    p = LinearProbe(epochs=3, lr=1e-2, batch_size=16, weight_decay=0.05, random_state=2).fit(X, y)
    W, b = reference_fit(X, y, epochs=3, lr=1e-2, batch_size=16, weight_decay=0.05, seed=2)
    np.testing.assert_allclose(p.coef_, W, atol=2e-5)
    np.testing.assert_allclose(p.intercept_, b, atol=2e-5)


def test_the_papers_probe_defaults():
    """Section 3: "a linear classifier ... using a 1e-4 learning rate and a batch size of 32"; the defaults are
    those values and are the ones trained with (100 rows: batches of 32, 32, 32, 4)."""
    assert LinearProbe().get_params()["lr"] == 1e-4 and LinearProbe().get_params()["batch_size"] == 32
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(100, 6)), rng.integers(0, 3, 100)
    p = LinearProbe(epochs=2).fit(X, y)
    W, b = reference_fit(X, y, epochs=2, lr=1e-4, batch_size=32, weight_decay=0.0, seed=0)
    np.testing.assert_allclose(p.coef_, W, atol=1e-7)
    np.testing.assert_allclose(p.intercept_, b, atol=1e-7)


def separable(n_videos, clips, centers, rng, spread=0.3):
    k, d = centers.shape
    labels = np.arange(n_videos) % k
    X = centers[labels][:, None, :] + spread * rng.normal(size=(n_videos, clips, d))
    return X.reshape(-1, d), np.repeat(labels, clips), np.repeat(np.arange(n_videos), clips)


def test_probe_on_separable_features_reaches_100_percent():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16)) * 3                  # 5 classes, 16-d features, clips spread 0.3 around them
    X, y, g = separable(150, 3, centers, rng)
    Xt, yt, gt = separable(50, 3, centers, rng)
    best, table = probe.select_hyperparameters(X, y, g, epochs_grid=(2, 5), weight_decay_grid=(0.0, 1e-3))
    assert len(table) == 4 and best["epochs"] in (2, 5)
    p = LinearProbe(epochs=best["epochs"], weight_decay=best["weight_decay"]).fit(X, y, g)
    assert p.score(Xt, yt, gt) == 1.0


def test_validation_split_keeps_groups_whole():
    ids = [f"C{c}/v_C{c}_g{gr:02d}_c{k:02d}.avi" for c in range(3) for gr in range(1, 9) for k in range(1, 4)]
    y = np.array([int(v[1]) for v in ids])
    for groups in (np.array([probe.ucf_group(v) for v in ids]), np.array(ids)):
        tr, va = probe.validation_split(y, groups, 0.25, random_state=0)
        assert len(tr) + len(va) == len(ids) and not set(groups[tr]) & set(groups[va])
        assert set(y[va]) == {0, 1, 2}  # stratified: every class is validated
    assert probe.ucf_group("HandstandPushups/v_HandStandPushups_g08_c01.avi") == "HandstandPushups/g08"
    # a cache too small for 5 folds in any class: a one-line ProbeError, not scikit-learn's ValueError
    with pytest.raises(ProbeError, match="needs 5 training clips per class; every class here has fewer .at most 4"):
        probe.validation_split(np.repeat([0, 1, 2], 4), np.arange(12))


def test_hyperparameter_choice_never_sees_test_rows(monkeypatch):
    rng = np.random.default_rng(0)
    N, C, D, k = 40, 2, 8, 4
    labels = np.arange(N) % k
    z_v = (rng.normal(size=(k, D)) * 2)[labels][:, None] + rng.normal(size=(N, C, D))
    emb = dict(z_v=z_v.astype(np.float32), z_a=np.zeros((N, C, 3), np.float32), has_audio=np.ones(N, bool))
    train, test = np.arange(0, 28), np.arange(28, 40)
    resolved = {"train": (train, labels[train]), "test": (test, labels[test])}
    ids = np.array([f"v{i}" for i in range(N)])
    seen = []
    real = probe.select_hyperparameters

    def spy(X, y, groups, *a, **kw):
        seen.append(np.asarray(groups).copy())
        return real(X, y, groups, *a, **kw)

    monkeypatch.setattr(probe, "select_hyperparameters", spy)
    grid = dict(epochs=(1, 3, 8), weight_decay=(0.0, 0.1))
    first = probe.evaluate_probe(emb, resolved, "video", ids, grid)
    assert set(seen[0]) == set(train)                       # the choice got exactly the training videos' rows
    # scramble the test videos' features and labels: the choice and the validation table must not move
    emb2 = dict(emb, z_v=emb["z_v"].copy())
    emb2["z_v"][test] = rng.normal(size=(len(test), C, D)) * 50
    resolved2 = {"train": resolved["train"], "test": (test, (labels[test] + 1) % k)}
    second = probe.evaluate_probe(emb2, resolved2, "video", ids, grid)
    assert first["hyperparameters"] == second["hyperparameters"] and first["validation"] == second["validation"]
    assert first["top1"] != second["top1"]


def test_missing_audio_becomes_the_training_mean():
    rng = np.random.default_rng(0)
    N, C = 10, 2
    emb = dict(z_v=rng.normal(size=(N, C, 3)), z_a=rng.normal(size=(N, C, 4)), has_audio=np.ones(N, bool))
    emb["has_audio"][[1, 7]] = False                      # 1 is a training video, 7 a test video
    emb["z_a"][[1, 7]] = 0.0
    train = np.arange(6)
    feats = probe.modality_features(emb, "audio+video", train)
    fill = emb["z_a"][[0, 2, 3, 4, 5]].mean(axis=(0, 1))  # training videos with audio only
    assert feats.shape == (N, C, 7)
    np.testing.assert_allclose(feats[[1, 7], :, 3:], np.broadcast_to(fill, (2, C, 4)))
    np.testing.assert_allclose(feats[:, :, :3], emb["z_v"])
    with pytest.raises(ValueError, match="unknown modality 'audio'"):  # not silently audio+video
        probe.modality_features(emb, "audio", train)
    # after the probe's standardisation the imputed audio is 0 exactly when it equals the standardisation mean;
    # with every training row at the same constant it must be 0, not -mean/std
    p = LinearProbe(epochs=1).fit(np.c_[rng.normal(size=(8, 1)), np.full((8, 1), 2.5)], np.arange(8) % 2)
    assert p.scale_[1] == 1.0 and p.mean_[1] == 2.5


def test_per_class_top1_is_a_brute_force_count():
    """Each row's per_class: top-1 of each class's test videos, from the same video predictions as top1 (the refit
    probe's, clip logits averaged), named by the split's classes; top1 is their mean weighted by test videos."""
    rng = np.random.default_rng(1)
    N, C, D, k = 48, 2, 6, 3
    labels = np.arange(N) % k
    z_v = (rng.normal(size=(k, D)) * 0.7)[labels][:, None] + rng.normal(size=(N, C, D))  # overlapping: some errors
    emb = dict(z_v=z_v.astype(np.float32), z_a=np.zeros((N, C, 3), np.float32), has_audio=np.ones(N, bool))
    train, test = np.arange(0, 30), np.arange(30, N)
    classes = ["Apple", "Pear", "Plum"]
    resolved = dict(train=(train, labels[train]), test=(test, labels[test]), classes=classes)
    row = probe.evaluate_probe(emb, resolved, "video", None, dict(epochs=(2, 20), weight_decay=(0.0,)))
    hp = row["hyperparameters"]
    refit = LinearProbe(epochs=hp["epochs"], weight_decay=hp["weight_decay"]).fit(
        z_v[train].reshape(-1, D), np.repeat(labels[train], C), np.repeat(train, C))
    pred = refit.predict(z_v[test].reshape(-1, D), np.repeat(test, C))  # one per test video, in test order
    want = {}
    for name, c in zip(classes, range(k)):
        mine = [i for i in range(len(test)) if labels[test[i]] == c]
        want[name] = 100 * sum(pred[i] == c for i in mine) / len(mine)
    assert row["per_class"] == pytest.approx(want) and 0 < min(want.values()) < 100  # not a trivial 0 or 100
    assert row["top1"] == pytest.approx(np.mean([want[n] for n in classes]))  # 6 test videos in every class
    # without class names (a bare resolved dict): the labels as text
    del resolved["classes"]
    assert set(probe.evaluate_probe(emb, resolved, "video", None, dict(epochs=(2,), weight_decay=(0.0,)))["per_class"]
               ) == {"0", "1", "2"}


def test_evaluate_probe_restores_the_thread_count_after_an_exception(monkeypatch):
    seen = []

    def failing_search(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop")

    monkeypatch.setattr(probe, "select_hyperparameters", failing_search)
    emb = dict(z_v=np.zeros((4, 1, 3)), has_audio=np.ones(4, bool))
    resolved = dict(train=(np.arange(2), np.arange(2)), test=(np.arange(2, 4), np.arange(2)))
    torch.set_num_threads(2)  # the autouse fixture restores the count it found
    with pytest.raises(RuntimeError, match="stop"):
        probe.evaluate_probe(emb, resolved, "video", None, dict(epochs=(1,), weight_decay=(0.0,)))
    assert seen == [1] and torch.get_num_threads() == 2


# ----------------------------------------------------------------------------------------------------------------
# CLI end to end on a write_feature_cache cache with hand-made split folders

def make_checkpoint(path, cache_dir, grid=2, seed=1, epoch=3, width=32, center_tokens=True, embed_dim=16):
    """A pretrain.py-style checkpoint of a tiny random LAVA (dropout 0.5, so only eval mode is deterministic)."""
    from bpe import BPETokenizer
    from model import AudioConfig, LAVA, LAVAConfig, TextConfig, VideoConfig

    tok = BPETokenizer.load(Path(cache_dir) / "tokenizer.bpe")
    size = dict(width=width, depth=1, heads=2, dropout=0.5)
    cfg = LAVAConfig(video=VideoConfig(feature_dim=512, frames=16, grid=grid, center_tokens=center_tokens, **size),
                     audio=AudioConfig(frames=256, frames_per_token=16, **size),
                     text=TextConfig(vocab_size=tok.pad_id + 1, max_len=128, pad_id=tok.pad_id, **size),
                     embed_dim=embed_dim)
    torch.manual_seed(seed)
    model = LAVA(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "step": 10, "epoch": epoch,
                "sampler": {"epoch": epoch, "step_in_epoch": 0, "steps_per_epoch": 5},
                "config": {"model": cfg.to_dict(), "args": {"losses": "av,vt,avt", "model": "tiny"}},
                "cache_manifest": {"backbone": "random"}}, path)
    shutil.copy(Path(cache_dir) / "tokenizer.bpe", path.parent / "tokenizer.bpe")  # as pretrain.py does
    return path


def load_model(ckpt):
    from model import LAVA, LAVAConfig

    state = torch.load(ckpt, weights_only=True)
    model = LAVA(LAVAConfig.from_dict(state["config"]["model"]))
    model.load_state_dict(state["model"])
    return model.eval()


@torch.no_grad()
def direct_embeddings(ckpt, cache_dir):
    """z_v (N, C, W), z_a (N, C, W), z_t (N, W) by direct encode_* calls on write_feature_cache's raw arrays, with the
    model in eval mode: clip c of video i is patches[(i * C + c) * T + s : ... + 16] with s = (T - 16) // 2 (the
    central 16 frames), its mel window audio[i, c, :, 10 s : 10 s + 256]; tokens cut to max_len."""
    model = load_model(ckpt)
    manifest = json.loads((Path(cache_dir) / "manifest.json").read_text())
    C, T = manifest["shapes"]["clips"], manifest["shapes"]["frames"]
    s = (T - 16) // 2
    z = {"z_v": [], "z_a": [], "z_t": []}
    for shard in manifest["shards"]:
        load = lambda name: np.load(Path(cache_dir) / shard / f"{name}.npy")
        patches, audio, tokens = load("patches"), load("audio"), load("tokens")
        n = len(tokens)
        frames = patches.reshape(n, C, T, *patches.shape[1:])[:, :, s:s + 16]           # (n, C, 16, G, G, F)
        z["z_v"].append(model.encode_video(torch.tensor(frames.astype(np.float32)).flatten(0, 1)).view(n, C, -1))
        mel = audio[:, :, :, 10 * s:10 * s + 256].astype(np.float32)                        # (n, C, 80, 256)
        z_a = model.encode_audio(torch.tensor(mel).flatten(0, 1)).view(n, C, -1)
        z["z_a"].append(z_a * torch.tensor(load("has_audio"), dtype=torch.float32)[:, None, None])
        z["z_t"].append(model.encode_text(torch.tensor(tokens[:, :128].astype(np.int64))))
    return {k: torch.cat(v).numpy() for k, v in z.items()}


def stored_embeddings(cache_dir, name):
    with np.load(Path(cache_dir) / "embeddings" / name) as f:
        return {k: f[k] for k in f.files}


N_VIDEOS, N_CLASSES = 24, 4


def video_id(i):
    return f"class_{i % N_CLASSES}/video_{i:04d}.avi"  # write_feature_cache's ids


def make_ucf_root(root, extra_test=()):
    """ucf101-like root: cache with 2 clips x 16 frames, missing audio for 3 videos, official-format lists (CRLF)."""
    write_feature_cache(root / "lava_cache", n_videos=N_VIDEOS, dataset="ucf101", clips=2, frames=16, grid=2,
                        num_classes=N_CLASSES, missing_audio=(1, 5, 20), seed=3)
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{c + 1} class_{c}\r\n" for c in range(N_CLASSES)))
    for k in (1, 2, 3):
        test = [i for i in range(N_VIDEOS) if (i // N_CLASSES) % 3 == k - 1]
        train = [i for i in range(N_VIDEOS) if i not in test]
        (lists / f"trainlist0{k}.txt").write_text("".join(f"{video_id(i)} {i % N_CLASSES + 1}\r\n" for i in train))
        (lists / f"testlist0{k}.txt").write_text("".join(f"{video_id(i)}\r\n" for i in test) +
                                                 "".join(f"{v}\r\n" for v in extra_test))
    return root


def make_hmdb_root(root):
    write_feature_cache(root / "lava_cache", n_videos=N_VIDEOS, dataset="hmdb51", clips=2, frames=16, grid=2,
                        num_classes=N_CLASSES, seed=4)
    lists = root / "testTrainMulti_7030_splits"
    lists.mkdir()
    for k in (1, 2, 3):
        for c in range(N_CLASSES):
            lines = [f"video_{i:04d}.avi {2 if (i // N_CLASSES) % 3 == k - 1 else 1} "
                     for i in range(c, N_VIDEOS, N_CLASSES)] + ["not_in_cache.avi 0 "]  # unused: never looked up
            (lists / f"class_{c}_test_split{k}.txt").write_text("\n".join(lines) + "\n")
    return root


FAST = ["--epochs-grid", "2,6", "--weight-decay-grid", "0,0.01", "--device", "cpu"]


def test_cli_end_to_end_random_and_pretrained(tmp_path, capsys):
    root = make_ucf_root(tmp_path / "ucf101")
    ckpt = make_checkpoint(tmp_path / "runs/x/ckpt_last.pt", root / "lava_cache")
    out_r, out_p = tmp_path / "r.json", tmp_path / "p.json"
    base = ["--dataset", "ucf101", "--root", str(root)] + FAST
    assert probe.main(base + ["--all-splits", "--checkpoint", "random", "--config-from", str(ckpt), "--out",
                              str(out_r)]) == 0
    assert probe.main(base + ["--checkpoint", str(ckpt), "--out", str(out_p)]) == 0  # default: 3 splits
    r, p = json.loads(out_r.read_text()), json.loads(out_p.read_text())
    for res in (r, p):
        for key in ("dataset", "checkpoint", "checkpoint_sha256", "args", "model_config", "splits", "mean", "std"):
            assert key in res
        assert res["dataset"] == "ucf101" and set(res["mean"]) >= {"video", "audio+video"}
        for row in res["splits"]:
            assert {"split", "modalities", "top1", "n_train", "n_test"} <= set(row)
            assert (row["n_test"], row["n_train"]) == (8, 16)  # videos
            assert 0 <= row["top1"] <= 100
        video = [row["top1"] for row in res["splits"] if row["modalities"] == "video"]
        assert len(video) == 3 and res["mean"]["video"] == pytest.approx(np.mean(video))
        assert res["std"]["video"] == pytest.approx(np.std(video, ddof=1))
        assert res["missing_audio"]["videos_without_audio"] == 3
        assert not [k for k in res if k.startswith("_")]  # private keys (_run_dir) stay out of the JSON
    assert r["checkpoint"] == "random" and r["checkpoint_sha256"] is None and r["model_config"] == p["model_config"]
    assert p["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest() and p["epoch"] == 3
    assert p["splits"][0]["missing_audio"]["test"] + p["splits"][0]["missing_audio"]["train"] == 3
    # the stored embeddings are the frozen encoders' outputs (eval mode) on each clip's window
    stored, direct = stored_embeddings(root / "lava_cache", Path(p["embeddings"]).name), direct_embeddings(
        ckpt, root / "lava_cache")
    assert stored["ids"].tolist() == [video_id(i) for i in range(N_VIDEOS)]
    for key in ("z_v", "z_a"):
        np.testing.assert_allclose(stored[key], direct[key], atol=1e-5)
    md = out_p.with_suffix(".md").read_text()
    assert "81.3" in md and "84.3" in md and "AV+VT+AVT" in md and f"{p['mean']['video']:.1f}" in md
    # embeddings: one file per (checkpoint, cache), reused by the next run
    files = sorted((root / "lava_cache/embeddings").glob("*.npz"))
    assert len(files) == 2 and any(f.name.startswith(p["checkpoint_sha256"][:16]) for f in files)
    capsys.readouterr()
    assert probe.main(base + ["--checkpoint", str(ckpt), "--split", "1", "--out", str(tmp_path / "q.json")]) == 0
    assert "(cached)" in capsys.readouterr().err
    q = json.loads((tmp_path / "q.json").read_text())
    assert [s["top1"] for s in q["splits"]] == [s["top1"] for s in p["splits"] if s["split"] == 1]
    # the summary table of several results files
    assert probe.main(["--summary", str(out_p), str(out_r)]) == 0
    text = capsys.readouterr().out
    assert "| ucf101 | random | video |" in text and f"{p['mean']['audio+video']:.1f} +- " in text


def test_cli_probe_finds_the_class_signal_with_the_papers_probe(tmp_path, monkeypatch):
    """On a cache whose class offsets reach the embeddings (no center_tokens), the probe is far above chance (25%) on
    every split and modality, and every probe it trains (selection and refit) uses the paper's lr 1e-4, batch 32, on
    one CPU thread, leaving the thread count as it was."""
    root = make_ucf_root(tmp_path / "ucf101")
    ckpt = make_checkpoint(tmp_path / "runs/x/ckpt_last.pt", root / "lava_cache", center_tokens=False)
    trained = []
    real = LinearProbe._fit_epochs

    def spy(self, X, y, groups=None):
        trained.append((self.lr, self.batch_size, len(X), torch.get_num_threads()))
        return real(self, X, y, groups)

    monkeypatch.setattr(LinearProbe, "_fit_epochs", spy)
    torch.set_num_threads(2)  # as on a 2-core machine (one_thread puts the count back)
    out = tmp_path / "p.json"
    assert probe.main(["--dataset", "ucf101", "--root", str(root), "--checkpoint", str(ckpt), "--out", str(out)]
                      + FAST) == 0
    res = json.loads(out.read_text())
    assert len(res["splits"]) == 6 and all(row["top1"] >= 75 for row in res["splits"]), res["splits"]
    # per split and modality: one probe per weight decay of the grid on part of the training rows, then the refit
    assert len(trained) == 6 * 3 and {(lr, b, threads) for lr, b, _, threads in trained} == {(1e-4, 32, 1)}
    assert sorted({n for _, _, n, _ in trained})[-1] == 16 * 2                  # the refit: 16 videos x 2 clips
    assert torch.get_num_threads() == 2
    assert res["hyperparameter_grid"]["lr"] == 1e-4 and res["hyperparameter_grid"]["batch_size"] == 32


def test_per_class_after_a_run_and_with_summary(tmp_path, capsys):
    """--per-class: the JSON's per_class_mean is each class's mean over the splits run; after the run the table of
    every class is printed and in the .md (only with the flag); --summary --per-class A,B prints those classes, lowest
    first, then their mean beside the overall top-1; an unknown class is one line and exit 2, before any run."""
    root = make_ucf_root(tmp_path / "ucf101")
    ckpt = make_checkpoint(tmp_path / "runs/x/ckpt_last.pt", root / "lava_cache", center_tokens=False)
    out = tmp_path / "p.json"
    base = ["--dataset", "ucf101", "--root", str(root), "--checkpoint", str(ckpt), "--modalities", "video", "--out",
            str(out)] + FAST
    assert probe.main(base + ["--per-class", "class_0,class_9"]) == 2
    err = capsys.readouterr().err
    assert err == "probe.py: error: --per-class: unknown classes ['class_9'] (e.g. ['class_0', 'class_1', 'class_2'])\n"
    assert not out.exists() and not (root / "lava_cache/embeddings").exists()  # refused before the embeddings
    assert probe.main(base + ["--per-class"]) == 0
    res = json.loads(out.read_text())
    classes = [f"class_{c}" for c in range(N_CLASSES)]
    pcm = res["per_class_mean"]["video"]
    assert len(res["splits"]) == 3 and list(pcm) == classes
    for c in classes:
        assert pcm[c] == pytest.approx(np.mean([row["per_class"][c] for row in res["splits"]]))
    printed, md = capsys.readouterr().out, out.with_suffix(".md").read_text()
    for text in (printed, md):
        assert "| class | video |" in text and all(f"| {c} | {pcm[c]:.1f} |" in text for c in classes)
        assert f"mean of these 4 classes: video {np.mean(list(pcm.values())):.1f} (overall top-1 " in text
    assert "| class |" not in probe.markdown_table(res)  # a run without --per-class: the .md stays short
    # --summary: read from the JSON, two classes only, lowest first
    assert probe.main(["--summary", str(out), "--per-class", "class_2,class_0"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| class_")]
    assert rows == [f"| {c} | {pcm[c]:.1f} |" for c in sorted(["class_2", "class_0"], key=pcm.get)]
    assert (f"mean of these 2 classes: video {np.mean([pcm['class_0'], pcm['class_2']]):.1f} (overall top-1 "
            f"{res['mean']['video']:.1f})") in text
    # an unknown class, or a result written before --per-class: one line, exit 2
    assert probe.main(["--summary", str(out), "--per-class", "class_0,Nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown classes ['Nope']" in err
    old = tmp_path / "old.json"
    old.write_text(json.dumps({k: v for k, v in res.items() if k != "per_class_mean"}))
    assert probe.main(["--summary", str(old), "--per-class"]) == 2
    assert "a result without per-class top-1" in capsys.readouterr().err
    # the README's example names the five classes as UCF-101's classInd.txt spells them (the paper's SkiJet: Skijet)
    five = "IceDancing,PizzaTossing,PommelHorse,Skijet,StillRings"
    assert len(probe.wanted_classes(five, probe.read_ucf101_split(DATA / "ucf101", 1)["classes"])) == 5


def test_per_class_of_a_class_without_test_videos_is_a_dash(tmp_path, capsys):
    """--allow-partial: a class of the split lists none of whose test videos is in the cache gets '-' in the
    per-class tables (after the run and with --summary), not an 'unknown classes' error after the run."""
    root = make_ucf_root(tmp_path / "ucf101", extra_test=["class_4/video_9999.avi"])
    with open(root / "ucfTrainTestlist/classInd.txt", "a") as f:
        f.write(f"{N_CLASSES + 1} class_4\r\n")  # listed, but no video of it in the cache
    ckpt = make_checkpoint(tmp_path / "runs/x/ckpt_last.pt", root / "lava_cache")
    out = tmp_path / "p.json"
    with pytest.warns(UserWarning, match="--allow-partial"):
        assert probe.main(["--dataset", "ucf101", "--root", str(root), "--checkpoint", str(ckpt), "--split", "1",
                           "--modalities", "video", "--allow-partial", "--per-class", "class_4,class_0", "--out",
                           str(out)] + FAST) == 0
    res = json.loads(out.read_text())
    assert res["splits"][0]["per_class"]["class_4"] is None and res["per_class_mean"]["video"]["class_4"] is None
    c0 = f"{res['per_class_mean']['video']['class_0']:.1f}"
    printed = capsys.readouterr().out
    assert probe.main(["--summary", str(out), "--per-class", "class_4,class_0"]) == 0
    for text in (printed, capsys.readouterr().out):  # the classes asked for: class_4 after the scored one
        assert f"| class_0 | {c0} |\n| class_4 | - |\n\nmean of these 1 classes: video {c0} " in text
        assert "\n-: no test video of the class in the cache (--allow-partial)\n" in text
    md = out.with_suffix(".md").read_text()  # every class
    assert "| class_4 | - |\n\nmean of these 4 classes: video " in md and "-: no test video of the class" in md


def test_cli_hmdb51_video_only_and_checkpoint_series(tmp_path, capsys):
    root = make_hmdb_root(tmp_path / "hmdb51")
    for e in (1, 2):
        make_checkpoint(tmp_path / f"runs/x/epoch_{e:03d}.pt", root / "lava_cache", seed=e, epoch=e)
    out = tmp_path / "h.json"
    assert probe.main(["--dataset", "hmdb51", "--root", str(root), "--split", "2", "--checkpoints",
                       str(tmp_path / "runs/x/epoch_*.pt"), "--out", str(out)] + FAST) == 0
    printed = capsys.readouterr().out
    assert "epoch 1: video " in printed and "epoch 2: video " in printed and "1.0" not in printed
    res = json.loads(out.read_text())
    assert [s["epoch"] for s in res["series"]] == [1, 2] and all(set(s["mean"]) == {"video"} for s in res["series"])
    assert res["series"][0]["splits"][0]["n_train"] == 16 and out.with_suffix(".png").stat().st_size > 1000
    # each point of the series is its checkpoint probed alone, with its own weights
    strip = lambda rows: [{k: v for k, v in row.items() if k != "time_s"} for row in rows]
    assert strip(res["series"][0]["splits"]) != strip(res["series"][1]["splits"])
    for e, point in zip((1, 2), res["series"]):
        ckpt = tmp_path / f"runs/x/epoch_{e:03d}.pt"
        alone = tmp_path / f"alone_{e}.json"
        assert probe.main(["--dataset", "hmdb51", "--root", str(root), "--split", "2", "--checkpoint", str(ckpt),
                           "--out", str(alone)] + FAST) == 0
        single = json.loads(alone.read_text())
        sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
        assert point["checkpoint_sha256"] == single["checkpoint_sha256"] == sha
        assert strip(point["splits"]) == strip(single["splits"])
        stored = stored_embeddings(root / "lava_cache", Path(single["embeddings"]).name)
        np.testing.assert_allclose(stored["z_v"], direct_embeddings(ckpt, root / "lava_cache")["z_v"], atol=1e-5)
    # --summary over a glob that also holds the series file: the series is skipped with a note
    capsys.readouterr()
    assert probe.main(["--summary", str(out), str(tmp_path / "alone_1.json")]) == 0
    text, err = capsys.readouterr()
    assert f"skipped {out}, not a linear-probe result" in err and text.count("| hmdb51 |") == 1
    # ... and a glob that matches the .md tables, or a .jsonl: skipped with a note each, not a traceback
    (tmp_path / "log.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    md = [str(tmp_path / "alone_1.md"), str(tmp_path / "log.jsonl")]
    assert probe.main(["--summary", str(tmp_path / "alone_1.json"), *md]) == 0
    text, err = capsys.readouterr()
    assert err.splitlines() == [f"--summary: skipped {f}, not a JSON file" for f in md]
    assert text.count("| hmdb51 |") == 1


def test_a_series_is_checked_whole_before_any_probe(tmp_path, capsys):
    """--checkpoints: an unreadable match or a checkpoint of another config is one line naming it and the glob,
    before any checkpoint is probed (no embeddings, no results)."""
    root = make_hmdb_root(tmp_path / "hmdb51")
    for e, width in ((1, 32), (2, 16), (3, 32)):
        make_checkpoint(tmp_path / f"runs/x/epoch_{e:03d}.pt", root / "lava_cache", epoch=e, width=width)
    (tmp_path / "runs/x/config.json").write_text("{}")
    base = ["--dataset", "hmdb51", "--root", str(root), "--split", "1", "--out", str(tmp_path / "s.json")] + FAST
    for pattern, message in (
            ("*", f"{tmp_path / 'runs/x/config.json'} is not a readable checkpoint"),
            ("epoch_*.pt", f"{tmp_path / 'runs/x/epoch_002.pt'} has another model config than "
                           f"{tmp_path / 'runs/x/epoch_001.pt'} (audio.width, text.width, video.width)")):
        glob = str(tmp_path / "runs/x" / pattern)
        assert probe.main(base + ["--checkpoints", glob]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"probe.py: error: --checkpoints {glob!r}: {message}"), err
    assert not (root / "lava_cache/embeddings").exists() and not (tmp_path / "s.json").exists()
    later = torch.load(tmp_path / "runs/x/epoch_003.pt", weights_only=True)  # a config key the first file has and
    del later["config"]["model"]["video"]["center_tokens"]                   # a later one lacks: differs too
    torch.save(later, tmp_path / "runs/x/epoch_003.pt")
    with pytest.raises(probe.ProbeError, match=r"epoch_003.pt has another model config than .*\(video.center_tokens\)"):
        probe.check_series("glob", [tmp_path / "runs/x/epoch_001.pt", tmp_path / "runs/x/epoch_003.pt"])


def test_videos_missing_from_the_cache_error_or_loud_warning(tmp_path, capsys):
    root = make_ucf_root(tmp_path / "ucf101", extra_test=["class_0/video_9999.avi", "class_1/video_9998.avi"])
    ckpt = make_checkpoint(tmp_path / "runs/x/ckpt_last.pt", root / "lava_cache")
    args = ["--dataset", "ucf101", "--root", str(root), "--split", "1", "--checkpoint", str(ckpt),
            "--modalities", "video", "--out", str(tmp_path / "o.json")] + FAST
    assert probe.main(args) == 2
    err = capsys.readouterr().err
    assert "0 of 16 training and 2 of 10 test videos" in err and "video_9999" in err and "--allow-partial" in err
    assert not (tmp_path / "o.json").exists()
    with pytest.warns(UserWarning, match="--allow-partial: split 1: 0 of 16 training and 2 of 10 test videos"):
        assert probe.main(args + ["--allow-partial"]) == 0
    res = json.loads((tmp_path / "o.json").read_text())
    assert res["partial"] and res["splits"][0]["missing_videos"] == {"train": 0, "test": 2}
    assert res["splits"][0]["n_test"] == 8
    # a cache of another known dataset: one line naming it, not "0 of 16 training videos ... --allow-partial"
    manifest = json.loads((root / "lava_cache/manifest.json").read_text())
    (root / "lava_cache/manifest.json").write_text(json.dumps(dict(manifest, dataset="hmdb51")))
    capsys.readouterr()
    assert probe.main(args) == 2
    assert capsys.readouterr().err == (f"probe.py: error: --dataset ucf101: the cache {root / 'lava_cache'} holds "
                                       "hmdb51 videos; pass the UCF-101 cache (--cache, or --root)\n")
    # the tables say it is partial; split 1 only: beside the paper's split-1 row of its losses (Table 2)
    note = "(partial: 16 of 16 training, 8 of 10 test videos)"
    md = (tmp_path / "o.md").read_text()
    assert f"| LAVA (video), this kit: `{ckpt}` {note} | " in md and "81.3" not in md
    assert "| LAVA* (video only), paper Table 2, split 1 | K700 (0.1) | AV+VT+AVT | 81.1 | 51.8 |" in md
    capsys.readouterr()
    assert probe.main(["--summary", str(tmp_path / "o.json")]) == 0
    assert f" +- 0.0 {note} | 1 |" in capsys.readouterr().out
    # other losses, 3 splits: Table 2's rows of that loss set (listed in any order), or all of Table 2 if none
    md = probe.markdown_table(dict(res, split_ids=[1, 2, 3], pretrain_args=dict(losses="vt,av")))
    assert "| LAVA* (video only), paper Table 2, split 1 | K700 (0.1) | AV+VT | 74.91 | 49.4 |" in md
    assert "| LAVA* (audio+video), paper Table 2, split 1 | K700 (0.1) | AV+VT | 79.36 | - |" in md
    assert md.count("paper Table 2, split 1 |") == 2 and "81.3" not in md
    assert probe.markdown_table(dict(res, split_ids=[1, 2, 3], pretrain_args=dict(losses="vt"))).count(
        "paper Table 2, split 1 |") == len(probe.PAPER_TABLE2)


def test_a_warning_is_one_line_from_the_command_line(tmp_path):
    root = make_ucf_root(tmp_path / "ucf101", extra_test=["class_0/video_9999.avi"])
    run = subprocess.run([sys.executable, "probe.py", "--dataset", "ucf101", "--root", str(root), "--split", "1",
                          "--allow-partial", "--checkpoint", str(tmp_path / "no.pt")], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 2 and run.stderr.splitlines() == [
        f"probe.py: warning: --allow-partial: split 1: 0 of 16 training and 1 of 9 test videos named in the official "
        f"lists are not in the cache {root / 'lava_cache'} (e.g. ['class_0/video_9999.avi']); evaluating on the rest",
        f"probe.py: error: --checkpoint: checkpoint {tmp_path / 'no.pt'} not found"], run.stderr


def test_checkpoint_of_another_config_is_a_clear_error(tmp_path, capsys):
    root = make_ucf_root(tmp_path / "ucf101")
    wrong_grid = make_checkpoint(tmp_path / "runs/a/ckpt_last.pt", root / "lava_cache", grid=7)
    other = make_checkpoint(tmp_path / "runs/b/ckpt_last.pt", root / "lava_cache", width=16)
    base = ["--dataset", "ucf101", "--root", str(root), "--split", "1"] + FAST
    assert probe.main(base + ["--checkpoint", str(wrong_grid)]) == 2
    assert "does not fit the cache" in capsys.readouterr().err
    ok = make_checkpoint(tmp_path / "runs/c/ckpt_last.pt", root / "lava_cache")
    assert probe.main(base + ["--checkpoint", str(ok), "--config-from", str(other)]) == 2
    assert "--config-from gives the config of --checkpoint random" in capsys.readouterr().err
    # weights that do not fit the config they carry
    bad = torch.load(ok, weights_only=True)
    bad["config"]["model"]["video"]["width"] = bad["config"]["model"]["audio"]["width"] = 16
    bad["config"]["model"]["text"]["width"] = 16
    torch.save(bad, tmp_path / "bad.pt")
    assert probe.main(base + ["--checkpoint", str(tmp_path / "bad.pt")]) == 2
    assert "do not fit its own config" in capsys.readouterr().err
    # a missing file or a folder: one line naming the flag, no traceback
    for flag, path in (("--checkpoint", tmp_path / "runs/a"), ("--checkpoint", tmp_path / "no.pt"),
                       ("--config-from", tmp_path / "no.pt")):
        extra = ["--checkpoint", "random"] if flag == "--config-from" else []
        assert probe.main(base + extra + [flag, str(path)]) == 2
        assert capsys.readouterr().err == f"probe.py: error: {flag}: checkpoint {path} not found" + (
            " (a directory)\n" if path.is_dir() else "\n")


def test_random_init_is_fixed_by_the_seed_and_shares_the_config(tmp_path, monkeypatch):
    from argparse import Namespace

    from prepare import FeatureCache

    cache = FeatureCache(write_feature_cache(tmp_path / "c", n_videos=4, dataset="ucf101", clips=1, frames=16, grid=2))
    ckpt = make_checkpoint(tmp_path / "runs/x/ckpt_last.pt", cache.path)
    args = lambda seed, config_from=str(ckpt): Namespace(config_from=config_from, seed=seed, device="cpu")
    (m1, i1), (m2, i2), (m3, i3) = (probe.load_model(args(s), "random", cache) for s in (0, 0, 1))
    assert i1["embedding_key"] == i2["embedding_key"] != i3["embedding_key"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    _, ip = probe.load_model(args(0, config_from=None), str(ckpt), cache)
    assert ip["model_config"] == i1["model_config"] and ip["embedding_key"] != i1["embedding_key"]
    # without --config-from: the latest runs/*/ckpt_last.pt's config, the same network for the same seed
    monkeypatch.chdir(tmp_path)
    m4, i4 = probe.load_model(args(0, config_from=None), "random", cache)
    assert i4["embedding_key"] == i1["embedding_key"] and i4["config_source"] == "config of runs/x/ckpt_last.pt"


def test_a_damaged_cache_is_one_line(tmp_path, capsys):
    cache = write_feature_cache(tmp_path / "c", n_videos=4, dataset="folder", clips=1, frames=16)
    patches = next(Path(cache).glob("shard_*/patches.npy"))
    patches.write_bytes(patches.read_bytes()[:200])  # a copy cut short
    assert probe.main(["--embed", "--cache", str(cache), "--checkpoint", "random"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(patches) in err and "Traceback" not in err, err


@pytest.mark.parametrize("flags, message", [
    (["--search", "", "--cache", "c"], "--search: an empty query; give the words to search for"),
    (["--search", "fire", "--cache", "c", "--top", "0"], "--top: the number of videos --search prints, at least 1"),
    (["--search", "fire", "--cache", "c", "--top=-2"], "--top: the number of videos --search prints, at least 1"),
    (["--dataset", "ucf101", "--checkpoints", "runs/x/*.pt", "--per-class"], "--per-class prints after a run of "
     "one --checkpoint, or with --summary; not with --checkpoints"),
    *[(["--dataset", "ucf101", flag], "--epochs-grid takes comma-separated integers >= 1, --weight-decay-grid "
       "comma-separated numbers >= 0") for flag in ("--epochs-grid=10,x", "--epochs-grid=0,10", "--epochs-grid=-5",
                                                    "--weight-decay-grid=0,-1e-3")],
    pytest.param(["--dataset", "ucf101", "--device", "cuda"], "--device cuda: torch sees 0 CUDA GPU(s) here; use "
                 "--device cpu or auto", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    (["--dataset", "ucf101", "--device", "gpu"], "--device gpu: Expected one of")])
def test_a_bad_flag_is_one_line(flags, message, capsys):
    try:  # a usage line (argparse) or probe.py's own error line, never a traceback later
        code = probe.main(flags)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and f"error: {message}" in err.splitlines()[-1], err
    assert "Traceback" not in err


class ShownBar(tqdm):
    """tqdm as on a terminal (probe.py's bars are disable=None: drawn on a terminal only), drawn at every update."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **dict(kwargs, disable=False, mininterval=0))


def test_progress_covers_the_selection_and_the_refit(tmp_path, capsys, monkeypatch):
    """A log gets a line per grid point, one as the refit starts and one per split; a terminal also gets a bar per
    probe trained, the refit's over its chosen epoch count (real UCF-101 on a CPU: the longest silent stretch)."""
    root = make_ucf_root(tmp_path / "ucf101")
    ckpt = make_checkpoint(tmp_path / "runs/x/ckpt_last.pt", root / "lava_cache")
    args = ["--dataset", "ucf101", "--root", str(root), "--split", "1", "--modalities", "video", "--checkpoint",
            str(ckpt), "--out", str(tmp_path / "p.json")] + FAST
    assert probe.main(args) == 0
    err = capsys.readouterr().err
    row = json.loads((tmp_path / "p.json").read_text())["splits"][0]
    epochs = row["hyperparameters"]["epochs"]
    for wd in (0.0, 0.01):
        for e in (2, 6):
            assert f"split 1 video: wd {wd}, epoch {e}/6, val top-1 " in err
    assert f"split 1 video: refit on 16 training videos, {epochs} epochs\n" in err
    assert f"split 1 video: top-1 {row['top1']:.1f} on 8 test videos\n" in err
    assert "%|" not in err  # no bars in a log
    monkeypatch.setattr(probe, "tqdm", ShownBar)
    assert probe.main(args) == 0
    err = capsys.readouterr().err
    assert "split 1 video, wd 0.0: 100%" in err and "split 1 video, wd 0.01: 100%" in err and " 6/6 " in err
    assert "split 1 video, refit: 100%" in err and f" {epochs}/{epochs} " in err
    assert f"split 1 video: refit on 16 training videos, {epochs} epochs\n" in err  # the lines stay, above the bars


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_is_one_line_and_the_same_command_continues(tmp_path, capsys, signum):
    root = make_ucf_root(tmp_path / "ucf101")
    ckpt = make_checkpoint(tmp_path / "runs/x/ckpt_last.pt", root / "lava_cache")
    args = ["--dataset", "ucf101", "--root", str(root), "--split", "1", "--modalities", "video", "--checkpoint",
            str(ckpt), "--out", str(tmp_path / "p.json"), "--device", "cpu"]
    # a selection long enough to be interrupted: the signal comes once the embeddings are stored
    with subprocess.Popen([sys.executable, "probe.py", *args, "--epochs-grid", "1000000"], cwd=ROOT,
                          stderr=subprocess.PIPE, text=True) as run:
        lines = [run.stderr.readline()]
        while lines[-1] and not lines[-1].startswith("embeddings:"):
            lines.append(run.stderr.readline())
        run.send_signal(signum)
        try:
            rest = run.communicate(timeout=60)[1]
        finally:
            run.kill()  # nothing once it has exited
    assert run.returncode == 128 + signum and "Traceback" not in "".join(lines) + rest
    assert rest == "probe: interrupted; the same command continues (stored embeddings are reused)\n", lines + [rest]
    assert not (tmp_path / "p.json").exists() and not list((root / "lava_cache/embeddings").glob("*tmp*"))
    assert probe.main(args + FAST) == 0
    assert "(cached)" in capsys.readouterr().err


def test_an_interrupted_or_refused_write_leaves_nothing_and_is_one_line(tmp_path, capsys, monkeypatch):
    """save_npz removes its temp file whatever stops it; a cache on read-only storage is a one-line error."""
    def write_half_then(error):
        def savez(path, **arrays):
            Path(path).write_bytes(b"half a file")
            raise error
        return savez

    monkeypatch.setattr(np, "savez", write_half_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        probe.save_npz(tmp_path / "e" / "x.npz", dict(a=np.zeros(3)))
    assert list((tmp_path / "e").iterdir()) == []
    cache = write_feature_cache(tmp_path / "c", n_videos=4, dataset="folder", clips=1, frames=16)
    monkeypatch.setattr(np, "savez", write_half_then(PermissionError(13, "Permission denied", str(cache))))
    ckpt = make_checkpoint(tmp_path / "runs/x/ckpt_last.pt", cache)
    assert probe.main(["--embed", "--cache", str(cache), "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"probe.py: error: [Errno 13] Permission denied: '{cache}'"
    assert "Traceback" not in err
    assert not list(Path(cache, "embeddings").iterdir())

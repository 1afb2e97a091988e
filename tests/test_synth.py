"""Tests of synth.py: official layouts and split semantics, real decodable media, determinism, and the
property the demo rests on (class readable from motion, not from the time-averaged frame).

    /work/main/.venv/bin/python -m pytest tests/test_synth.py -q
"""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import synth  # noqa: E402

TINY = ["--classes", "4", "--k700-clips", "12", "--k700-val-clips", "4", "--k700-seconds", "1.2",
        "--ucf-groups", "3", "--ucf-clips-per-group", "2", "--hmdb-clips-per-class", "5",
        "--eval-seconds", "1.2", "--size", "32", "--workers", "1",
        # every K700 clip gets a title and the no-audio shares stay non-trivial at this size
        "--k700-no-title", "0.25", "--k700-no-audio", "0.25", "--ucf-no-audio", "0.3", "--hmdb-audio", "0.5"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny corpus of all three datasets (~64 files) and its manifest records, written once per module."""
    out = tmp_path_factory.mktemp("corpus")
    records = synth.run(synth.parse_args(["--out", str(out), "--seed", "3"] + TINY))
    return out, records


def decode_pyav(path):
    """-> (frames (T, H, W, 3) uint8 RGB, audio (channels, samples) float or None) through PyAV."""
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    audio = None
    with av.open(str(path)) as container:
        if container.streams.audio:
            audio = np.concatenate([f.to_ndarray().reshape(f.layout.nb_channels if f.format.is_planar else 1, -1)
                                    for f in container.decode(audio=0)], axis=1)
    return frames, audio


def decode_cv2(path):
    """-> (T, H, W, 3) uint8 BGR frames through OpenCV, the reader most video code uses."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return np.stack(frames)


def read_lines(path):
    """Lines of a split file with their exact endings kept."""
    return Path(path).read_bytes().decode("utf-8").splitlines(keepends=True)


# ----------------------------------------------------------------------------------------------------
# layout and index files


def test_layout_matches_official_patterns(corpus):
    out, records = corpus
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.suffix in (".mp4", ".avi")}
    assert on_disk == {r["path"] for r in records}
    patterns = {
        "k700": re.compile(r"k700/(train|val)/([a-z]+(?: [a-z]+)*)/([A-Za-z0-9_-]{11})_(\d{6})_(\d{6})\.mp4"),
        "ucf101": re.compile(r"ucf101/UCF-101/([A-Z][A-Za-z]+)/v_\1_g(\d\d)_c(\d\d)\.avi"),
        "hmdb51": re.compile(r"hmdb51/videos/([a-z]+(?:_[a-z]+)*)/([A-Za-z0-9_]+_\1_[fhu]_(?:cm|nm)_np\d_"
                             r"(?:fr|ba|le|ri)_(?:goo|med|bad)_\d+)\.avi"),
    }
    for r in records:
        m = patterns[r["dataset"]].fullmatch(r["path"])
        assert m, r["path"]
        if r["dataset"] == "k700":
            assert int(m.group(5)) - int(m.group(4)) == 10   # a 10 s segment, as in the real annotations
    for dataset in ("k700", "ucf101", "hmdb51"):
        assert len({r["label"] for r in records if r["dataset"] == dataset}) == 4
    ids = [r["extra"]["youtube_id"] for r in records if r["dataset"] == "k700"]
    assert len(set(ids)) == len(ids)


def test_k700_annotations_and_titles(corpus):
    out, records = corpus
    k700 = {r["extra"]["youtube_id"]: r for r in records if r["dataset"] == "k700"}
    for split, value, n in (("train", "train", 12), ("val", "validate", 4)):
        text = (out / "k700" / "annotations" / f"{split}.csv").read_text()
        assert text.startswith("label,youtube_id,time_start,time_end,split\n")   # LF, as the real file
        rows = list(csv.DictReader(text.splitlines()))
        assert len(rows) == n
        for row in rows:
            r = k700[row["youtube_id"]]
            assert row["split"] == value
            # The row names the file on disk: <split>/<label>/<id>_<start>_<end>.mp4
            path = f"{split}/{row['label']}/{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"
            assert (out / "k700" / path).is_file() and r["path"] == f"k700/{path}"
    with open(out / "k700" / "titles.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["youtube_id", "title"]
    titles = dict(rows[1:])
    assert titles == {i: r["title"] for i, r in k700.items() if r["title"] is not None}
    assert 0 < len(titles) < len(k700)                      # some clips have no title


def test_keywords_are_unique_and_never_filler():
    keywords = [k for n in synth.action_names(12) for k in n["keywords"]]   # the named actions and numbered ones
    assert len(set(keywords)) == len(keywords)
    assert not set(keywords) & set(synth.FILLER)    # so a title's class is carried by its keywords only


def test_titles_carry_class_keywords_with_noise_and_unicode():
    names = synth.action_names(8)
    rng = np.random.default_rng(0)
    clean = [synth.make_title(rng, 5, names, noise=0.0) for _ in range(400)]
    words = lambda t: set(re.findall(r"\w+", t.lower()))
    own, others = set(names[5]["keywords"]), {k for i, n in enumerate(names) if i != 5 for k in n["keywords"]}
    assert all(words(t) & own and not words(t) & others for t in clean)
    assert any(not t.isascii() for t in clean)               # the tokenizer meets multi-byte characters
    assert any("," in t and '"' in t for t in clean)         # titles.csv must quote them
    noisy = [synth.make_title(rng, 5, names, noise=0.5) for _ in range(400)]
    assert 0.2 < np.mean([bool(words(t) & others) for t in noisy]) < 0.8


def test_ucf_split_files_follow_official_semantics(corpus):
    out, records = corpus
    lists = out / "ucf101" / "ucfTrainTestlist"
    class_lines = read_lines(lists / "classInd.txt")
    assert all(line.endswith("\r\n") for line in class_lines)
    class_index = {line.split()[1]: int(line.split()[0]) for line in class_lines}
    assert sorted(class_index.values()) == [1, 2, 3, 4]
    videos = {r["path"][len("ucf101/UCF-101/"):]: r for r in records if r["dataset"] == "ucf101"}
    test_groups_seen = []
    for split in (1, 2, 3):
        train = {}
        for line in read_lines(lists / f"trainlist0{split}.txt"):
            m = re.fullmatch(r"(([A-Za-z]+)/v_\2_g(\d\d)_c(\d\d)\.avi) (\d+)\r\n", line)
            assert m, line
            assert int(m.group(5)) == class_index[m.group(2)]
            train[m.group(1)] = int(m.group(3))
        test = {}
        for line in read_lines(lists / f"testlist0{split}.txt"):
            m = re.fullmatch(r"(([A-Za-z]+)/v_\2_g(\d\d)_c(\d\d)\.avi)\r\n", line)   # path only, no label
            assert m, line
            test[m.group(1)] = int(m.group(3))
        # every video in exactly one of train / test, and the test set is whole groups: a third of them
        assert set(train) | set(test) == set(videos) and not set(train) & set(test)
        groups = set(test.values())
        assert groups == set(synth.ucf_test_groups(3, split)) and len(groups) == 1
        assert not groups & set(train.values())
        test_groups_seen.append(groups)
    assert set.union(*test_groups_seen) == {1, 2, 3}       # the three splits test disjoint groups


def test_ucf_test_groups_scale_the_official_rule():
    for k in (1, 2, 3):   # official: 25 groups, split k tests groups 7(k-1)+1 .. 7k
        assert synth.ucf_test_groups(25, k) == list(range(7 * (k - 1) + 1, 7 * k + 1))
    for groups in (3, 6, 9):   # a third of the groups at these counts (7/25 of them in general)
        assert [len(synth.ucf_test_groups(groups, k)) for k in (1, 2, 3)] == [groups // 3] * 3
    for groups in range(3, 40):    # never past the last group
        assert max(synth.ucf_test_groups(groups, 3)) <= groups


def test_hmdb_split_files_follow_official_semantics(corpus):
    out, records = corpus
    splits = out / "hmdb51" / "testTrainMulti_7030_splits"
    by_class = {}
    for r in records:
        if r["dataset"] == "hmdb51":
            by_class.setdefault(r["label"], set()).add(r["extra"]["video"])
    assert len(list(splits.iterdir())) == 3 * len(by_class)
    for label, videos in by_class.items():
        for split in (1, 2, 3):
            codes = {}
            for line in read_lines(splits / f"{label}_test_split{split}.txt"):
                m = re.fullmatch(r"(\S+\.avi) ([012]) \n", line)   # trailing space, as the real files
                assert m, repr(line)
                assert m.group(1) not in codes
                codes[m.group(1)] = int(m.group(2))
            assert set(codes) == videos
            values = list(codes.values())
            # 5 clips, 10% unused -> round(0.5) = 0 unused; 30% of 5 -> 2 test (round half to even: 1.5 -> 2)
            assert values.count(0) == round(len(videos) * 0.1)
            assert values.count(2) == round((len(videos) - values.count(0)) * 0.3)
    rng = np.random.default_rng(0)
    codes = synth.hmdb_codes(rng, 100, 0.25)                  # the real proportions: 70/30 of the used clips
    assert (codes.count(0), codes.count(1), codes.count(2)) == (25, 53, 22)   # 22.5 test rounds half to even


# ----------------------------------------------------------------------------------------------------
# media


def test_every_file_decodes_with_pyav_and_opencv(corpus):
    out, records = corpus
    audio_codecs = {"aac": "aac", "libmp3lame": "mp3", "pcm_s16le": "pcm_s16le"}
    for r in records:
        path = out / r["path"]
        frames, audio = decode_pyav(path)
        assert frames.shape == (r["frames"], r["height"], r["width"], 3), r["path"]
        assert frames.shape[1] >= 32 and frames.shape[2] > frames.shape[1]   # landscape: readers must crop
        bgr = decode_cv2(path)
        assert bgr.shape == frames.shape, r["path"]
        # same pixels from both readers (up to the YUV->RGB rounding of each)
        assert np.abs(bgr[..., ::-1].astype(int) - frames).mean() < 3
        assert (audio is not None) == r["has_audio"], r["path"]
        with av.open(str(path)) as container:
            assert container.streams.video[0].average_rate == synth.parse_fps(r["fps"])[0]
            if r["has_audio"]:
                stream = container.streams.audio[0]
                assert stream.codec_context.name.startswith(audio_codecs[r["acodec"]])
                assert stream.sample_rate == r["sample_rate"]
                # at least the video's duration (encoders pad the end)
                assert audio.shape[1] >= 0.95 * r["seconds"] * r["sample_rate"]
    # the corpus exercises what readers must handle
    assert {r["fps"] for r in records} >= {"15", "25", "30000/1001"}
    assert {r["vcodec"] for r in records} >= {"libx264", "mpeg4"}
    for dataset in ("k700", "ucf101", "hmdb51"):
        with_audio = [r["has_audio"] for r in records if r["dataset"] == dataset]
        assert any(with_audio) and not all(with_audio), dataset


def test_audio_pitch_names_the_class(corpus):
    out, records = corpus
    checked = 0
    for r in records:
        if not r["has_audio"]:
            continue
        _, audio = decode_pyav(out / r["path"])
        mono = audio.astype(np.float64).mean(axis=0)
        spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
        peak = np.fft.rfftfreq(len(mono), 1 / r["sample_rate"])[np.argmax(spectrum)]
        assert abs(peak / synth.pitch(r["latent"], 4) - 1) < 0.04, (r["path"], peak)
        checked += 1
    assert checked > 20


def test_same_seed_same_content_different_seed_different(tmp_path):
    small = ["--only", "k700,ucf101", "--classes", "2", "--k700-clips", "3", "--k700-val-clips", "1",
             "--ucf-groups", "3", "--ucf-clips-per-group", "1", "--size", "32", "--k700-seconds", "0.8",
             "--eval-seconds", "0.8", "--k700-no-audio", "0", "--ucf-no-audio", "0"]
    a = synth.run(synth.parse_args(["--out", str(tmp_path / "a"), "--seed", "7", "--workers", "1"] + small))
    b = synth.run(synth.parse_args(["--out", str(tmp_path / "b"), "--seed", "7", "--workers", "2"] + small))
    c = synth.run(synth.parse_args(["--out", str(tmp_path / "c"), "--seed", "8", "--workers", "1"] + small))
    assert a == b and [r["path"] for r in a] != [r["path"] for r in c]
    for name in ("k700/annotations/train.csv", "k700/titles.csv", "ucf101/ucfTrainTestlist/trainlist01.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for ra, rc in zip(a, c):
        fa, aa = decode_pyav(tmp_path / "a" / ra["path"])
        fb, ab = decode_pyav(tmp_path / "b" / ra["path"])
        fc, ac = decode_pyav(tmp_path / "c" / rc["path"])
        assert np.array_equal(fa, fb) and np.array_equal(aa, ab)       # any worker count, same content
        assert fa.shape != fc.shape or np.abs(fa.astype(int) - fc).mean() > 1
        assert aa.shape != ac.shape or not np.allclose(aa, ac)


# ----------------------------------------------------------------------------------------------------
# the learnable structure: motion names the class, the time-averaged frame does not


def object_mask(luma):
    """(T, H, W) luma -> (T, H, W) bool: pixels far from the background (the clip's median level)."""
    return np.abs(luma.astype(np.float32) - np.median(luma)) > 30


def direction_class(mask, classes):
    """Class whose direction is nearest the object's centroid displacement from first to last frame."""
    if not mask[0].any() or not mask[-1].any():
        return -1                              # object out of view: counts as a miss, not a crash

    def centroid(m):
        ys, xs = np.nonzero(m)
        return np.array([xs.mean(), ys.mean()])
    dx, dy = centroid(mask[-1]) - centroid(mask[0])
    return int(np.round(np.arctan2(-dy, dx) / (2 * np.pi / classes))) % classes   # image y points down


def nearest_class_mean_accuracy(a, b):
    """Train a nearest-class-mean classifier on the first half of each set, score it on the second half."""
    ha, hb = len(a) // 2, len(b) // 2
    ma, mb = a[:ha].mean(0), b[:hb].mean(0)
    hits = [np.sum((x - mb) ** 2) < np.sum((x - ma) ** 2) for x in b[hb:]]
    hits += [np.sum((x - ma) ** 2) < np.sum((x - mb) ** 2) for x in a[ha:]]
    return float(np.mean(hits))


def test_opposite_classes_are_exact_time_reversals():
    for classes in (2, 8):
        for c in range(classes // 2):
            forward = synth.render_frames(np.random.default_rng(11), c, classes, 17, 48, 32, noise=0)
            backward = synth.render_frames(np.random.default_rng(11), c + classes // 2, classes, 17, 48, 32, noise=0)
            assert np.array_equal(forward[::-1], backward)
            assert not np.array_equal(forward, backward)


def test_time_average_shows_the_axis_at_most_motion_shows_the_class():
    classes, n = 8, 80
    masks = {}
    for c in (0, 2, 4):   # 0 and 4 opposite, 2 perpendicular
        clips = [synth.render_frames(np.random.default_rng([5, c, i]), c, classes, 16, 32, 32)[:, :32]
                 for i in range(n)]
        masks[c] = np.stack([object_mask(y) for y in clips]).astype(np.float32)   # (n, T, H, W)
    average = {c: m.mean(axis=1) for c, m in masks.items()}                     # time averages, (n, H, W)
    # over a set of clips, opposite classes have the same mean time-averaged frame; perpendicular do not
    gap_opposite = np.abs(average[0].mean(0) - average[4].mean(0)).mean()
    gap_perpendicular = np.abs(average[0].mean(0) - average[2].mean(0)).mean()
    assert gap_opposite < 0.25 * gap_perpendicular
    # per clip: a classifier on the time average tells the axis, not the direction ...
    assert nearest_class_mean_accuracy(average[0], average[4]) < 0.65
    assert nearest_class_mean_accuracy(average[0], average[2]) > 0.9
    # ... while the motion from the first to the last frame names the class
    for c, m in masks.items():
        assert np.mean([direction_class(clip, classes) == c for clip in m]) > 0.95


def test_decoded_files_need_temporal_order(tmp_path):
    """On real files (two opposite classes), the time-averaged frame is at chance, the motion is not."""
    args = ["--out", str(tmp_path), "--only", "ucf101", "--classes", "2", "--ucf-groups", "3",
            "--ucf-clips-per-group", "10", "--size", "32", "--eval-seconds", "0.8", "--workers", "1"]
    records = synth.run(synth.parse_args(args))
    averages, motion_hits = {0: [], 1: []}, []
    for r in records:
        frames, _ = decode_pyav(tmp_path / r["path"])
        side = frames.shape[1]                     # short side 32 or 40, landscape: centre square, to 32x32
        left = (frames.shape[2] - side) // 2
        luma = np.stack([cv2.resize(f[:, left:left + side].mean(axis=-1), (32, 32), interpolation=cv2.INTER_AREA)
                         for f in frames.astype(np.float32)])
        mask = object_mask(luma)
        averages[r["latent"]].append(mask.mean(axis=0))
        motion_hits.append(direction_class(mask, 2) == r["latent"])
    assert np.mean(motion_hits) > 0.95
    assert nearest_class_mean_accuracy(np.stack(averages[0]), np.stack(averages[1])) < 0.75


# ----------------------------------------------------------------------------------------------------
# command line


def test_cli_help_only_and_summary(tmp_path, capsys):
    parser = synth.build_parser()
    assert all(action.help for action in parser._actions)
    help_text = subprocess.run([sys.executable, str(ROOT / "synth.py"), "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "python synth.py --out" in help_text
    records = synth.run(synth.parse_args(["--out", str(tmp_path), "--only", "hmdb51", "--classes", "2",
                                          "--hmdb-clips-per-class", "2", "--size", "32", "--eval-seconds", "0.5"]))
    assert {r["dataset"] for r in records} == {"hmdb51"} and len(records) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hmdb51", "synth_manifest.jsonl", "synth_state.json"]
    manifest = [json.loads(line) for line in (tmp_path / "synth_manifest.jsonl").read_text().splitlines()]
    assert manifest == json.loads(json.dumps(records))
    assert "hmdb51" in capsys.readouterr().out
    for bad in (["--classes", "3"], ["--only", "kinetics"], ["--ucf-groups", "2"]):
        with pytest.raises(SystemExit):
            synth.parse_args(["--out", str(tmp_path)] + bad)


def test_rerun_reuses_replaces_or_refuses(tmp_path):
    base = ["--out", str(tmp_path), "--classes", "2", "--size", "32", "--eval-seconds", "0.5",
            "--hmdb-clips-per-class", "2", "--ucf-groups", "3", "--ucf-clips-per-group", "1", "--workers", "1"]
    first = synth.run(synth.parse_args(base + ["--only", "ucf101,hmdb51"]))
    marker = tmp_path / "hmdb51" / "videos" / "marker.avi"
    marker.write_bytes(b"")
    # same flags: up to date, nothing rewritten (prepare's cache inside the folder would survive)
    assert synth.run(synth.parse_args(base + ["--only", "ucf101,hmdb51"])) == first and marker.exists()
    # other flags for hmdb51 only: that folder is replaced whole (no stale files), ucf101 is kept
    records = synth.run(synth.parse_args(base + ["--only", "hmdb51", "--seed", "1"]))
    assert not marker.exists() and (tmp_path / "ucf101" / "UCF-101").is_dir()
    manifest = [json.loads(line) for line in (tmp_path / "synth_manifest.jsonl").read_text().splitlines()]
    assert [r for r in manifest if r["dataset"] == "ucf101"] == [r for r in first if r["dataset"] == "ucf101"]
    assert [r for r in manifest if r["dataset"] == "hmdb51"] == records != [r for r in first if r["dataset"] == "hmdb51"]
    # --overwrite regenerates an up-to-date folder; an interrupted run's folder is replaced
    marker.write_bytes(b"")
    synth.run(synth.parse_args(base + ["--only", "hmdb51", "--seed", "1", "--overwrite"]))
    assert not marker.exists()
    state = json.loads((tmp_path / "synth_state.json").read_text())
    state["hmdb51"]["complete"] = False
    (tmp_path / "synth_state.json").write_text(json.dumps(state))
    marker.write_bytes(b"")
    assert synth.run(synth.parse_args(base + ["--only", "hmdb51", "--seed", "1"])) == records and not marker.exists()
    # a folder synth did not write is never replaced, --overwrite or not
    real = tmp_path / "real"
    (real / "hmdb51").mkdir(parents=True)
    with pytest.raises(SystemExit):
        synth.run(synth.parse_args(["--out", str(real), "--only", "hmdb51", "--overwrite"]))
    assert (real / "hmdb51").is_dir()

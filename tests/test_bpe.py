"""BPETokenizer: worked examples, the fast trainer against the naive one, round-trips (incl. property-based), save/load.

Real data: tests/data/titles_ascii_2000.txt (first 2000 lines of shared/data/titles/youtube_trending_titles_ascii.txt)
and tests/data/titles_unicode_300.txt (the first 300 non-ASCII titles of youtube_trending_titles.txt).
"""
import logging
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from bpe import BPETokenizer, get_stats, merge, write_atomic

DATA = Path(__file__).resolve().parent / "data"


def read_lines(name):
    return (DATA / name).read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def titles():
    return read_lines("titles_ascii_2000.txt")


@pytest.fixture(scope="module")
def tok(titles):
    """Trained on ASCII titles plus the Unicode ones, so merges inside multi-byte characters exist too."""
    return BPETokenizer().train(titles + read_lines("titles_unicode_300.txt"), vocab_size=1500)


# ---- worked examples -------------------------------------------------------------------------------
def test_helper_worked_examples():
    assert get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert get_stats([7, 7, 7], {(7, 7): 1}, weight=10) == {(7, 7): 21}
    assert get_stats([5]) == {}
    assert merge([1, 2, 3, 1, 2], (1, 2), 4) == [4, 3, 4]
    assert merge([7, 7, 7], (7, 7), 9) == [9, 7]
    assert merge([7, 7, 7, 7], (7, 7), 9) == [9, 9]


def test_wikipedia_example(caplog):
    # aaabdaaabac -> ZabdZabac -> ZYdZYac -> XdXac, then no pair repeats
    with caplog.at_level(logging.WARNING):
        tok = BPETokenizer().train(["aaabdaaabac"], vocab_size=48000)
    a, b, c, d = (ord(ch) for ch in "abcd")
    assert tok.merges == [(a, a), (a, b), (256, 257)]
    assert "no pair occurs twice after 3 merges" in caplog.text
    assert (tok.vocab_size, tok.eot_id, tok.pad_id) == (261, 259, 260)  # specials right after the last merge
    assert tok.encode("aaabdaaabac") == [258, d, 258, a, c]
    assert tok.decode([258]) == "aaab"


def test_tie_break_is_highest_count_then_smallest_pair():
    x, y, a, b = (ord(ch) for ch in "xyab")
    # (x, y) twice and (a, b) twice: equal counts, (97, 98) < (120, 121) whatever the input order
    for texts in (["xy", "xy", "ab", "ab"], ["ab", "xy", "ab", "xy"], ["xy", "ab", "xy", "ab"]):
        assert BPETokenizer().train(texts, 258 + 1).merges == [(a, b)]
    # a higher count beats smaller ids
    assert BPETokenizer().train(["xy"] * 3 + ["ab"] * 2, 258 + 1).merges == [(x, y)]
    # overlapping pairs count as get_stats counts them: "aaa" holds (a, a) twice, beating (x, y) = 1 + 0
    assert BPETokenizer().train(["aaa", "xy", "xy"], 258 + 1).merges == [(a, a)]


def test_merges_never_cross_presplit_boundaries():
    tok = BPETokenizer().train(["the cat. the cat. the cat."] * 5, vocab_size=400)
    for i in range(256, 256 + len(tok.merges)):
        word = tok.decode([i])
        assert regex.findall(tok.pattern, word) == [word], word


# ---- the incremental trainer against the naive one (the definition) -----------------------------------
def segment(word_bytes, merges):
    """A word's ids after applying `merges` in the order learned, each everywhere: what training leaves."""
    ids = list(word_bytes)
    for k, pair in enumerate(merges):
        ids = merge(ids, pair, 256 + k)
    return ids


def test_train_matches_naive_on_real_titles(titles):
    vocab_size = 256 + 300 + 2
    tok = BPETokenizer().train(titles, vocab_size)
    naive = BPETokenizer().train_naive(titles, vocab_size)
    assert len(naive.merges) == 300 and tok.merges == naive.merges
    # encoding a training word by merge rank reproduces the trainer's final segmentation of that word
    words = sorted({w for t in titles for w in regex.findall(tok.pattern, t)})
    for word in words[::7]:
        assert tok.encode(word) == segment(word.encode(), tok.merges), word


@pytest.mark.parametrize("texts", [
    ["aaaa"], ["aaaaa", "aaa"], ["a" * 9, "aa aa"],       # overlaps: (a, a) inside runs of a, odd and even
    ["abab", "baba", "abba"],                             # overlapping candidates (a, b) and (b, a) tie
    ["xy", "ab", "xy", "ab"], ["ab", "xy", "ab", "xy"],   # ties broken by the smallest pair, whatever the order
    ["aaabdaaabac"], ["hello hello", "world"],            # early stop: no pair left that occurs twice
    ["\u00e9\u00e9\u00e9 \ud83d\ude00\ud83d\ude00 \udc80\udc80", "\u65e5\u672c\u65e5\u672c"],   # multi-byte, surrogates
    [], [""],
])
def test_train_matches_naive_on_edge_cases(texts):
    for vocab_size in (259, 262, 300):
        assert BPETokenizer().train(texts, vocab_size).merges == BPETokenizer().train_naive(texts, vocab_size).merges


def test_train_is_independent_of_text_order(titles):
    shuffled = titles[:500]
    random.Random(0).shuffle(shuffled)
    assert BPETokenizer().train(shuffled, 600).merges == BPETokenizer().train(titles[:500], 600).merges


def test_early_stop_on_small_corpus(caplog):
    with caplog.at_level(logging.WARNING):
        tok = BPETokenizer().train(["hello hello", "world"], vocab_size=48000)
    assert "stopping at vocab_size" in caplog.text
    # only pairs with count >= 2 were merged: "hello" and " hello" share h-e-l-l-o
    assert tok.vocab_size == 256 + len(tok.merges) + 2 < 48000
    assert (tok.eot_id, tok.pad_id) == (tok.vocab_size - 2, tok.vocab_size - 1)
    assert tok.decode([256 + len(tok.merges) - 1]) == "hello"
    assert BPETokenizer().train([], vocab_size=1000).vocab_size == 258
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer().train(["abc"], vocab_size=257)
    with pytest.raises(TypeError):
        BPETokenizer().train("not a list", vocab_size=300)


# ---- round-trips -----------------------------------------------------------------------------------
ROUND_TRIP_CASES = [
    "", " ", "a", "hello world", "  leading and trailing  ", "\n\n\r\n\t\x0b\x0c",
    "Hello 😀 world 👩‍👩‍👧 🇯🇵",                                   # emoji, ZWJ sequence, flag
    "日本語のタイトル 中文标题 한국어",                              # CJK
    "e\u0301 n\u0303 \u0301\u0301 a\u20dd",                     # combining marks, also with no base letter
    "\x00\x01\x1f\x7f\x80\x9f",                                 # C0/C1 controls
    "\ud800", "\udfff", "a\udc80b", "\ud83d\ude00", "\ude00\ud83d",  # lone / paired / reversed surrogates
    "\ufffd\ufeff\u200b\u2028\u2029\U0010ffff",                 # replacement char, BOM, separators, max code point
    "<|endoftext|><|pad|>",                                     # special names are plain text
    "don't I'LL we've 12345678 3.14159 $$$ --- !!!",
    "x" * 2000,
]


@pytest.mark.parametrize("text", ROUND_TRIP_CASES)
def test_round_trip_cases(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.eot_id for i in ids)                # never a special token
    assert tok.decode(ids) == text
    assert BPETokenizer().decode(BPETokenizer().encode(text)) == text   # untrained = plain bytes
    assert len(ids) <= len(text.encode("utf-8", "surrogatepass"))


def test_round_trip_real_titles_and_compression(tok, titles):
    for t in titles[:500] + read_lines("titles_unicode_300.txt"):
        assert tok.decode(tok.encode(t)) == t
    n_bytes = sum(len(t.encode()) for t in titles)
    n_tokens = sum(len(tok.encode(t)) for t in titles)
    assert 2.2 < n_bytes / n_tokens < 4  # 1,242 merges, in-domain text: 2.43 bytes per token (bytes alone: 1.0)


def test_specials_are_never_encoded_and_decode_by_name(tok):
    text = "<|endoftext|>"
    assert tok.eot_id not in tok.encode(text) and tok.pad_id not in tok.encode(text)
    ids = tok.encode("hi") + [tok.eot_id, tok.pad_id]
    assert tok.decode(ids) == "hi<|endoftext|><|pad|>"
    assert tok.decode(ids, skip_special=True) == "hi"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])


# characters from everywhere (incl. surrogates, which st.characters() leaves out by default), with extra
# weight on surrogates and on characters at pre-split boundaries
any_char = st.one_of(
    st.characters(codec=None, exclude_categories=()),
    st.characters(categories=["Cs"]),
    st.sampled_from(list(" \n\r\t'sé\u0301😀日1a.") + ["\u200d"]),
)


@settings(max_examples=300, deadline=None)
@given(text=st.text(any_char, max_size=40))
def test_round_trip_property(tok, text):
    assert tok.decode(tok.encode(text)) == text
    # pre-split covers the text: merging stays inside words, so concatenation encodes piecewise
    words = regex.findall(tok.pattern, text)
    assert "".join(words) == text
    assert tok.encode(text) == [i for w in words for i in tok.encode(w)]


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 1499), max_size=30))
def test_decode_any_ids_never_raises(tok, ids):
    # sampled ids can form invalid UTF-8: decode must still return a str (U+FFFD), never raise
    assert isinstance(tok.decode(ids), str)


# ---- encode_title ----------------------------------------------------------------------------------
def test_encode_title_pads_truncates_and_ends_with_eot(tok):
    ids, n = tok.encode_title("Official Trailer", max_len=128)
    body = tok.encode("Official Trailer")
    assert ids.dtype == np.int32 and ids.shape == (128,)
    assert n == len(body) + 1
    assert ids[:n].tolist() == body + [tok.eot_id]
    assert (ids[n:] == tok.pad_id).all()

    long = "word " * 500
    ids, n = tok.encode_title(long, max_len=16)
    assert n == 16 and ids.tolist() == tok.encode(long)[:15] + [tok.eot_id]

    ids, n = tok.encode_title("", max_len=4)
    assert n == 1 and ids.tolist() == [tok.eot_id] + [tok.pad_id] * 3
    with pytest.raises(ValueError):
        tok.encode_title("x", max_len=0)


# ---- save / load -----------------------------------------------------------------------------------
def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.bpe"
    tok.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.pattern == tok.pattern
    assert (loaded.vocab_size, loaded.eot_id, loaded.pad_id) == (tok.vocab_size, tok.eot_id, tok.pad_id)
    assert [loaded.decode([i]) for i in range(loaded.vocab_size)] == [tok.decode([i]) for i in range(tok.vocab_size)]
    for text in ROUND_TRIP_CASES + read_lines("titles_unicode_300.txt")[:50]:
        assert loaded.encode(text) == tok.encode(text)

    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "lava-bpe v1" and lines[1] == f"pattern {tok.pattern}"
    assert lines[2:5] == [f"special <|endoftext|> {tok.eot_id}", f"special <|pad|> {tok.pad_id}",
                          f"merges {len(tok.merges)}"]
    assert len(lines) == 5 + len(tok.merges)

    vocab = (tmp_path / "tokenizer.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == tok.vocab_size  # one line per id
    assert vocab[32] == "32 ' '" and vocab[10] == "10 '\\n'" and vocab[0xC3] == "195 '\ufffd'"
    assert vocab[-2] == f"{tok.eot_id} <|endoftext|>"
    a, b = tok.merges[0]
    assert vocab[256] == f"256 {tok.decode([256])!r} <- {tok.decode([a])!r} + {tok.decode([b])!r}"
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def test_write_atomic_failing_mid_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "tokenizer.vocab"
    write_atomic(path, "old\n")
    with pytest.raises(UnicodeEncodeError):  # raised once the temp file is open, as a Ctrl-C mid-write would be
        write_atomic(path, "new " + "\udc80" + "\n")
    assert path.read_text(encoding="utf-8") == "old\n" and list(tmp_path.iterdir()) == [path]


def test_pickle_keeps_merges(tok):
    clone = pickle.loads(pickle.dumps(tok))  # e.g. for prepare's worker processes
    assert clone.merges == tok.merges and clone.encode("Official Trailer 2018") == tok.encode("Official Trailer 2018")


def test_load_rejects_other_files(tok, tmp_path):
    path = tmp_path / "tokenizer.bpe"
    tok.save(path)
    good = path.read_text(encoding="utf-8").splitlines()
    bad_files = {
        "version": ["lava-bpe v2"] + good[1:],
        "truncated": good[:-3],
        "special": good[:2] + ["special <|endoftext|> 7"] + good[3:],
        "forward reference": good[:5] + [f"{256 + len(tok.merges)} 97"] + good[6:],
        "empty": [],
    }
    for why, lines in bad_files.items():
        bad = tmp_path / f"{why}.bpe"
        bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=str(bad)):
            BPETokenizer.load(bad)

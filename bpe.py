"""bpe.py: the byte-level BPE tokenizer that turns a video's title into the text encoder's input (LAVA Section 3).

    from bpe import BPETokenizer
    tok = BPETokenizer().train(titles, vocab_size=48000)   # the paper's vocabulary size; prepare.py does this
    ids, n = tok.encode_title("a dog catching a frisbee")   # (128,) int32 ids, n of them text + eot
    tok.save("tokenizer.bpe")                               # plus a human-readable tokenizer.vocab

What a title becomes (GPT-2/GPT-4-style byte-level BPE, as minbpe writes it):
  1. pre-split: the title -> "words" by GPT4_SPLIT_PATTERN ("Official Trailer 2018" -> "Official" " Trailer"
     " " "201" "8"); merges never cross a word boundary;
  2. each word -> its UTF-8 bytes, ids 0..255 (lone surrogates too, see "Round-trip" below);
  3. training merges the most frequent adjacent pair into a new id (256, 257, ...), again and again:
     `train_naive` is that loop written plainly (the definition), `train` the same merges, fast (tested);
  4. encoding applies the learned merges to each word, earliest learned first;
  5. encode_title: those ids + eot, truncated to 128 and padded with pad: the text encoder's (128,) input.
Ids: 0..255 bytes, 256..256+M-1 the M merges, then eot = 256+M and pad = 257+M (the top two ids), so
vocab_size = 256 + M + 2 is the ACTUAL size: smaller than asked when the corpus runs out of repeated pairs.
"""
import codecs
import heapq
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import regex

# GPT-4's split pattern (cl100k_base): contractions ('s 't 're 've 'm 'll 'd, any case); a letter run
# with at most one leading non-letter/non-digit (" the", "(Official"); digit runs of at most 3
# ("2018" -> "201" "8"); a punctuation run with an optional leading space (" --", "!!"); newlines;
# other whitespace, leaving one space to lead the next word. Every character matches one branch
# (letters, digits, whitespace, or the "anything else" branch, which takes marks, controls and
# surrogates), so "".join(findall(s)) == s and nothing is ever dropped.
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                      r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
BPE_FORMAT = "lava-bpe v1"  # first line of a saved tokenizer; bump when the format changes
BPE_SPECIALS = ("<|endoftext|>", "<|pad|>")  # eot, pad: the two ids above the last merge
_BPE_ERRORS = "lava_bpe_surrogatepass_replace"
_bpe_log = logging.getLogger("bpe")


def get_stats(ids, counts=None, weight=1):
    """Count adjacent pairs (overlapping) in `ids`, adding `weight` per occurrence into `counts`.

    get_stats([1, 2, 3, 1, 2]) -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    get_stats([7, 7, 7], {(7, 7): 1}, weight=10) -> {(7, 7): 21}      # "aaa" holds "aa" twice
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids, pair, idx):
    """Replace every occurrence of `pair` in `ids` by `idx`, scanning left to right without overlap.

    merge([1, 2, 3, 1, 2], (1, 2), 4) -> [4, 3, 4]
    merge([7, 7, 7], (7, 7), 9) -> [9, 7]                             # leftmost occurrence wins
    """
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class BPETokenizer:
    """Byte-level BPE: `train_naive` / `train`, `encode`, `decode`, `encode_title`, `save`, `BPETokenizer.load`.

    tok.encode("hello world") -> e.g. 2 ids, "hello" and " world" (a pre-split word each); decode inverts it.
    An untrained tokenizer is plain bytes (vocab_size 258). encode never produces eot/pad, even for
    the text "<|endoftext|>"; decode renders them by name (or drops them with skip_special=True).
    """

    _CACHE_MAX = 1 << 20  # distinct words cached (~150 MB worst case); 27,907 titles hold ~47k

    def __init__(self, pattern=GPT4_SPLIT_PATTERN):
        self.pattern = pattern
        self._split = regex.compile(pattern).findall
        self._set_merges([])

    def _set_merges(self, merges):
        """Install merges [(a, b), ...] (merge i creates id 256 + i) and rebuild the derived tables."""
        self.merges = [tuple(m) for m in merges]
        self._ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}  # pair -> new id (= rank)
        self._vocab = [bytes([i]) for i in range(256)]                         # id -> bytes
        for a, b in self.merges:
            self._vocab.append(self._vocab[a] + self._vocab[b])
        self._cache = {}  # word (str) -> list of ids; cleared when it grows past _CACHE_MAX

    # pickling (e.g. for worker processes) keeps the pattern and merges and rebuilds the rest
    def __getstate__(self):
        return {"pattern": self.pattern, "merges": self.merges}

    def __setstate__(self, state):
        self.__init__(state["pattern"])
        self._set_merges(state["merges"])

    @property
    def vocab_size(self):
        return 256 + len(self.merges) + len(BPE_SPECIALS)

    @property
    def eot_id(self):
        return self.vocab_size - 2

    @property
    def pad_id(self):
        return self.vocab_size - 1

    # ---- training ----------------------------------------------------------------------------------
    def train_naive(self, texts, vocab_size):
        """Learn vocab_size - 258 merges from `texts` (an iterable of str) the plain way; returns self.

        The definition of training, minbpe's teaching loop: every step recounts the adjacent pairs of every
        distinct word (weighted by how often the word occurs) and merges the winner everywhere. `train`
        must give exactly these merges (tests/test_bpe.py); this loop costs a pass over the corpus per
        merge, fine for a few hundred merges, far too slow for the paper's 48,000.

        Tie-break: the pair with the highest count wins; among equal counts, the smallest pair (a, b)
        in id order (compare a, then b). Counts are over overlapping pairs, as get_stats counts them.
        So the result does not depend on the order of `texts`. Stops early, with a logged warning,
        when no pair occurs twice (a merge that would be used once only memorises the corpus).

        Worked example (Wikipedia's): "aaabdaaabac" -> merge (a, a) -> Z: "ZabdZabac"; (Z, a) and
        (a, b) both count 2, (a, b) = (97, 98) is smaller than (256, 97) -> Y: "ZYdZYac"; (Z, Y) -> X:
        "XdXac"; no pair repeats, stop: merges [(97, 97), (97, 98), (256, 257)], vocab_size 261.
        """
        num_merges, words, freqs = self._distinct_words(texts, vocab_size)
        merges = []
        while len(merges) < num_merges:
            counts = {}
            for word, n in zip(words, freqs):
                get_stats(word, counts, weight=n)
            if not counts or max(counts.values()) < 2:
                break
            pair = min(counts, key=lambda p: (-counts[p], p))  # the highest count, then the smallest pair
            merges.append(pair)
            words = [merge(word, pair, 255 + len(merges)) for word in words]
        return self._install_trained(merges, vocab_size)

    def train(self, texts, vocab_size):
        """Learn the merges of `train_naive` (same arguments, tie-break and early stop), fast; returns self.

        Pair counts are kept up to date instead of recounted: merging (a, b) visits only the words that
        held it (`where`) and adjusts the counts of the neighbouring pairs; the best pair comes from a
        max-heap whose stale entries (count since decreased) are re-pushed with the current count.
        """
        num_merges, words, freqs = self._distinct_words(texts, vocab_size)

        # counts[pair] = weighted occurrences; where[pair] = indices of words that hold it (a superset:
        # entries are not removed when a word loses the pair, the scan below simply finds nothing)
        counts, where = {}, defaultdict(set)
        for wi, (word, n) in enumerate(zip(words, freqs)):
            get_stats(word, counts, weight=n)
            for pair in zip(word, word[1:]):
                where[pair].add(wi)
        heap = [(-c, pair) for pair, c in counts.items()]  # (-count, pair): heapq is a min-heap
        heapq.heapify(heap)

        merges = []
        while len(merges) < num_merges:
            # surface the true best pair: an entry is current when its count equals counts[pair]
            while heap:
                neg, pair = heap[0]
                c = counts.get(pair, 0)
                if c == -neg:
                    break
                if c > 0:
                    heapq.heapreplace(heap, (-c, pair))
                else:
                    heapq.heappop(heap)
            if not heap or -heap[0][0] < 2:
                break
            pair = heapq.heappop(heap)[1]
            a, b = pair
            new = 256 + len(merges)
            merges.append(pair)
            born = set()  # pairs that contain `new`: pushed once their counts are final
            for wi in where.pop(pair):
                w, n = words[wi], freqs[wi]
                i = 0
                while i < len(w) - 1:
                    if w[i] == a and w[i + 1] == b:
                        # ... p [a b] q ...  ->  ... p new q ...: (p,a) and (b,q) go, (p,new) and (new,q) come.
                        # Exact for overlaps too: in "aaaa" with (a, a), the second match's p is the `new`
                        # just made, and the (new, a) it takes back is the one the first match added.
                        if i > 0:
                            p = w[i - 1]
                            counts[p, a] -= n
                            pn = (p, new)
                            counts[pn] = counts.get(pn, 0) + n
                            where[pn].add(wi)
                            born.add(pn)
                        if i + 2 < len(w):
                            q = w[i + 2]
                            counts[b, q] -= n
                            nq = (new, q)
                            counts[nq] = counts.get(nq, 0) + n
                            where[nq].add(wi)
                            born.add(nq)
                        w[i] = new
                        del w[i + 1]
                    i += 1
            del counts[pair]  # every occurrence is gone; (a, b) can never become adjacent again
            for p in born:
                c = counts[p]
                if c > 0:
                    heapq.heappush(heap, (-c, p))
        return self._install_trained(merges, vocab_size)

    def _distinct_words(self, texts, vocab_size):
        """-> (merges to learn, distinct words of `texts` as lists of byte ids, how often each occurs)."""
        if vocab_size < 256 + len(BPE_SPECIALS):
            raise ValueError(f"vocab_size must be >= {256 + len(BPE_SPECIALS)} (bytes + specials), got {vocab_size}")
        if isinstance(texts, str):
            raise TypeError("train() takes an iterable of texts, not one str")
        word_counts = Counter()
        for text in texts:
            word_counts.update(self._split(text))
        words, freqs = [], []
        for word, n in word_counts.items():
            b = word.encode("utf-8", "surrogatepass")
            if len(b) > 1:  # a 1-byte word has no pair and can be dropped
                words.append(list(b))
                freqs.append(n)
        return vocab_size - 256 - len(BPE_SPECIALS), words, freqs

    def _install_trained(self, merges, vocab_size):
        """Set the learned merges (both trainers end here), warning when fewer were found than asked."""
        if len(merges) < vocab_size - 256 - len(BPE_SPECIALS):
            _bpe_log.warning("bpe: no pair occurs twice after %d merges; stopping at vocab_size %d "
                             "(asked %d)", len(merges), 256 + len(merges) + len(BPE_SPECIALS), vocab_size)
        self._set_merges(merges)
        return self

    # ---- encoding / decoding -------------------------------------------------------------------------
    def _encode_word(self, word_bytes):
        """Apply merges to one word by rank: repeatedly merge the adjacent pair learned earliest."""
        ids = list(word_bytes)
        ranks = self._ranks
        while len(ids) > 1:
            best, best_rank = None, None
            for pair in zip(ids, ids[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            ids = merge(ids, best, best_rank)
        return ids

    def encode(self, text):
        """str -> list of ids (never eot/pad). Each pre-split word is looked up in a per-word cache."""
        cache = self._cache
        if len(cache) > self._CACHE_MAX:
            cache.clear()
        out = []
        for word in self._split(text):
            ids = cache.get(word)
            if ids is None:
                ids = cache[word] = self._encode_word(word.encode("utf-8", "surrogatepass"))
            out.extend(ids)
        return out

    def decode(self, ids, skip_special=False):
        """ids -> str. Exact inverse of encode; for other id lists, invalid UTF-8 becomes U+FFFD."""
        vocab, n = self._vocab, len(self._vocab)
        parts = []
        for i in ids:
            i = int(i)
            if 0 <= i < n:
                parts.append(vocab[i])
            elif n <= i < self.vocab_size:
                if not skip_special:
                    parts.append(BPE_SPECIALS[i - n].encode())
            else:
                raise ValueError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
        return b"".join(parts).decode("utf-8", _BPE_ERRORS)

    def encode_title(self, title, max_len=128):
        """Title -> (ids (max_len,) int32, n_tokens): encode(title)[:max_len - 1] + [eot], then pad.

        n_tokens counts the eot, so ids[:n_tokens] is the text part and ids[n_tokens:] == pad_id; the
        attention mask is `arange(max_len) < n_tokens`. E.g. with max_len 4 and encode(t) == [5, 6]:
        ([5, 6, eot, pad], 3); with encode(t) == [5, 6, 7, 8]: ([5, 6, 7, eot], 4).
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ids = self.encode(title)[:max_len - 1]
        ids.append(self.eot_id)
        out = np.full(max_len, self.pad_id, dtype=np.int32)
        out[:len(ids)] = ids
        return out, len(ids)

    # ---- save / load ---------------------------------------------------------------------------------
    def save(self, path):
        """Write `path` (the model, e.g. tokenizer.bpe) and `path` with suffix .vocab (for people).

        Model file, UTF-8 text, one item per line:
            lava-bpe v1
            pattern <the split regex, verbatim>
            special <|endoftext|> <eot id>
            special <|pad|> <pad id>
            merges <M>
            <a> <b>            M lines: merge i makes id 256 + i from ids a and b
        Both files are written to a temp name and renamed, so a reader never sees half a file.
        """
        path = Path(path)
        if "\n" in self.pattern or "\r" in self.pattern:
            raise ValueError("the split pattern must not hold a literal newline (write it as \\n in the regex)")
        lines = [BPE_FORMAT, f"pattern {self.pattern}"]
        lines += [f"special {name} {256 + len(self.merges) + k}" for k, name in enumerate(BPE_SPECIALS)]
        lines.append(f"merges {len(self.merges)}")
        lines += [f"{a} {b}" for a, b in self.merges]
        write_atomic(path, "\n".join(lines) + "\n")

        # vocab file: "id [token]" for bytes, "id [token] <- [a] + [b]" for merges, then the specials
        vlines = [f"# {BPE_FORMAT} vocabulary of {path.name}: {self.vocab_size} ids; tokens in [...], "
                  "non-printable bytes as \\xNN"]
        vlines += [f"{i} [{render_token(self._vocab[i])}]" for i in range(256)]
        vlines += [f"{256 + k} [{render_token(self._vocab[256 + k])}] <- [{render_token(self._vocab[a])}] + "
                   f"[{render_token(self._vocab[b])}]" for k, (a, b) in enumerate(self.merges)]
        vlines += [f"{self.eot_id} {BPE_SPECIALS[0]} (special: end of text)",
                   f"{self.pad_id} {BPE_SPECIALS[1]} (special: padding)"]
        write_atomic(path.with_suffix(".vocab"), "\n".join(vlines) + "\n")

    @classmethod
    def load(cls, path):
        """Read a file written by save(); raises ValueError naming the file and line when it is not one."""
        path = Path(path)
        lines = path.read_text(encoding="utf-8").split("\n")

        def fail(lineno, why):
            raise ValueError(f"{path}:{lineno}: {why} (expected a '{BPE_FORMAT}' tokenizer written by save())")

        if lines[0] != BPE_FORMAT:
            fail(1, f"first line is {lines[0][:40]!r}")
        if len(lines) < 5:
            fail(len(lines), "file ends before the 'merges <count>' line")
        if not lines[1].startswith("pattern "):
            fail(2, "no 'pattern' line")
        tok = cls(pattern=lines[1][len("pattern "):])
        head = lines[4].split()
        if len(head) != 2 or head[0] != "merges" or not head[1].isdigit():
            fail(5, "no 'merges <count>' line")
        num_merges = int(head[1])
        for k, name in enumerate(BPE_SPECIALS):
            if lines[2 + k] != f"special {name} {256 + num_merges + k}":
                fail(3 + k, f"expected 'special {name} {256 + num_merges + k}'")
        body = [ln for ln in lines[5:] if ln]
        if len(body) != num_merges:
            fail(6, f"header says {num_merges} merges, file has {len(body)}")
        merges = []
        for k, ln in enumerate(body):
            parts = ln.split()
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or max(map(int, parts)) >= 256 + k:
                fail(6 + k, f"bad merge {ln!r} (two ids below {256 + k})")
            merges.append((int(parts[0]), int(parts[1])))
        tok._set_merges(merges)
        return tok


# ----------------------------------------------------------------------------------------------------
# Machinery: the round-trip codec, the .vocab file's token rendering, atomic writes

# Round-trip: decode(encode(s)) == s for every Python str. A str may hold lone surrogates
# (U+D800..U+DFFF, e.g. from os.fsdecode or a broken JSON "\ud83d"), which strict UTF-8 cannot encode.
# We encode with "surrogatepass" (a surrogate becomes the 3 bytes ED A0..BF 80..BF, as in CESU-8) and
# decode with "lava_bpe_surrogatepass_replace": surrogatepass for those 3-byte forms, U+FFFD for any
# other invalid byte sequence (which only arbitrary id lists, e.g. sampled ones, can produce).
# "surrogateescape" would not do: it only encodes U+DC80..U+DCFF and maps them onto single bytes that
# collide with the bytes of real invalid input.
def _surrogatepass_or_replace(exc):
    """Codec error handler: decode a CESU-style surrogate (ED A0 80 -> U+D800), else U+FFFD."""
    try:
        return codecs.lookup_error("surrogatepass")(exc)
    except UnicodeError:
        return "\ufffd", exc.end


codecs.register_error(_BPE_ERRORS, _surrogatepass_or_replace)


def write_atomic(path, text):
    """Write a text file so that readers see all of it or none (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def render_token(token: bytes) -> str:
    r"""Printable form of a token's bytes for the .vocab file: UTF-8 text where it decodes, escapes
    elsewhere, so that each token stays on one line and invisible characters show. Inputs are Python
    literals, outputs the text as written to the file:

    render_token(b" the")             -> " the"
    render_token(b"\xe2\x80")         -> "\xe2\x80"   (half of a 3-byte character: the raw bytes)
    render_token("\n\u00e9".encode()) -> "\x0aé"       (a control character is escaped, é is shown)
    render_token(b"a\\b")             -> "a\\b"        (a real backslash is doubled, so escapes are unambiguous)
    """
    out = []
    # surrogateescape turns each undecodable byte into U+DC80..U+DCFF so it can be told apart below
    for ch in token.decode("utf-8", "surrogateescape"):
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:
            out.append(f"\\x{cp - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch == " " or ch.isprintable():
            out.append(ch)
        else:  # control, format, line/paragraph separators, unassigned, ...
            out.append(f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}")
    return "".join(out)

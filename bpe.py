"""bpe.py: the byte-level BPE tokenizer that turns a video's title into the text encoder's input (LAVA Section 3).

    tok = BPETokenizer().train(titles, vocab_size=48000)   # the paper's vocabulary size; prepare.py does this
    ids, n = tok.encode_title("a dog catching a frisbee")   # (128,) int32 ids, n of them text + eot
    tok.save("tokenizer.bpe")                               # plus a human-readable tokenizer.vocab

Byte-level BPE as in GPT-2/GPT-4 and minbpe: GPT4_SPLIT_PATTERN pre-splits a title into "words" that merges never
cross ("Official Trailer 2018" -> "Official" " Trailer" " " "201" "8"); a word starts as its UTF-8 bytes (ids 0..255);
training merges the most frequent adjacent pair into a new id (256, 257, ...), again and again; encoding applies the
merges to each word, earliest learned first. Ids: 256 bytes, M merges, eot = 256 + M, pad = 257 + M; vocab_size =
258 + M is the ACTUAL size (less than asked when no pair repeats any more). Untrained, the tokenizer is plain bytes.
"""
import heapq
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import regex

# GPT-4's split pattern (cl100k_base): contractions; letters after at most one non-letter/non-digit (" the");
# up to 3 digits; punctuation after an optional space; newlines; whitespace. Every character matches a branch.
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                      r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
BPE_FORMAT = "lava-bpe v1"  # first line of a saved tokenizer; bump when the format changes
BPE_SPECIALS = ("<|endoftext|>", "<|pad|>")  # eot, pad: the two ids above the last merge
BPE_CACHE_MAX = 1 << 20  # distinct words encode() caches (~150 MB worst case); 27,907 titles hold ~47k


def get_stats(ids, counts=None, weight=1):
    """Count adjacent pairs (overlapping) in `ids`, adding `weight` per occurrence into `counts`:
    get_stats([1, 2, 3, 1, 2]) -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    get_stats([7, 7, 7], {(7, 7): 1}, weight=10) -> {(7, 7): 21}  ("aaa" holds "aa" twice)"""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids, pair, idx):
    """Replace every occurrence of `pair` in `ids` by `idx`, scanning left to right without overlap:
    merge([1, 2, 3, 1, 2], (1, 2), 4) -> [4, 3, 4]
    merge([7, 7, 7], (7, 7), 9) -> [9, 7]  (the leftmost occurrence wins)"""
    out, i, n = [], 0, len(ids)
    while i < n:
        hit = i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]
        out.append(idx if hit else ids[i])
        i += 2 if hit else 1
    return out


class BPETokenizer:
    def __init__(self, pattern=GPT4_SPLIT_PATTERN, merges=()):
        self.pattern, self._split = pattern, regex.compile(pattern).findall
        self._set_merges(merges)

    def _set_merges(self, merges, asked=None):
        """Install merges [(a, b), ...] (merge i makes id 256 + i), build the tables -> self; trainers pass `asked`."""
        self.merges = [tuple(m) for m in merges]
        self.vocab_size = 256 + len(self.merges) + len(BPE_SPECIALS)
        if asked is not None and self.vocab_size < asked:
            logging.getLogger(__name__).warning("bpe: no pair occurs twice after %d merges; stopping at vocab_size"
                                                " %d (asked %d)", len(self.merges), self.vocab_size, asked)
        self.eot_id, self.pad_id = self.vocab_size - 2, self.vocab_size - 1
        self._ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}  # pair -> new id (= rank)
        self._vocab = [bytes([i]) for i in range(256)]  # id -> bytes; the specials (appended below) by name
        for a, b in self.merges:
            self._vocab.append(self._vocab[a] + self._vocab[b])
        self._vocab += [name.encode() for name in BPE_SPECIALS]
        self._cache = {}  # word (str) -> list of ids; cleared when it grows past BPE_CACHE_MAX
        return self

    def __reduce__(self):  # pickling (e.g. for worker processes) sends the pattern and merges, rebuilds the rest
        return type(self), (self.pattern, self.merges)

    def train_naive(self, texts, vocab_size):
        """Learn vocab_size - 258 merges from `texts` (an iterable of str) the plain way; returns self.

        minbpe's teaching loop, the definition of training: each step recounts the pairs of every distinct word
        (weighted by its count) and merges the winner everywhere. Tie-break: the highest count, then the smallest pair
        (a, b), pairs overlapping as in get_stats (so the order of `texts` does not matter). Stops early, logged, when
        no pair occurs twice (it would memorise). Worked example (Wikipedia's): "aaabdaaabac" -> merge (a, a) -> Z:
        "ZabdZabac"; (Z, a) and (a, b) both count 2, (a, b) = (97, 98) is smaller than (256, 97) -> Y: "ZYdZYac";
        (Z, Y) -> X: "XdXac"; no pair repeats, stop: merges [(97, 97), (97, 98), (256, 257)], vocab_size 261.
        """
        num_merges, words, freqs = self._distinct_words(texts, vocab_size)
        merges = []
        for new in range(256, 256 + num_merges):
            counts = {}
            for word, n in zip(words, freqs):
                get_stats(word, counts, weight=n)
            if not counts or max(counts.values()) < 2:
                break
            pair = min(counts, key=lambda p: (-counts[p], p))  # the highest count, then the smallest pair
            merges.append(pair)
            words = [merge(word, pair, new) for word in words]
        return self._set_merges(merges, asked=vocab_size)

    def train(self, texts, vocab_size):
        """Learn the merges of `train_naive` (same arguments, tie-break and early stop), fast; returns self. The pair
        counts are kept up to date, not recounted: merging (a, b) visits only the words in where[(a, b)] and adjusts
        the neighbouring pairs' counts; the best pair comes from a max-heap."""
        num_merges, words, freqs = self._distinct_words(texts, vocab_size)
        counts, where = defaultdict(int), defaultdict(set)  # pair -> count; pair -> the words holding it (or once did)
        for wi, (word, n) in enumerate(zip(words, freqs)):
            get_stats(word, counts, weight=n)
            for pair in zip(word, word[1:]):
                where[pair].add(wi)
        # max-heap of (-count, pair), sorted (= a heap); counts only fall: a current top is the best (ties: smallest)
        heap = sorted((-c, pair) for pair, c in counts.items() if c > 1)
        merges = []
        for new in range(256, 256 + num_merges):
            while heap and (c := counts.get(heap[0][1], 0)) != -heap[0][0]:  # a stale top: re-push with its count
                heapq.heapreplace(heap, (-c, heap[0][1]))
            if not heap or -heap[0][0] < 2:
                break
            a, b = pair = heapq.heappop(heap)[1]
            merges.append(pair)
            born = defaultdict(set)  # pair containing `new` -> words holding it; pushed once its count is final
            for wi in where.pop(pair):
                w, n = words[wi], freqs[wi]
                i = 0
                while i < len(w) - 1:
                    if w[i] == a and w[i + 1] == b:
                        # ... p [a b] q ... -> ... p new q ...: (p, a) and (b, q) go, (p, new) and (new, q) come;
                        # exact for overlaps too ("aaaa": the 2nd match takes back the (new, a) the 1st one added)
                        if i > 0:
                            counts[w[i - 1], a] -= n
                            counts[w[i - 1], new] += n
                            born[w[i - 1], new].add(wi)
                        if i + 2 < len(w):
                            counts[b, w[i + 2]] -= n
                            counts[new, w[i + 2]] += n
                            born[new, w[i + 2]].add(wi)
                        w[i:i + 2] = [new]
                    i += 1
            where.update(born)  # (a, b) itself is gone from every word: its count is 0 and stays 0
            for p in born:
                if counts[p] > 1:
                    heapq.heappush(heap, (-counts[p], p))
        return self._set_merges(merges, asked=vocab_size)

    def _distinct_words(self, texts, vocab_size):
        """-> (merges to learn, distinct words of `texts` as lists of byte ids, how often each occurs)."""
        if vocab_size < 256 + len(BPE_SPECIALS):
            raise ValueError(f"vocab_size must be >= {256 + len(BPE_SPECIALS)} (bytes + specials), got {vocab_size}")
        if isinstance(texts, str):
            raise TypeError("train() takes an iterable of texts, not one str")
        word_counts = Counter(word for text in texts for word in self._split(text))
        words = [list(word.encode("utf-8", "surrogatepass")) for word in word_counts]
        return vocab_size - 256 - len(BPE_SPECIALS), words, list(word_counts.values())

    def encode(self, text):
        """str -> list of ids, never eot/pad (even for "<|endoftext|>"); each pre-split word is cached."""
        cache, ranks, top = self._cache, self._ranks, self.eot_id  # eot_id: above every merge's id
        if len(cache) > BPE_CACHE_MAX:
            cache.clear()
        out = []
        for word in self._split(text):
            if word not in cache:
                ids = list(word.encode("utf-8", "surrogatepass"))
                while True:  # merge by rank until no adjacent pair is a merge
                    pair, rank = None, top  # the adjacent pair learned earliest, and its id
                    for p in zip(ids, ids[1:]):
                        if (r := ranks.get(p, top)) < rank:
                            pair, rank = p, r
                    if pair is None:
                        break
                    ids = merge(ids, pair, rank)
                cache[word] = ids
            out.extend(cache[word])
        return out

    def decode(self, ids, skip_special=False):
        """ids -> str. Exact inverse of encode; for other id lists, invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            raise ValueError(f"token ids {min(ids)}..{max(ids)} go outside the vocabulary [0, {self.vocab_size})")
        data = b"".join([self._vocab[i] for i in ids if not (skip_special and i >= self.eot_id)])
        try:  # encode wrote a lone surrogate (U+D800..U+DFFF, which strict UTF-8 refuses) as 3 bytes, as CESU-8 does
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:  # not encode's output (e.g. sampled ids): each bad sequence -> U+FFFD
            return data.decode("utf-8", "replace")

    def encode_title(self, title, max_len=128):
        """Title -> (ids (max_len,) int32, n_tokens counting the eot): encode(title)[:max_len - 1] + [eot], padded.
        With max_len 4: encode(t) == [5, 6] -> ([5, 6, eot, pad], 3); [5, 6, 7, 8] -> ([5, 6, 7, eot], 4)."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ids = self.encode(title)[:max_len - 1] + [self.eot_id]
        return np.array(ids + [self.pad_id] * (max_len - len(ids)), dtype=np.int32), len(ids)

    def save(self, path):
        """Write `path` (the model, e.g. tokenizer.bpe) and `path` with suffix .vocab (for people), each atomically.

        The model file is UTF-8 text, one item a line: "lava-bpe v1", "pattern <the split regex, verbatim>",
        "special <|endoftext|> <eot id>", "special <|pad|> <pad id>", "merges <M>", then M lines "<a> <b>".
        """
        if "\n" in self.pattern or "\r" in self.pattern:
            raise ValueError("the split pattern must not hold a literal newline (write it as \\n in the regex)")
        lines = [BPE_FORMAT, f"pattern {self.pattern}", f"special {BPE_SPECIALS[0]} {self.eot_id}",
                 f"special {BPE_SPECIALS[1]} {self.pad_id}", f"merges {len(self.merges)}"]
        write_atomic(path, "\n".join(lines + [f"{a} {b}" for a, b in self.merges]) + "\n")

        # tokenizer.vocab: "id 'token'" (repr; part of a character is U+FFFD, as in minbpe) + " <- 'a' + 'b'" if a merge
        shown = [repr(token.decode("utf-8", "replace")) for token in self._vocab[:self.eot_id]] + list(BPE_SPECIALS)
        made_of = [""] * 256 + [f" <- {shown[a]} + {shown[b]}" for a, b in self.merges] + ["", ""]
        write_atomic(Path(path).with_suffix(".vocab"), "".join(f"{i} {s}{made_of[i]}\n" for i, s in enumerate(shown)))

    @classmethod
    def load(cls, path):
        """Read a file written by save(); raises ValueError naming the file and line when it is not one."""
        lines = Path(path).read_text(encoding="utf-8").split("\n") + [""] * 5  # padded: a short file fails a check
        m = int(lines[4][7:]) if lines[4][:7] == "merges " and lines[4][7:].isdecimal() else -1
        specials = [f"special {name} {256 + m + k}" for k, name in enumerate(BPE_SPECIALS)]
        body = [ln.split() for ln in lines[5:] if ln]
        checks = [(1, lines[0] == BPE_FORMAT, f"first line is {lines[0][:40]!r}"),
                  (2, lines[1].startswith("pattern "), "no 'pattern' line"),
                  (5, m >= 0, "no 'merges <count>' line"),
                  (3, lines[2:4] == specials, f"expected {' / '.join(specials)!r}"),
                  (6, len(body) == m, f"header says {m} merges, file has {len(body)}")]
        checks += [(6 + k, len(p) == 2 and p[0].isdecimal() and p[1].isdecimal() and max(map(int, p)) < 256 + k,
                    "not a merge '<a> <b>' of two ids made before it") for k, p in enumerate(body)]
        for lineno, ok, why in checks:  # the first failure is reported
            if not ok:
                raise ValueError(f"{path}:{lineno}: {why} (expected a '{BPE_FORMAT}' tokenizer written by save())")
        return cls(lines[1][len("pattern "):], [(int(a), int(b)) for a, b in body])


def write_atomic(path, text):
    """Write a text file so that readers see all of it or none (temp file + rename); an error leaves no temp file."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8", newline="\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

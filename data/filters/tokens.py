"""spaCy's English word tokenizer, exact and fast: the tokens datatrove 0.10.x's `split_into_words(text,
"en")` yields (spaCy's rule-based `spacy.blank("en").tokenizer`, whitespace-only tokens dropped, the rest
stripped), for every whitespace-separated chunk of a document.

spaCy splits text at whitespace first and tokenizes each chunk alone, so tokens are cached per chunk. A new
chunk of letters is its own token (no English rule can split it: read off the patterns); any other new chunk
is mapped to a representative with the same tokenization (`_Canon`), and spaCy runs once per document on the
representatives it has not seen, with its suffix, infix and URL searches short-cut where the patterns allow
(`_fast_tokenizer`). `spacy_chunk_tokens` is the unoptimized reference the tests compare against.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from itertools import chain


@lru_cache(maxsize=1)
def _tokenizer():
    """The same English tokenizer on a vocabulary that computes no lexical attributes: tokenization reads
    only the prefix/suffix/infix rules and special cases, and a new word's attributes (shape, like_num,
    ...) were most of the tokenizer's time on unseen text."""
    import spacy

    nlp = spacy.blank("en")
    nlp.vocab.lex_attr_getters = {}
    return nlp.tokenizer


def _set_members(items) -> frozenset[int] | None:
    """The code points of a parsed `[...]` set's items, or None for a category (\\w) or a negation."""
    from re import _constants as sc

    out: set[int] = set()
    for op, av in items:
        if op is sc.LITERAL:
            out.add(av)
        elif op is sc.RANGE:
            out.update(range(av[0], av[1] + 1))
        else:
            return None
    return frozenset(out)


def _last_chars(items) -> frozenset[int] | None:
    """The code points a match of the parsed sequence `items` can end with (its last item's literals and
    set members), or None where that is not a plain set (a category such as \\w, a negated set, an
    assertion, an optional last item)."""
    from re import _constants as sc

    if not items:
        return None
    op, av = items[-1]
    if op is sc.LITERAL:
        return frozenset([av])
    if op is sc.IN:
        return _set_members(av)
    if op in (sc.MAX_REPEAT, sc.MIN_REPEAT, sc.POSSESSIVE_REPEAT) and av[0] >= 1:
        return _last_chars(list(av[2]))
    if op is sc.SUBPATTERN:
        return _last_chars(list(av[3]))
    if op is sc.BRANCH:
        out = set()
        for branch in av[1]:
            last = _last_chars(list(branch))
            if last is None:
                return None
            out |= last
        return frozenset(out)
    return None


def _tail_search(pattern: re.Pattern):
    """`pattern.search` for a suffix pattern whose alternatives all end at `$`, looking only where a match
    can start: the last W characters (W = the widest bounded alternative), unless the string ends in more
    than W repeats of the one character an unbounded alternative repeats (spaCy's `\\.\\.+$`); and not
    at all when the string's last character is none a match can end with (most chunks end in a letter or
    digit that no suffix ends with). Equal to `pattern.search` on whitespace-free strings (lookbehinds
    still see characters before the start position); returns `pattern.search` itself where the pattern
    has another shape."""
    from re import _constants as sc
    from re import _parser as sp

    tree = sp.parse(pattern.pattern, pattern.flags)
    if len(tree.data) != 1 or tree.data[0][0] is not sc.BRANCH or pattern.flags & re.IGNORECASE:
        return pattern.search
    widest, repeated, ends = 0, set(), set()
    for alt in tree.data[0][1][1]:
        if not alt or alt[-1] != (sc.AT, sc.AT_END):
            return pattern.search
        last = _last_chars(list(alt[:-1]))
        if last is None:
            return pattern.search
        ends.update(map(chr, last))
        lo, hi = sp.SubPattern(tree.state, alt).getwidth()
        if hi < sc.MAXREPEAT:
            widest = max(widest, hi)
        elif (
            len(alt) == 3
            and alt[0][0] is sc.LITERAL
            and alt[1][0] is sc.MAX_REPEAT
            and list(alt[1][1][2]) == [alt[0]]
        ):
            repeated.add(chr(alt[0][1]))
        else:
            return pattern.search
    guards = tuple(ch * (widest + 1) for ch in repeated)
    search = pattern.search
    ends = frozenset(ends)

    def tail_search(s: str):
        if s and s[-1] not in ends:
            return None
        if guards and s.endswith(guards):
            return search(s)
        return search(s, max(0, len(s) - widest))

    return tail_search


def _trigger(pattern: re.Pattern) -> frozenset[str] | None:
    """Characters of which every string where `pattern` has a match contains one: the characters its
    alternatives consume (lookarounds aside), checked with `_always_contains`; None where the pattern
    consumes a category (\\w), a negated set or any character. (A set, not a regex class: `re` scans a
    class of thousands of scattered code points linearly.)"""
    from re import _constants as sc
    from re import _parser as sp

    chars: set[int] = set()

    def walk(items) -> bool:
        for op, av in items:
            if op is sc.LITERAL:
                chars.add(av)
            elif op is sc.IN:
                members = _set_members(av)
                if members is None:
                    return False
                chars.update(members)
            elif op is sc.BRANCH:
                if not all(walk(b) for b in av[1]):
                    return False
            elif op is sc.SUBPATTERN:
                if not walk(av[3]):
                    return False
            elif op in (sc.MAX_REPEAT, sc.MIN_REPEAT, sc.POSSESSIVE_REPEAT):
                if not walk(av[2]):
                    return False
            elif op not in (sc.ASSERT, sc.ASSERT_NOT, sc.AT):
                return False
        return True

    if not walk(sp.parse(pattern.pattern, pattern.flags)) or not chars:
        return None
    if not _always_contains(pattern, lambda ch: ord(ch) in chars):
        return None
    return frozenset(map(chr, chars))


@lru_cache(maxsize=1)
def _fast_tokenizer():
    """`_tokenizer()` with its suffix search looking only at the string's tail (`_tail_search`): spaCy's
    suffix pattern is anchored at `$` but `re.search` tries it from every position, which was most of
    the tokenizer's time on long chunks (URLs, CJK sentences); its URL match skipping strings without
    ".", which no URL it accepts lacks (`_always_contains`); its infix search skipping strings without
    any character an infix consumes (`_trigger`: ".", ",", hyphens, ":<>=/", symbols). Same tokens (tests compare with
    `spacy_chunk_tokens`, which uses the unmodified tokenizer)."""
    import spacy

    nlp = spacy.blank("en")
    nlp.vocab.lex_attr_getters = {}
    tok = nlp.tokenizer
    tok.suffix_search = _tail_search(tok.suffix_search.__self__)
    url = tok.url_match
    if url is not None and _always_contains(url.__self__, ".".__eq__):
        tok.url_match = lambda s: url(s) if "." in s else None
    finditer = tok.infix_finditer
    trigger = _trigger(finditer.__self__)
    if trigger is not None:
        tok.infix_finditer = lambda s: () if trigger.isdisjoint(s) else finditer(s)
    return tok


_CHUNK_TOKENS: dict[str, tuple[str, ...]] = {}
_SPACED: dict[str, str] = {}  # chunk -> its tokens joined by " " (filled with _CHUNK_TOKENS)
_SPANS: dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]] = {}
_CACHE_LIMIT = 2_000_000
_SEPARATOR = "\u2003"  # em space: see _learn_spans
_ALNUM_RUN = re.compile(r"[^\W_]+")
# A letter right after a digit, quote or degree sign, or right before "$": where spaCy's suffix and
# prefix rules read ASCII letters literally (units "5km", "'s", "°F.", "US$"). Such chunks are not
# canonicalized.
_RISKY = re.compile(r"[0-9'\u2019\u00b0][^\W\d_]|[^\W\d_]\$")


def spacy_chunk_tokens(chunk: str) -> tuple[str, ...]:
    """spaCy's own tokens of one whitespace-free chunk (the reference the fast path must equal)."""
    return tuple(t.text for t in _tokenizer()(chunk))


def _regex_classes(pattern: re.Pattern) -> tuple[list[list[tuple[int, int]]], bool]:
    """The character classes of a compiled `re` pattern: one list of inclusive code point ranges per
    literal or `[...]` set (a literal is a range of one), and whether the pattern is safe to reason about
    by character classes (no back-references, no case folding).

    A letter literal that starts an alternative right after a digit lookbehind (`(?<=[0-9])(?:km|кг|...)`,
    spaCy's unit and currency suffixes) is left out: it can only match a letter that follows a digit,
    and chunks with a digit before a letter are never canonicalized (`_RISKY`)."""
    from re import _constants as sc
    from re import _parser as sp

    ok = not pattern.flags & re.IGNORECASE
    classes: list[list[tuple[int, int]]] = []

    def after_digit(item) -> bool:
        op, av = item
        return op is sc.ASSERT and av[0] == -1 and list(av[1]) == [(sc.IN, [(sc.RANGE, (48, 57))])]

    def walk(items, in_set: list | None = None) -> None:
        nonlocal ok
        items = list(items)
        for i, (op, av) in enumerate(items):
            if op in (sc.LITERAL, sc.NOT_LITERAL):
                if in_set is None:
                    classes.append([(av, av)])
                else:
                    in_set.append((av, av))
            elif op is sc.RANGE:
                in_set.append(av)
            elif op is sc.IN:
                classes.append([])
                walk(av, classes[-1])
            elif op is sc.BRANCH:
                digit_before = i > 0 and after_digit(items[i - 1])
                for branch in av[1]:
                    first = branch[0] if branch else None
                    if digit_before and first[0] is sc.LITERAL and chr(first[1]).isalpha():
                        branch = [x for x in branch if not (x[0] is sc.LITERAL and chr(x[1]).isalpha())]
                    walk(branch)
            elif op is sc.SUBPATTERN:
                walk(av[3])
            elif op in (sc.MAX_REPEAT, sc.MIN_REPEAT, sc.POSSESSIVE_REPEAT):
                walk(av[2])
            elif op in (sc.ASSERT, sc.ASSERT_NOT):
                walk(av[1])
            elif op in (sc.GROUPREF, sc.GROUPREF_EXISTS):
                ok = False
            # AT (anchors), ANY, CATEGORY (\w \d \s, handled by the class key), NEGATE: no ranges.

    walk(sp.parse(pattern.pattern, pattern.flags))
    return classes, ok


def _always_contains(pattern: re.Pattern, ok: Callable[[str], bool]) -> bool:
    """Whether every string in which `pattern` finds a match contains a character for which `ok` is true,
    read off its parse tree: a literal or a set of only such characters, a sequence with such an item, a
    branch whose alternatives all have one, a repeat of at least one such body, a positive lookaround
    whose body has one (what it asserts lies in the string too)."""
    from re import _constants as sc
    from re import _parser as sp

    if pattern.flags & re.IGNORECASE:
        return False

    def seq(items) -> bool:
        return any(item(op, av) for op, av in items)

    def item(op, av) -> bool:
        if op is sc.LITERAL:
            return ok(chr(av))
        if op is sc.IN:
            members = _set_members(av)  # None: a category (\w, \d, ...) or a negated set
            return members is not None and all(ok(chr(x)) for x in members)
        if op is sc.SUBPATTERN:
            return seq(av[3])
        if op is sc.BRANCH:
            return all(seq(alt) for alt in av[1])
        if op in (sc.MAX_REPEAT, sc.MIN_REPEAT, sc.POSSESSIVE_REPEAT):
            return av[0] >= 1 and seq(av[2])
        if op is sc.ASSERT:
            return seq(av[1])
        return False

    return seq(sp.parse(pattern.pattern, pattern.flags))


class _Canon:
    """Which characters spaCy's tokenizer cannot tell apart, so that a chunk's tokens can be read off a
    representative chunk already tokenized. spaCy's tokenizer (spaCy 3, `Tokenizer._split_affixes` and
    `_attach_tokens`) decides a chunk's tokens with (a) its prefix, suffix, infix and URL regexes and (b)
    exact-string lookups of its special cases. Two letters or digits that belong to the same character
    classes of those regexes (each literal and each [...] set is a class) and agree on \\w, \\d and \\s
    are matched alike by every regex (none uses back-references or case folding: checked here), so
    replacing one by the other changes no regex decision; for chunks without "." the URL pattern's classes
    are left out (it only matches strings with "."). Special cases are exact strings: a chunk is only canonicalized when
    none of its (or its canonical form's) letter/digit runs occurs in any special case or in the tokens
    of one, so no special-case lookup can succeed for either. Lengths are kept, so token offsets carry
    over; a representative whose tokens split a letter/digit run falls back to spaCy on the chunk."""

    def __init__(self) -> None:
        from bisect import bisect_right

        from spacy.attrs import ORTH

        tok = _tokenizer()
        patterns = [getattr(tok, n).__self__ for n in ("prefix_search", "suffix_search", "infix_finditer")]
        patterns += [tok.url_match.__self__] if tok.url_match is not None else []
        self.enabled = tok.token_match is None
        classes: list[list[tuple[int, int]]] = []
        url_classes: set[int] = set()  # indices of the URL pattern's classes
        for pat in patterns:
            found, ok = _regex_classes(pat)
            if tok.url_match is not None and pat is tok.url_match.__self__:
                url_classes.update(range(len(classes), len(classes) + len(found)))
            self.enabled &= ok
            for ranges in found:
                kept = []
                for a, b in ranges:
                    if a == b and chr(a).isascii() and chr(a).isalpha():
                        # ASCII letters appear as literals only in affixes that need a context _RISKY
                        # excludes: 's after a quote, "°F." and "US$".
                        self.enabled &= (
                            pat is not tok.infix_finditer.__self__ and pat is not tok.url_match.__self__
                        )
                        continue
                    kept.append((a, b))
                classes.append(kept)
        # Elementary intervals between all range bounds; an interval's signature is the set of classes
        # containing it. Characters with the same signature are matched alike by every class, even in
        # different intervals (spaCy spells CJK as several adjacent ranges of one class).
        self._bounds = sorted({x for ranges in classes for a, b in ranges for x in (a, b + 1)})
        members: list[set[int]] = [set() for _ in range(len(self._bounds) + 1)]
        for k, ranges in enumerate(classes):
            for a, b in ranges:
                for i in range(bisect_right(self._bounds, a), bisect_right(self._bounds, b) + 1):
                    members[i].add(k)
        ids: dict[frozenset, int] = {}
        self._signature = [ids.setdefault(frozenset(m), len(ids)) for m in members]
        # Every URL spaCy's url_match accepts contains ".", and so does every substring of a chunk it
        # can see only if the chunk does: for chunks without ".", the URL pattern's classes (which tell
        # digits apart for IP addresses and many letters for top-level domains) decide nothing.
        url_dots = tok.url_match is None or _always_contains(tok.url_match.__self__, ".".__eq__)
        self._signature_nodot = [
            ids.setdefault(frozenset(m - url_classes if url_dots else m), len(ids)) for m in members
        ]
        self._bisect = bisect_right
        # Letter/digit runs of the special cases and of the tokens the special-case matcher looks for.
        plain = type(tok)(
            tok.vocab,
            prefix_search=tok.prefix_search,
            suffix_search=tok.suffix_search,
            infix_finditer=tok.infix_finditer,
            url_match=tok.url_match,
        )
        cores: set[str] = set()
        for key, subs in tok.rules.items():
            cores.update(_ALNUM_RUN.findall(key))
            for piece in [s.get(ORTH, s.get("ORTH", "")) for s in subs] + [t.text for t in plain(key)]:
                cores.update(_ALNUM_RUN.findall(piece))
        self.cores = frozenset(cores)
        # A chunk of letters only is one token unless it is a special case: when every match of every
        # affix, infix and URL pattern needs a character that is not a letter (the unit suffixes' digit
        # lookbehind, "'s", "."), no rule can split or strip it.
        self.letters_whole = tok.token_match is None and all(
            _always_contains(p, lambda ch: not ch.isalpha()) for p in patterns
        )
        self.special = frozenset(tok.rules)
        self.table: dict[int, str] = {}  # code point -> its representative (only letters and digits)
        self.table_nodot: dict[int, str] = {}  # the same for chunks without "."
        self._rep_of_key: dict[tuple, str] = {}
        self._known: set[str] = set()

    def learn(self, text: str) -> None:
        """Add text's unseen letters and digits to the translation table."""
        for ch in set(text) - self._known:
            self._known.add(ch)
            if not ch.isalnum():
                continue
            cp = ord(ch)
            i = self._bisect(self._bounds, cp)
            for sig, table in (
                (self._signature[i], self.table),
                (self._signature_nodot[i], self.table_nodot),
            ):
                rep = self._rep_of_key.setdefault((sig, ch.isdecimal(), ch.isalpha()), ch)
                if rep != ch:
                    table[cp] = rep

    def reps(self, chunks: list[str]) -> list[str]:
        """Each chunk's representative: the chunk with letters and digits replaced (through the coarser
        table when it has no "."), or the chunk itself where a replacement could change spaCy's decision
        (`_RISKY` contexts, special-case runs)."""
        if not self.enabled:
            return list(chunks)
        joined = "\n".join(chunks)
        self.learn(joined)
        dot, nodot = self.table, self.table_nodot
        reps = [c.translate(dot if "." in c else nodot) for c in chunks]
        translated = "\n".join(reps)
        # Letter/digit runs that are special-case material, in the chunks or their representatives.
        hits = self.cores.intersection(_ALNUM_RUN.findall(joined)) | self.cores.intersection(
            _ALNUM_RUN.findall(translated)
        )
        if not hits and not _RISKY.search(joined):
            return reps
        findall, risky = _ALNUM_RUN.findall, _RISKY.search
        return [
            c
            if r != c and (risky(c) or not (hits.isdisjoint(findall(c)) and hits.isdisjoint(findall(r))))
            else r
            for c, r in zip(chunks, reps)
        ]


@lru_cache(maxsize=1)
def _canon() -> _Canon:
    return _Canon()


@lru_cache(maxsize=1)
def _alnum_bmp():
    """str.isalnum of every Basic Multilingual Plane code point, as a lookup table."""
    import numpy as np

    return np.array([chr(i).isalnum() for i in range(0x10000)])


def _isalnum_at(codes, pos):
    """str.isalnum of the characters at `pos` of a string given as its code points."""
    import numpy as np

    c = codes[pos]
    out = _alnum_bmp()[np.minimum(c, 0xFFFF)]
    high = np.flatnonzero(c > 0xFFFF)
    if len(high):
        out[high] = [chr(x).isalnum() for x in c[high].tolist()]
    return out


def _learn_spans(reps: list[str]) -> None:
    """spaCy's tokens of each new representative as their start and stop offsets, and whether a token
    boundary falls between two letters/digits (then the offsets are only trusted for that string itself).

    One tokenizer call for all of them: spaCy tokenizes each space-separated chunk alone, and a call's
    fixed cost (Doc, token objects) was most of the time when it ran per chunk. They are joined by an em
    space, which spaCy makes a token of its own (only " " is absorbed as trailing space) that is in no
    special case: spaCy's special-case matcher (`_apply_special_cases`, e.g. ":(" across the tokens ":"
    and "(") then cannot match across two chunks and shadow a match inside one, and has no match on the
    separators themselves (" " is a special case). Tests compare with `spacy_chunk_tokens` per chunk.
    Tokens are assigned to representatives with array operations, not a loop over tokens."""
    import numpy as np
    from spacy.attrs import IDX, LENGTH

    joined = _SEPARATOR.join(reps)
    flat = _fast_tokenizer()(joined).to_array([IDX, LENGTH]).astype(np.int64).ravel()
    idx, length = flat[0::2], flat[1::2]
    lens = np.fromiter(map(len, reps), np.int64, len(reps))
    starts = np.zeros(len(reps), np.int64)
    np.cumsum(lens[:-1] + 1, out=starts[1:])
    rid = np.searchsorted(starts, idx, "right") - 1
    own = idx < starts[rid] + lens[rid]  # not the separator after the representative
    idx, length, rid = idx[own], length[own], rid[own]
    rel = idx - starts[rid]
    stop = rel + length
    first = np.ones(len(rid), bool)
    first[1:] = rid[1:] != rid[:-1]
    prev_stop = np.zeros(len(rid), np.int64)
    prev_stop[1:] = stop[:-1]
    prev_stop[first] = 0
    cut_at = rel != prev_stop  # a gap before the token (never seen: spaCy's tokens tile a chunk)
    inner = np.flatnonzero(~first)
    if len(inner):
        codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), np.uint32)
        at = idx[inner]
        cut_at[inner] |= _isalnum_at(codes, at - 1) & _isalnum_at(codes, at)
    counts = np.bincount(rid, minlength=len(reps))
    cut = (np.bincount(rid, weights=cut_at, minlength=len(reps)) > 0) | (counts == 0)
    last = np.ones(len(rid), bool)
    last[:-1] = rid[:-1] != rid[1:]
    cut[rid[last]] |= stop[last] != lens[rid[last]]
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    rel_l, stop_l, cut_l = rel.tolist(), stop.tolist(), cut.tolist()
    for k, rep in enumerate(reps):
        lo, hi = bounds[k], bounds[k + 1]
        # Tuples of ints, not slices: a slice stays tracked by the garbage collector for as long as the
        # cache holds it, and a collection's cost grows with what is tracked.
        _SPANS[rep] = (tuple(rel_l[lo:hi]), tuple(stop_l[lo:hi]), cut_l[k])


def _tokenize_new(new: set[str]) -> None:
    """Cache the tokens of chunks not seen before. A chunk of letters only that is no special case is
    its own token (`_Canon.letters_whole`: no regex needs to run); every other chunk is mapped to its
    representative (`_Canon`: "Hello," and "World," share offsets), so spaCy runs once per distinct
    shape, not per distinct chunk; a representative whose tokens split a letter/digit run falls back to
    spaCy on the chunk."""
    canon = _canon()
    if canon.letters_whole:
        words = {c for c in new if c.isalpha()}.difference(canon.special)
        _CHUNK_TOKENS.update(zip(words, zip(words)))  # chunk -> (chunk,)
        new = new.difference(words)
        if not new:
            return
    chunks = list(new)
    reps = canon.reps(chunks)
    missing = [r for r in dict.fromkeys(reps) if r not in _SPANS]
    if missing:
        _learn_spans(missing)
    retry = []
    for chunk, rep in zip(chunks, reps):
        starts, stops, cut = _SPANS[rep]
        if cut and rep != chunk:
            retry.append(chunk)
        elif len(starts) == 1:
            _CHUNK_TOKENS[chunk] = (chunk,)
        else:
            _CHUNK_TOKENS[chunk] = tuple(map(chunk.__getitem__, map(slice, starts, stops)))
    if retry:
        _learn_spans([c for c in retry if c not in _SPANS])
        for chunk in retry:
            starts, stops, _ = _SPANS[chunk]
            _CHUNK_TOKENS[chunk] = tuple(map(chunk.__getitem__, map(slice, starts, stops)))


def ensure_tokens(chunks: set[str]) -> dict[str, tuple[str, ...]]:
    """Cache the tokens of those of `chunks` not cached yet and return the cache (chunk -> tokens). When
    the cache would grow past _CACHE_LIMIT entries it is emptied first and all of `chunks` tokenized, so
    every one of them is in the returned cache."""
    new = chunks.difference(_CHUNK_TOKENS)
    if new:
        if len(_CHUNK_TOKENS) + len(new) >= _CACHE_LIMIT:
            clear_token_caches()
            new = chunks
        _tokenize_new(new)
        new = list(new)
        _SPACED.update(zip(new, map(" ".join, map(_CHUNK_TOKENS.__getitem__, new))))
    return _CHUNK_TOKENS


def chunk_tokens(chunk: str) -> tuple[str, ...]:
    """spaCy's tokens of one whitespace-free chunk, cached. spaCy's tokenizer splits text at whitespace
    first and tokenizes each chunk alone (prefixes, suffixes, infixes, special cases), so a document's
    tokens are its chunks' tokens in order."""
    toks = _CHUNK_TOKENS.get(chunk)
    if toks is None:
        ensure_tokens({chunk})
        toks = _CHUNK_TOKENS[chunk]
    return toks


def clear_token_caches() -> None:
    """Forget every cached chunk and representative."""
    _CHUNK_TOKENS.clear()
    _SPACED.clear()
    _SPANS.clear()


def split_words(text: str) -> list[str]:
    """datatrove's `split_into_words(text, "en")`: spaCy tokens, stripped, whitespace-only ones dropped."""
    chunks = text.split()
    toks = list(map(_CHUNK_TOKENS.get, chunks))
    if None in toks:
        ensure_tokens(set(chunks))
        toks = list(map(_CHUNK_TOKENS.__getitem__, chunks))
    return list(chain.from_iterable(toks))


def spaced_words(text: str) -> str:
    """ " ".join(split_words(text)) without the word list (tokens hold no whitespace, so splitting it at
    " " gives the words back). A chunk of letters that is no special case is itself (`_Canon.letters_whole`);
    any other chunk's tokens joined by spaces are cached with its tokens. Telling the two apart was 4%
    faster than looking every chunk up in a cache of millions of entries (a lookup waits on memory)."""
    chunks = text.split()
    canon = _canon()
    special, get = canon.special, _SPACED.get
    if canon.letters_whole:
        parts = [c if c.isalpha() and c not in special else get(c) for c in chunks]
    else:
        parts = list(map(get, chunks))
    if None in parts:
        cache = ensure_tokens({c for c, p in zip(chunks, parts) if p is None})
        parts = [p if p is not None else " ".join(cache[c]) for c, p in zip(chunks, parts)]
    return " ".join(parts)


def tokenize_chunks(text: str) -> None:
    """Cache the tokens of every chunk of `text` not seen before, in one spaCy call."""
    ensure_tokens(set(text.split()))

"""spaCy's English word tokenizer, exact and fast: the tokens datatrove 0.10.x's `split_into_words(text,
"en")` yields (spaCy's rule-based `spacy.blank("en").tokenizer`, whitespace-only tokens dropped, the rest
stripped), for every whitespace-separated chunk of a document.

spaCy splits text at whitespace first and tokenizes each chunk alone, so tokens are cached per chunk. New
chunks are tokenized by the C port of spaCy's tokenizer (`data.filters.spacy_en`, compiled from spaCy's
own patterns and special cases); where that extension is not built, or its matcher lacks a construct
spaCy's patterns use, spaCy runs once per document on the new chunks (`_spacy_tokens`), with its suffix,
infix and URL searches short-cut where the patterns allow (`_fast_tokenizer`). `spacy_chunk_tokens` is
the unoptimized reference the tests compare against.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from itertools import chain

from data.filters import _chunks


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
_CACHE_LIMIT = 2_000_000
_SEPARATOR = "\u2003"  # em space: see _spacy_tokens


def spacy_chunk_tokens(chunk: str) -> tuple[str, ...]:
    """spaCy's own tokens of one whitespace-free chunk (the reference the fast path must equal)."""
    return tuple(t.text for t in _tokenizer()(chunk))


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


@lru_cache(maxsize=1)
def _special_if_letters_whole() -> frozenset[str] | None:
    """spaCy's special-case strings when a chunk of letters only that is none of them is its own token
    (every match of every affix, infix and URL pattern needs a character that is not a letter: the unit
    suffixes' digit lookbehind, "'s", "."), else None."""
    tok = _tokenizer()
    patterns = [getattr(tok, n).__self__ for n in ("prefix_search", "suffix_search", "infix_finditer")]
    patterns += [tok.url_match.__self__] if tok.url_match is not None else []
    if tok.token_match is None and all(_always_contains(p, lambda ch: not ch.isalpha()) for p in patterns):
        return frozenset(tok.rules)
    return None


def _spacy_tokens(chunks: list[str]) -> list[tuple[str, ...]]:
    """spaCy's tokens of each chunk, from one tokenizer call for all of them (a call's fixed cost, Doc
    and token objects, was most of the time when it ran per chunk). spaCy tokenizes each space-separated
    chunk alone; the chunks are joined by an em space, which spaCy makes a token of its own (only " " is
    absorbed as trailing space) that is in no special case: spaCy's special-case matcher
    (`_apply_special_cases`, e.g. ":(" across the tokens ":" and "(") then cannot match across two chunks
    and shadow a match inside one, and has no match on the separators themselves (" " is a special case).
    Tests compare with `spacy_chunk_tokens` per chunk."""
    from bisect import bisect_right

    starts, at = [], 0
    for c in chunks:
        starts.append(at)
        at += len(c) + 1
    out: list[list[str]] = [[] for _ in chunks]
    for t in _fast_tokenizer()(_SEPARATOR.join(chunks)):
        k = bisect_right(starts, t.idx) - 1
        if t.idx < starts[k] + len(chunks[k]):  # not the separator after the chunk
            out[k].append(t.text)
    return [tuple(x) if len(x) != 1 or x[0] != c else (c,) for x, c in zip(out, chunks)]


def _add_spacy(chunks: list[str]) -> None:
    """Cache spaCy's tokens of new chunks (one call for all of them) and their tokens joined by spaces."""
    toks = _spacy_tokens(chunks)
    _CHUNK_TOKENS.update(zip(chunks, toks))
    _SPACED.update(zip(chunks, map(" ".join, toks)))


def _ensure(chunks: Iterable[str] | None, text: str = "") -> None:
    """Cache the tokens of those of `chunks` (which may repeat; None: `text.split()`) not cached yet,
    and their tokens joined by spaces: with the C tokenizer where it is built (and spaCy for a chunk on
    which its matcher gave up: its step limit), with spaCy otherwise. When the cache would grow to
    _CACHE_LIMIT entries it is emptied first and all of `chunks` tokenized, so every one of them is
    cached."""
    from data.filters.spacy_en import compiled

    c = compiled()
    if c is None:
        chunks = set(text.split() if chunks is None else chunks)
        new = chunks.difference(_CHUNK_TOKENS)
        if len(_CHUNK_TOKENS) + len(new) >= _CACHE_LIMIT:
            clear_token_caches()
            new = chunks
        if new:
            _add_spacy(list(new))
        return
    if chunks is None:
        hard = c.ensure_text(text, _CHUNK_TOKENS, _SPACED, _CACHE_LIMIT)
    else:
        hard = c.ensure(chunks, _CHUNK_TOKENS, _SPACED, _CACHE_LIMIT)
    if hard is None:
        clear_token_caches()
        hard = c.into(set(text.split() if chunks is None else chunks), _CHUNK_TOKENS, _SPACED)
    if hard:
        _add_spacy(hard)


def ensure_tokens(chunks: set[str]) -> dict[str, tuple[str, ...]]:
    """Cache the tokens of those of `chunks` not cached yet and return the cache (chunk -> tokens). When
    the cache would grow past _CACHE_LIMIT entries it is emptied first and all of `chunks` tokenized, so
    every one of them is in the returned cache."""
    _ensure(chunks)
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
    """Forget every cached chunk."""
    _CHUNK_TOKENS.clear()
    _SPACED.clear()


def split_words(text: str) -> list[str]:
    """datatrove's `split_into_words(text, "en")`: spaCy tokens, stripped, whitespace-only ones dropped."""
    chunks = text.split()
    toks = list(map(_CHUNK_TOKENS.get, chunks))
    if None in toks:
        ensure_tokens(set(chunks))
        toks = list(map(_CHUNK_TOKENS.__getitem__, chunks))
    return list(chain.from_iterable(toks))


def _spaced_of(chunks: list[str]) -> list[str]:
    _ensure(chunks)
    return list(map(_SPACED.__getitem__, chunks))


def spaced_words(text: str) -> str:
    """ " ".join(split_words(text)) without the word list (tokens hold no whitespace, so splitting it at
    " " gives the words back), joined in C from the chunks' cached spaced tokens (`_chunks.spaced`). A
    chunk of letters that is no special case is itself (`_special_if_letters_whole`): telling the two
    apart is faster than looking every chunk up in a cache of millions of entries (a lookup waits on
    memory)."""
    return _chunks.spaced(text, _SPACED, _special_if_letters_whole(), _spaced_of)


def tokenize_chunks(text: str) -> None:
    """Cache the tokens of every chunk of `text` not seen before."""
    _ensure(None, text)

"""spaCy's English tokenizer compiled to C (`data.filters._spacy_en`): the same tokens per whitespace-free
chunk as `spacy.blank("en").tokenizer`, without Python regex callbacks or Doc objects.

spaCy's tokenizer (spacy/tokenizer.pyx) decides a chunk's tokens with four `re` patterns (prefix, suffix,
infix, URL) and exact-string special cases. This module compiles the patterns from their `re` parse trees
into programs for the extension's backtracking matcher (the semantics of `re`: leftmost match, alternatives
in order, greedy and lazy repeats, lookarounds), and passes the special cases and the special-case
matcher's token patterns as tables; the extension ports `_split_affixes`, `_attach_tokens` and
`_apply_special_cases`. A pattern construct the matcher does not implement raises `Unsupported`, and the
caller keeps spaCy: never a silently different result.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable
from functools import lru_cache
from re import _constants as sc
from re import _parser as sp
from typing import NamedTuple

MAXCP = 0x10FFFF

# Opcodes: keep in step with data/filters/_matcher.c.
CHAR, SET, ANY, JMP, SPLIT, BRANCH, AT, ASSERT, MATCH = range(9)
AT_CODES = {
    sc.AT_BEGINNING: 0,
    sc.AT_END: 1,
    sc.AT_BEGINNING_STRING: 2,
    sc.AT_END_STRING: 3,
    sc.AT_BOUNDARY: 4,
    sc.AT_NON_BOUNDARY: 5,
}


class Unsupported(ValueError):
    """A pattern construct the compiled matcher does not implement."""


def _merge(ranges) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _complement(ranges) -> list[tuple[int, int]]:
    out, nxt = [], 0
    for lo, hi in _merge(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAXCP:
        out.append((nxt, MAXCP))
    return out


@lru_cache(maxsize=1)
def _categories() -> dict:
    """Code point ranges of \\d, \\s and \\w as `re` matches them in str patterns, read off `re` itself
    (every code point, lone surrogates included)."""
    everything = "".join(map(chr, range(MAXCP + 1)))
    out = {}
    for cat, neg, rx in (
        (sc.CATEGORY_DIGIT, sc.CATEGORY_NOT_DIGIT, r"\d+"),
        (sc.CATEGORY_SPACE, sc.CATEGORY_NOT_SPACE, r"\s+"),
        (sc.CATEGORY_WORD, sc.CATEGORY_NOT_WORD, r"\w+"),
    ):
        ranges = [(m.start(), m.end() - 1) for m in re.finditer(rx, everything)]
        out[cat], out[neg] = ranges, _complement(ranges)
    return out


def _set_ranges(items) -> list[tuple[int, int]]:
    """The code point ranges of a parsed `[...]` set."""
    ranges, negate = [], False
    for op, av in items:
        if op is sc.NEGATE:
            negate = True
        elif op is sc.LITERAL:
            ranges.append((av, av))
        elif op is sc.RANGE:
            ranges.append(av)
        elif op is sc.CATEGORY:
            if av not in _categories():
                raise Unsupported(f"category {av}")
            ranges += _categories()[av]
        else:
            raise Unsupported(f"set item {op}")
    return _complement(ranges) if negate else _merge(ranges)


def _contains(ranges, cp: int) -> bool:
    i = bisect_left(ranges, (cp + 1,)) - 1
    return i >= 0 and ranges[i][0] <= cp <= ranges[i][1]


class _Compiler:
    """Parse tree -> one int array of instructions (`code`), the sets (`sets`: sorted inclusive ranges)
    and the branch dispatch tables (`tabs`)."""

    def __init__(self, state) -> None:
        self.state = state  # the parser's state (SubPattern.getwidth reads it)
        self.code = []
        self.sets: list[list[tuple[int, int]]] = []
        self.tabs: list[int] = []
        self._set_ids: dict[tuple, int] = {}

    def set_id(self, ranges) -> int:
        key = tuple(ranges)
        if key not in self._set_ids:
            self._set_ids[key] = len(self.sets)
            self.sets.append(list(key))
        return self._set_ids[key]

    # First characters: what a match of `items` can begin with, and whether it can be empty.
    def first(self, items) -> tuple[list[tuple[int, int]], bool]:
        acc: list[tuple[int, int]] = []
        for op, av in items:
            f, nullable = self.first_item(op, av)
            acc += f
            if not nullable:
                return _merge(acc), False
        return _merge(acc), True

    def first_item(self, op, av):
        if op is sc.LITERAL:
            return [(av, av)], False
        if op is sc.NOT_LITERAL:
            return _complement([(av, av)]), False
        if op is sc.IN:
            return _set_ranges(av), False
        if op is sc.ANY:
            return _complement([(10, 10)]), False
        if op is sc.CATEGORY:
            return _set_ranges([(op, av)]), False
        if op in (sc.AT, sc.ASSERT, sc.ASSERT_NOT):
            return [], True
        if op is sc.BRANCH:
            acc, nullable = [], False
            for alt in av[1]:
                f, n = self.first(alt)
                acc += f
                nullable |= n
            return acc, nullable
        if op is sc.SUBPATTERN:
            return self.first(av[3])
        if op in (sc.MAX_REPEAT, sc.MIN_REPEAT):
            f, n = self.first(av[2])
            return f, n or av[0] == 0
        raise Unsupported(f"op {op}")

    def guards(self, alt) -> tuple[int, int]:
        """An alternative's checks before it runs: the set of a one-character lookbehind it starts with
        (-1: none), and its widest match when it ends at `$` (-1: unbounded or not at `$`)."""
        prev = -1
        if alt and alt[0][0] is sc.ASSERT and alt[0][1][0] < 0:
            body = list(alt[0][1][1])
            if len(body) == 1 and body[0][0] in (sc.LITERAL, sc.NOT_LITERAL, sc.IN, sc.ANY, sc.CATEGORY):
                prev = self.set_id(self.first_item(*body[0])[0])
        maxrem = -1
        if alt and alt[-1] == (sc.AT, sc.AT_END):
            hi = sp.SubPattern(self.state, alt).getwidth()[1]
            maxrem = hi if hi < sc.MAXREPEAT else -1
        return prev, maxrem

    def emit(self, *words) -> int:
        self.code.extend(words)
        return len(self.code) - len(words)

    def seq(self, items) -> None:
        for op, av in items:
            self.item(op, av)

    def item(self, op, av) -> None:
        if op is sc.LITERAL:
            self.emit(CHAR, av)
        elif op in (sc.NOT_LITERAL, sc.IN, sc.ANY, sc.CATEGORY):
            self.emit(SET, self.set_id(self.first_item(op, av)[0]))
        elif op is sc.AT:
            if av not in AT_CODES:
                raise Unsupported(f"anchor {av}")
            self.emit(AT, AT_CODES[av])
        elif op is sc.SUBPATTERN:
            group, add, dele, p = av
            if add & ~re.UNICODE or dele:
                raise Unsupported("inline flags")
            self.seq(p)
        elif op is sc.BRANCH:
            self.branch(av[1])
        elif op in (sc.MAX_REPEAT, sc.MIN_REPEAT):
            self.repeat(op is sc.MAX_REPEAT, *av)
        elif op in (sc.ASSERT, sc.ASSERT_NOT):
            direction, p = av
            lo, hi = p.getwidth()
            if direction < 0 and lo != hi:
                raise Unsupported("variable-width lookbehind")
            kind = (0 if op is sc.ASSERT else 1) + (2 if direction < 0 else 0)
            at = self.emit(ASSERT, kind, lo if direction < 0 else 0, 0)
            self.code[at + 3] = len(self.code) + 2  # the sub-program, after the jump over it
            jump = self.emit(JMP, 0)
            self.seq(p)
            self.emit(MATCH)
            self.code[jump + 1] = len(self.code)
        else:
            raise Unsupported(f"op {op}")

    def repeat(self, greedy: bool, lo: int, hi: int, body) -> None:
        f, nullable = self.first(body)
        if nullable and hi != lo:
            raise Unsupported("repeat of a body that can match empty")
        for _ in range(lo):
            self.seq(body)
        if hi == sc.MAXREPEAT:
            # L: SPLIT body, end; body; JMP L
            top = self.emit(SPLIT, 0, 0)
            self.seq(body)
            self.emit(JMP, top)
            end = len(self.code)
            self.code[top + 1 : top + 3] = [top + 3, end] if greedy else [end, top + 3]
        else:
            # Optional copies in a chain: when one is skipped so are the rest (x{0,3} = (x(x(x)?)?)?).
            splits = []
            for _ in range(hi - lo):
                splits.append(self.emit(SPLIT, 0, 0))
                self.seq(body)
            end = len(self.code)
            for s in splits:
                self.code[s + 1 : s + 3] = [s + 3, end] if greedy else [end, s + 3]

    def branch(self, alts) -> None:
        """BRANCH ntab: try the alternatives that can start with the current character, in order. The
        table (in `tabs`): n, then each alternative's address, then 258 candidate lists (characters
        0-255, other characters, end of string) of (alternative, set the character must be in or -1,
        set the previous character must be in or -1, most characters before `$` or -1): a candidate
        failing these checks cannot match, so it is skipped without running it (spaCy's unit suffixes
        `(?<=[0-9])(?:km|m|...)$` fail at once after a letter or far from the end)."""
        at = self.emit(BRANCH, 0)
        jumps, addrs, firsts, guards = [], [], [], []
        for alt in alts:
            addrs.append(len(self.code))
            firsts.append(self.first(alt))
            guards.append(self.guards(list(alt)))
            self.seq(alt)
            jumps.append(self.emit(JMP, 0))
        end = len(self.code)
        for j in jumps:
            self.code[j + 1] = end
        lists: list[list[int]] = [[] for _ in range(258)]
        for k, ((ranges, nullable), (prev, maxrem)) in enumerate(zip(firsts, guards)):
            if nullable:
                for lst in lists:
                    lst += [k, -1, prev, maxrem]
                continue
            for ch in range(256):
                if _contains(ranges, ch):
                    lists[ch] += [k, -1, prev, maxrem]
            if ranges and ranges[-1][1] >= 256:
                lists[256] += [k, self.set_id(ranges), prev, maxrem]
        tab = len(self.tabs)
        self.code[at + 1] = tab
        self.tabs += [len(alts), *addrs]
        offsets_at = len(self.tabs)
        self.tabs += [0] * 259
        for i, lst in enumerate(lists):
            self.tabs[offsets_at + i] = len(self.tabs)
            self.tabs += lst
        self.tabs[offsets_at + 258] = len(self.tabs)


def _anchored(items) -> bool:
    """Whether every match of `items` starts with `^` (then a search tries only the first position)."""
    items = list(items)
    if not items:
        return False
    op, av = items[0]
    if op is sc.AT:
        return av in (sc.AT_BEGINNING, sc.AT_BEGINNING_STRING)
    if op is sc.BRANCH:
        return all(_anchored(alt) for alt in av[1])
    if op is sc.SUBPATTERN:
        return _anchored(av[3])
    return False


def _tail(c: _Compiler, tree) -> tuple[int, int]:
    """(W, far): every alternative of the pattern that ends at `$` with at most W characters can only
    match within W + 1 characters of the string's end (`$` also matches before a final newline); far
    is the set the other alternatives start with, the only ones a search must try further from the end
    (spaCy's suffixes: W = 5 and `\\.\\.+$`, so far = "."). W = -1 where that reading does not apply."""
    items = list(tree)
    alts = items[0][1][1] if len(items) == 1 and items[0][0] is sc.BRANCH else [items]
    widest, far = 0, []
    for alt in alts:
        alt = list(alt)
        hi = sp.SubPattern(tree.state, alt).getwidth()[1]
        if alt and alt[-1] == (sc.AT, sc.AT_END) and hi < sc.MAXREPEAT:
            widest = max(widest, hi)
            continue
        ranges, nullable = c.first(alt)
        if nullable:
            return -1, -1
        far += ranges
    return widest, c.set_id(_merge(far))


def compile_pattern(pattern: re.Pattern) -> tuple:
    """One pattern as the extension's program: (code, sets, tabs, first-character set or -1, anchored,
    tail width or -1, far set)."""
    if pattern.flags & ~re.UNICODE:
        raise Unsupported(f"flags {pattern.flags}")
    if not isinstance(pattern.pattern, str):
        raise Unsupported("bytes pattern")
    tree = sp.parse(pattern.pattern, pattern.flags)
    c = _Compiler(tree.state)
    c.seq(tree)
    c.emit(MATCH)
    ranges, nullable = c.first(tree)
    first = -1 if nullable else c.set_id(ranges)
    tail, far = _tail(c, tree)
    sets = [array("i", [x for r in s for x in r]) for s in c.sets]
    return array("i", c.code), sets, array("i", c.tabs), first, _anchored(tree), tail, far


def compiled():
    """The compiled English tokenizer (`Compiled`), or None where the extension is not built or spaCy's
    rules use a construct it lacks."""
    try:
        return _compiled()
    except (ImportError, Unsupported):
        return None


@lru_cache(maxsize=1)
def _compiled():
    from functools import partial

    from spacy.attrs import ORTH

    from data.filters import _spacy_en
    from data.filters.tokens import _always_contains, _special_if_letters_whole, _tokenizer

    tok = _tokenizer()
    methods = ("search", "search", "finditer", "match")
    names = ("prefix_search", "suffix_search", "infix_finditer", "url_match")
    if tok.token_match is not None or not tok.faster_heuristics:
        raise Unsupported("token_match or faster_heuristics off")
    if any(getattr(getattr(tok, n), "__name__", None) != m for n, m in zip(names, methods)):
        raise Unsupported("a rule that is no bound method of an re pattern")
    progs = [compile_pattern(getattr(tok, n).__self__) for n in names[:3]]
    url = tok.url_match.__self__
    # A URL match needs a "." (read off the pattern), so strings without one skip it.
    url_needs_dot = _always_contains(url, ".".__eq__)
    plain = type(tok)(
        tok.vocab,
        prefix_search=tok.prefix_search,
        suffix_search=tok.suffix_search,
        infix_finditer=tok.infix_finditer,
        url_match=tok.url_match,
    )
    specials, patterns = {}, []
    for key, subs in tok.rules.items():
        specials[key] = tuple(len(s.get(ORTH, s.get("ORTH", ""))) for s in subs)
        # spaCy's special-case matcher holds a key's affix tokens when a rule finds something in it
        # (Tokenizer.add_special_case with faster_heuristics); tokens with whitespace never occur in a
        # chunk.
        pre, suf = tok.prefix_search(key), tok.suffix_search(key)
        if (
            (pre and pre.end() > pre.start())
            or (suf and suf.end() > suf.start())
            or list(tok.infix_finditer(key))
        ):
            toks = [t.text for t in plain(key)]
            if not any(ch.isspace() for t in toks for ch in t):
                patterns.append(("".join(toks), tuple(map(len, toks))))
    letters_whole = _special_if_letters_whole() is not None
    handle = _spacy_en.build(progs, compile_pattern(url), specials, patterns, url_needs_dot, letters_whole)
    return Compiled(
        partial(_spacy_en.tokenize, handle),
        partial(_spacy_en.tokenize_into, handle),
        partial(_spacy_en.ensure, handle),
        partial(_spacy_en.ensure_text, handle),
    )


class Compiled(NamedTuple):
    """The C tokenizer's entry points."""

    tokenize: Callable[[list[str]], list]
    """chunks -> per chunk a tuple of token strs ((chunk,) for a chunk that is one token), or None for a
    chunk on which the matcher gave up (its step limit), which the caller tokenizes with spaCy."""
    into: Callable[[Iterable[str], dict, dict], list[str]]
    """(chunks, tokens, spaced) -> the chunks on which the matcher gave up; every other chunk is put in
    the dict `tokens` (its tuple) and `spaced` (its tokens joined by " ")."""
    ensure: Callable[[Iterable[str], dict, dict, int], list[str] | None]
    """(chunks, tokens, spaced, limit) -> `into` for the distinct chunks not in `tokens` (the iterable
    may repeat chunks), or None, with nothing added, when they would bring `tokens` to `limit` entries."""
    ensure_text: Callable[[str, dict, dict, int], list[str] | None]
    """(text, tokens, spaced, limit) -> `ensure` for the chunks of `text.split()`, split in C."""


def search(pattern: re.Pattern, s: str, pos: int = 0, endpos: int | None = None):
    """The compiled matcher's `pattern.search(s, pos, endpos)` as (start, end) or None (for tests)."""
    from data.filters import _spacy_en

    endpos = len(s) if endpos is None else endpos
    return _spacy_en.search(compile_pattern(pattern), s, pos, endpos)


def finditer(pattern: re.Pattern, s: str) -> list[tuple[int, int]]:
    """The compiled matcher's `[m.span() for m in pattern.finditer(s)]` (for tests)."""
    from data.filters import _spacy_en

    return _spacy_en.finditer(compile_pattern(pattern), s)

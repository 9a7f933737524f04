"""The C port of spaCy's English tokenizer (data/filters/_spacy_en.c, programs from data/filters/spacy_en.py)
gives spaCy's own tokens, and its regex matcher finds what `re` finds."""

import random
import re

import pytest

from data.filters import spacy_en as se
from data.filters import tokens as tk


@pytest.fixture(scope="module")
def compiled():
    c = se.compiled()
    assert c is not None  # the editable install builds the extension; spaCy's rules compile
    return c.tokenize


def _spacy_or_none(chunk):
    """spaCy's tokens, or None where spaCy cannot tokenize the chunk: it hashes strings as UTF-8, which
    a lone surrogate is not."""
    try:
        return tk.spacy_chunk_tokens(chunk)
    except UnicodeEncodeError:
        return None


def _check(tokenize, chunks):
    got = tokenize(chunks)
    want = list(map(_spacy_or_none, chunks))
    assert [(c, g, w) for c, g, w in zip(chunks, got, want) if w is not None and g != w] == []
    # Where spaCy fails, the C tokenizer still gives tokens that tile the chunk.
    assert all("".join(g) == c for c, g, w in zip(chunks, got, want) if w is None)
    return got


def test_equals_spacy_on_real_chunks(compiled):
    from data.samples import mixed_corpus

    chunks = list(dict.fromkeys(c for d in mixed_corpus(1500) for c in d.split()))
    got = _check(compiled, chunks)
    # A chunk that is one token is returned as itself, not a copy.
    assert all(g[0] is c for c, g in zip(chunks, got) if len(g) == 1)
    assert sum(len(g) > 1 for g in got) > 0.2 * len(chunks)  # the affix and infix rules did split


def test_equals_spacy_on_special_cases(compiled):
    """Every special case alone and wrapped in affixes: the special-case lookups inside _split_affixes
    and the matcher that merges tokens afterwards (":)" split by the affix rules is one token)."""
    keys = [k for k in tk._tokenizer().rules if not any(ch.isspace() for ch in k)]
    wraps = [("(", ")"), ("", ","), ("", "."), ('"', '"'), ("'", "'"), ("", "..."), ("(", ""), ("", ")")]
    chunks = keys + [a + k + b for k in keys for a, b in wraps] + [k + k for k in keys[::7]]
    got = _check(compiled, chunks)
    assert got[keys.index(":)")] == (":)",) and got[keys.index("can't")] == ("ca", "n't")


def _pattern_chars() -> list[str]:
    """The characters spaCy's four patterns name (literals and the ends of set ranges)."""
    from re import _constants as sc
    from re import _parser as sp

    out: set[int] = set()

    def walk(items):
        for op, av in items:
            if op is sc.LITERAL:
                out.add(av)
            elif op is sc.RANGE:
                out.update(av)
            elif op is sc.IN:
                walk(av)
            elif op is sc.BRANCH:
                for alt in av[1]:
                    walk(alt)
            elif op is sc.SUBPATTERN:
                walk(av[3])
            elif op in (sc.MAX_REPEAT, sc.MIN_REPEAT):
                walk(av[2])
            elif op in (sc.ASSERT, sc.ASSERT_NOT):
                walk(av[1])

    tok = tk._tokenizer()
    for name in ("prefix_search", "suffix_search", "infix_finditer", "url_match"):
        p = getattr(tok, name).__self__
        walk(sp.parse(p.pattern, p.flags))
    return sorted(chr(c) for c in out if not chr(c).isspace())


def test_equals_spacy_on_random_strings(compiled):
    rng = random.Random(0)
    specials = list(_pattern_chars())
    common = list(".,:;'\"()-/…$%+*=<>@#") + list("aeksmtAUSC") + list("0125")
    other = ["\u4e00", "\u3002", "\U0001f600", "\ud800", "\udfff", "é", "ß", "\u0430", "\u00b0", "\u00b2"]
    chunks = []
    for _ in range(6000):
        n = rng.randint(1, 15)
        chunks.append(
            "".join(
                rng.choice(specials) if rng.random() < 0.25 else rng.choice(common + other) for _ in range(n)
            )
        )
    chunks += ["http://www.example.com/a?b=1", "a@b.org", "www.a.co.uk", "127.0.0.1:8080", "1.2.3.4.5"]
    _check(compiled, chunks)
    assert sum(_spacy_or_none(c) is None for c in chunks) > 100  # lone surrogates were tried


# The matcher against `re`: each case must fail if the matcher is wrong.
VM_CASES = {
    "alternatives in order": (r"a|ab|abc|b", ["abc", "xab", "b", "", "cab"]),
    "search": (r"cd|c", ["abcde", "xxcxcd", "d"]),
    "lookbehind": (r"(?<=[0-9])km|(?<![a-z])m|(?<=°[FC])\.", ["5km", "akm", "am", "m", "°F.", "°K.", "1m"]),
    "lookahead": (r"[a-z](?=[0-9])|x(?!y)", ["a1", "ab", "xy", "xz", "x"]),
    "lazy repeat": (r"a.*?b|<.+?>", ["aaabab", "ab", "a\nb", "<x><y>"]),
    "greedy repeat": (r"a.*b|\.\.+", ["aaabab", "a..b...", "x."]),
    "bounded repeat": (r"a{2,4}|b{3}|c{1,2}?d|e{0,2}f", ["aaaaaa", "a", "bbbb", "ccd", "cd", "eeef", "f"]),
    "negated category sets": (r"[^\W\d_]+|[^\s]x|\S\D", ["12ab_c3", "é1x", " x", "9a", "١x"]),
    "categories": (r"\w+|\d+|\s", ["héllo_1", "٣4", "\u00a0", "\u2003a"]),
    "sets with ranges": (r"[a-cx-z]+|[\u4e00-\u9fff]|[^a-z0-9]", ["abcxyz", "中文", "d", "D", "\ud800"]),
    "anchors": (r"^ab|b$|^$", ["ab", "cab", "cab\n", "", "abc"]),
    "word boundary": (r"\b\w|\w\b|\B.", ["ab cd", "x", "", "_ _"]),
    "empty matches": (r"x*|\b|:+", ["a::bc", "axxb", ""]),
    "nested groups": (r"(?:(?:[a-z][a-z0-9-]{0,3})?[a-z]\.)+(?:com|org)", ["ab.cd.org", "a-b.com", "x.c"]),
}


@pytest.mark.parametrize("name", list(VM_CASES))
def test_matcher_equals_re(name):
    pattern, strings = VM_CASES[name]
    p = re.compile(pattern)
    for s in strings:
        for pos in range(len(s) + 1):
            m = p.search(s, pos)
            assert se.search(p, s, pos) == (m and m.span()), (pattern, s, pos)
        assert se.finditer(p, s) == [m.span() for m in p.finditer(s)], (pattern, s)
        m = p.search(s, 0, max(0, len(s) - 1))
        assert se.search(p, s, 0, max(0, len(s) - 1)) == (m and m.span()), (pattern, s, "endpos")


def test_matcher_refuses_what_it_lacks():
    for pattern in (r"(a)\1", r"(?i)a", r"(a)?(?(1)b|c)", r"(?:a?)*b", r"(?m)^a", r"(?>ab)", r"a++"):
        with pytest.raises(se.Unsupported):
            se.compile_pattern(re.compile(pattern))


def test_matcher_gives_up_instead_of_hanging():
    """An exponential backtrack stops at the step limit (the tokenizer then asks spaCy)."""
    with pytest.raises(RuntimeError):
        se.search(re.compile(r"(?:a|a)*c"), "a" * 40)


def test_fallback_without_the_extension(monkeypatch):
    """Without the C tokenizer, tokens come from spaCy, equal to the compiled ones."""
    from data.filters import text as ft

    chunks = ["can't", ":)", "(hello),", "U.S.", "5km.", "a-b", "http://x.org/a", "word"]
    ft.clear_caches()
    monkeypatch.setattr(se, "compiled", lambda: None)
    assert [tk.chunk_tokens(c) for c in chunks] == list(map(tk.spacy_chunk_tokens, chunks))
    ft.clear_caches()


def test_tokenize_chunks_splits_like_str_split(monkeypatch):
    """tokenize_chunks splits the text in C (spacy_en ensure_text): it caches exactly the chunks of
    `text.split()` (Unicode whitespace included, repeats once), and under a small cache limit it empties
    the cache first and still caches every chunk of the document."""
    from data.filters import text as ft

    ws = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2007\u2028\u2029\u202f\u3000"
    rng = random.Random(1)
    words = ["can't", "(a)", "x", "5km.", "\u4e00\u4e8c", "U.S.", "a-b", "\u200b", "\ufeffz", "\ud800"]
    texts = [
        "".join(rng.choice(words) + rng.choice(ws) * rng.randint(0, 2) for _ in range(rng.randint(0, 12)))
        for _ in range(300)
    ]
    ft.clear_caches()
    for t in texts:
        before = set(tk._CHUNK_TOKENS)
        tk.tokenize_chunks(t)
        assert set(tk._CHUNK_TOKENS) == before | set(t.split()), repr(t)
    assert all(tk._SPACED[c] == " ".join(tk._CHUNK_TOKENS[c]) for c in tk._CHUNK_TOKENS)
    ft.clear_caches()
    monkeypatch.setattr(tk, "_CACHE_LIMIT", 8)
    for t in texts:
        tk.tokenize_chunks(t)
        assert set(t.split()) <= set(tk._CHUNK_TOKENS), repr(t)
        assert len(tk._CHUNK_TOKENS) < 8 + len(set(t.split()))
    ft.clear_caches()

"""Quality filters: each rule on hand-made documents with exact numbers, and decisions identical to
datatrove 0.10.1 (the reference, in the `ref`/`dev` extras) on real text."""

from __future__ import annotations

import pytest

from data.config import C4Config, FiltersConfig, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig
from data.filters import C4Lines, DocText, FilterChain, FineWebQuality, GopherQuality, GopherRepetition
from data.filters.text import count_sentences
from data.filters.tokens import split_words

PROSE = (
    "The history of the town is long and that is why the people of the valley have a museum with many "
    "old things. It was built in the year of the great flood, and the walls of the hall are made with "
    "stone from the river. Visitors come to see the paintings and to walk in the garden. It is open every day. Children like it a lot."
)


def gq(text: str, **kw) -> str | None:
    return GopherQuality(GopherQualityConfig(**kw))(DocText(text))


def test_gopher_quality_rules():
    assert gq(PROSE) is None
    assert gq("the cat and the dog") == "gopher_short_doc"  # 5 words < 50
    assert gq(PROSE + " ###" * 10) == "gopher_too_many_hashes"  # 30 '#' / 80 words > 0.1
    assert gq("\n".join("- " + PROSE for _ in range(3))) == "gopher_too_many_bullets"
    no_stop = " ".join(["museum garden painting river stone valley"] * 10)
    assert gq(no_stop) == "gopher_enough_stop_words"
    assert gq(no_stop, min_stop_words=0) is None
    long_words = " ".join(["extraordinarily"] * 60) + " the and"
    assert gq(long_words) == "gopher_above_avg_threshold"


def test_gopher_line_marks_equal_splitlines():
    """GopherQuality's bullet and end-ellipsis line counts (data/filters/_chunks.c `line_marks`) equal
    datatrove's: over text.splitlines(), lines whose lstrip() starts with "\u2022" or "-" and whose
    rstrip() ends with "..." or "\u2026", on every string of up to 5 characters over line breaks
    splitlines knows ("\n", "\r", "\r\n", "\x0b", "\u2028"), spaces, the marks and a letter."""
    import itertools

    from data.filters._chunks import line_marks

    checked = 0
    for size in range(6):
        for chars in itertools.product(
            ["a", "\n", "\r", "\x0b", "\u2028", " ", "-", "\u2022", ".", "\u2026"], repeat=size
        ):
            text = "".join(chars)
            lines = text.splitlines()
            want = (
                len(lines),
                sum(s.lstrip().startswith(("\u2022", "-")) for s in lines),
                sum(s.rstrip().endswith(("...", "\u2026")) for s in lines),
            )
            assert line_marks(text) == want, repr(text)
            checked += want[1] > 0 and want[2] > 0
    assert checked > 1000
    assert line_marks("x\U0001f600...\r\n  - y\n") == (2, 1, 1)


def test_gopher_repetition_rules():
    rep = GopherRepetition(GopherRepetitionConfig())
    assert rep(DocText(PROSE)) is None
    assert rep(DocText("\n".join(["same line here"] * 4 + ["other", "more", "text"]))) == "dup_line_frac"
    para = PROSE + "\n\n" + "A short note.\n\n" * 3
    assert rep(DocText(para)) == "dup_para_frac"  # 2 of 5 paragraphs repeat: 0.4 > 0.3
    ngram = PROSE + " ".join(["the museum of the valley"] * 8)
    assert rep(DocText(ngram)).startswith(("top_", "duplicated_"))


def test_c4_removes_lines_and_names_page_drops():
    c4 = C4Lines(C4Config())
    text = (
        "Menu Home About\n"  # no terminal punctuation: removed
        "This sentence has enough words. And another one here.\n"
        "Please enable JavaScript to view this page.\n"  # javascript: removed
        "We use cookies to improve your experience here.\n"  # policy: removed
        "Short one.\n"  # 2 words < 3: removed
        "The museum opened in 1901 [1] and is still open today. It is free.\n"
        "Everyone is welcome to visit the garden. Dogs are not allowed inside!"
    )
    new, reason = c4.clean(text)
    assert reason is None
    assert new.split("\n") == [
        "This sentence has enough words. And another one here.",
        "The museum opened in 1901  and is still open today. It is free.",
        "Everyone is welcome to visit the garden. Dogs are not allowed inside!",
    ]
    assert c4.clean(text + "\nfunction f() { return 1; } is code here.") == (None, "curly_bracket")
    assert c4.clean("Lorem ipsum dolor sit amet.") == (None, "lorem_ipsum")
    assert c4.clean("One sentence only, with words.") == (None, "too_few_sentences")


def test_c4_reference_variant_differs_from_datatrove_defaults():
    # c4_utils.py: end marks . ? ! " (no '), lines of >= 5 words, pages of >= 3 sentences.
    lines = [
        "Four words are here.",
        "It said 'go home now, please'",
        "This line has five words.",
        "And so does this one.",
    ]
    text = "\n".join(lines + ["A sixth line with words ends here."])
    dt, _ = C4Lines(C4Config(variant="datatrove", min_num_sentences=1)).clean(text)
    ref, _ = C4Lines(C4Config(variant="reference")).clean(text)
    assert "Four words are here." in dt and "It said 'go home now, please'" in dt
    assert ref.split("\n") == [
        "This line has five words.",
        "And so does this one.",
        "A sixth line with words ends here.",
    ]
    assert C4Lines(C4Config(variant="reference")).clean("\n".join(lines[2:])) == (None, "too_few_sentences")


def test_fineweb_rules():
    fw = FineWebQuality(FineWebConfig())
    assert fw(DocText(PROSE)) is None
    assert fw(DocText("\n".join(f"item number {i}" for i in range(20)))) == "line_punct_ratio"
    short = "\n".join(["Yes.", "No.", "Maybe so.", PROSE])
    assert fw(DocText(short)) == "short_line_ratio"  # 3 of 4 lines <= 30 chars: 0.75 > 0.67
    dup = PROSE + "\n" + "This exact line repeats itself.\n" * 3
    assert fw(DocText(dup)) == "char_dup_ratio"


def test_chain_order_and_reason_names():
    cfg = FiltersConfig()
    cfg.gopher_quality.enabled = cfg.c4.enabled = cfg.fineweb.enabled = True
    chain = FilterChain(cfg)
    assert chain("too short") == (None, "gopher_quality/gopher_short_doc")
    text, reason = chain(PROSE + "\nMenu Home About")
    assert reason is None and "Menu" not in text  # C4 rewrote the text before FineWeb saw it


def test_words_and_sentences_match_datatrove_tokenizer():
    text_mod = pytest.importorskip("datatrove.utils.text", reason="datatrove (the `ref` extra) not installed")
    samples = [
        "Don't stop: U.S. prices rose 3.5% (a lot)... e-mail me at a@b.com!",
        'Hello.  ... World?! "Quoted." Next one',
        "Mr. Smith went to Washington. He arrived at 5 p.m. and left!",
        PROSE,
    ]
    for s in samples:
        assert split_words(s) == text_mod.split_into_words(s, "en")
        assert count_sentences(s) == len(text_mod.split_into_sentences(s, "en"))


@pytest.fixture(scope="module")
def corpus():
    from data.samples import mixed_corpus

    docs = mixed_corpus(200)
    if len(docs) < 200:
        pytest.skip("fewer than 200 real documents installed (package docs / fortunes / handbook)")
    return docs


def test_decisions_equal_datatrove(corpus):
    filters = pytest.importorskip(
        "datatrove.pipeline.filters", reason="datatrove (the `ref` extra) not installed"
    )
    from datatrove.data import Document

    ours = {
        "gopher_quality": (filters.GopherQualityFilter(), GopherQuality(GopherQualityConfig())),
        "gopher_repetition": (filters.GopherRepetitionFilter(), GopherRepetition(GopherRepetitionConfig())),
        "fineweb": (filters.FineWebQualityFilter(), FineWebQuality(FineWebConfig())),
    }
    for name, (ref, mine) in ours.items():
        decisions = []
        for text in corpus:
            r = ref.filter(Document(text=text, id="x"))
            decisions.append(("keep" if r is True else r[1]) == (mine(DocText(text)) or "keep"))
        assert sum(decisions) == len(corpus), f"{name}: {decisions.count(False)} decisions differ"
    c4_ref, c4 = filters.C4QualityFilter(), C4Lines(C4Config())
    dropped = 0
    for text in corpus:
        d = Document(text=text, id="x")
        r = c4_ref.filter(d)
        new, reason = c4.clean(text)
        if r is True:
            assert new == d.text
        else:
            assert reason == r[1]
            dropped += 1
    assert 0 < dropped < len(corpus)  # the sample exercises both outcomes


VARIED = [
    "Don't stop: U.S. prices rose 3.5% (a lot)... e-mail me at a@b.com! It's 10km, 5kg and 12:30:45 today.",
    "See https://example.com/path?x=1&y=2, www.kiln.dev or user@example.org; C++ and a/b x=y --option.",
    "Prices: $5, US$10, 5$, €3.50, 1,000,000 and 3.14; it was 451°F. Mr. Smith, Dr. Who etc. can't gonna.",
    "O'Neil's rock'n'roll, well-known 'quoted' \"double\" (parenthetical) [bracket] {curly} … !!! ??? ...",
    "Naïve café in der Straße, ÉCOLE Ångström; ﬁ ligature; ＦＵＬＬＷＩＤＴＨ text; emoji 😀 test #hashtag @mention.",
    "Привет, мир! Это тест: 5км, 3кг и «кавычки» — тире. Ёлка, ещё; ПРОПИСНЫЕ буквы.",
    "日本語のテキスト。中文，标点符号！한국어 문장입니다. مرحبا بالعالم. हिन्दी पाठ है। Ελληνικά κείμενα.",
    "Zażółć gęślą jaźń. Příliš žluťoučký kůň úpěl ďábelské ódy. ¿Qué tal? ¡Muy bien! L'été, aujourd'hui.",
    "snake_case camelCase ALLCAPS Title Mixed123 123abc 2nd 3rd 4th 1990s '90s A. B. C. e.g. i.e. vs.",
    "\x1b[31mred\x1b[0m tab\tseparated\u00a0nbsp\u200bzero-width line\nnew\n\nparagraph ::: ;; ,, -- —",
]


def test_fast_tokenizer_equals_spacy_on_varied_text(monkeypatch):
    """The fast path (the C tokenizer, data/filters/spacy_en.py) gives spaCy's own tokens for every chunk
    of a varied corpus, and the filters decide the same with it as with spaCy per chunk."""
    from data.filters import text as ft
    from data.filters import tokens as tk
    from data.samples import mixed_corpus

    docs = VARIED + mixed_corpus(300)
    chunks = list(dict.fromkeys(c for d in docs for c in d.split()))
    ft.clear_caches()
    # The C tokenizer did the work: the spaCy fallback is not called.
    with monkeypatch.context() as m:
        m.setattr(tk, "_spacy_tokens", None)
        fast_tokens = [tk.chunk_tokens(c) for c in chunks]
    differ = [c for c, t in zip(chunks, fast_tokens) if t != tk.spacy_chunk_tokens(c)]
    assert differ == []

    cfg = FiltersConfig()
    cfg.gopher_repetition.enabled = cfg.gopher_quality.enabled = cfg.c4.enabled = cfg.fineweb.enabled = True
    singles = [GopherQuality(GopherQualityConfig()), GopherRepetition(GopherRepetitionConfig())]
    singles += [FineWebQuality(FineWebConfig())]

    def decide():
        out = [FilterChain(cfg)(d) for d in docs]
        out += [[f(DocText(d)) for f in singles] + [C4Lines(C4Config()).clean(d)] for d in docs]
        return out

    ft.clear_caches()
    fast = decide()
    ft.clear_caches()
    monkeypatch.setattr(ft, "chunk_tokens", tk.spacy_chunk_tokens)
    assert decide() == fast
    kept = sum(r[1] is None for r in fast[: len(docs)])
    assert 0 < kept < len(docs)  # both outcomes exercised


@pytest.fixture(params=[False, True], ids=["hashed", "collide"])
def collide(request):
    """With collide, every hash in data/filters/_repetition.c is 0: hashes only pick candidates, and the
    characters themselves must decide which n-grams are equal."""
    from data.filters import _repetition

    if not request.param:
        yield False
        return
    old = _repetition._set_hash_mask(0)
    try:
        yield True
    finally:
        _repetition._set_hash_mask(old)


def test_gopher_repetition_ngram_fractions_equal_datatrove(collide):
    """GopherRepetition's n-gram measures equal datatrove's own functions to the last character: on
    repetitive random documents (including words whose concatenations collide, ("ab", "c") vs ("a",
    "bc"), which datatrove's duplicate n-grams count as equal), a threshold a hair below datatrove's
    value drops the document for that rule and a hair above keeps it, for every n."""
    grf = pytest.importorskip(
        "datatrove.pipeline.filters.gopher_repetition_filter",
        reason="datatrove (the `ref` extra) not installed",
    )
    import random

    rng = random.Random(0)
    vocab = ["a", "ab", "abc", "b", "bc", "c", "the", "cat", "sat", "on", "mat", "and", "then", "ran"]
    off = dict(dup_line_frac=0, dup_para_frac=0, dup_line_char_frac=0, dup_para_char_frac=0)
    checked = 0
    for _ in range(150):
        pool = vocab[: rng.randint(2, len(vocab))]
        words = [rng.choice(pool) for _ in range(rng.randint(12, 120))]
        if rng.random() < 0.5:  # a repeated block, as in boilerplate
            block = words[: rng.randint(5, 12)]
            words[rng.randint(0, len(words) - 1) :] += block * rng.randint(1, 3)
        text = " ".join(words)
        assert split_words(text) == words
        for n in (2, 3, 4, 5, 6, 8, 10):
            if len(words) < n:
                continue
            if n <= 4:
                value = grf.find_top_duplicate(grf.get_n_grams(words, n)) / len(text)
                kw = dict(top_n_grams={n: 0}, dup_n_grams={})
                key, reason = "top_n_grams", f"top_{n}_gram"
            else:
                value = grf.find_all_duplicate(words, n) / len(text)
                kw = dict(top_n_grams={}, dup_n_grams={n: 0})
                key, reason = "dup_n_grams", f"duplicated_{n}_n_grams"
            if value == 0:
                continue
            for eps, expect in ((-1e-9, reason), (1e-9, None)):
                kw[key] = {n: value + eps}
                got = GopherRepetition(GopherRepetitionConfig(**off, **kw))(DocText(text))
                assert got == expect, (n, value, eps, text)
            checked += 1
    assert checked > 500


@pytest.mark.parametrize(
    "words, rule, n, chars",
    [
        # Duplicate n-grams are joined without a separator: "ab"+"c" repeats as "a"+"bc" (3 characters).
        (["ab", "c", "a", "bc"], "dup", 2, 3),
        # ... and a match skips the next n positions: "x y x y x y" has 2-grams xy, yx, xy (match, skip
        # to 4), xy (match): 4 characters, not 6.
        (["x", "y", "x", "y", "x", "y"], "dup", 2, 4),
        # Ties in Counter.most_common(1) go to the n-gram inserted first, not the longest ("aa b" would
        # give 8) and not the first to reach the top count ("z w", 6): "xx y" x 2 = 8.
        (["c", "d", "c", "d", "aa", "b", "aa", "b"], "top", 2, 6),
        (["xx", "y", "z", "w", "z", "w", "xx", "y"], "top", 2, 8),
        # Every n-gram once: the first one, times 1 ("a b", not "ccc ddd").
        (["a", "b", "ccc", "ddd"], "top", 2, 3),
        # Lengths in code points, on 2- and 4-byte strings: "😀a b" x 2; "😀a😀" again at position 2.
        (["😀a", "b", "😀a", "b", "c"], "top", 2, 8),
        (["😀", "a😀", "😀a", "😀"], "dup", 2, 3),
        (["Ωβ", "γ", "Ω", "βγ", "δ"], "dup", 2, 3),
        (["Ωβ", "γ", "Ωβ", "γ"], "top", 2, 8),
        # Fewer words than n: a top rule has no n-grams and is skipped; a dup rule counts 0 characters.
        (["a", "b", "c"], "top", 4, None),
        (["a", "b", "c"], "dup", 5, 0),
        ([], "dup", 5, 0),
    ],
)
def test_gopher_repetition_ngram_edge_cases(collide, words, rule, n, chars):
    """first_rule (data/filters/_repetition.c) on hand-counted n-grams: it drops the document when the
    fraction is a hair below chars / len(text) and keeps it a hair above, as datatrove's functions count."""
    from data.filters._repetition import first_rule

    spaced = " ".join(words)
    n_chars = len(spaced) + 1  # a text one character longer than its words (e.g. a final newline)
    try:
        from datatrove.pipeline.filters import gopher_repetition_filter as grf
    except ImportError:
        grf = None
    if grf and rule == "top":
        grams = grf.get_n_grams(words, n)
        assert (grf.find_top_duplicate(grams) if grams else None) == chars
    elif grf:
        assert grf.find_all_duplicate(words, n) == chars

    def decide(frac):
        if rule == "top":
            return first_rule(spaced, n_chars, ((n, frac),), ())
        return first_rule(spaced, n_chars, (), ((n, frac),))

    reason = f"top_{n}_gram" if rule == "top" else f"duplicated_{n}_n_grams"
    if chars is None:
        assert decide(-1.0) is None  # skipped even with a threshold every value passes
        return
    value = chars / n_chars
    assert decide(value - 1e-9) == reason
    assert decide(value + 1e-9) is None
    assert decide(value) is None  # strictly greater drops


def test_gopher_repetition_rule_order():
    """Top rules are checked before duplicate rules, each in increasing n, and the first that drops names
    the reason."""
    rep = GopherRepetition(GopherRepetitionConfig(top_n_grams={3: 0.0, 2: 0.0}, dup_n_grams={6: 0.0, 5: 0.0}))
    text = " ".join(["the museum of the valley"] * 8)
    assert rep(DocText(text)) == "top_2_gram"
    rep = GopherRepetition(GopherRepetitionConfig(top_n_grams={}, dup_n_grams={6: 0.0, 5: 0.0}))
    assert rep(DocText(text)) == "duplicated_5_n_grams"
    rep = GopherRepetition(GopherRepetitionConfig(top_n_grams={}, dup_n_grams={}))
    assert rep(DocText(text)) is None


def test_gopher_paragraphs_and_lines_equal_datatrove_regex(collide):
    """duplicate_pieces (data/filters/_repetition.c) counts datatrove's paragraphs and lines,
    re.split(r"\n{2,}", text.strip()) and re.split("\n+", text), as its find_duplicates does: on every
    string of up to 8 characters over "a", "\n", "\r", " " (runs of 1..8 newlines, leading and trailing
    ones, "\r\n", whitespace-only text) and of up to 5 over 2- and 4-byte characters, Unicode whitespace
    that str.strip() removes ("\u2028", "\x1c", "\u3000") and an astral one (lengths in code points)."""
    import itertools
    import re

    from data.filters import gopher
    from data.filters._repetition import duplicate_pieces

    def find_duplicates(items):  # datatrove gopher_repetition_filter.find_duplicates
        seen, n, chars = set(), 0, 0
        for x in items:
            if x in seen:
                n, chars = n + 1, chars + len(x)
            else:
                seen.add(x)
        return n, chars

    checked = 0
    sweeps = [("a\n\r ", 8), ("a\n\u2028😀\x1c\u3000", 5)] if not collide else [("a\n\r ", 6)]
    for alphabet, longest in sweeps:
        for size in range(longest + 1):
            for chars in itertools.product(alphabet, repeat=size):
                text = "".join(chars)
                paragraphs, lines = re.split(r"\n{2,}", text.strip()), re.split("\n+", text)
                assert duplicate_pieces(text, True) == (len(paragraphs), *find_duplicates(paragraphs)), repr(
                    text
                )
                assert duplicate_pieces(text, False) == (len(lines), *find_duplicates(lines)), repr(text)
                checked += 1
    assert checked == sum(len(a) ** k for a, longest in sweeps for k in range(longest + 1))
    # By hand: paragraphs "x", "y", " x", "y" (one repeat, 1 character); lines x, ab, x, ab, x.
    assert duplicate_pieces(" \n x\n\n\ny\n\n x\n\n\n\ny \n", True) == (4, 1, 1)
    assert duplicate_pieces("x\nab\n\nx\nab\nx\n", False) == (6, 3, 4)
    assert duplicate_pieces("😀b\n😀b\nΩ\nΩ", False) == (4, 2, 3)
    assert gopher._duplicates(["x", "", "ab", "x", "", "ab", "x"]) == (4, 4)


def test_batched_spacy_call_equals_one_call_per_chunk():
    """Where the C tokenizer is not built, new chunks go through spaCy in one call per document
    (data/filters/tokens.py `_spacy_tokens`); its special-case matcher works across tokens (":(" from ":"
    and "("), so neighbouring chunks must not shadow each other's special cases. Every ordered pair of
    emoticon-like chunks, tokenized together, gives each chunk's own tokens."""
    from data.filters import tokens as tk

    pieces = [
        "ban:",
        "(",
        ":(",
        "''AS",
        "x'",
        "'",
        "(==)",
        "=)",
        "(=",
        ":)",
        "a.",
        "can't",
        "''",
        ":",
        "=",
        "x",
    ]
    pairs = [(a, b) for a in pieces for b in pieces if a != b]
    for a, b in pairs:
        assert tk._spacy_tokens([a, b]) == [tk.spacy_chunk_tokens(a), tk.spacy_chunk_tokens(b)], (a, b)
    together = ["can't", "ban:", "x", "don't", ":)", "(:"]
    assert tk._spacy_tokens(together) == list(map(tk.spacy_chunk_tokens, together))


def test_always_contains_reads_the_pattern():
    """The coarse table for chunks without "." and the URL pre-check rest on `_always_contains(url_match,
    ".")`, and the letters-only fast path on `_always_contains(rule, not a letter)`."""
    import re

    from data.filters import tokens as tk

    dot, colon = ".".__eq__, ":".__eq__
    assert tk._always_contains(re.compile(r"a\.b"), dot)
    assert tk._always_contains(re.compile(r"(?:x\.)+y|[.]z"), dot)
    assert not tk._always_contains(re.compile(r"a|b\."), dot)
    assert not tk._always_contains(re.compile(r"(?:x\.)*y"), dot)
    assert not tk._always_contains(re.compile(r"[.,]"), dot)
    assert tk._always_contains(tk._tokenizer().url_match.__self__, dot)
    assert not tk._always_contains(tk._tokenizer().url_match.__self__, colon)

    # Sets and lookarounds: what a lookaround asserts lies in the string too; \w, \d and negated sets
    # say nothing; case folding makes a literal stand for others.
    def non_letter(ch):
        return not ch.isalpha()

    assert tk._always_contains(re.compile(r"(?<=[0-9])(?:km|kg)"), non_letter)
    assert tk._always_contains(re.compile(r"[a-z](?=[-+])"), non_letter)
    assert not tk._always_contains(re.compile(r"(?<![0-9])km"), non_letter)
    assert not tk._always_contains(re.compile(r"(?<=\d)km"), non_letter)
    assert not tk._always_contains(re.compile(r"[^a-z]x"), non_letter)
    assert not tk._always_contains(re.compile(r"[0-9a]"), non_letter)
    assert not tk._always_contains(re.compile(r"\.", re.IGNORECASE), dot)
    # What the letters-only fast path rests on: no English affix, infix or URL rule can match letters.
    assert tk._special_if_letters_whole() is not None


def test_tail_suffix_search_equals_full_search():
    """The fast tokenizer's suffix search looks only at a chunk's tail (`_tail_search`); it finds the
    same match as spaCy's pattern on the whole chunk, including runs of dots longer than the tail. Its
    infix and URL searches find the same matches too."""
    import random

    from data.filters import tokens as tk

    pattern = tk._tokenizer().suffix_search.__self__
    fast = tk._tail_search(pattern)
    assert fast is not pattern.search  # the optimization applies to spaCy's English suffixes
    rng = random.Random(0)
    alphabet = "ab.,'s$%)]\"km5²°C…!?-" + "\u0430\u4e00"
    chunks = VARIED[0].split() + VARIED[2].split() + VARIED[5].split()
    chunks += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))) for _ in range(20000)]
    chunks += ["x" + "." * k for k in range(1, 12)] + ["5" + "km" + "." * k for k in range(8)]
    for s in chunks:
        a, b = pattern.search(s), fast(s)
        assert (a and a.span()) == (b and b.span()), s
    # The infix and URL shortcuts of the fast tokenizer (`_trigger`, the "." pre-check) find what the
    # unmodified patterns find, and do skip strings.
    plain, quick = tk._tokenizer(), tk._fast_tokenizer()
    assert tk._trigger(plain.infix_finditer.__self__) is not None
    chunks += ["a-b", "a--b", "x,y", "a.B", "1+2", "a:b", "a/b", "a…b", "x…", "a©b", "www.a.com", "a@b.org"]
    for s in chunks:
        spans = [m.span() for m in plain.infix_finditer(s)]
        assert spans == [m.span() for m in quick.infix_finditer(s)], s
        a, b = plain.url_match(s), quick.url_match(s)
        assert (a and a.span()) == (b and b.span()), s
    assert quick.infix_finditer("abc") == ()


def test_word_counts_equal_counts_of_the_word_list(monkeypatch):
    """GopherQuality reads per-chunk packed counts (`word_counts`) and GopherRepetition the words joined
    by spaces (`spaced_words`), not the word list: on real and varied text, each equals the same taken
    over `split_words`, also when the caches are emptied mid-document because they reached their size
    limit (a document's earlier chunks must not go missing)."""
    from data.filters import text as ft
    from data.filters import tokens as tk
    from data.samples import mixed_corpus

    docs = VARIED + mixed_corpus(300) + ["You cannot say gonna here"]  # letters-only special cases
    # str.split()'s whitespace beyond ASCII (the C counter splits the same way), astral letters and
    # symbols (lengths in code points), symbol-only words, no words at all.
    docs += [
        "a\x1cb\x1dc\x1ed\x1ff\x85g\u2028h\u3000i\xa0the \U0001d400\U0001d401 \U0001f600 ... ## -- ,",
        "",
        "  \n ",
    ]
    docs += [" ".join(["the of and to be that have with"] * 3 + ["the#"])]

    def expected(text):
        words = split_words(text)
        non_symbol = [w for w in words if any(ch not in ft.PUNCTUATION_SET for ch in w)]
        return ft.WordCounts(
            len(words),
            len(non_symbol),
            sum(map(len, non_symbol)),
            sum(any(ch.isalpha() for ch in w) for w in words),
            len(set(ft.STOP_WORDS).intersection(words)),
        )

    ft.clear_caches()
    want = [expected(d) for d in docs]
    assert [ft.word_counts(d) for d in docs] == want
    assert [tk.spaced_words(d) for d in docs] == [" ".join(split_words(d)) for d in docs]
    assert want[-1].stop_words == 8 and sum(w.stop_words == 0 for w in want) > 0
    ft.clear_caches()
    monkeypatch.setattr(tk, "_CACHE_LIMIT", 40)
    monkeypatch.setattr(ft, "_CACHE_LIMIT", 40)
    assert [ft.word_counts(d) for d in docs] == want
    assert [expected(d) for d in docs] == want
    assert [tk.spaced_words(d) for d in docs] == [" ".join(split_words(d)) for d in docs]
    assert len(tk._CHUNK_TOKENS) < 40 + max(len(set(d.split())) for d in docs)
    ft.clear_caches()

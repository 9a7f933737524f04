"""HTML extraction (trafilatura) on real pages, and tokenizer options (unigram, special tokens)."""

from __future__ import annotations

import glob
import os

import pytest

from data.html import html_to_text, reset_html_state
from data.normalize import normalize
from data.samples import handbook_pages


def test_html_to_text_keeps_the_article_and_drops_markup():
    html = (
        "<html><head><title>T</title><script>var x = 1;</script></head><body>"
        "<nav><a href='/'>Home</a> | <a href='/about'>About</a></nav>"
        "<article><h1>Kilns</h1><p>A kiln is a thermally insulated chamber, a type of oven, that produces "
        "temperatures sufficient to complete some process, such as hardening, drying, or chemical changes.</p>"
        "<p>Kilns have been used for millennia to turn objects made from clay into pottery, tiles and bricks.</p>"
        "</article><footer>Copyright 2026</footer></body></html>"
    )
    text = html_to_text(html)
    assert "A kiln is a thermally insulated chamber" in text and "into pottery, tiles and bricks." in text
    assert "var x" not in text and "<p>" not in text
    assert html_to_text("") == "" and html_to_text("<html></html>") == ""


def test_handbook_pages_extract_to_prose():
    pages = handbook_pages()[:5]
    if not pages:
        pytest.skip("debian-handbook not installed (apt-get install debian-handbook)")
    reset_html_state()
    texts = [normalize(html_to_text(p)) for p in pages]
    assert sum(len(t) > 200 for t in texts) >= 3
    assert not any("</div>" in t or "<a href" in t for t in texts)
    # trafilatura's deduplication remembers segments across calls: after the same pages were extracted
    # twice more, a fresh start (what every shard gets) yields the same text again.
    for _ in range(2):
        [html_to_text(p) for p in pages]
    reset_html_state()
    assert [normalize(html_to_text(p)) for p in pages] == texts


def test_unigram_tokenizer_with_special_tokens(tmp_path):
    import sentencepiece as spm

    from data.tokenizer import train_tokenizer

    texts = []
    for p in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "json", "*.py"))):
        with open(p, encoding="utf-8") as f:
            texts.append(f.read())
    special = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    model = train_tokenizer(
        texts * 3,
        model_prefix=str(tmp_path / "u"),
        vocab_size=400,
        model_type="unigram",
        byte_fallback=True,
        special_tokens=special,
    )
    sp = spm.SentencePieceProcessor(model_file=model)
    assert sp.get_piece_size() == 400
    ids = [sp.piece_to_id(t) for t in special]
    assert ids == list(range(2, 2 + len(special)))  # right after <unk>=0 and <eod>=1
    text = "<|im_start|>user\nsome ü text 字<|im_end|>"
    enc = sp.encode(text)
    assert ids[3] in enc and ids[4] in enc and sp.decode(enc) == text  # byte fallback: nothing is lost

"""Mix plan arithmetic and refusals, FineWeb-style PII redaction, language id."""

from __future__ import annotations

import pytest

from data.langid import detect, language_decision
from data.mix import format_plan, mix_plan
from data.pii import PIIRedactor
from train.errors import ConfigError


def test_mix_plan_numbers():
    plan = mix_plan(
        {"base": {"tokens": 1_000_000, "mix": {"web": 3, "code": 1}}},
        available={"web": 500_000, "code": 100_000},
        max_repetition={"web": 4, "code": 4},
    )
    web, code = plan["base"]["sources"]["web"], plan["base"]["sources"]["code"]
    assert (web["tokens"], web["epochs"], web["weight"]) == (750_000, 1.5, 0.75)
    assert (code["tokens"], code["epochs"]) == (250_000, 2.5)
    assert "base" in format_plan(plan) and "750,000" in format_plan(plan)


def test_impossible_mix_is_refused_with_numbers():
    with pytest.raises(
        ConfigError,
        match=r"250,000 tokens of 'code' \(2.50 epochs of its 100,000 tokens\) but "
        r"max_repetition is 2.*at most 800,000 tokens",
    ):
        mix_plan(
            {"base": {"tokens": 1_000_000, "mix": {"web": 3, "code": 1}}},
            available={"web": 500_000, "code": 100_000},
            max_repetition={"web": 4, "code": 2},
        )
    with pytest.raises(ConfigError, match="no such source"):
        mix_plan({"s": {"tokens": 10, "mix": {"nope": 1}}}, available={"web": 1}, max_repetition={"web": 1})


def test_pii_redaction_as_fineweb():
    r = PIIRedactor()
    text = "Mail john.doe@corp.io or ann@x.org; server 8.8.8.8, router 192.168.1.1, version 1.2.3.4.5"
    out = r(text)
    assert out == (
        "Mail email@example.com or firstname.lastname@example.org; server 22.214.171.124, router 192.168.1.1, "
        "version 126.96.36.199.5"
    )
    assert r.counts == {"emails": 2, "ips": 2}
    assert PIIRedactor(emails=False, ips=True)("a@b.com") == "a@b.com"


def test_language_id_on_real_multilingual_fortunes():
    from data.samples import fortune_languages, fortunes

    langs = fortune_languages()
    if len(langs) < 4:
        pytest.skip(
            "Debian fortunes in 4+ languages not installed (apt-get install fortunes-de fortunes-es ...)"
        )
    correct = total = 0
    for directory, lang in langs.items():
        for text in [t for t in fortunes(directory) if len(t) > 80][:40]:
            correct += detect(text)[0] == lang
            total += 1
    assert correct / total >= 0.9, f"{correct}/{total}"
    assert (
        language_decision("Der Hund schläft im Garten unter dem Baum.", allowed=["en"], threshold=0.5)[2]
        == "language/de"
    )
    assert (
        language_decision("The dog sleeps in the garden.", allowed=["en"], threshold=1.01)[2]
        == "language/low_score"
    )
    assert detect("   ") == ("unknown", 0.0)

"""C4's page cleaning (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", JMLR 21, section 2.2) in two variants:

- `datatrove`: datatrove 0.10.x `C4QualityFilter` defaults: lines must end in . ? ! " or ' (not ...),
  have >= 3 words; pages need >= 5 sentences (spaCy sentencizer, counted per kept line). These are the
  numbers the paper states.
- `reference`: TFDS `tensorflow_datasets/text/c4_utils.py` `clean_page`, which the C4 release ran:
  end marks . ? ! " only, lines of >= 5 words, pages of >= 3 sentences. (c4_utils counts sentences with
  NLTK punkt, a model download; here they are counted by the same rule-based sentencizer as above.)

Both drop any line with a word over 1000 characters, remove Wikipedia citation marks, drop lines with
"javascript" or a cookie/terms-of-use phrase, and drop the page on "lorem ipsum" or a curly bracket.
It is a line filter: the kept lines replace the document's text.
"""

from __future__ import annotations

import re

from data.config import C4Config
from data.filters.text import count_sentences
from data.filters.tokens import tokenize_chunks

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
ELLIPSIS = "..."
POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
# variant -> (end marks, min words per line, min sentences per page)
VARIANTS = {
    "datatrove": ((".", "?", "!", '"', "'"), 3, 5),
    "reference": ((".", "?", "!", '"'), 5, 3),
}


class C4Lines:
    name = "c4"

    def __init__(self, cfg: C4Config) -> None:
        self.cfg = cfg
        self.end_marks, words, sentences = VARIANTS[cfg.variant]
        self.min_words = cfg.min_words_per_line if cfg.min_words_per_line is not None else words
        self.min_sentences = cfg.min_num_sentences if cfg.min_num_sentences is not None else sentences

    def clean(self, text: str) -> tuple[str | None, str | None]:
        """(new text, None) to keep the page with its kept lines, or (None, reason) to drop it."""
        c = self.cfg
        kept = []
        for line in text.splitlines():
            # datatrove's checks in a cheaper order (each only skips the line, so the order does not
            # change what is kept): terminal punctuation (after citation removal) first, then the words.
            raw = line.strip()
            line = CITATION.sub("", raw)
            if c.filter_no_terminal_punct and (not line.endswith(self.end_marks) or line.endswith(ELLIPSIS)):
                continue
            words = raw.split()
            if (
                c.max_word_length != -1
                and len(raw) > c.max_word_length
                and max(map(len, words)) > c.max_word_length
            ):
                continue
            # datatrove counts the words before citation removal, c4_utils after it.
            n_words = len(words) if self.cfg.variant == "datatrove" else len(line.split())
            if n_words < self.min_words:
                continue
            low = line.lower()
            if "lorem ipsum" in low:
                return None, "lorem_ipsum"
            if "javascript" in low:
                continue
            if "{" in line:
                return None, "curly_bracket"
            if any(p in low for p in POLICY_SUBSTRINGS):
                continue
            kept.append(line)
        # Every kept line counts as at least one sentence (datatrove: an empty line too), so the count is
        # needed only when fewer lines than the minimum number of sentences are kept.
        if len(kept) < self.min_sentences:
            tokenize_chunks("\n".join(kept))
            if sum(map(count_sentences, kept)) < self.min_sentences:
                return None, "too_few_sentences"
        return "\n".join(kept).strip(), None

"""The published detokenizers: undo the tokenised spelling of some corpora before BPE.

WikiText, PTB and LM1B are distributed pre-tokenised ("do n't", "1 @,@ 000", "( x )"); the published
pipeline rewrites them to ordinary text before the GPT-2 / BERT tokenizer sees them, so that the model is
trained and evaluated on natural spelling. Each function here gives the same output as the published one
(including its quirks, noted inline); the rules are kept as ordered tables because order matters
(e.g. quotes are tightened after "s '" became "s'").

``get_detokenizer(dataset_name)`` picks the one the published data loader applies, or None.
"""
from __future__ import annotations

import re
from typing import Callable

__all__ = ["wikitext_detokenizer", "ptb_detokenizer", "lm1b_detokenizer", "lambada_detokenizer",
           "scientific_papers_detokenizer", "get_detokenizer", "DETOKENIZERS"]

# A rule is (old, new): a plain substring replacement when ``old`` is a str, a regex substitution when it is
# a compiled pattern. Rules run in order, each over the whole string.
_Rule = tuple   # (str | re.Pattern, str | callable)


def _run(rules: list[_Rule], s: str) -> str:
    for old, new in rules:
        s = s.replace(old, new) if isinstance(old, str) else old.sub(new, s)
    return s


def _closing(open_: str, close: str) -> _Rule:
    """'( a b )' -> '(a b)': drop the spaces just inside a pair (non-greedy, so pairs are matched innermost-first
    from the left and the content cannot contain the closing character)."""
    o, c = re.escape(open_), re.escape(close)
    return re.compile(rf"{o}\s*([^{c}]*?)\s*{c}"), lambda m: open_ + m.group(1) + close


_WIKITEXT: list[_Rule] = [
    ("s '", "s'"),                                   # plural possessive
    # Published quirk: the slashes are part of the pattern and the replacement is a literal "[0-9]",
    # so only the text "/' <digit>/" is touched (and turned into "/'[0-9]/"). Kept for identical output.
    (re.compile(r"/' [0-9]/"), "/'[0-9]/"),
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),  # number / compound separators
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    _closing("(", ")"), _closing("[", "]"), _closing("{", "}"), _closing('"', '"'), _closing("'", "'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),      # section heading markers
    (" \u00b0 ", "\u00b0"),                          # degree sign
    (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "),                                  # PTB-style number placeholder
    (" 's", "'s"),
]

_PTB_HEAD: list[_Rule] = [(" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/")]
_PTB_TAIL: list[_Rule] = [("$ 1", "$1"), ("# 1", "#1"), ("<unk>", "?")]

_LM1B: list[_Rule] = [
    ("http : / / ", "http://"), ("https : / / ", "https://"),
    (re.compile(r" '(\w+)"), r"'\1"),                # " 's" -> "'s", " 're" -> "'re" (and " 'word")
    (re.compile(r" (\w+) \. "), r" \1. "), (re.compile(r" (\w+) \.$"), r" \1."),
    (" ? ", "? "), (re.compile(r" \?$"), "?"),
    (" ! ", "! "), (re.compile(r" !$"), "!"),
    (" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/"),
    (re.compile(r'" ([^"]+) "'), r'"\1"'),
    (re.compile(r"' ([^']+) '"), r"'\1'"),
    (re.compile(r"\( ([^()]+) \)"), r"(\1)"),
    (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    ("$ ", "$"), ("\u00a3 ", "\u00a3"),
]


def wikitext_detokenizer(text: str) -> str:
    """WikiText (``wiki.*.tokens`` / ``wikitext-*-raw-v1`` rows) -> natural spelling."""
    return _run(_WIKITEXT, text)


def ptb_detokenizer(text: str) -> str:
    """Penn Treebank (``ptb_text_only`` sentences) -> natural spelling; ``N`` (a number) becomes ``1`` and
    ``<unk>`` becomes ``?``."""
    text = _run(_PTB_HEAD, text)
    # " N N N " needs several passes because matches cannot overlap; the published code makes 10
    for _ in range(10):
        text = text.replace(" N ", " 1 ")
    return _run(_PTB_TAIL, text)


def lm1b_detokenizer(text: str) -> str:
    """One Billion Words sentences -> natural spelling."""
    return _run(_LM1B, text)


def lambada_detokenizer(text: str) -> str:
    """LAMBADA passages: curly double quotes -> '"', surrounding whitespace stripped, one leading newline."""
    return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


def scientific_papers_detokenizer(text: str) -> str:
    """arXiv / PubMed articles: the WikiText rules, then the LM1B rules."""
    return lm1b_detokenizer(wikitext_detokenizer(text))


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenizer, "ptb": ptb_detokenizer, "lm1b": lm1b_detokenizer,
    "lambada": lambada_detokenizer, "scientific_papers": scientific_papers_detokenizer,
}


def get_detokenizer(dataset_name: str) -> Callable[[str], str] | None:
    """The detokenizer the published data loader uses for ``dataset_name``, or None (e.g. openwebtext, text8,
    ag_news, tinyshakespeare): ``wikitext*`` -> wikitext, ``ptb``, ``lm1b*``, ``lambada``,
    ``scientific_papers*``."""
    name = dataset_name.lower()
    if name.startswith("wikitext"):
        return wikitext_detokenizer
    if name.startswith("scientific_papers"):
        return scientific_papers_detokenizer
    if name.startswith("lm1b"):
        return lm1b_detokenizer
    return DETOKENIZERS.get(name) if name in ("ptb", "lambada") else None

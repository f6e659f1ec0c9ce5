"""Split long text into segments an engine can say well, without dropping a word."""

from __future__ import annotations

import re

# Sentence ends (Latin and CJK punctuation) and line breaks.
_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；…])\s+|\n+")
_CLAUSE_END = re.compile(r"(?<=[,，、:：])\s*")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def approx_tokens(text: str) -> int:
    """A rough token count: words for alphabetic scripts, characters for CJK."""
    cjk = len(_CJK.findall(text))
    return cjk + len(_CJK.sub(" ", text).split())


def _split_words(text: str, max_tokens: int) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    for word in text.split():
        if current and approx_tokens(" ".join([*current, word])) > max_tokens:
            pieces.append(" ".join(current))
            current = []
        current.append(word)
    if current:
        pieces.append(" ".join(current))
    return pieces


def _split_sentence(sentence: str, max_tokens: int) -> list[str]:
    if approx_tokens(sentence) <= max_tokens:
        return [sentence]
    pieces: list[str] = []
    for clause in filter(None, (c.strip() for c in _CLAUSE_END.split(sentence))):
        pieces.extend(_split_words(clause, max_tokens) if approx_tokens(clause) > max_tokens else [clause])
    return pieces


def split_text(text: str, max_tokens: int) -> list[str]:
    """Segments of at most ``max_tokens`` (approximately), whole sentences packed together where they fit."""
    max_tokens = max(1, max_tokens)
    segments: list[str] = []
    current = ""
    for sentence in filter(None, (s.strip() for s in _SENTENCE_END.split(text))):
        for piece in _split_sentence(sentence, max_tokens):
            candidate = f"{current} {piece}".strip()
            if current and approx_tokens(candidate) > max_tokens:
                segments.append(current)
                current = piece
            else:
                current = candidate
    if current:
        segments.append(current)
    return segments

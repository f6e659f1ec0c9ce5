"""Split long text into segments an engine can say well, without dropping a word.

Text is cut into tokens (a word with its trailing space, or one CJK character), grouped into
sentences, and sentences are packed into segments of at most ``max_tokens``; a sentence longer
than that is cut at its clause marks, and a clause longer than that at the token limit.
"""

from __future__ import annotations

import re

_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK_CHARS}][^\S\n]*\n*|[^\s{_CJK_CHARS}]+[^\S\n]*\n*")
_SENTENCE_END = re.compile(r"[.!?;。！？；…]['\"”’)]*\s*$|\n\s*$")
_CLAUSE_END = re.compile(r"[,，、:：]\s*$")

Tokens = list[str]


def tokenize(text: str) -> Tokens:
    """Tokens that join back (``"".join``) into the text, without its leading/trailing space."""
    return _TOKEN.findall(text.strip())


def approx_tokens(text: str) -> int:
    """A rough token count: words for alphabetic scripts, characters for CJK."""
    return len(tokenize(text))


def _groups(tokens: Tokens, boundary: re.Pattern[str]) -> list[Tokens]:
    groups: list[Tokens] = [[]]
    for token in tokens:
        groups[-1].append(token)
        if boundary.search(token):
            groups.append([])
    return [group for group in groups if group]


def _pack(groups: list[Tokens], max_tokens: int) -> list[Tokens]:
    """Consecutive groups packed into chunks of at most ``max_tokens``; an oversize group is cut."""
    chunks: list[Tokens] = []
    current: Tokens = []
    for group in groups:
        if len(group) > max_tokens:
            if current:
                chunks.append(current)
                current = []
            chunks.extend(group[i : i + max_tokens] for i in range(0, len(group), max_tokens))
            continue
        if current and len(current) + len(group) > max_tokens:
            chunks.append(current)
            current = []
        current = current + group
    if current:
        chunks.append(current)
    return chunks


def split_text(text: str, max_tokens: int) -> list[str]:
    """Segments of at most ``max_tokens`` tokens, whole sentences packed together where they fit."""
    max_tokens = max(1, max_tokens)
    pieces: list[Tokens] = []
    for sentence in _groups(tokenize(text), _SENTENCE_END):
        if len(sentence) <= max_tokens:
            pieces.append(sentence)
        else:
            pieces.extend(_pack(_groups(sentence, _CLAUSE_END), max_tokens))
    return ["".join(chunk).strip() for chunk in _pack(pieces, max_tokens)]

"""Split long text into segments an engine can say well, without dropping a word.

Text is cut into tokens (a word with its trailing space, or one CJK character), grouped into
sentences, and sentences are packed into segments of at most ``max_tokens`` tokens and
``max_chars`` characters (a run of whitespace counting as one); a sentence longer than that is cut
at its clause marks, and a clause longer than that between tokens.

Both bounds matter because an engine's memory grows with the length of what it says at once,
not with its number of words: Piper holds the whole utterance's activations (measured warm, one
thread, speech without punctuation: 200 characters +170 MB, 500 +410 MB, 1,000 +840 MB,
2,000 +1.7 GB, 4,000 +6.2 GB; one 10,000-character word +3.1 GB). A word longer than
``MAX_TOKEN_CHARS`` is therefore cut into pieces, so that no single token can exceed the bound.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Longer than the words of real text (English dictionary words reach 45 letters; German compounds
# of 60 and more are cut, harmlessly: the pieces stay adjacent within a segment), so in practice
# only URLs, hashes and runs without spaces are cut.
MAX_TOKEN_CHARS = 50
# Whole sentences of ordinary prose fit (most are under 200 characters), and Piper's peak for one
# segment stays under +300 MB (300 characters of words: +280 MB), whatever the text or the
# client's max_text_tokens_per_segment.
MAX_SEGMENT_CHARS = 300

_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
# Every character of the stripped text belongs to exactly one token, so the tokens join back.
_TOKEN = re.compile(rf"[{_CJK_CHARS}]\s*|[^\s{_CJK_CHARS}]{{1,{MAX_TOKEN_CHARS}}}\s*")
_SENTENCE_END = re.compile(r"[.!?;。！？；…]['\"”’)]*\s*$|\n\s*$")
_CLAUSE_END = re.compile(r"[,，、:：]\s*$")

Tokens = list[str]


class _Limit(NamedTuple):
    tokens: int
    chars: int

    def admits(self, tokens: int, chars: int) -> bool:
        return tokens <= self.tokens and chars <= self.chars


def tokenize(text: str) -> Tokens:
    """Tokens that join back (``"".join``) into the text without its leading/trailing space; none
    is longer than ``MAX_TOKEN_CHARS`` before its trailing space."""
    return _TOKEN.findall(text.strip())


def approx_tokens(text: str) -> int:
    """A rough token count: words for alphabetic scripts, characters for CJK."""
    return len(tokenize(text))


def _chars(tokens: Tokens) -> int:
    """Characters, a run of whitespace counting as one (what an engine says: the run is a pause)."""
    return sum(len(token.rstrip()) + int(token[-1].isspace()) for token in tokens)


def _groups(tokens: Tokens, boundary: re.Pattern[str]) -> list[Tokens]:
    groups: list[Tokens] = [[]]
    for token in tokens:
        groups[-1].append(token)
        if boundary.search(token):
            groups.append([])
    return [group for group in groups if group]


def _pack(groups: list[Tokens], limit: _Limit) -> list[Tokens]:
    """Consecutive groups packed into chunks within ``limit``; an oversize group is cut between its
    tokens (each token fits alone: ``tokenize`` bounds its length)."""
    chunks: list[Tokens] = []
    current: Tokens = []
    current_chars = 0
    for group in groups:
        group_chars = _chars(group)
        if not limit.admits(len(group), group_chars):
            if current:
                chunks.append(current)
                current, current_chars = [], 0
            chunks.extend(_pack([[token] for token in group], limit))
            continue
        if current and not limit.admits(len(current) + len(group), current_chars + group_chars):
            chunks.append(current)
            current, current_chars = [], 0
        current.extend(group)
        current_chars += group_chars
    if current:
        chunks.append(current)
    return chunks


def split_text(text: str, max_tokens: int, max_chars: int = MAX_SEGMENT_CHARS) -> list[str]:
    """Segments of at most ``max_tokens`` tokens and ``max_chars`` characters, whole sentences
    packed together where they fit."""
    limit = _Limit(max(1, max_tokens), max(MAX_TOKEN_CHARS + 1, max_chars))  # a piece and its space fit
    pieces: list[Tokens] = []
    for sentence in _groups(tokenize(text), _SENTENCE_END):
        if limit.admits(len(sentence), _chars(sentence)):
            pieces.append(sentence)
        else:
            pieces.extend(_pack(_groups(sentence, _CLAUSE_END), limit))
    return ["".join(chunk).strip() for chunk in _pack(pieces, limit)]

"""Character vocabulary and corpus-level error rates (WER, CER) for the AN4 recipe.

The vocabulary is fixed rather than built from the training transcripts: token ids then do not
depend on which split or subset a run reads, two runs (or a run and a checkpoint made by another)
always agree on them, and AN4's training text already covers all of A-Z and the space. The
apostrophe is kept so the same vocabulary serves English corpora that use it; it costs one
output unit.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torchaudio.functional as AF

__all__ = [
    "BLANK_ID",
    "DEFAULT_CHARS",
    "CharVocab",
    "normalize_text",
    "error_counts",
    "word_error_rate",
    "char_error_rate",
]

BLANK_ID = 0
"""Id of the CTC / RNN-T blank symbol; every model and loss in the recipe uses 0."""

DEFAULT_CHARS = " ABCDEFGHIJKLMNOPQRSTUVWXYZ'"
"""Characters of the default vocabulary, in id order starting at 1 (space = 1, A = 2, ...)."""

_BLANK_TOKEN = "<blank>"


def normalize_text(text: str) -> str:
    """Upper-cases ``text`` and collapses runs of whitespace to one space, trimming both ends.

    Args:
        text: Raw transcript.

    Returns:
        The normalized transcript, e.g. ``"  go  Left "`` -> ``"GO LEFT"``.
    """
    return " ".join(text.upper().split())


class CharVocab:
    """Character vocabulary with the blank at id 0.

    Args:
        chars: The characters, in id order starting at 1. Must not repeat. Default: space, A-Z,
            apostrophe (fixed, see the module docstring).

    Attributes:
        blank_id: Id of the blank (always 0).
        tokens: ``["<blank>", *chars]``; ``tokens[i]`` is the symbol of id ``i``.
    """

    blank_id = BLANK_ID

    def __init__(self, chars: str = DEFAULT_CHARS) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError(f"CharVocab: repeated characters in {chars!r}")
        if not chars:
            raise ValueError("CharVocab: empty character set")
        self.tokens: list[str] = [_BLANK_TOKEN, *chars]
        self._id_of = {ch: i for i, ch in enumerate(self.tokens) if i != BLANK_ID}

    def __len__(self) -> int:
        """Number of ids including the blank (the models' output size)."""
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"CharVocab(chars={''.join(self.tokens[1:])!r})"

    @property
    def chars(self) -> str:
        """The characters of ids 1..len-1, as one string."""
        return "".join(self.tokens[1:])

    def encode(self, text: str) -> list[int]:
        """Turns a transcript into token ids (after ``normalize_text``).

        Args:
            text: Transcript, e.g. ``"GO LEFT"``.

        Returns:
            Ids in ``[1, len(self))``, one per character; no blank.

        Raises:
            ValueError: A character is not in the vocabulary (the message names it and the text).
        """
        normalized = normalize_text(text)
        try:
            return [self._id_of[ch] for ch in normalized]
        except KeyError as err:
            raise ValueError(f"CharVocab.encode: character {err.args[0]!r} of {text!r} is not in the vocabulary {self.chars!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Turns token ids back into text; blanks are dropped, whitespace is normalized.

        Args:
            ids: Token ids (Python ints or 0-d tensors), e.g. a greedy decoding result.

        Returns:
            The transcript.

        Raises:
            ValueError: An id is outside ``[0, len(self))``.
        """
        chars = []
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < len(self.tokens):
                raise ValueError(f"CharVocab.decode: id {token_id} outside [0, {len(self.tokens)})")
            if token_id != BLANK_ID:
                chars.append(self.tokens[token_id])
        return normalize_text("".join(chars))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for checkpoint metadata: ``{"tokens": [...], "blank_id": 0}``."""
        return {"tokens": list(self.tokens), "blank_id": BLANK_ID}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CharVocab":
        """Inverse of ``to_dict``.

        Raises:
            ValueError: The dict does not describe a vocabulary with the blank at id 0.
        """
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not tokens or data.get("blank_id", BLANK_ID) != BLANK_ID or tokens[0] != _BLANK_TOKEN:
            raise ValueError(f"CharVocab.from_dict: expected {{'tokens': ['{_BLANK_TOKEN}', ...], 'blank_id': 0}}, got {data!r}")
        if any(not isinstance(t, str) or len(t) != 1 for t in tokens[1:]):
            raise ValueError(f"CharVocab.from_dict: tokens after the blank must be single characters, got {tokens!r}")
        return cls("".join(tokens[1:]))


def _units(text: str, unit: str) -> list[str]:
    normalized = normalize_text(text)
    if unit == "word":
        return normalized.split()
    if unit == "char":
        return list(normalized)
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


def error_counts(refs: Sequence[str], hyps: Sequence[str], unit: str = "word") -> tuple[int, int]:
    """Sums Levenshtein edits and reference lengths over a corpus.

    Args:
        refs: Reference transcripts.
        hyps: Hypotheses, same length and order as ``refs``.
        unit: ``"word"`` (split on whitespace) or ``"char"`` (characters of the normalized text,
            spaces included).

    Returns:
        ``(edits, reference_units)``; the error rate is their ratio.

    Raises:
        ValueError: ``refs`` and ``hyps`` differ in length, or ``unit`` is unknown.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"error_counts: {len(refs)} references but {len(hyps)} hypotheses")
    edits = 0
    total = 0
    for ref, hyp in zip(refs, hyps):
        ref_units = _units(ref, unit)
        edits += int(AF.edit_distance(ref_units, _units(hyp, unit)))
        total += len(ref_units)
    return edits, total


def _rate(refs: Sequence[str], hyps: Sequence[str], unit: str) -> float:
    edits, total = error_counts(refs, hyps, unit)
    if total == 0:
        raise ValueError(f"{unit} error rate undefined: the references hold no {unit}s")
    return edits / total


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus-level WER: total word edits / total reference words.

    Example: ``word_error_rate(["A B C D"], ["A X C"]) == 0.5`` (one substitution, one deletion).
    """
    return _rate(refs, hyps, "word")


def char_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus-level CER: total character edits / total reference characters (spaces included)."""
    return _rate(refs, hyps, "char")

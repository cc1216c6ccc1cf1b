"""Warning codes, scales and limits of :mod:`rewards.parse` (declared here once, re-exported there).

The grammar they belong to is written in :mod:`rewards.parse`'s module docstring.
"""

from __future__ import annotations

# ----- input and format -----
W_NOT_TEXT = "not_text"  # input was not a str
W_EMPTY = "empty"  # nothing left after stripping think blocks / whitespace
W_TRUNCATED = "truncated"  # input longer than MAX_INPUT_CHARS; only the tail was parsed
W_UNCLOSED_THINK = "unclosed_think"  # a <think> without </think> (its text is thinking, not answer)
W_BAD_JSON = "bad_json"  # JSON mode: no usable JSON; the text grammar was used instead
W_JSON_ANSWER = "json_answer"  # text mode: no text score, the answer was read as JSON
W_BAD_ARGUMENT = "bad_argument"  # a caller argument (width, height, expected ids) was unusable

# ----- the score -----
W_NO_SCORE = "no_score"  # no usable score
W_NO_REASON = "no_reason"  # no Reason field
W_NONFINITE = "nonfinite"  # nan / inf words, or x/0
W_PERCENT = "percent"  # a percentage where a score was expected
W_FRACTION = "fraction"  # score written as a/b, "a out of b" or a vulgar fraction
W_DECIMAL_COMMA = "decimal_comma"  # "0,8" read as 0.8
W_BAD_NUMBER = "bad_number"  # number-like but malformed ("0x10", "1_000", "1.2.3"): no score
W_BAD_SCORE_TYPE = "bad_score_type"  # JSON score of a type that is no number (bool, list, ...)
W_MULTIPLE_SCORES = "multiple_scores"  # more than one score field held a number

# ----- ambiguity: the score is only the parser's best reading (see AMBIGUITY_CODES) -----
W_AMBIGUOUS_SCORES = "ambiguous_scores"  # top-ranked score fields (or duplicate regions) disagree
W_OTHER_SCALE = "other_scale"  # the number is on a scale other than the one the prompt asked for
W_CLAMPED = "clamped"  # the number was outside every recognised range and was clamped to [-1, 1]
W_AMBIGUOUS_NUMBER = "ambiguous_number"  # the number's form has two readings ("- 0.5", "1,000")
W_PROSE_SCORE = "prose_score"  # the only score is a number inside a sentence ("Score: 0.9 would be")
W_TRUNCATED_THINK = "truncated_think"  # the score exists only inside an unclosed <think>

# ----- regions and grounding -----
W_MISSING_REGION = "missing_region"
W_DUPLICATE_REGION = "duplicate_region"
W_UNKNOWN_REGION = "unknown_region"  # a block whose id is not expected, too long or no id at all
W_NO_REGION_HEADER = "no_region_header"
W_BAD_BOX = "bad_box"  # grounding: a box that is not 4 finite numbers or is empty

W_INTERNAL_ERROR = "internal_error"  # a bug in the parser; no input reaches it (tests check)

AMBIGUITY_CODES: frozenset[str] = frozenset(
    {W_AMBIGUOUS_SCORES, W_OTHER_SCALE, W_CLAMPED, W_AMBIGUOUS_NUMBER, W_PROSE_SCORE, W_TRUNCATED_THINK}
)
"""A parse is ``ambiguous`` iff its warnings hold one of these (and then it has a score)."""

UNIT = "unit"
"""Scale the text prompts ask for: a number from -1.0 to 1.0."""
TENTHS = "tenths"
"""Scale the JSON prompts ask for: an integer number of tenths, -10..10 (7 means 0.7)."""

MAX_INPUT_CHARS = 100_000
MAX_REASON_CHARS = 2_000
MAX_OBJECT_CHARS = 200
MAX_ID_DIGITS = 9  # longer region ids are no ids ("Region ID: 1234567890")

"""Options several commands share."""

from __future__ import annotations

INPUT_HASHES_HELP = (
    "do not hash the inputs the hash cache does not know: the recipe then records them without SHA-256/AutoV2 "
    "(and `model-merger verify` cannot find them); by default they are hashed during the merge and cached"
)


def add_input_hashes_option(p) -> None:
    p.add_argument("--no-input-hashes", dest="input_hashes", action="store_false", help=INPUT_HASHES_HELP)

"""Test oracles: plain, slow implementations that the fast production code is checked against.

Only tests use them, so they live here rather than in the packages they check.
"""

from __future__ import annotations

from training.llama2c import BYTE_FALLBACK_OFFSET

# llama2.c's merge loop starts from this score and only accepts strictly better pairs.
NO_MERGE_SCORE = -1e10


def encode_llama2c_reference(pieces: list[bytes], scores: list[float], text: str) -> list[int]:
    """Encode ``text`` exactly as llama2.c's ``encode(t, text, bos=0, eos=0, ...)`` in run.c does.

    A line-by-line port kept deliberately naive (quadratic, like run.c) because it is the ground
    truth the fast tokenizer is tested against: prepend the id of " " (dummy prefix) unless the
    text is empty, look up every UTF-8 character (byte fallback ``byte + 3`` when it is not a
    piece), then repeatedly merge the leftmost adjacent pair whose concatenation is the
    best-scoring piece until no adjacent pair forms a piece.
    """
    piece_id = {piece: i for i, piece in enumerate(pieces)}
    raw = text.encode("utf-8")
    tokens: list[int] = []
    if raw:
        tokens.append(piece_id[b" "])

    # A non-continuation byte starts a character; up to 4 bytes are collected before lookup.
    buffer = b""
    for i, byte in enumerate(raw):
        if byte & 0xC0 != 0x80:
            buffer = b""
        buffer += bytes([byte])
        if i + 1 < len(raw) and raw[i + 1] & 0xC0 == 0x80 and len(buffer) < 4:
            continue
        if buffer in piece_id:
            tokens.append(piece_id[buffer])
        else:
            tokens.extend(b + BYTE_FALLBACK_OFFSET for b in buffer)
        buffer = b""

    while True:
        best_score, best_id, best_index = NO_MERGE_SCORE, -1, -1
        for i in range(len(tokens) - 1):
            merged = piece_id.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
            if merged != -1 and scores[merged] > best_score:
                best_score, best_id, best_index = scores[merged], merged, i
        if best_index == -1:
            return tokens
        tokens[best_index : best_index + 2] = [best_id]

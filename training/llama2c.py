"""Import Karpathy's llama2.c checkpoints (e.g. ``stories260K``) and tokenizers into Hugging Face.

llama2.c stores a model as a raw ``.bin`` file (a 7-int32 header followed by float32 weights, the
"legacy" export format) and its SentencePiece-style BPE vocabulary as a ``tok*.bin`` file. This
module turns them into a ``transformers.LlamaForCausalLM`` and a ``PreTrainedTokenizerFast`` whose
encoding is token-for-token identical to llama2.c's ``encode()`` in ``run.c`` (tested against a
line-by-line port of it, ``tests/oracles.py``), so the model sees exactly the ids it was trained on.

Typical use::

    model, tokenizer = load_llama2c("llama2c:../shared/models/stories260K/stories260K.bin")
    ids = [tokenizer.bos_token_id] + tokenizer.encode("Once upon a time")
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPEC_PREFIX = "llama2c:"
DEFAULT_TOKENIZER_NAME = "tok512.bin"

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# llama2.c's byte fallback encodes byte b as id b + 3 (after <unk>, <s>, </s>).
BYTE_FALLBACK_OFFSET = 3
# The piece names Hugging Face uses for the three special ids; llama2.c's file spells BOS/EOS as
# "\n<s>\n" and "\n</s>\n" so that its decoder prints them on their own lines.
SPECIAL_TOKENS = {UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}

_HEADER = struct.Struct("<7i")
_FLOAT_BYTES = 4


def _read_existing_file(path: str | Path, what: str) -> bytes:
    """Read a whole file, turning "missing" and "unreadable" into errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c {what} not found (or not a file): {path}")
    try:
        return path.read_bytes()
    except OSError as err:
        raise ValueError(f"llama2.c {what} {path} is not readable: {err}") from err


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _permute_for_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of wq/wk from llama2.c's RoPE layout to Hugging Face's.

    llama2.c rotates adjacent pairs (2i, 2i+1) of each head; HF's ``rotate_half`` rotates
    (i, i + head_dim/2). Moving every head's even rows to its first half and odd rows to its second
    half makes both compute the same attention scores (q·k is invariant to a shared reordering).
    """
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    return weight.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_llama2c_model(checkpoint_path: str | Path) -> LlamaForCausalLM:
    """Load a llama2.c legacy ``.bin`` checkpoint as a float32 ``LlamaForCausalLM`` in eval mode.

    The header is ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len``; a
    negative ``vocab_size`` means the classifier is stored separately after the RoPE tables instead
    of being tied to the token embedding (llama2.c's own convention). The file size must match the
    header exactly, so a truncated or foreign file is rejected rather than silently misread.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable, too short, has an implausible header, or its size does
            not match the header.
    """
    path = Path(checkpoint_path)
    data = _read_existing_file(path, "checkpoint")
    if len(data) < _HEADER.size:
        raise ValueError(
            f"llama2.c checkpoint {path} is {len(data)} bytes, shorter than its "
            f"{_HEADER.size}-byte header"
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, signed_vocab, seq_len = _HEADER.unpack(
        data[: _HEADER.size]
    )
    shared_classifier = signed_vocab > 0
    vocab_size = abs(signed_vocab)
    header = (
        f"dim={dim}, hidden_dim={hidden_dim}, n_layers={n_layers}, n_heads={n_heads}, "
        f"n_kv_heads={n_kv_heads}, vocab_size={signed_vocab}, seq_len={seq_len}"
    )
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) <= 0 or (
        dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2
    ):
        raise ValueError(f"llama2.c checkpoint {path} has an implausible header ({header})")

    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    # (name, shape) in file order. The RoPE tables only count towards the size: like run.c, the
    # model recomputes the angles (here from rope_theta).
    layout = [
        ("embed", (vocab_size, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden_dim, dim)),
        ("w2", (n_layers, dim, hidden_dim)),
        ("w3", (n_layers, hidden_dim, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_dim // 2)),
        ("freq_cis_imag", (seq_len, head_dim // 2)),
    ]
    if not shared_classifier:
        layout.append(("wcls", (vocab_size, dim)))
    n_floats = sum(torch.Size(shape).numel() for _, shape in layout)
    expected = _HEADER.size + n_floats * _FLOAT_BYTES
    if len(data) != expected:
        raise ValueError(
            f"llama2.c checkpoint {path} is {len(data)} bytes but its header ({header}) implies "
            f"{expected} bytes: the file is truncated or not a llama2.c legacy (version 0) export"
        )

    flat = torch.frombuffer(bytearray(data), dtype=torch.float32, offset=_HEADER.size)
    weights: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in layout:
        count = torch.Size(shape).numel()
        weights[name] = flat[offset : offset + count].view(shape)
        offset += count

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=hidden_dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=shared_classifier,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    state = {
        "model.embed_tokens.weight": weights["embed"],
        "model.norm.weight": weights["rms_final"],
        "lm_head.weight": weights["embed"] if shared_classifier else weights["wcls"],
    }
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}."
        state |= {
            prefix + "input_layernorm.weight": weights["rms_att"][layer],
            prefix + "self_attn.q_proj.weight": _permute_for_rotate_half(
                weights["wq"][layer], n_heads
            ),
            prefix + "self_attn.k_proj.weight": _permute_for_rotate_half(
                weights["wk"][layer], n_kv_heads
            ),
            prefix + "self_attn.v_proj.weight": weights["wv"][layer],
            prefix + "self_attn.o_proj.weight": weights["wo"][layer],
            prefix + "post_attention_layernorm.weight": weights["rms_ffn"][layer],
            prefix + "mlp.gate_proj.weight": weights["w1"][layer],
            prefix + "mlp.up_proj.weight": weights["w3"][layer],
            prefix + "mlp.down_proj.weight": weights["w2"][layer],
        }

    model = LlamaForCausalLM(config).to(torch.float32)
    # With tied embeddings lm_head and embed_tokens are one parameter, so loading both keys (the
    # same values) keeps them shared.
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def read_llama2c_vocab(tok_path: str | Path) -> tuple[list[bytes], list[float]]:
    """Read a llama2.c ``tok*.bin`` file into its raw pieces (bytes) and their merge scores.

    Format: ``int32 max_token_length``, then per piece ``float32 score, int32 length, bytes``. The
    file does not store how many pieces it holds (run.c takes that from the model header), so a
    file cut exactly at a piece boundary is only caught by comparing with the model's vocabulary
    size (see ``load_llama2c_tokenizer(..., vocab_size=...)``).
    """
    path = Path(tok_path)
    data = _read_existing_file(path, "tokenizer")
    if len(data) < 4:
        raise ValueError(f"llama2.c tokenizer {path} is {len(data)} bytes, too short for a header")
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    pieces: list[bytes] = []
    scores: list[float] = []
    offset = 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise ValueError(
                f"llama2.c tokenizer {path} is truncated inside the header of piece {len(pieces)}"
            )
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if not 0 < length <= max_token_length or offset + length > len(data):
            raise ValueError(
                f"llama2.c tokenizer {path} is truncated or corrupt at piece {len(pieces)} "
                f"(length {length}, max_token_length {max_token_length}, "
                f"{len(data) - offset} bytes left)"
            )
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    return pieces, scores


def _merges_by_score(pieces: list[bytes], scores: list[float]) -> list[tuple[int, int]]:
    """Every pair of pieces whose concatenation is a piece, best resulting score first.

    llama2.c merges *any* adjacent pair whose concatenation is in the vocabulary, choosing the
    highest score; ``tokenizers`` merges the listed pair with the lowest rank. Listing all such
    pairs ordered by the score of their result makes the two choose the same merge (exact as long
    as distinct mergeable pieces have distinct scores, true of SentencePiece BPE exports where the
    score is minus the merge index). Pairs yielding the same piece are ordered by the length of
    their left part, a fixed tie-break, since llama2.c treats them as equal.
    """
    piece_id = {piece: i for i, piece in enumerate(pieces)}
    merges = []
    for merged, piece in enumerate(pieces):
        for cut in range(1, len(piece)):
            left, right = piece_id.get(piece[:cut]), piece_id.get(piece[cut:])
            if left is not None and right is not None:
                merges.append((-scores[merged], cut, left, right))
    merges.sort()
    return [(left, right) for _, _, left, right in merges]


def load_llama2c_tokenizer(
    tok_path: str | Path, vocab_size: int | None = None
) -> PreTrainedTokenizerFast:
    """Build a fast tokenizer that encodes exactly like llama2.c's ``encode()`` (no BOS/EOS).

    The ``tokenizers`` pipeline mirrors run.c step by step:

    * normalizer ``Prepend(" ")``: the dummy-prefix space, added only to non-empty text;
    * no pre-tokenizer: llama2.c merges across the whole text, so spaces stay ordinary characters
      (pieces spell them as " ", not SentencePiece's "▁") and merge into the following word;
    * ``BPE(byte_fallback=True)`` with merges ranked by piece score (see ``_merges_by_score``);
      characters without a piece become ``<0xXX>`` byte tokens, ids ``byte + 3``;
    * decoder ``ByteFallback`` + ``Fuse`` + ``Strip`` one leading space: byte tokens are turned
      back into UTF-8 and the dummy prefix is removed, so ``decode(encode(x)) == x``.

    ``<unk>`` (0), ``<s>`` (1, BOS) and ``</s>`` (2, EOS) are the special tokens. Encoding text
    returns its ids WITHOUT BOS or EOS (``add_bos_token=False``): llama2.c's models expect a BOS
    before each story, which callers prepend themselves (or set ``tokenizer.add_bos_token = True``).
    ``split_special_tokens=True`` because llama2.c never treats the literal text "<s>" as BOS.

    Args:
        tok_path: the llama2.c ``tok*.bin`` file.
        vocab_size: if given, the number of pieces the file must hold (the model's vocabulary).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable, truncated, or not laid out like a llama2.c vocabulary.
    """
    path = Path(tok_path)
    pieces, scores = read_llama2c_vocab(path)
    if vocab_size is not None and len(pieces) != vocab_size:
        raise ValueError(
            f"llama2.c tokenizer {path} holds {len(pieces)} pieces but the model expects "
            f"{vocab_size}: the file is truncated or belongs to another model"
        )
    for byte in range(256):
        piece_id = byte + BYTE_FALLBACK_OFFSET
        if piece_id >= len(pieces) or pieces[piece_id] != f"<0x{byte:02X}>".encode():
            raise ValueError(
                f"llama2.c tokenizer {path} does not hold byte-fallback piece <0x{byte:02X}> at "
                f"id {piece_id}, so it cannot be a llama2.c SentencePiece vocabulary"
            )
    try:
        names = [SPECIAL_TOKENS.get(i) or piece.decode("utf-8") for i, piece in enumerate(pieces)]
    except UnicodeDecodeError as err:
        raise ValueError(f"llama2.c tokenizer {path} has a piece that is not UTF-8: {err}") from err
    if len(set(names)) != len(names):
        raise ValueError(f"llama2.c tokenizer {path} has duplicate pieces")

    merges = [(names[left], names[right]) for left, right in _merges_by_score(pieces, scores)]
    backend = Tokenizer(
        BPE(
            vocab={name: i for i, name in enumerate(names)},
            merges=merges,
            unk_token=SPECIAL_TOKENS[UNK_ID],
            byte_fallback=True,
        )
    )
    backend.normalizer = normalizers.Prepend(" ")
    backend.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)]
    )
    backend.add_special_tokens(
        [AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS.values()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=SPECIAL_TOKENS[UNK_ID],
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        add_bos_token=False,
        add_eos_token=False,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------------
# Both
# --------------------------------------------------------------------------------------------


def load_llama2c(spec: str) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a model and its tokenizer from a spec ``"llama2c:MODEL.bin[:TOKENIZER.bin]"``.

    Without an explicit tokenizer, ``tok512.bin`` beside the model is used (where llama2.c's
    ``stories260K`` keeps it). The tokenizer must hold exactly the model's ``vocab_size`` pieces.
    """
    if not spec.startswith(SPEC_PREFIX):
        raise ValueError(
            f"llama2.c spec must look like 'llama2c:MODEL.bin[:TOKENIZER.bin]': {spec!r}"
        )
    model_path, _, tok_path = spec[len(SPEC_PREFIX) :].partition(":")
    if not model_path:
        raise ValueError(f"llama2.c spec names no model file: {spec!r}")
    model_file = Path(model_path)
    tok_file = Path(tok_path) if tok_path else model_file.parent / DEFAULT_TOKENIZER_NAME
    model = load_llama2c_model(model_file)
    tokenizer = load_llama2c_tokenizer(tok_file, vocab_size=model.config.vocab_size)
    return model, tokenizer

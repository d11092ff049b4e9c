"""Tests for importing llama2.c's stories260K model and tok512 tokenizer (``training.llama2c``).

Everything here needs the read-only ``../shared`` material and skips without it.
"""

from __future__ import annotations

import math
import random
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from tests.oracles import encode_llama2c_reference
from training.llama2c import (
    load_llama2c,
    load_llama2c_model,
    load_llama2c_tokenizer,
    read_llama2c_vocab,
)

KNOWN_SAMPLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball."
)
# Strings that exercise the dummy prefix, byte fallback and llama2.c's treatment of "<s>" as text.
EDGE_CASES = [
    "",
    " ",
    "a",
    "  two  spaces   inside ",
    " leading space",
    "trailing newline\n",
    "\n\nnewlines\nbetween\n\n",
    "tab\there",
    "Digits 0123456789 and 3.14, 1,000,000!",
    "Café, naïve, “quotes”, it’s — dash… ñ",
    "日本語 and emoji 🙂🚀",
    "mojibake: â€œhelloâ€\x9d it'â€™s",
    "<s>literal special tokens</s> <unk> <0x41>",
    "\u2581metaspace\u2581char",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run the tiny model single-threaded.

    Its tensors are so small that intra-op threads only add synchronisation; on a busy 2-core box
    they made the forward passes about ten times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(shared_dir: Path) -> Path:
    return shared_dir / "models" / "stories260K"


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir: Path):
    return load_llama2c(f"llama2c:{model_dir / 'stories260K.bin'}")


@pytest.fixture(scope="module")
def tokenizer(model_and_tokenizer) -> PreTrainedTokenizerFast:
    return model_and_tokenizer[1]


@pytest.fixture(scope="module")
def vocab(model_dir: Path) -> tuple[list[bytes], list[float]]:
    return read_llama2c_vocab(model_dir / "tok512.bin")


def _stories(shared_dir: Path, name: str, separator: str) -> list[str]:
    text = (shared_dir / "data" / "tinystories" / name).read_text(encoding="utf-8")
    return [part for part in text.split(separator) if part.strip()]


@pytest.fixture(scope="module")
def tokenizer_texts(shared_dir: Path) -> list[str]:
    """300 real texts, unstripped so leading/trailing newlines are covered too."""
    v1 = _stories(shared_dir, "tinystories_v1_train_prefix_2MiB.txt", "<|endoftext|>")
    v2 = _stories(shared_dir, "tinystories_v2_train_prefix_10k_lines.txt", "<|endoftext|>")
    lowercased = _stories(shared_dir, "tinystories_v1_train_prefix_4MB_lowercased.txt", "\n\n")
    mojibake = [text for text in lowercased if "â€" in text]
    return v1[:100] + v2[-100:] + mojibake[:100]


# ---------------------------------------------------------------------------------------------
# (a) the known greedy sample
# ---------------------------------------------------------------------------------------------


def test_greedy_generation_from_bos_reproduces_known_sample(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    bos = torch.tensor([[tokenizer.bos_token_id]])
    with torch.inference_mode():
        output = model.generate(bos, do_sample=False, max_new_tokens=60)
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    assert text.startswith(KNOWN_SAMPLE), text


# ---------------------------------------------------------------------------------------------
# (b) + (c) the tokenizer against llama2.c's encode()
# ---------------------------------------------------------------------------------------------


def test_tokenizer_matches_llama2c_encode_on_real_stories(tokenizer, vocab, tokenizer_texts):
    pieces, scores = vocab
    texts = tokenizer_texts + EDGE_CASES
    assert len(tokenizer_texts) >= 300
    hf_ids = tokenizer(texts)["input_ids"]
    for text, ids in zip(texts, hf_ids, strict=True):
        assert ids == encode_llama2c_reference(pieces, scores, text), repr(text[:200])
        assert tokenizer.decode(ids) == text, repr(text[:200])


def test_tokenizer_matches_llama2c_encode_on_piece_soup(tokenizer, vocab):
    """Random strings glued from vocabulary pieces provoke competing and overlapping merges."""
    pieces, scores = vocab
    alphabet = [piece.decode() for piece in pieces[259:]] + ["  ", "\n", "é", "日", "🙂", "<s>"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = tokenizer.encode(text)
        assert ids == encode_llama2c_reference(pieces, scores, text), repr(text)
        assert tokenizer.decode(ids) == text, repr(text)


def test_tokenizer_special_tokens_and_no_bos(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert not tokenizer.add_bos_token
    assert tokenizer("Once")["input_ids"][0] != tokenizer.bos_token_id
    ids = [tokenizer.bos_token_id, *tokenizer.encode("Once upon a time"), tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Once upon a time"


def test_tokenizer_save_and_reload_gives_identical_ids(tokenizer, tokenizer_texts, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    texts = tokenizer_texts[::10] + EDGE_CASES
    assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert (reloaded.unk_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    assert not reloaded.add_bos_token
    ids = tokenizer.encode(EDGE_CASES[9])
    assert reloaded.decode(ids) == tokenizer.decode(ids) == EDGE_CASES[9]


# ---------------------------------------------------------------------------------------------
# (d) logits against llama2.c's forward pass
# ---------------------------------------------------------------------------------------------


def _read_raw_checkpoint(path: Path) -> tuple[tuple[int, ...], dict[str, torch.Tensor]]:
    """Read a llama2.c legacy checkpoint independently of the module under test (float64)."""
    data = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack_from("<7i", data)
    head = dim // n_heads
    kv_dim = n_kv_heads * head
    shapes = {
        "embed": (abs(vocab), dim),
        "rms_att": (n_layers, dim),
        "wq": (n_layers, dim, dim),
        "wk": (n_layers, kv_dim, dim),
        "wv": (n_layers, kv_dim, dim),
        "wo": (n_layers, dim, dim),
        "rms_ffn": (n_layers, dim),
        "w1": (n_layers, hidden, dim),
        "w2": (n_layers, dim, hidden),
        "w3": (n_layers, hidden, dim),
        "rms_final": (dim,),
        "freq_cis_real": (seq_len, head // 2),
        "freq_cis_imag": (seq_len, head // 2),
    }
    if vocab < 0:
        shapes["wcls"] = (-vocab, dim)
    flat = torch.frombuffer(bytearray(data), dtype=torch.float32, offset=28).double()
    weights, offset = {}, 0
    for name, shape in shapes.items():
        weights[name] = flat[offset : offset + math.prod(shape)].view(shape)
        offset += math.prod(shape)
    weights.setdefault("wcls", weights["embed"])
    return (dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len), weights


def _llama2c_forward(header, w, tokens: list[int]) -> torch.Tensor:
    """run.c's ``forward()`` one position at a time with a KV cache; returns (len, vocab) logits.

    RoPE rotates the pairs (2i, 2i+1) of each head by the angles in the checkpoint's own
    freq_cis tables (as llama2.c's first run.c did), so rope_theta is checked too.
    """
    dim, _, n_layers, n_heads, n_kv_heads, _, _ = header
    head = dim // n_heads
    kv_mul = n_heads // n_kv_heads

    def rmsnorm(x, weight):
        return weight * x / torch.sqrt((x * x).mean() + 1e-5)

    def rope(vec, pos):
        pairs = vec.view(-1, head // 2, 2)
        cos, sin = w["freq_cis_real"][pos], w["freq_cis_imag"][pos]
        v0, v1 = pairs[..., 0], pairs[..., 1]
        return torch.stack([v0 * cos - v1 * sin, v0 * sin + v1 * cos], dim=-1).flatten()

    keys = [[] for _ in range(n_layers)]
    values = [[] for _ in range(n_layers)]
    logits = []
    for pos, token in enumerate(tokens):
        x = w["embed"][token].clone()
        for layer in range(n_layers):
            xb = rmsnorm(x, w["rms_att"][layer])
            q = rope(w["wq"][layer] @ xb, pos)
            keys[layer].append(rope(w["wk"][layer] @ xb, pos).view(n_kv_heads, head))
            values[layer].append((w["wv"][layer] @ xb).view(n_kv_heads, head))
            k_cache, v_cache = torch.stack(keys[layer]), torch.stack(values[layer])
            heads = []
            for h in range(n_heads):
                q_h = q[h * head : (h + 1) * head]
                att = torch.softmax(k_cache[:, h // kv_mul] @ q_h / math.sqrt(head), dim=0)
                heads.append(att @ v_cache[:, h // kv_mul])
            x = x + w["wo"][layer] @ torch.cat(heads)
            xb = rmsnorm(x, w["rms_ffn"][layer])
            hb = F.silu(w["w1"][layer] @ xb) * (w["w3"][layer] @ xb)
            x = x + w["w2"][layer] @ hb
        logits.append(w["wcls"] @ rmsnorm(x, w["rms_final"]))
    return torch.stack(logits)


def test_logits_match_llama2c_forward(model_and_tokenizer, model_dir):
    model, tokenizer = model_and_tokenizer
    tokens = [1, *tokenizer.encode("Once upon a time, there was a little dog named Max.")]
    header, weights = _read_raw_checkpoint(model_dir / "stories260K.bin")
    expected = _llama2c_forward(header, weights, tokens)
    with torch.inference_mode():
        actual = model(torch.tensor([tokens])).logits[0].double()
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_model_config_and_tied_embeddings(model_and_tokenizer):
    model, _ = model_and_tokenizer
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 172, 5)
    assert (config.num_attention_heads, config.num_key_value_heads) == (8, 4)
    assert (config.vocab_size, config.max_position_embeddings) == (512, 512)
    assert (config.bos_token_id, config.eos_token_id, config.rms_norm_eps) == (1, 2, 1e-5)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32 and not model.training


def test_unshared_classifier_from_negative_vocab_size(model_dir, tmp_path):
    """A negative vocab_size marks a separate classifier, stored after the RoPE tables."""
    data = (model_dir / "stories260K.bin").read_bytes()
    header = list(struct.unpack_from("<7i", data))
    wcls = torch.randn(header[5], header[0], generator=torch.Generator().manual_seed(0))
    header[5] = -header[5]
    path = tmp_path / "unshared.bin"
    path.write_bytes(struct.pack("<7i", *header) + data[28:] + wcls.numpy().tobytes())

    model = load_llama2c_model(path)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight.detach(), wcls, atol=0, rtol=0)
    raw_header, weights = _read_raw_checkpoint(path)
    tokens = [1, 403, 407, 261]
    with torch.inference_mode():
        actual = model(torch.tensor([tokens])).logits[0].double()
    expected = _llama2c_forward(raw_header, weights, tokens)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# (e) validation loss
# ---------------------------------------------------------------------------------------------


def test_validation_loss_is_near_llama2c_report(model_and_tokenizer, shared_dir):
    """llama2.c reports 1.297 nats/token; each story is BOS + its stripped text, as in training."""
    model, tokenizer = model_and_tokenizer
    stories = _stories(shared_dir, "tinystories_v2_train_prefix_10k_lines.txt", "<|endoftext|>")
    seq_len = model.config.max_position_embeddings
    sequences = [[1, *tokenizer.encode(story.strip())][:seq_len] for story in stories[:200]]
    sequences.sort(key=len)  # batches of similar length waste little on padding

    total_nats, total_tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(sequences), 25):
            batch = sequences[start : start + 25]
            width = max(map(len, batch))
            ids = torch.tensor([seq + [0] * (width - len(seq)) for seq in batch])
            mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in batch])
            logits = model(input_ids=ids, attention_mask=mask).logits
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total_nats += F.cross_entropy(
                logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum"
            ).item()
            total_tokens += int((targets != -100).sum())
    loss = total_nats / total_tokens
    assert total_tokens > 50_000
    assert 1.0 < loss < 1.6, loss


# ---------------------------------------------------------------------------------------------
# (f) clear errors
# ---------------------------------------------------------------------------------------------


def test_missing_files_raise_file_not_found(tmp_path, model_dir):
    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_llama2c_model(missing)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_llama2c_tokenizer(missing)
    lonely_model = tmp_path / "stories260K.bin"  # no tok512.bin beside it
    lonely_model.symlink_to(model_dir / "stories260K.bin")
    with pytest.raises(FileNotFoundError, match="tok512.bin"):
        load_llama2c(f"llama2c:{lonely_model}")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_llama2c(f"llama2c:{model_dir / 'stories260K.bin'}:{missing}")


def test_truncated_checkpoint_raises_value_error(tmp_path, model_dir):
    data = (model_dir / "stories260K.bin").read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(data[:100_000])
    with pytest.raises(ValueError, match=r"truncated\.bin is 100000 bytes.*implies 1056540"):
        load_llama2c_model(truncated)
    truncated.write_bytes(data[:10])
    with pytest.raises(ValueError, match="shorter than its 28-byte header"):
        load_llama2c_model(truncated)
    truncated.write_bytes(struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + data[28:])
    with pytest.raises(ValueError, match="implausible header"):
        load_llama2c_model(truncated)


def test_truncated_tokenizer_raises_value_error(tmp_path, model_dir, vocab):
    data = (model_dir / "tok512.bin").read_bytes()
    cut = tmp_path / "tok_cut.bin"
    cut.write_bytes(data[:3000])
    with pytest.raises(ValueError, match=r"tok_cut\.bin is truncated"):
        load_llama2c_tokenizer(cut)

    # Cut exactly between pieces: only the model's vocab_size can tell.
    pieces, scores = vocab
    kept = b"".join(
        struct.pack("<fi", score, len(piece)) + piece
        for piece, score in zip(pieces[:300], scores[:300], strict=True)
    )
    cut.write_bytes(data[:4] + kept)
    assert len(load_llama2c_tokenizer(cut)) == 300
    with pytest.raises(ValueError, match="holds 300 pieces but the model expects 512"):
        load_llama2c(f"llama2c:{model_dir / 'stories260K.bin'}:{cut}")


def test_bad_spec_raises_value_error():
    with pytest.raises(ValueError, match="llama2c:MODEL.bin"):
        load_llama2c("stories260K.bin")

"""Bits per byte, the measure that does not depend on the tokenizer: each id's bytes of text (byte-level
BPE, WordPiece, SentencePiece conventions; special tokens none)."""

from __future__ import annotations

from distill import corpus
from distill.text import byte_lengths

# two- and four-byte characters, so that byte-level tokens split characters
DOCUMENTS = [f"the café {i} was naïve 🎬 and the film drags " * 3 + "while the actors shine" for i in range(30)]


def test_the_bpe_trained_here_gives_each_token_its_bytes_and_a_document_its_utf8_length():
    tok = corpus.train_tokenizer(DOCUMENTS, 300)
    table = byte_lengths(tok)
    assert table.shape == (300,) and table[tok.eos_token_id] == 0  # end-of-text is not text
    assert table[tok.convert_tokens_to_ids("Ã©")] == 2  # é, in the byte-to-unicode alphabet: two bytes
    for doc, ids in zip(DOCUMENTS, tok(DOCUMENTS, add_special_tokens=False)["input_ids"]):
        assert table[ids].sum() == len(doc.encode("utf-8"))
    windows, _ = corpus.windows(DOCUMENTS, tok, 16)
    whole = []
    for window in windows:  # end-of-text between documents counts nothing
        text = tok.decode(window, skip_special_tokens=True)
        if "\ufffd" not in text:  # no character cut at the window's edges
            assert table[window].sum() == len(text.encode("utf-8"))
            whole.append(text)
    assert len(whole) > len(windows) / 2 and any("🎬" in text for text in whole)


def fast_tokenizer(model, decoder, special: dict[str, str]):
    """A transformers fast tokenizer over a tokenizers `model` split on whitespace, with `decoder`."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def test_a_wordpiece_token_is_its_text_without_the_continuation_prefix_and_special_tokens_count_nothing():
    from tokenizers import decoders, models

    vocab = {"[UNK]": 0, "[SEP]": 1, "play": 2, "##ing": 3, "café": 4, "##s": 5}
    tok = fast_tokenizer(models.WordPiece(vocab, unk_token="[UNK]"), decoders.WordPiece(),
                         {"unk_token": "[UNK]", "eos_token": "[SEP]"})
    assert byte_lengths(tok).tolist() == [0, 0, 4, 3, 5, 1]
    ids = tok("playing cafés", add_special_tokens=False)["input_ids"]
    assert ids == [2, 3, 4, 5] and byte_lengths(tok)[ids].sum() == len("playingcafés".encode())  # 13


def test_a_sentencepiece_token_counts_its_meta_space_as_one_byte_and_a_fallback_byte_as_one():
    from tokenizers import decoders, models

    vocab = {"<eos>": 0, "\u2581the": 1, "\u2581café": 2, "s": 3, "\u2581": 4, "<0xF0>": 5}
    tok = fast_tokenizer(models.WordLevel(vocab, unk_token="<eos>"),
                         decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()]), {"eos_token": "<eos>"})
    assert byte_lengths(tok).tolist() == [0, 4, 6, 1, 1, 1]  # " the", " café" (é: 2), "s", " ", one byte

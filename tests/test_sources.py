import json
import logging

import pytest
from PIL import Image

from captioner.data.sources import DatasetError, read_coco_captions, read_flickr8k_text, read_karpathy_json


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def test_karpathy_json(tmp_path):
    data = {"images": [
        {"filename": "a.jpg", "filepath": "val2014", "split": "restval", "cocoid": 7,
         "sentences": [{"raw": "A dog runs.", "tokens": ["a", "dog", "runs"]}, {"raw": "The dog, running!"}]},
        {"filename": "b.jpg", "split": "test", "imgid": 1, "sentences": [{"tokens": ["two", "cats"]}]},
    ]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    recs = read_karpathy_json(tmp_path / "dataset_coco.json", image_root=tmp_path / "imgs")
    assert [r.split for r in recs] == ["train", "test"]  # restval joins train
    assert recs[0].image_id == "7" and recs[0].path == tmp_path / "imgs" / "val2014" / "a.jpg"
    assert recs[0].tokens == [["a", "dog", "runs"], ["the", "dog", "running"]]
    assert recs[1].captions == ["two cats"] and recs[1].path == tmp_path / "imgs" / "b.jpg"


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{broken", "not valid JSON"),
        (json.dumps({"foo": []}), '"images" list'),
        (json.dumps({"images": [{"filename": "a.jpg", "split": "train"}]}), 'no "sentences"'),
        (json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"x": 1}]}]}), "neither"),
        (json.dumps({"images": []}), "empty"),
    ],
)
def test_karpathy_json_malformed(tmp_path, content, problem):
    f = tmp_path / "dataset_flickr8k.json"
    f.write_text(content)
    with pytest.raises(DatasetError, match=problem) as e:
        read_karpathy_json(f)
    assert str(f) in str(e.value)


def test_karpathy_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_karpathy_json(tmp_path / "nope.json")


def _flickr8k(tmp_path, token_lines, splits):
    text = tmp_path / "Flickr8k_text"
    text.mkdir(parents=True)
    (text / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
    for name, imgs in zip(("trainImages", "devImages", "testImages"), splits):
        (text / f"Flickr_8k.{name}.txt").write_text("\n".join(imgs) + "\n")
    return tmp_path


def test_flickr8k_text_layout(tmp_path, caplog):
    for n in ("1.jpg", "2.jpg", "3.jpg", "orphan.jpg"):
        _img(tmp_path / "Flicker8k_Dataset" / n)
    root = _flickr8k(
        tmp_path,
        ["1.jpg#0\tA dog runs .", "1.jpg#1 A dog is running .",  # second line uses a space, as 3 real lines do
         "2.jpg#0\tTwo cats .", "3.jpg#0\tA bird .", "missing.jpg#0\tNo photo ."],
        [["1.jpg"], ["2.jpg"], ["3.jpg"]],
    )
    with caplog.at_level(logging.WARNING):
        recs = read_flickr8k_text(root)
    assert [(r.image_id, r.split) for r in recs] == [("1.jpg", "train"), ("2.jpg", "val"), ("3.jpg", "test")]
    assert recs[0].captions == ["A dog runs .", "A dog is running ."]
    assert recs[0].tokens[1] == ["a", "dog", "is", "running"]
    text = caplog.text
    assert "1 captioned image(s) have no photo" in text and "1 photo(s) are in no split" in text


def test_flickr8k_malformed_line(tmp_path):
    _img(tmp_path / "Flicker8k_Dataset" / "1.jpg")
    root = _flickr8k(tmp_path, ["1.jpg#0\tok", "this line has no id"], [["1.jpg"], [], []])
    with pytest.raises(DatasetError, match=r"Flickr8k.token.txt: line 2"):
        read_flickr8k_text(root)


def test_flickr8k_missing_split_file(tmp_path):
    _img(tmp_path / "Flicker8k_Dataset" / "1.jpg")
    root = _flickr8k(tmp_path, ["1.jpg#0\tok"], [["1.jpg"], [], []])
    (root / "Flickr8k_text" / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(DatasetError, match="devImages.txt: split file not found"):
        read_flickr8k_text(root)


def test_coco_captions(tmp_path, caplog):
    ann = {"images": [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "y.jpg"}],
           "annotations": [{"image_id": 1, "caption": "A Cat."}, {"image_id": 1, "caption": "a cat sits"}, {"image_id": 9, "caption": "?"}]}
    (tmp_path / "cap.json").write_text(json.dumps(ann))
    with caplog.at_level(logging.WARNING):
        recs = read_coco_captions({"val": tmp_path / "cap.json"}, {"val": tmp_path / "val2014"})
    assert len(recs) == 1 and recs[0].tokens == [["a", "cat"], ["a", "cat", "sits"]] and recs[0].split == "val"
    assert "unknown image ids" in caplog.text and "have no caption" in caplog.text
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(DatasetError, match="bad.json"):
        read_coco_captions({"train": tmp_path / "bad.json"}, {"train": tmp_path})

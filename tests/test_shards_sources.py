"""Dataset readers (shards/sources): real layouts in, DatasetSource out, every drop explained."""
from __future__ import annotations

import os
import re

import pytest

import fixtures_datasets as fx
from s4d_dist.shards.sources.base import DatasetSource, SourceFormatError
from s4d_dist.shards.sources.files import frame_order_key
from s4d_dist.shards.sources.registry import READERS


def check_against(source: DatasetSource, facts: dict) -> None:
    """Splits, keys, labels, media paths and skip reasons exactly as the fixture wrote them."""
    assert source.class_names == facts["class_names"]
    assert set(source.splits) == set(facts["splits"])
    for split, expected in facts["splits"].items():
        records = source.splits[split]
        keys = [r.key for r in records]
        assert keys == sorted(keys), f"{split} not sorted by key"
        assert {r.key: r.label for r in records} == expected
        for record in records:
            assert "." not in record.key and "/" not in record.key
            assert "source" in record.meta
            if record.media == "frames":
                assert os.path.dirname(record.paths[0]) == facts["paths"][record.key]
                assert len(record.paths) == facts["frames"][record.key]
            else:
                assert record.paths == (facts["paths"][record.key],)
    skipped = dict(source.skipped)
    assert len(source.skipped) == len(facts["skipped"]), source.skipped
    for path, fragment in facts["skipped"].items():
        assert fragment in skipped[path], (path, skipped[path])


def frame_numbers(paths: tuple[str, ...]) -> list[int]:
    return [int(re.search(r"(\d+)\.\w+$", p).group(1)) for p in paths]


def test_registry_names_every_reader() -> None:
    assert set(READERS) == {"affectnet", "rafdb", "voxceleb2", "dfew", "ferv39k", "mafw",
                            "folder", "csv", "synthetic"}
    for reader in READERS.values():
        assert "Options:" in (reader.__doc__ or ""), reader


def test_unknown_option_is_rejected(tmp_path) -> None:
    facts = fx.make_dfew(str(tmp_path), n_clips=5, frames=2)
    with pytest.raises(TypeError, match="frames_folder"):
        READERS["dfew"](facts["root"], frames_folder="x")


# --------------------------------------------------------------------------- frame order

def test_frame_order_key_is_numeric_then_natural() -> None:
    names = ["10.jpg", "2.jpg", "1.jpg", "11.jpg"]
    assert sorted(names, key=frame_order_key) == ["1.jpg", "2.jpg", "10.jpg", "11.jpg"]
    names = ["frame_10.png", "frame_9.png", "frame_0100.png"]
    assert sorted(names, key=frame_order_key) == ["frame_9.png", "frame_10.png", "frame_0100.png"]
    names = ["b.jpg", "a10.jpg", "a2.jpg", "1.jpg"]  # no shared pattern: natural order
    assert sorted(names, key=frame_order_key) == ["1.jpg", "a2.jpg", "a10.jpg", "b.jpg"]


def test_frames_are_in_numeric_order(tmp_path) -> None:
    facts = fx.make_dfew(str(tmp_path), n_clips=5, frames=11)
    source = READERS["dfew"](facts["root"])
    for records in source.splits.values():
        for record in records:
            assert frame_numbers(record.paths) == list(range(1, 12))


# --------------------------------------------------------------------------- DFEW / MAFW

@pytest.mark.parametrize("name, make", [("dfew", fx.make_dfew), ("mafw", fx.make_mafw)])
def test_kfold_dataset_parts_and_folds(tmp_path, name, make) -> None:
    facts = make(str(tmp_path), missing=True, empty=True, bad_label=True)
    source = READERS[name](facts["root"])
    assert source.name == name and source.modality == "video"
    check_against(source, facts)
    assert source.splits.keys() == {f"part{k}" for k in range(1, 6)}
    assert source.folds == facts["folds"]
    all_keys = [r.key for records in source.splits.values() for r in records]
    assert len(all_keys) == len(set(all_keys)) == sum(map(len, facts["splits"].values()))
    for split, records in source.splits.items():
        for record in records:
            assert record.media == "frames"
            assert record.meta["part"] == int(split[-1]) == facts["parts"][record.key]
            assert record.meta["video_name"] == record.key  # 5-digit string, zeros kept
            ext = ".png" if name == "mafw" else ".jpg"
            assert all(p.endswith(ext) for p in record.paths)
    for _path, reason in source.skipped:  # reasons point back into the label file
        assert re.search(r"test_set_\d\.csv:\d+|test\.csv:\d+", reason), reason


def test_dfew_keeps_zero_padded_names_and_real_labels(tmp_path) -> None:
    facts = fx.make_dfew(str(tmp_path))
    source = READERS["dfew"](facts["root"])
    by_key = {r.key: r for records in source.splits.values() for r in records}
    assert by_key["00001"].label == 1 and by_key["00001"].meta["part"] == 1
    assert by_key["02522"].label == 5 and by_key["02578"].label == 6
    assert by_key["02522"].meta["source"] == "clip_jpg_256/02522"
    with open(facts["label_files"]["train_set_1"]) as handle:
        assert handle.readline() == "video_name,label\n"
        assert "02522,5\n" in handle.readlines()


def test_dfew_wrong_header_names_file_and_line(tmp_path) -> None:
    facts = fx.make_dfew(str(tmp_path))
    path = facts["label_files"]["test_set_2"]
    rows = open(path).read().splitlines()
    with open(path, "w") as handle:
        handle.write("\n".join(["name,label"] + rows[1:]) + "\n")
    with pytest.raises(SourceFormatError, match=r"test_set_2\.csv:1: expected header"):
        READERS["dfew"](facts["root"])


def rewrite(path: str, edit) -> None:
    lines = open(path).read().splitlines()
    with open(path, "w") as handle:
        handle.write("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize("mutate, file, pattern", [
    # the first data row of test_set_2 also appended to test_set_3
    (lambda f: rewrite(f["label_files"]["test_set_3"],
                       lambda ls: ls + [open(f["label_files"]["test_set_2"]).read()
                                        .splitlines()[1]]),
     "test_set_3.csv", r"clip 02522 is also in .*test_set_2\.csv:2; the test sets must be"),
    # train_set_1 loses one row
    (lambda f: rewrite(f["label_files"]["train_set_1"], lambda ls: [line for line in ls
                                                                    if line != "02522,5"]),
     "train_set_1.csv", r"missing from this train set, e\.g\. clip 02522"),
    # train_set_1 gains its own test clip
    (lambda f: rewrite(f["label_files"]["train_set_1"], lambda ls: ls + ["00001,1"]),
     "train_set_1.csv", r"clip 00001 is also in this fold's test set"),
    # train_set_2 disagrees on a label
    (lambda f: rewrite(f["label_files"]["train_set_2"],
                       lambda ls: [("00001,3" if line == "00001,1" else line) for line in ls]),
     "train_set_2.csv", r"clip 00001 has label 3 here but 1 in"),
    # a clip listed twice in one file
    (lambda f: rewrite(f["label_files"]["test_set_1"], lambda ls: ls + ["00001,1"]),
     "test_set_1.csv", r"clip 00001 listed twice \(first at line 2\)"),
    # a label that is not a number
    (lambda f: rewrite(f["label_files"]["test_set_4"], lambda ls: ls[:1] + ["02578,x"] + ls[2:]),
     "test_set_4.csv:2", r"label 'x' is not an integer"),
])
def test_dfew_broken_partition_fails_clearly(tmp_path, mutate, file, pattern) -> None:
    facts = fx.make_dfew(str(tmp_path))
    mutate(facts)
    with pytest.raises(SourceFormatError, match=pattern) as error:
        READERS["dfew"](facts["root"])
    assert file in str(error.value)


def test_kfold_missing_label_file_or_frames_root(tmp_path) -> None:
    facts = fx.make_mafw(str(tmp_path / "a"))
    os.remove(facts["label_files"]["train_set_4"])
    with pytest.raises(SourceFormatError, match=r"set_4/train\.csv: label file not found"):
        READERS["mafw"](facts["root"])
    facts = fx.make_dfew(str(tmp_path / "b"), n_clips=5, frames=2)
    with pytest.raises(SourceFormatError, match="frames folder not found"):
        READERS["dfew"](facts["root"], frames_dir="clip_jpg_224")


# --------------------------------------------------------------------------- FERV39K

def test_ferv39k(tmp_path) -> None:
    facts = fx.make_ferv39k(str(tmp_path), missing=True, empty=True, bad_label=True,
                            mismatch=True)
    source = READERS["ferv39k"](facts["root"])
    assert source.modality == "video" and source.folds is None
    check_against(source, facts)
    by_key = {r.key: r for records in source.splits.values() for r in records}
    assert by_key["Crime_Angry_0063"].label == 0
    assert by_key["Argue_Surprise_0196"].label == 6
    assert by_key["Argue_Surprise_0196"].meta["source"] == "2_ClipsforFaceCrop/Argue/Surprise/0196"


def test_ferv39k_wrong_header_and_bad_path(tmp_path) -> None:
    facts = fx.make_ferv39k(str(tmp_path))
    rewrite(facts["label_files"]["test"], lambda ls: ["path,label"] + ls[1:])
    with pytest.raises(SourceFormatError, match=r"test\.csv:1: expected header 'path,id'"):
        READERS["ferv39k"](facts["root"])
    rewrite(facts["label_files"]["test"], lambda ls: ["path,id", "Argue/0196,6"] + ls[1:])
    with pytest.raises(SourceFormatError, match=r"test\.csv:2: path 'Argue/0196'"):
        READERS["ferv39k"](facts["root"])


# --------------------------------------------------------------------------- AffectNet, RAF-DB

def test_affectnet_7_defaults(tmp_path) -> None:
    facts = fx.make_affectnet(str(tmp_path), missing=True, bad_label=True)
    source = READERS["affectnet"](facts["root"])
    assert source.modality == "image"
    check_against(source, facts)
    test = {r.key: r for r in source.splits["test"]}
    example = "680_cfa0c679da3dbe9f01e92cdeda2da1065aa50e7bf0b3990ec335f726_aligned_face_det_000000"
    assert test[example].label == 0 and test[example].media == "image"
    assert test[example].meta["source"].startswith("Manually_Annotated_Images/680/")
    reasons = [reason for _, reason in source.skipped]
    assert any("label 7 out of range" in r and "test_affectnet7_2w.txt:" in r for r in reasons)


def test_affectnet_8_with_list_options_as_strings(tmp_path) -> None:
    facts = fx.make_affectnet(str(tmp_path), classes=8, bad_label=True)
    lists = facts["label_files"]
    source = READERS["affectnet"](facts["root"], classes="8", train=lists["train"],
                                  test=os.path.basename(lists["test"]))
    check_against(source, facts)
    assert source.class_names[7] == "Contempt"
    assert 7 in {r.label for records in source.splits.values() for r in records}
    with pytest.raises(ValueError, match="classes=8 has no official list"):
        READERS["affectnet"](facts["root"], classes=8)
    with pytest.raises(SourceFormatError, match="train_affectnet7_2w.txt: list file not found"):
        READERS["affectnet"](facts["root"])


def test_affectnet_two_lists_for_one_split_and_duplicates(tmp_path) -> None:
    facts = fx.make_affectnet(str(tmp_path))
    lists = facts["label_files"]
    source = READERS["affectnet"](facts["root"], train=f"{lists['train']},{lists['test']}")
    assert set(source.splits) == {"train"}
    assert len(source.splits["train"]) == sum(map(len, facts["splits"].values()))
    first_train_row = open(lists["train"]).readline().strip()
    rewrite(lists["test"], lambda ls: ls + [first_train_row])
    n_test_lines = len(open(lists["test"]).read().splitlines())
    with pytest.raises(SourceFormatError, match=rf"test_affectnet7_2w\.txt:{n_test_lines}: "
                                                r"duplicate sample key .*train_affectnet7_2w"):
        READERS["affectnet"](facts["root"])


def test_rafdb(tmp_path) -> None:
    facts = fx.make_rafdb(str(tmp_path), missing=True, bad_label=True)
    source = READERS["rafdb"](facts["root"])
    check_against(source, facts)
    train = {r.key: r for r in source.splits["train"]}
    test = {r.key: r for r in source.splits["test"]}
    assert train["train_00001"].label == 4 and test["test_0001"].label == 2  # 5, 3 in the file
    assert train["train_00001"].paths[0].endswith("Image/aligned/train_00001_aligned.jpg")
    assert any("label 8 (1-based) out of range" in reason for _, reason in source.skipped)


def test_rafdb_unknown_prefix_names_line(tmp_path) -> None:
    facts = fx.make_rafdb(str(tmp_path))
    rewrite(facts["label_files"]["list"], lambda ls: ls[:2] + ["val_0001.jpg 1"] + ls[2:])
    with pytest.raises(SourceFormatError, match=r"list_patition_label\.txt:3: .*'val_0001\.jpg'"):
        READERS["rafdb"](facts["root"])


# --------------------------------------------------------------------------- VoxCeleb2

def test_voxceleb2(tmp_path) -> None:
    facts = fx.make_voxceleb2(str(tmp_path), empty=True, stray=True)
    source = READERS["voxceleb2"](facts["root"])
    assert source.modality == "video" and source.class_names == []
    check_against(source, facts)
    for record in source.splits["train"]:
        assert record.label is None and record.media == "video"
        assert {k: record.meta[k] for k in ("speaker", "video", "utterance")} \
            == facts["meta"][record.key]
    # root may also be the subset folder itself (the official code uses /dev/shm/dev)
    from_subset = READERS["voxceleb2"](os.path.join(facts["root"], "dev"))
    assert [r.paths for r in from_subset.splits["train"]] \
        == [r.paths for r in source.splits["train"]]
    with pytest.raises(SourceFormatError, match="unknown VoxCeleb2 layout"):
        READERS["voxceleb2"](str(tmp_path / "dev" / "mp4"))


# --------------------------------------------------------------------------- generic readers

def test_folder_with_split_folders(tmp_path) -> None:
    facts = fx.make_image_folder(str(tmp_path), stray=True)
    source = READERS["folder"](facts["root"])
    assert source.modality == "image"
    check_against(source, facts)


def test_folder_single_split_videos(tmp_path) -> None:
    facts = fx.make_image_folder(str(tmp_path), splits=None, media="video", per_class=1)
    source = READERS["folder"](facts["root"])
    assert source.modality == "video"
    check_against(source, facts)
    explicit = READERS["folder"](facts["root"], classes="sad,angry")
    assert explicit.class_names == ["sad", "angry"]
    assert {r.key: r.label for r in explicit.splits["train"]} == {"sad_001": 0, "angry_001": 1}
    assert any("'happy' not in classes" in reason for _, reason in explicit.skipped)


@pytest.mark.parametrize("by_name", [True, False])
def test_csv(tmp_path, by_name) -> None:
    facts = fx.make_csv_dataset(str(tmp_path), by_name=by_name, missing=True)
    source = READERS["csv"](facts["root"])
    check_against(source, facts)


def test_csv_errors(tmp_path) -> None:
    facts = fx.make_csv_dataset(str(tmp_path))
    train = facts["label_files"]["train"]
    fx.write_image(os.path.join(facts["root"], "images", "extra.png"))
    rewrite(train, lambda ls: ls + ["images/extra.png,0"])
    with pytest.raises(SourceFormatError, match=r"train\.csv:6: integer label '0'.*classes="):
        READERS["csv"](facts["root"])
    source = READERS["csv"](facts["root"], classes=["calm", "joy"])  # ids and names mix fine
    assert len(source.splits["train"]) == 5
    rewrite(train, lambda ls: ls + ["images/train_0.png,joy"])
    with pytest.raises(SourceFormatError, match=r"train\.csv:7: duplicate sample key "
                                                r"'images_train_0' \(first from .*train\.csv:2\)"):
        READERS["csv"](facts["root"], classes=["calm", "joy"])
    rewrite(train, lambda ls: ["file,label"] + ls[1:])
    with pytest.raises(SourceFormatError, match=r"train\.csv:1: expected header 'path,label'"):
        READERS["csv"](facts["root"])


def test_reading_is_deterministic(tmp_path) -> None:
    facts = fx.make_mafw(str(tmp_path), empty=True)
    assert READERS["mafw"](facts["root"]) == READERS["mafw"](facts["root"])

"""Shard media and the shard writer: what goes into a tar comes back out, through the
`webdataset` library and through DALI's CPU reader with our index files, byte for byte."""
from __future__ import annotations

import io
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from s4d_dist.data.decode import decode_clip, decode_image
from s4d_dist.shards.layout import frame_index_path, index_path
from s4d_dist.shards.media import (EncodeOptions, MediaError, chunk_bounds, encode_clip, encode_jpeg,
                                   image_file_to_jpeg, load_frames, load_image, load_video)
from s4d_dist.shards.samples import Sample
from s4d_dist.shards.writer import ShardWriter, check_key


def moving_clip(frames: int = 8, size: int = 32) -> np.ndarray:
    """A bright square moving over a gradient: each frame differs, and codecs keep it."""
    clip = np.empty((frames, size, size, 3), np.uint8)
    ramp = np.linspace(40, 120, size, dtype=np.uint8)
    for t in range(frames):
        clip[t] = ramp[None, :, None]
        clip[t, 8:16, 2 + 2 * t: 10 + 2 * t] = 230
    return clip


def image_samples(n: int = 5) -> list[Sample]:
    return [Sample(f"img{i:02d}", encode_jpeg(np.full((32, 24, 3), 20 * i, np.uint8)), i % 3, {"i": i})
            for i in range(n)]


def write(folder, samples: list[Sample], ext: str, labelled: bool = True, max_bytes: int = 6000) -> list:
    closed = []
    with ShardWriter(folder, ext, labelled, max_bytes, on_close=closed.append) as writer:
        for sample in samples:
            writer.write([sample])
    return closed


def shard_paths(folder) -> list[str]:
    return sorted(str(folder / n) for n in os.listdir(folder) if n.endswith(".tar"))


# ------------------------------------------------------------------------------------ media
def test_jpeg_source_is_stored_unchanged_others_are_encoded(tmp_path) -> None:
    rgb = moving_clip(1, 30)[0, :20]
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "g.bmp")
    stored, size = image_file_to_jpeg(str(tmp_path / "a.jpg"))
    assert stored == (tmp_path / "a.jpg").read_bytes() and size == (20, 30)
    png, _ = image_file_to_jpeg(str(tmp_path / "a.png"))
    assert np.abs(decode_image(png).astype(int) - rgb).mean() < 8
    assert decode_image(image_file_to_jpeg(str(tmp_path / "g.bmp"))[0]).shape == (20, 30, 3)


def test_broken_images_raise_media_error(tmp_path) -> None:
    good = io.BytesIO()
    Image.fromarray(moving_clip(1, 64)[0]).save(good, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for name in ("cut.jpg", "junk.png"):
        with pytest.raises(MediaError, match=name):
            load_image(str(tmp_path / name))
    with pytest.raises(MediaError, match="empty frame folder"):
        load_frames([])
    with pytest.raises(FileNotFoundError):  # a missing file is not a skip: it stops the build
        load_image(str(tmp_path / "absent.jpg"))


def test_frames_of_another_size_are_resized(tmp_path) -> None:
    for i, size in enumerate([(32, 32), (32, 32), (30, 34)]):
        Image.new("RGB", size, (50 * i,) * 3).save(tmp_path / f"{i}.png")
    clip, resized = load_frames([str(tmp_path / f"{i}.png") for i in range(3)])
    assert clip.shape == (3, 32, 32, 3) and resized == 1


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_clip_round_trip_window_and_determinism(codec: str, tmp_path) -> None:
    clip = moving_clip(12)
    options = EncodeOptions(video_codec=codec, keyframe_interval=4)
    data = encode_clip(clip, 25.0, options)
    assert data == encode_clip(clip, 25.0, options)
    full = decode_clip(data)
    assert full.shape == clip.shape
    assert np.abs(full.astype(int) - clip).mean() < 6
    for start in (0, 3, 5):  # from a keyframe, between keyframes
        assert np.array_equal(decode_clip(data, start, 3, 3), full[start:start + 9:3])
    (tmp_path / "c.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated"):
        load_video(str(tmp_path / "c.bin"))


def test_chunk_bounds_are_even_and_cover_the_clip() -> None:
    assert chunk_bounds(300, 128) == [(0, 100), (100, 200), (200, 300)]
    assert chunk_bounds(128, 128) == [(0, 128)]
    assert chunk_bounds(129, 128) == [(0, 64), (64, 129)]
    assert chunk_bounds(500, 0) == [(0, 500)]


# ------------------------------------------------------------------------------------ writer
def test_keys_that_break_tar_or_index_are_rejected() -> None:
    check_key("Crime_Angry_0063", "label")
    for bad in ["a.b", "a/b", "a b", "", "-x", "x" * 100]:
        with pytest.raises(ValueError):
            check_key(bad, "label")


def test_shards_roll_over_by_size_and_are_atomic(tmp_path) -> None:
    samples = image_samples(5)
    closed = write(tmp_path, samples, "jpg", max_bytes=3 * 2048 + 512)
    assert [c.name for c in closed] == [f"shard-{i:06d}.tar" for i in range(len(closed))]
    assert len(closed) > 1 and sum(c.samples for c in closed) == 5
    assert sorted(os.listdir(tmp_path)) == sorted([c.name for c in closed] + [index_path(c.name) for c in closed]
                                                  + [frame_index_path(c.name) for c in closed])
    assert sum(sum(c.labels.values()) for c in closed) == 5

    with pytest.raises(RuntimeError):  # a crash mid-shard leaves only .tmp files behind
        with ShardWriter(tmp_path / "crash", "jpg", True, 10**6) as writer:
            (tmp_path / "crash").mkdir()
            writer.write(samples[:2])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path / "crash") == ["shard-000000.tar.tmp"]


def test_same_samples_give_identical_bytes(tmp_path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write(tmp_path / name, image_samples(5), "jpg")
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_label_presence_must_match_the_folder(tmp_path) -> None:
    with pytest.raises(ValueError, match="unlabelled"):
        write(tmp_path, image_samples(1), "jpg", labelled=False)
    with pytest.raises(ValueError, match="labelled"):
        write(tmp_path, [Sample("x", b"1", None, {})], "jpg", labelled=True)


def test_index_matches_dali_wds2idx(tmp_path) -> None:
    from wds2idx import IndexCreator

    write(tmp_path, image_samples(5), "jpg", max_bytes=10**6)
    tar = shard_paths(tmp_path)[0]
    with IndexCreator(tar, str(tmp_path / "ref.idx"), verbose=False) as creator:
        creator.create_index()
    assert (tmp_path / "ref.idx").read_text() == open(index_path(tar)).read()


def test_round_trip_with_webdataset(tmp_path) -> None:
    import webdataset as wds

    samples = image_samples(5)
    write(tmp_path, samples, "jpg")
    unlabelled = tmp_path / "u"
    unlabelled.mkdir()
    write(unlabelled, [Sample("v0", b"bytes", None, {"a": 1})], "webm", labelled=False)

    read = list(wds.WebDataset(shard_paths(tmp_path), shardshuffle=False))
    assert [r["__key__"] for r in read] == [s.key for s in samples]
    for r, s in zip(read, samples):
        assert r["jpg"] == s.media
        assert struct.unpack("<i", r["label"]) == (s.label,)
        assert json.loads(r["json"]) == s.meta
    (only,) = list(wds.WebDataset(shard_paths(unlabelled), shardshuffle=False))
    assert {k for k in only if not k.startswith("__")} == {"webm", "json"}


def _dali_outputs(paths: list[str], ext: list[str], dtypes: list, decode) -> list[list[np.ndarray]]:
    """Run a DALI CPU pipeline over the shards once; per sample, the outputs as arrays."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipeline():
        outputs = fn.readers.webdataset(paths=paths, index_paths=[index_path(p) for p in paths], ext=ext,
                                        dtypes=dtypes, missing_component_behavior="error", name="reader")
        return (decode(outputs[0]), *outputs)

    pipe = pipeline()
    pipe.build()
    count = pipe.reader_meta("reader")["epoch_size"]
    return [[np.array(out[0]) for out in pipe.run()] for _ in range(count)]


def test_dali_cpu_reads_labels_and_decodes_images(tmp_path) -> None:
    from nvidia.dali import fn, types

    samples = image_samples(5)
    write(tmp_path, samples, "jpg")
    got = _dali_outputs(shard_paths(tmp_path), ["jpg", "label", "json"],
                        [types.UINT8, types.INT32, types.UINT8],
                        lambda jpg: fn.decoders.image(jpg, device="cpu", output_type=types.RGB))
    assert len(got) == len(samples)
    for (image, jpg, label, meta), s in zip(got, samples):
        assert jpg.tobytes() == s.media and int(label[0]) == s.label
        assert json.loads(meta.tobytes()) == s.meta
        assert np.abs(image.astype(int) - decode_image(s.media)).max() <= 2


@pytest.mark.parametrize("codec,ext", [("vp9", "webm"), ("mjpeg", "mkv")])
def test_dali_cpu_decodes_stored_clip_windows(codec: str, ext: str, tmp_path) -> None:
    from nvidia.dali import fn, types

    clips = [moving_clip(8), moving_clip(8)[::-1].copy()]
    options = EncodeOptions(video_codec=codec, keyframe_interval=4)
    samples = [Sample(f"clip{i}", encode_clip(c, 25.0, options), i, {}) for i, c in enumerate(clips)]
    write(tmp_path, samples, ext, max_bytes=1)  # one sample per shard: several tars + indexes
    assert len(shard_paths(tmp_path)) == 2
    got = _dali_outputs(shard_paths(tmp_path), [ext, "label"], [types.UINT8, types.INT32],
                        lambda data: fn.decoders.video(data, device="cpu", start_frame=1, sequence_length=3,
                                                       stride=2))
    for (window, data, label), s in zip(got, samples):
        assert int(label[0]) == s.label and data.tobytes() == s.media
        expected = decode_clip(s.media, 1, 3, 2)  # frames 1, 3, 5 as PyAV decodes them
        assert window.shape == expected.shape == (3, 32, 32, 3)
        assert np.abs(window.astype(int) - expected).mean() < 3  # only YUV→RGB conversion differs

"""Tests of mdsearch.data: the synthetic dataset, image folders, COCO, text encoders, the cache."""

import csv
import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from mdsearch.data import (ATTRIBUTES, CHANCE, CocoCaptions, DataError, ImageCaptionFolder,
                           SyntheticShapes, caption_for, eval_prompts, labels_for, make_dataset,
                           render)
from mdsearch.data import synthetic

# --- Synthetic shapes ---------------------------------------------------------------------------


def test_synthetic_is_deterministic_by_seed_and_index():
    a, b = SyntheticShapes(50, 32, seed=0), SyntheticShapes(50, 32, seed=0)
    for i in (0, 7, 49):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"]
        assert torch.equal(x["labels"], y["labels"]) and x["index"] == i
    c = SyntheticShapes(50, 32, seed=1)
    assert [a.caption(i) for i in range(50)] != [c.caption(i) for i in range(50)]
    assert not torch.equal(a[3]["image"], c[3]["image"])
    val = SyntheticShapes(50, 32, seed=0, split="val")
    assert [a.caption(i) for i in range(50)] != [val.caption(i) for i in range(50)]


def test_synthetic_captions_match_labels():
    ds = SyntheticShapes(200, 16, seed=3)
    for i in range(0, 200, 7):
        item = ds[i]
        assert item["caption"] == caption_for(item["labels"])
        assert torch.equal(labels_for(item["caption"]), item["labels"])
        names = [ATTRIBUTES[a][k] for a, k in zip(ATTRIBUTES, item["labels"].tolist())]
        for name in names:
            assert name in item["caption"]


def test_synthetic_pinned_values():
    """The generator is frozen: a change here changes every experiment's data."""
    ds = SyntheticShapes(10, 32, seed=0)
    assert ds[0]["caption"] == "three small red rings in the center on a black background"
    assert ds[1]["caption"] == "one large cyan circle at the bottom right on a checkered background"


@pytest.mark.parametrize("resolution", [16, 64])
def test_synthetic_shapes_and_ranges(resolution):
    ds = SyntheticShapes(40, resolution, seed=0)
    assert len(ds) == 40
    for i in range(40):
        item = ds[i]
        image = item["image"]
        assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert item["labels"].dtype == torch.long and item["labels"].shape == (len(ATTRIBUTES),)
    # the object really is drawn: its colour appears in the image
    labels = synthetic.labels_from_names(shape="square", colour="red", size="large",
                                         position="center", count="one", background="black")
    image = render(labels, resolution)
    centre = image[:, resolution // 2, resolution // 2]
    assert centre[0] > 0.5 and centre[1] < -0.5 and image[:, 0, 0].max() < -0.8


def test_synthetic_labels_are_uniform_and_chance_is_known():
    ds = SyntheticShapes(3000, 16, seed=0)
    labels = torch.stack([ds.labels(i) for i in range(3000)])
    for j, (name, classes) in enumerate(ATTRIBUTES.items()):
        freq = torch.bincount(labels[:, j], minlength=len(classes)).float() / 3000
        assert torch.allclose(freq, torch.full_like(freq, 1 / len(classes)), atol=0.04), name
        assert CHANCE[name] == pytest.approx(1 / len(classes))


def test_render_is_canonical_and_validates():
    labels = labels_for("two small blue crosses at the top left on a striped background")
    assert torch.equal(render(labels, 32), render(labels, 32))
    with pytest.raises(DataError, match="colour"):
        render([0, 99, 0, 0, 0, 0], 32)
    with pytest.raises(DataError, match="not a synthetic-shapes caption"):
        labels_for("a photo of a dog")


def test_eval_prompts_are_fixed_and_balanced():
    prompts = eval_prompts()
    again = eval_prompts()
    assert [c for c, _ in prompts] == [c for c, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(prompts, again))
    assert len(prompts) == 72
    assert prompts[0][0] == "three small red diamonds at the top left on a striped background"
    labels = torch.stack([l for _, l in prompts])
    for j, classes in enumerate(ATTRIBUTES.values()):
        assert torch.bincount(labels[:, j]).tolist() == [72 // len(classes)] * len(classes)
    for caption, l in prompts:
        assert caption == caption_for(l)


def test_synthetic_bad_arguments():
    with pytest.raises(DataError, match="size"):
        SyntheticShapes(0)
    with pytest.raises(DataError, match="split"):
        SyntheticShapes(10, split="training")
    with pytest.raises(DataError, match="resolution"):
        SyntheticShapes(10, resolution=3)
    with pytest.raises(IndexError):
        SyntheticShapes(10)[10]


# --- make_dataset -------------------------------------------------------------------------------


def test_make_dataset_synthetic_and_errors():
    ds = make_dataset({"kind": "synthetic", "size": 100, "seed": 2}, 32, "train")
    assert len(ds) == 100 and ds[0]["image"].shape == (3, 32, 32)
    assert len(make_dataset({"kind": "synthetic", "eval_size": 20}, 16, "val")) == 20
    with pytest.raises(DataError, match="did you mean 'synthetic'"):
        make_dataset({"kind": "synthetc"}, 32, "train")
    with pytest.raises(DataError, match="has no 'kind'"):
        make_dataset({"size": 3}, 32, "train")
    with pytest.raises(DataError, match="did you mean 'size'"):
        make_dataset({"kind": "synthetic", "sise": 3}, 32, "train")
    with pytest.raises(DataError, match="missing key.*captions"):
        make_dataset({"kind": "folder", "root": "."}, 32, "train")
    with pytest.raises(DataError, match="split"):
        make_dataset({"kind": "synthetic"}, 32, "tain")


# --- Image folders and COCO ---------------------------------------------------------------------


def _png(path, colour, size=(40, 24)):
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def folder(tmp_path):
    """Five PNGs (one wide, one grayscale), plus a corrupt one; one listed file is missing."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    rows = []
    for i, colour in enumerate(colours):
        _png(tmp_path / f"img{i}.png", colour)
        rows.append({"file": f"img{i}.png", "caption": f"picture {i}"})
    Image.new("L", (20, 30), 128).save(tmp_path / "gray.png")
    rows.append({"file": "gray.png", "caption": "a gray one"})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows.append({"file": "broken.png", "caption": "corrupt"})
    rows.append({"file": "missing.png", "caption": "not there"})
    return tmp_path, rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_folder_jsonl_loads_and_skips_bad_images(folder, caplog):
    root, rows = folder
    _write_jsonl(root / "captions.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="mdsearch.data"):
        ds = ImageCaptionFolder(root, "captions.jsonl", 16)
    assert len(ds) == 6 and len(ds.skipped) == 1
    assert ds.skipped[0].file.endswith("missing.png") and "missing" in ds.skipped[0].reason
    assert "skipped 1 of 7" in caplog.text
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["caption"] == "picture 0"
    assert "labels" not in item and item["index"] == 0
    assert torch.allclose(item["image"][:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    assert ds[4]["image"].shape == (3, 16, 16)  # grayscale becomes RGB
    skipped = ds.verify()
    assert len(ds) == 5 and len(skipped) == 2
    assert skipped[1].file.endswith("broken.png") and "unreadable" in skipped[1].reason
    assert "corrupt" not in ds.captions()


def test_folder_corrupt_image_is_skipped_lazily(folder, caplog):
    root, rows = folder
    _write_jsonl(root / "captions.jsonl", rows)
    ds = ImageCaptionFolder(root, "captions.jsonl", 16)
    with caplog.at_level(logging.WARNING, logger="mdsearch.data"):
        item = ds[5]  # broken.png: replaced by the next readable item (wraps to 0)
    assert item["caption"] == "picture 0" and item["index"] == 0
    assert [s.file.rsplit("/", 1)[-1] for s in ds.skipped] == ["missing.png", "broken.png"]
    assert "unreadable image" in caplog.text


def test_truncated_image_is_found_by_verify(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _write_jsonl(tmp_path / "c.jsonl", [{"file": "full.png", "caption": "a"},
                                        {"file": "cut.png", "caption": "b"}])
    ds = ImageCaptionFolder(tmp_path, "c.jsonl", 16)
    assert len(ds) == 2 and not ds.skipped  # lazily: nothing decoded yet
    assert [s.file.rsplit("/", 1)[-1] for s in ds.verify()] == ["cut.png"] and len(ds) == 1


def test_folder_csv(folder):
    root, rows = folder
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "caption"])
        writer.writeheader()
        writer.writerows(rows[:4])
    ds = make_dataset({"kind": "folder", "root": str(root), "captions": "captions.csv"}, 32, "train")
    assert len(ds) == 4 and ds[3]["caption"] == "picture 3" and ds[3]["image"].shape == (3, 32, 32)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))  # default collate works
    assert batch["image"].shape == (4, 3, 32, 32) and batch["caption"][1] == "picture 1"


def test_folder_center_crop(tmp_path):
    img = Image.new("RGB", (30, 10), (0, 0, 255))
    img.paste((255, 0, 0), (10, 0, 20, 10))  # the red middle third survives the crop
    img.save(tmp_path / "wide.png")
    _write_jsonl(tmp_path / "c.jsonl", [{"file": "wide.png", "caption": "x"}])
    image = ImageCaptionFolder(tmp_path, "c.jsonl", 8)[0]["image"]
    assert image[0].min() > 0.5 and image[2].max() < -0.5


def test_folder_bad_captions_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        ImageCaptionFolder(tmp_path, "nope.jsonl", 16)
    (tmp_path / "bad.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl.*line 2"):
        ImageCaptionFolder(tmp_path, "bad.jsonl", 16)
    (tmp_path / "bad.csv").write_text("path,text\na.png,hi\n")
    with pytest.raises(DataError, match=r"bad.csv.*'file' and 'caption'"):
        ImageCaptionFolder(tmp_path, "bad.csv", 16)
    _write_jsonl(tmp_path / "gone.jsonl", [{"file": "a.png", "caption": "x"}])
    with pytest.raises(DataError, match="no usable images"):
        ImageCaptionFolder(tmp_path, "gone.jsonl", 16)
    with pytest.raises(DataError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "nowhere", "c.jsonl", 16)


def test_coco(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    _png(tmp_path / "images" / "000001.png", (255, 0, 0))
    _png(tmp_path / "images" / "000002.png", (0, 255, 0))
    data = {"images": [{"id": 1, "file_name": "000001.png"}, {"id": 2, "file_name": "000002.png"},
                       {"id": 3, "file_name": "000003.png"}],
            "annotations": [{"id": 10, "image_id": 1, "caption": "A red  thing."},
                            {"id": 11, "image_id": 1, "caption": "Something red."},
                            {"id": 12, "image_id": 2, "caption": "A green thing."},
                            {"id": 13, "image_id": 3, "caption": "Not on disk."}]}
    (tmp_path / "annotations" / "captions_val.json").write_text(json.dumps(data))
    cfg = {"kind": "coco", "root": str(tmp_path / "images"),
           "annotations": {"val": "../annotations/captions_val.json"}}
    ds = make_dataset(cfg, 16, "val")
    assert len(ds) == 3 and len(ds.skipped) == 1
    assert ds[0]["caption"] == "A red thing." and ds[2]["caption"] == "A green thing."
    assert ds[2]["image"][1].min() > 0.9
    one = CocoCaptions(tmp_path / "images", "../annotations/captions_val.json", 16,
                       one_caption_per_image=True)
    assert one.captions() == ["A red thing.", "A green thing."]
    with pytest.raises(DataError, match="no entry for split 'train'"):
        make_dataset(cfg, 16, "train")
    (tmp_path / "annotations" / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match=r"bad.json.*'images' and 'annotations'"):
        CocoCaptions(tmp_path / "images", "../annotations/bad.json", 16)


# --- Text encoders ------------------------------------------------------------------------------

from mdsearch.data import text  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    """Loaded once (a few seconds); the tests that use it have "minilm" in their names, so
    `-k "not minilm"` leaves them out."""
    return text.get_text_encoder("minilm", max_length=32)


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).item()


def test_minilm_encodes_offline(minilm):
    assert (minilm.name, minilm.dim, minilm.max_length) == ("minilm", 384, 32)
    captions = ["a red circle", "a red circle on the left", "a blue square", "a red circle", ""]
    tokens, mask, pooled = minilm.encode(captions)
    assert tokens.shape == (5, 32, 384) and tokens.dtype == torch.float32
    assert mask.shape == (5, 32) and mask.dtype == torch.bool
    assert pooled.shape == (5, 384)
    assert mask[4].sum() == 2 and mask[0].sum() < mask[1].sum()  # "" is [CLS] [SEP]
    assert torch.allclose(tokens[0], tokens[3], atol=1e-5)
    assert not torch.allclose(tokens[0], tokens[2], atol=1e-2)
    assert _cos(pooled[0], pooled[1]) > _cos(pooled[0], pooled[2]) + 0.2
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(5), atol=1e-4)
    # batching does not change the result
    alone = minilm.encode(["a blue square"])
    assert torch.allclose(alone.tokens[0], tokens[2], atol=1e-4)


def test_minilm_embedding_cache_is_hit_the_second_time(minilm, tmp_path, monkeypatch):
    calls = []
    real = minilm.encode

    def counting(captions):
        calls.append(len(captions))
        return real(captions)

    monkeypatch.setattr(minilm, "encode", counting)
    captions = SyntheticShapes(40, 16).captions()
    first = text.cached_embeddings(minilm, captions, tmp_path, batch_size=16)
    n_calls = len(calls)
    assert n_calls == 3 and sum(calls) == len(set(captions)) + 1  # distinct captions and ""
    second = text.cached_embeddings(minilm, captions, tmp_path, batch_size=16)
    assert len(calls) == n_calls  # loaded from disk: no encoding
    assert len(list(tmp_path.iterdir())) == 1
    a, b = first.lookup(captions[:5]), second.lookup(captions[:5])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    live = real(captions[:5])
    assert a.tokens.shape == (5, 32, 384) and torch.equal(a.mask, live.mask)
    assert torch.allclose(a.tokens, live.tokens, atol=2e-2)
    assert torch.allclose(a.pooled, live.pooled, atol=2e-3)
    null = second.null
    assert null.tokens.shape == (1, 32, 384) and null.mask[0].sum() == 2
    # other captions or another setting: another file
    text.cached_embeddings(minilm, captions[:10], tmp_path, trim_padding=True)
    assert len(calls) == n_calls + 1 and len(list(tmp_path.iterdir())) == 2
    with pytest.raises(DataError, match="not in the embedding cache"):
        second.lookup(["a caption never seen"])


def test_cache_rebuilds_a_corrupt_file(tmp_path):
    class Fake:
        name, cache_id, max_length, dim = "fake", "fake:1", 4, 2
        calls = 0

        def encode(self, captions):
            Fake.calls += 1
            n = len(captions)
            return text.Encoded(torch.ones(n, 4, 2), torch.ones(n, 4, dtype=torch.bool),
                                torch.ones(n, 2))

    text.cached_embeddings(Fake(), ["a", "b"], tmp_path)
    (file,) = tmp_path.iterdir()
    file.write_bytes(b"garbage")
    emb = text.cached_embeddings(Fake(), ["a", "b"], tmp_path)
    assert Fake.calls == 2 and emb.lookup(["b", "a"]).tokens.shape == (2, 4, 2)


def test_clip_missing_path_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(text.CLIP_PATH_ENV, raising=False)
    with pytest.raises(DataError, match="needs a local checkpoint folder.*MDSEARCH_CLIP_PATH"):
        text.get_text_encoder("clip")
    with pytest.raises(DataError, match="does not exist.*clip-vit-large-patch14"):
        text.get_text_encoder("clip", path=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no config.json"):
        text.get_text_encoder("clip", path=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DataError, match="clip"):  # a folder that is not a CLIP checkpoint
        text.get_text_encoder("clip", path=str(tmp_path))
    with pytest.raises(DataError, match="did you mean 'minilm'"):
        text.get_text_encoder("minilmm")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised tiny CLIP text model and a byte-level tokenizer, built offline."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    config = CLIPTextConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPTextModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_clip_loads_a_local_checkpoint(tiny_clip, monkeypatch):
    enc = text.get_text_encoder("clip", path=str(tiny_clip))
    assert (enc.name, enc.dim, enc.max_length) == ("clip", 32, 77)
    tokens, mask, pooled = enc.encode(["a red circle", "a blue square", "a red circle", ""])
    assert tokens.shape == (4, 77, 32) and mask.shape == (4, 77) and pooled.shape == (4, 32)
    assert torch.equal(tokens[0], tokens[2]) and not torch.allclose(tokens[0], tokens[1])
    assert mask[3].sum() == 2  # start and end tokens
    monkeypatch.setenv(text.CLIP_PATH_ENV, str(tiny_clip))
    assert text.get_text_encoder("clip-l", max_length=16).encode(["x"]).tokens.shape == (1, 16, 32)

"""The shapes benchmark: PIE-Bench's layout and fields, exact run-length masks, world-true edits, same bytes twice."""

import doctest
import json
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from prompt2prompt.bench import shapes
from prompt2prompt.demo import world

SIZE = 512
# kind -> PIE's editing type id and the folder under annotation_images/
TYPES = {"color": "6", "shape": "1", "background": "8", "add": "2", "delete": "3"}
FOLDERS = {"6": "6_change_color", "1": "1_change_object", "8": "8_change_background", "2": "2_add_object",
           "3": "3_delete_object"}
FIELDS = {"image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id", "blended_word",
          "mask"}


def decode_runs(pairs, shape):
    """The runs as cure-lab/PnPInversion's `mask_decode` sets them, before it forces the border to 1."""
    total = shape[0] * shape[1]
    flat = np.zeros(total, dtype=np.uint8)
    for i in range(0, len(pairs), 2):
        start, length = pairs[i], pairs[i + 1]
        flat[start:start + min(length, total - start)] = 1
    return flat.reshape(shape)


def reference_decode(pairs, shape):
    """`mask_decode` of the reference evaluator: the runs, then the border rows and columns set to 1."""
    mask = decode_runs(pairs, shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def upscale(mask):
    """A (64, 64) mask at 512 px, each pixel an 8x8 block."""
    return np.kron(mask.astype(np.uint8), np.ones((SIZE // 64, SIZE // 64), dtype=np.uint8)).astype(bool)


def grow(mask):
    """The mask and its 8 neighbours' pixels."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    shifted = [padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return np.logical_or.reduce(shifted)


def brackets(prompt):
    return re.findall(r"\[([^\]]*)\]", prompt)


def unbracketed(prompt):
    """The prompt with its bracketed words (and the space before them) cut out."""
    return re.sub(r"\s*\[[^\]]*\]", "", prompt)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes-bench")
    mapping_path = shapes.write_shapes_benchmark(out)
    mapping = json.loads(mapping_path.read_text())
    # Pair each entry with its edit: the i-th edit of a kind has id f"{type}{i:011d}".
    seen = Counter()
    pairs = []
    for edit in shapes.shapes_edits(40, seed=0):
        type_id = TYPES[edit.edit_type]
        pairs.append((f"{type_id}{seen[type_id]:011d}", edit))
        seen[type_id] += 1
    return out, mapping_path, mapping, pairs


def test_rle_encode_gives_the_exact_runs_of_a_hand_made_mask():
    mask = np.zeros((8, 8), dtype=bool)
    mask[1, 2:6] = True  # flat 10..13
    mask[3, 7] = mask[4, 0] = mask[4, 1] = True  # flat 31..33, across a row's end
    pairs = shapes.rle_encode(mask)
    assert pairs == [10, 4, 31, 3] and all(type(v) is int for v in pairs)
    assert np.array_equal(decode_runs(pairs, (8, 8)), mask)
    border = np.ones((8, 8), dtype=bool)
    border[1:-1, 1:-1] = False
    assert np.array_equal(reference_decode(pairs, (8, 8)), mask | border)
    edge = np.zeros((8, 8), dtype=bool)
    edge[0, 0] = edge[7, 7] = True  # runs at the very first and very last pixel
    assert shapes.rle_encode(edge) == [0, 1, 63, 1]
    assert shapes.rle_encode(np.zeros((8, 8), dtype=bool)) == []
    assert shapes.rle_encode(np.ones((8, 8), dtype=bool)) == [0, 64]


def test_the_docstring_examples_run():
    failures, attempted = doctest.testmod(shapes, optionflags=doctest.ELLIPSIS)
    assert attempted > 0 and failures == 0


def test_the_folder_and_every_field_are_pie_benchs(bench):
    out, mapping_path, mapping, pairs = bench
    assert mapping_path == out / "mapping_file.json"
    assert sorted(p.name for p in out.iterdir()) == ["annotation_images", "mapping_file.json"]
    assert sorted(p.name for p in (out / "annotation_images").iterdir()) == sorted(FOLDERS.values())
    assert len(mapping) == 40 and sorted(mapping) == sorted(entry_id for entry_id, _ in pairs)
    assert Counter(entry["editing_type_id"] for entry in mapping.values()) == {t: 8 for t in FOLDERS}
    for folder in FOLDERS.values():
        assert len(list((out / "annotation_images" / folder).iterdir())) == 8
    for entry_id, entry in mapping.items():
        assert set(entry) == FIELDS, entry_id
        assert isinstance(entry_id, str) and re.fullmatch(r"\d{12}", entry_id)
        assert all(isinstance(entry[f], str) for f in FIELDS - {"mask"})
        type_id = entry["editing_type_id"]
        assert entry_id[0] == type_id and entry["image_path"] == f"{FOLDERS[type_id]}/{entry_id}.png"
        mask = entry["mask"]
        assert isinstance(mask, list) and len(mask) % 2 == 0 and len(mask) > 0
        assert all(type(v) is int for v in mask)
        starts, lengths = mask[0::2], mask[1::2]
        assert min(lengths) > 0 and starts[-1] + lengths[-1] <= SIZE * SIZE
        assert all(a + n < b for a, n, b in zip(starts, lengths, starts[1:]))  # sorted runs with gaps between
        words = entry["blended_word"].split()
        assert len(words) in (0, 2)
        if words:  # LocalBlend finds each word once in its own prompt
            assert unbracketed(entry["original_prompt"]) != entry["original_prompt"]
            assert entry["original_prompt"].replace("[", "").replace("]", "").split().count(words[0]) == 1
            assert entry["editing_prompt"].replace("[", "").replace("]", "").split().count(words[1]) == 1


def test_images_are_the_held_out_renders_at_512_rgb(bench):
    out, _, mapping, pairs = bench
    for entry_id, edit in pairs:
        assert world.is_held_out(edit.source)
        with Image.open(out / "annotation_images" / mapping[entry_id]["image_path"]) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (SIZE, SIZE)
            pixels = np.asarray(image)
        expected = world.render(edit.source).image.repeat(8, axis=0).repeat(8, axis=1)
        assert np.array_equal(pixels, expected), entry_id


@pytest.mark.parametrize("kind", list(TYPES))
def test_each_kind_masks_exactly_what_the_world_says_it_changes(bench, kind):
    _, _, mapping, pairs = bench
    border = np.ones((SIZE, SIZE), dtype=bool)
    border[1:-1, 1:-1] = False
    checked = 0
    for entry_id, edit in pairs:
        if edit.edit_type != kind:
            continue
        entry = mapping[entry_id]
        source, target = world.render(edit.source), world.render(edit.target)
        (old, *others), new = edit.source.objects, edit.target.objects
        if kind == "color":
            assert new == (replace(old, color=new[0].color),) and new[0].color != old.color
            assert new[0].center == old.center
            truth = source.masks[0]
            assert np.array_equal(truth, target.masks[0])
            words, named = ([old.color], [new[0].color]), new[0].color
        elif kind == "shape":
            assert new == (replace(old, shape=new[0].shape),) and new[0].shape != old.shape
            assert new[0].center == old.center
            truth = source.masks[0] | target.masks[0]
            words, named = ([old.shape], [new[0].shape]), new[0].shape
        elif kind == "background":
            assert new == (old,) and new[0].center == old.center and edit.target.background != edit.source.background
            assert edit.target.gradient == edit.source.gradient
            truth = ~source.masks[0]
            words, named = ([edit.source.background], [edit.target.background]), edit.target.background
        elif kind == "add":
            assert not others and len(new) == 2 and new[0] == old and new[0].center == old.center
            assert (old.position, new[1].position) in world.POSITION_PAIRS and new[1].color != old.color
            truth = target.masks[1]
            words, named = ([], [f"and {new[1].phrase()}"]), new[1].phrase()
        else:
            assert len(others) == 1 and new == (old,) and new[0].center == old.center
            truth = source.masks[1]
            words, named = ([f"and {others[0].phrase()}"], []), f"{others[0].color} {others[0].shape}"
        decoded = decode_runs(entry["mask"], (SIZE, SIZE)).astype(bool)
        assert np.array_equal(decoded, upscale(truth)), entry_id
        assert np.array_equal(reference_decode(entry["mask"], (SIZE, SIZE)).astype(bool), upscale(truth) | border)
        # The mask marks the change: outside it only its anti-aliased rim differs (two pixels wide at a star's thin
        # points); inside, most pixels do.
        changed = np.abs(source.image.astype(int) - target.image.astype(int)).max(-1) > 0
        assert not (changed & ~grow(grow(truth))).any() and changed[~truth].sum() < 0.02 * truth.size, entry_id
        if kind != "shape":  # a shape swap keeps the colour where the old and the new shape overlap
            assert changed[truth].mean() > 0.9, entry_id
        # The prompts are the two scenes' captions, differing in exactly the bracketed words.
        original, editing = entry["original_prompt"], entry["editing_prompt"]
        assert original.replace("[", "").replace("]", "") == edit.source.caption()
        assert editing.replace("[", "").replace("]", "") == edit.target.caption()
        assert (brackets(original), brackets(editing)) == words
        assert unbracketed(original) == unbracketed(editing)
        assert entry["blended_word"] == (" ".join(words[0] + words[1]) if kind in ("color", "shape") else "")
        assert named in entry["editing_instruction"]
        checked += 1
    assert checked == 8


def test_the_same_arguments_give_the_same_bytes_and_a_rewrite_replaces_files(bench, tmp_path):
    out, mapping_path, _, _ = bench
    again = shapes.write_shapes_benchmark(tmp_path / "again")
    assert again.read_bytes() == mapping_path.read_bytes()
    images = sorted(p.relative_to(out) for p in (out / "annotation_images").rglob("*.png"))
    assert len(images) == 40
    assert images == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*.png"))
    for image in images:
        assert (out / image).read_bytes() == (tmp_path / "again" / image).read_bytes()
    # Overwriting a spoilt folder restores every file.
    original_image = (tmp_path / "again" / images[0]).read_bytes()
    (tmp_path / "again" / images[0]).write_bytes(b"spoilt")
    again.write_text("{}")
    assert shapes.write_shapes_benchmark(tmp_path / "again") == again
    assert again.read_bytes() == mapping_path.read_bytes()
    assert (tmp_path / "again" / images[0]).read_bytes() == original_image
    assert not [p for p in (tmp_path / "again").rglob("*") if ".tmp" in p.name]
    other = shapes.write_shapes_benchmark(tmp_path / "other", num_scenes=5, seed=1)
    assert other.read_bytes() != mapping_path.read_bytes()


def test_kinds_take_turns_and_bad_arguments_are_refused(tmp_path):
    assert Counter(edit.edit_type for edit in shapes.shapes_edits(7)) == {"color": 2, "shape": 2, "background": 1,
                                                                       "add": 1, "delete": 1}
    with pytest.raises(ValueError, match="multiple of 64.*500"):
        shapes.write_shapes_benchmark(tmp_path, size=500)
    with pytest.raises(ValueError, match="num_scenes"):
        shapes.shapes_edits(0)

"""The shapes world: deterministic scenes, captions whose attribute words are single CLIP tokens, masks, parser."""

import numpy as np
import pytest

from prompt2prompt.demo import world
from prompt2prompt.demo.parse import mask_iou, parse, placement, placement_iou
from prompt2prompt.demo.train import corrupt, load_config, lr_at, save_atomic, step_generator

ATTRIBUTE_WORDS = [*world.COLORS, *world.SHAPES, *world.SIZES, *world.BACKGROUNDS, "left", "right", "top", "bottom",
                   "center", "gradient"]


def test_scenes_and_images_are_a_pure_function_of_the_seed():
    for seed in (0, 7, 123456):
        a, b = world.sample_scene(seed, num_objects=2), world.sample_scene(seed, num_objects=2)
        assert a == b and [o.center for o in a.objects] == [o.center for o in b.objects]
        assert np.array_equal(world.render(a).image, world.render(b).image)
    images_a, captions_a = world.render_dataset(12, seed=5, progress=False)
    images_b, captions_b = world.render_dataset(12, seed=5, progress=False)
    assert np.array_equal(images_a, images_b) and captions_a == captions_b
    assert images_a.shape == (12, 64, 64, 3) and images_a.dtype == np.uint8
    assert len(set(captions_a)) > 6


def test_every_attribute_word_is_one_clip_token(tokenizer):
    for word in ATTRIBUTE_WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"]


@pytest.mark.parametrize("old,new", [("red", "green"), ("circle", "square"), ("big", "small"), ("white", "black"),
                                     ("left", "right")])
def test_a_word_swap_changes_one_token_in_place(tokenizer, old, new):
    scene = world.Scene((world.Obj("circle", "red", "big", "left"), world.Obj("star", "blue", "small", "right")),
                        "white")
    caption = scene.caption()
    assert caption == "a big red circle on the left and a small blue star on the right on a white background"
    before = tokenizer(caption).input_ids
    after = tokenizer(caption.replace(old, new, 1)).input_ids
    assert len(before) == len(after)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert len(changed) == 1 and tokenizer.convert_ids_to_tokens(after[changed[0]]) == new + "</w>"


def test_masks_cover_the_objects_and_nothing_else():
    for seed in range(20):
        rendered = world.render(world.sample_scene(seed, num_objects=1 + seed % 2, split="all"))
        background = world.background_image(rendered.scene.background, rendered.scene.gradient)
        anywhere = rendered.masks.any(0)
        # Outside every mask the image is the background, up to anti-aliased edges.
        outside = np.abs(rendered.image.astype(np.float32) - background).max(-1)[~anywhere]
        assert np.mean(outside < 2) > 0.97
        for obj, mask in zip(rendered.scene.objects, rendered.masks):
            inside = rendered.image[mask].astype(np.float32)
            distance = np.abs(inside - np.array(world.COLORS[obj.color])).max(-1)
            assert mask.sum() > 100 and np.median(distance) < 5 and np.mean(distance < 40) > 0.8
        if len(rendered.masks) == 2:
            assert not (rendered.masks[0] & rendered.masks[1]).any()


def test_big_objects_are_bigger_and_sit_where_the_caption_says():
    for shape in world.SHAPES:
        small = world.render(world.Scene((world.Obj(shape, "red", "small", "top", (32.0, 17.0)),), "white")).masks[0]
        big = world.render(world.Scene((world.Obj(shape, "red", "big", "bottom", (32.0, 47.0)),), "white")).masks[0]
        assert big.sum() > 1.6 * small.sum()
        assert np.nonzero(small)[0].mean() < 32 < np.nonzero(big)[0].mean()


def test_held_out_captions_never_reach_the_training_split():
    train = {world.sample_scene(s).caption() for s in range(300)}
    held = {world.sample_scene(s, split="heldout").caption() for s in range(60)}
    assert train.isdisjoint(held)
    assert all(world.is_held_out(world.sample_scene(s, split="heldout")) for s in range(20))
    share = np.mean([world.is_held_out(world.sample_scene(s, split="all")) for s in range(1000)])
    assert 0.05 < share < 0.15


def test_parser_reads_back_rendered_scenes():
    objects = correct = backgrounds = 0
    for seed in range(60):
        rendered = world.render(world.sample_scene(seed, num_objects=1 + seed % 3 // 2, split="all"))
        parsed = parse(rendered.image)
        backgrounds += (parsed.background, parsed.gradient) == (rendered.scene.background, rendered.scene.gradient)
        for obj, mask in zip(rendered.scene.objects, rendered.masks):
            objects += 1
            found = parsed.find(obj.color)
            correct += (found is not None and (found.shape, found.size, found.position) == (obj.shape, obj.size,
                                                                                          obj.position)
                        and mask_iou(found.mask, mask) > 0.9)
    assert backgrounds == 60
    assert correct >= objects - 1  # a rare overlap can hide a corner of the first object


def test_placement_recovers_centre_and_radius_whatever_the_shape():
    # The layout of a shape swap: a perfect one, drawn by the world, keeps its placement though its box changes.
    center = (30.3, 35.7)
    found = {shape: parse(world.render(world.Scene((world.Obj(shape, "red", "big", None, center),), "white")).image)
             .find("red") for shape in world.SHAPES}
    for shape, obj in found.items():
        x, y, radius = placement(obj)
        assert obj.shape == shape
        assert abs(x - center[0]) < 0.6 and abs(y - center[1]) < 0.6 and abs(radius - world.SIZES["big"]) < 0.6
    widths = {shape: int(obj.mask.any(0).sum()) for shape, obj in found.items()}
    assert widths["circle"] - widths["square"] >= 4  # their bounding boxes' IoU is about 0.69
    assert placement_iou(found["circle"], found["square"]) > 0.9
    assert placement_iou(found["circle"], None) == 0.0
    moved = world.render(world.Scene((world.Obj("square", "red", "big", None, (center[0] + 8, center[1])),), "white"))
    assert placement_iou(found["circle"], parse(moved.image).find("red")) < 0.65
    small = world.render(world.Scene((world.Obj("square", "red", "small", None, center),), "white"))
    assert placement_iou(found["circle"], parse(small.image).find("red")) < 0.6


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="num_objects must be 1 or 2, got 3"):
        world.sample_scene(0, num_objects=3)
    with pytest.raises(ValueError, match="'test'"):
        world.sample_scene(0, split="test")
    with pytest.raises(ValueError, match="'hexagon'"):
        world.shape_coverage("hexagon", (32.0, 32.0), 10.0)
    with pytest.raises(ValueError, match="shape"):
        parse(np.zeros((32, 32, 3), dtype=np.uint8))


def test_probe_corruption_changes_exactly_the_named_attribute():
    rng = np.random.default_rng(0)
    caption = "a big red circle on the left on a white gradient background"
    assert corrupt(caption, "color", rng).split(" ")[2] in set(world.COLORS) - {"red"}
    assert corrupt(caption, "shape", rng).split(" ")[3] in set(world.SHAPES) - {"circle"}
    assert corrupt(caption, "background", rng).split(" ")[-3] in set(world.BACKGROUNDS) - {"white"}
    moved = corrupt(caption, "position", rng)
    assert moved != caption and moved.endswith("on a white gradient background")
    assert any(moved.startswith(f"a big red circle {p}") for p in world.POSITION_PHRASES.values())


@pytest.mark.training
def test_training_helpers_are_deterministic_and_resumable(tmp_path):
    import torch

    a = torch.randn(4, generator=step_generator(0, 2, 17))
    assert torch.equal(a, torch.randn(4, generator=step_generator(0, 2, 17)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(0, 2, 18)))
    assert lr_at(0, 1000, 100) == pytest.approx(0.01) and lr_at(100, 1000, 100) == pytest.approx(1.0)
    assert lr_at(1000, 1000, 100) == pytest.approx(0.1)
    save_atomic({"step": 3}, tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt")["step"] == 3 and not (tmp_path / "ckpt.pt.tmp").exists()
    config = load_config(tmp_path / "run", {"batch": 8})
    assert load_config(tmp_path / "run", {}).batch == 8
    with pytest.raises(SystemExit, match="batch"):
        load_config(tmp_path / "run", {"batch": 16})
    assert config.batch == 8


def test_free_layouts_name_no_position_and_place_objects_anywhere():
    positions = ("left", "right", "top", "bottom", "center")
    centers = []
    for seed in range(80):
        scene = world.sample_scene(seed, num_objects=1 + seed % 2, split="all", layout="free")
        caption = scene.caption()
        assert not any(word in caption.split() for word in positions), caption
        rendered = world.render(scene)
        for obj, mask in zip(scene.objects, rendered.masks):
            assert obj.position is None and mask.sum() > 100
            radius = world.SIZES[obj.size]
            assert all(radius <= c <= world.SIZE - radius for c in obj.center)  # inside the picture
            centers.append(obj.center)
        if len(scene.objects) == 2:
            assert not (rendered.masks[0] & rendered.masks[1]).any()
            assert " and " in caption and (scene.objects[0].size, scene.objects[1].size) != ("big", "big")
    # Continuous positions: far more distinct places than the five fixed centres, spread over the picture.
    xs, ys = np.array(centers).T
    assert len({(round(x), round(y)) for x, y in centers}) > 50
    assert xs.min() < 22 and xs.max() > 42 and ys.min() < 22 and ys.max() > 42


def test_fixed_layouts_draw_as_before_and_a_bad_layout_is_refused():
    # The fixed world is unchanged by the free one: the same seed gives the same scene as it always did.
    scene = world.sample_scene(3, num_objects=2)
    assert scene == world.sample_scene(3, num_objects=2, layout="fixed")
    assert all(obj.position in world.POSITIONS for obj in scene.objects)
    with pytest.raises(ValueError, match="layout must be 'fixed' or 'free'"):
        world.sample_scene(0, layout="anywhere")


def test_the_data_set_mixes_layouts_and_object_counts_as_asked():
    _, captions = world.render_dataset(400, seed=11, two_object_fraction=0.2, free_fraction=0.5,
                                       free_two_object_fraction=0.6, progress=False)
    named = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
    free = [c for c in captions if not any(p in c for p in named)]
    assert 0.4 < len(free) / len(captions) < 0.6
    assert 0.5 < np.mean([" and " in c for c in free]) < 0.7
    fixed = [c for c in captions if c not in free]
    assert 0.1 < np.mean([" and " in c for c in fixed]) < 0.3

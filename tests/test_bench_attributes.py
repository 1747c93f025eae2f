"""The shapes benchmark's attribute success, on rendered images made to pass and made to fail."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from prompt2prompt.bench.attributes import attribute_success
from prompt2prompt.bench.pie import Entry
from prompt2prompt.demo import world

RED_STAR = world.Obj("star", "red", "big", "bottom", world.POSITIONS["bottom"])
YELLOW_STAR = world.Obj("star", "yellow", "small", "top", world.POSITIONS["top"])
SOURCE = world.Scene((RED_STAR,), "white")
ADDED = world.Scene((RED_STAR, YELLOW_STAR), "white")  # "add a small yellow star at the top"


def entry(source: world.Scene, target: world.Scene, type_id: str) -> Entry:
    return Entry("0", Path("/unused.png"), source.caption(), target.caption(), "", type_id, "",
                 np.zeros((512, 512), np.uint8))


def image(*objects: world.Obj) -> np.ndarray:
    return world.render(world.Scene(objects, "white")).image


def score(picture: np.ndarray, target: world.Scene = ADDED, source: world.Scene = SOURCE, type_id: str = "2") -> float:
    return attribute_success(entry(source, target, type_id), picture)["success"]


def test_a_real_addition_succeeds_wherever_the_new_object_lands():
    assert score(world.render(ADDED).image) == 1.0
    assert score(image(RED_STAR, replace(YELLOW_STAR, center=(14.0, 14.0)))) == 1.0


def test_the_reported_failure_one_orange_figure_with_a_round_head_is_no_addition():
    # The red star turned orange, with a round head on top: every saturated pixel reads as one yellow figure.
    picture = world.background_image("white", False)
    alpha = np.maximum(world.shape_coverage("star", world.POSITIONS["bottom"], 17.0),
                       world.shape_coverage("circle", (32.0, 24.0), 7.0))
    picture = picture * (1 - alpha[..., None]) + np.array([240, 150, 30], np.float32) * alpha[..., None]
    picture = np.clip(np.rint(picture), 0, 255).astype(np.uint8)
    assert score(picture) == 0.0


@pytest.mark.parametrize("objects, why", [
    ((RED_STAR,), "nothing was added"),
    ((RED_STAR, replace(YELLOW_STAR, shape="circle")), "the added object has another shape"),
    ((YELLOW_STAR,), "the first object is gone"),
    ((replace(RED_STAR, color="yellow"),), "the first object took on the new colour instead"),
    ((replace(RED_STAR, shape="circle"), YELLOW_STAR), "the first object changed shape"),
    ((RED_STAR, replace(YELLOW_STAR, center=(32.0, 26.0))), "the new object touches the first: one figure"),
])
def test_failed_additions_are_refused(objects, why):
    assert score(image(*objects)) == 0.0, why


def test_the_other_kinds_score_as_before():
    recolored = world.Scene((replace(RED_STAR, color="green"),), "white")
    assert score(world.render(recolored).image, recolored, type_id="6") == 1.0
    assert score(world.render(SOURCE).image, recolored, type_id="6") == 0.0
    reshaped = world.Scene((replace(RED_STAR, shape="circle"),), "white")
    assert score(world.render(reshaped).image, reshaped, type_id="1") == 1.0
    assert score(world.render(recolored).image, reshaped, type_id="1") == 0.0
    # delete: the second object's colour must be gone
    assert score(world.render(SOURCE).image, SOURCE, ADDED, type_id="3") == 1.0
    assert score(world.render(ADDED).image, SOURCE, ADDED, type_id="3") == 0.0
    gray = replace(SOURCE, background="gray")
    assert score(world.render(gray).image, gray, type_id="8") == 1.0
    assert score(world.render(SOURCE).image, gray, type_id="8") == 0.0

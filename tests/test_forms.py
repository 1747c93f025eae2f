"""Edits as plain data: the JSON form that recipes and manifests store, to Edit objects and back."""

import json

import pytest

from prompt2prompt import Edit, LocalBlend
from prompt2prompt.edits import blend_from_dict, blend_to_dict, edit_from_dict, edit_to_dict

EDITS = [
    Edit("a dog riding a bike"),
    Edit("a fluffy cat riding a bike", mode="refine", cross_steps={"default": (0.1, 0.9), "fluffy": 0.4},
         self_steps=(0.0, 0.3), weights={"fluffy": 2.0, 3: -0.5}),
    Edit("a dog riding a bike", blend=LocalBlend(["cat"], "dog", threshold=0.5, exclude_edit_words=["bike"])),
]


@pytest.mark.parametrize("edit", EDITS, ids=["plain", "windows and weights", "blend"])
def test_an_edit_survives_its_json_form(edit):
    data = json.loads(json.dumps(edit_to_dict(edit)))  # as a recipe or a manifest line holds it
    assert edit_from_dict(data) == edit
    assert edit_to_dict(edit_from_dict(data)) == data


def test_the_form_is_the_one_recipes_store():
    """The dicts `p2p edit` writes into its recipes (see test_cli) read back as the API's Edit."""
    stored = {"prompt": "a dog riding a red bicycle", "mode": "auto", "cross_steps": {"default": 0.8, "dog": 0.5},
              "self_steps": 0.4, "weights": [[4, 1.5]], "blend": {"source_words": ["cat"], "edit_words": ["dog"]}}
    edit = Edit("a dog riding a red bicycle", cross_steps={"default": 0.8, "dog": 0.5}, weights={4: 1.5},
                blend=LocalBlend(["cat"], ["dog"]))
    assert edit_from_dict(stored) == edit and edit_to_dict(edit) == stored


def test_blend_options_at_their_defaults_are_left_out():
    assert blend_to_dict(LocalBlend("cat", "dog")) == {"source_words": "cat", "edit_words": "dog"}
    blend = LocalBlend(("cat",), ("dog",), start=0.3, exclude_source_words=("floor",))
    assert blend_to_dict(blend) == {"source_words": ["cat"], "edit_words": ["dog"], "start": 0.3,
                                    "exclude_source_words": ["floor"]}
    assert blend_from_dict(blend_to_dict(blend)) == LocalBlend(["cat"], ["dog"], start=0.3, exclude_source_words=["floor"])


def test_bad_fields_fail_as_the_edit_does():
    with pytest.raises(ValueError, match="self_steps"):
        edit_from_dict({"prompt": "a dog", "self_steps": 1.5})
    with pytest.raises(TypeError):
        edit_from_dict({"prompt": "a dog", "strength": 2})


def test_edit_and_local_blend_carry_their_dict_form():
    from prompt2prompt import Edit, LocalBlend

    blend = LocalBlend("cat", ["dog"], threshold=0.5, exclude_edit_words=["bike"])
    edit = Edit("a dog on a bike", cross_steps={"default": 0.8, "dog": (0.2, 0.6)}, weights={1: -1.0}, blend=blend)
    assert Edit.from_dict(edit.to_dict()) == edit
    assert LocalBlend.from_dict(blend.to_dict()) == blend
    assert edit.to_dict()["blend"] == blend.to_dict()

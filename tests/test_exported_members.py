import prompt2prompt


def test_public_api_is_pinned():
    assert prompt2prompt.__all__ == sorted(prompt2prompt.__all__)
    assert prompt2prompt.__all__ == [
        "Edit", "EditResult", "Editor", "Inversion", "LocalBlend", "attention_heatmaps", "image_grid", "invert",
    ]
    for name in prompt2prompt.__all__:
        assert getattr(prompt2prompt, name).__doc__, f"{name} has no docstring"

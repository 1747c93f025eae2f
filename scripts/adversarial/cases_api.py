"""api: the Python API with hostile values, each a snippet that child.py runs after prelude_api.py."""

from __future__ import annotations

from .case import Case
from .inputs import make_fifo, write_image


def api_cases() -> list[Case]:
    """The Python API with hostile values: each snippet should raise ValueError/TypeError (one line) or return
    images that are not black; `RESULT = ...` marks a value whose images the harness checks."""
    specs: list[tuple[str, str, str]] = []

    def add(name, code, expect="error"):
        specs.append((name, code, expect))

    # Edit
    for name, value in [("nan", "float('nan')"), ("inf", "float('inf')"), ("10-pow-400", "10**400"),
                        ("one-tuple", "(0.2,)"), ("reversed", "(0.5, 0.2)"), ("three", "[0.2, 0.5, 0.9]"),
                        ("string", "'0.8'"), ("none", "None"), ("bool", "True"), ("np-nan", "np.float64('nan')"),
                        ("complex", "1j"), ("set", "{0.2, 0.8}"), ("tensor", "torch.tensor(0.5)"),
                        ("dict-non-string-key", "{'default': 0.8, 1.5: 0.3}"), ("dict-none-key", "{None: 0.3}"),
                        ("dict-tuple-key", "{('a',): 0.1}"), ("dict-nan-window", "{'default': float('nan')}"),
                        ("dict-empty", "{}")]:
        add(f"edit-cross-steps-{name}", f"RESULT = p2p.Edit(EDIT, cross_steps={value})")
    for name, value in [("np-int64-1", "np.int64(1)"), ("bool", "True"), ("decimal", "__import__('decimal').Decimal('0.5')"),
                        ("fraction", "__import__('fractions').Fraction(1, 2)"), ("np-float16-inf", "np.float16('inf')"),
                        ("huge-int", "10**400")]:
        add(f"edit-self-steps-{name}", f"RESULT = p2p.Edit(EDIT, self_steps={value})", "any")
    for name, value in [("nan", "{'green': float('nan')}"), ("10-pow-400", "{'green': 10**400}"),
                        ("bool", "{'green': True}"), ("np-float16-overflow", "{'green': np.float16(70000)}"),
                        ("position-huge", "{10**30: 2.0}"), ("none-key", "{None: 2.0}"), ("float-key", "{1.5: 2.0}"),
                        ("bytes-key", "{b'green': 2.0}"), ("tuple-key", "{('green',): 2.0}"),
                        ("string-weight", "{'green': '2'}"), ("decimal-weight", "{'green': __import__('decimal').Decimal(2)}"),
                        ("list-of-pairs", "[('green', 2.0)]"), ("set", "{'green'}"), ("complex", "{'green': 2j}"),
                        ("tensor-weight", "{'green': torch.tensor(2.0)}"), ("np-array-weight", "{'green': np.array([2.0])}")]:
        add(f"edit-weights-{name}", f"RESULT = p2p.Edit(EDIT, weights={value})")
    for name, value in [("none", "None"), ("int", "5"), ("bytes", "b'a dog'"), ("empty", "''"), ("list", "[EDIT]")]:
        add(f"edit-prompt-{name}", f"RESULT = p2p.Edit({value})")
    for name, value in [("none", "None"), ("int", "5"), ("uppercase", "'Replace'")]:
        add(f"edit-mode-{name}", f"RESULT = p2p.Edit(EDIT, mode={value})")
    add("edit-blend-not-localblend", "RESULT = p2p.Edit(EDIT, blend={'source_words': ['red'], 'edit_words': ['green']})")
    # LocalBlend
    for name, kwargs in [("threshold-nan", "threshold=float('nan')"), ("threshold-bool", "threshold=True"),
                         ("threshold-np-float32", "threshold=np.float32(0.3)"), ("start-2", "start=2"),
                         ("exclude-threshold-inf", "exclude_threshold=float('inf')"),
                         ("exclude-words-none", "exclude_source_words=None")]:
        add(f"blend-{name}", f"RESULT = p2p.LocalBlend('red', 'green', {kwargs})", "any")
    for name, words in [("empty-list", "[]"), ("nested-list", "[['red']]"), ("float", "5.5"), ("bool", "True"),
                        ("np-int", "np.int64(2)"), ("huge-list", "['red'] * 1_000_000"), ("range", "range(10)"),
                        ("bytes", "b'red'"), ("none", "None")]:
        add(f"blend-source-words-{name}", f"RESULT = p2p.LocalBlend({words}, 'green')", "any")
    # prepare / edit
    def ed(kwargs, edits="[EDIT]", prompt="SRC", method="edit"):
        call = f"editor().{method}({prompt}, {edits}, {kwargs})"
        return f"RESULT = {call}"
    for name, value in [("negative", "-1"), ("zero", "0"), ("float", "2.0"), ("bool", "True"), ("np-int64", "np.int64(2)"),
                        ("10-pow-30", "10**30"), ("10-pow-7", "10**7"), ("string", "'2'")]:
        add(f"edit-steps-{name}", ed(f"num_inference_steps={value}, seed=1"),
            "any" if name in ("np-int64",) else "error")
    for name, value in [("nan", "float('nan')"), ("inf", "float('inf')"), ("10-pow-400", "10**400"), ("string", "'7.5'"),
                        ("np-float64", "np.float64(7.5)"), ("bool", "True"), ("1e30", "1e30"), ("minus-1e30", "-1e30")]:
        add(f"edit-guidance-{name}", ed(f"num_inference_steps=2, seed=1, guidance_scale={value}"),
            "ok" if name == "np-float64" else "error")
    for name, value in [("negative", "-1"), ("2-pow-63", "2**63"), ("float", "1.5"), ("string", "'1'"),
                        ("np-int64", "np.int64(1)"), ("bool", "True")]:
        add(f"edit-seed-{name}", ed(f"num_inference_steps=2, seed={value}"), "any" if name == "np-int64" else "error")
    for name, value in [("63", "height=63"), ("8", "height=8"), ("1", "height=1"), ("10-pow-30", "height=10**30"),
                        ("np-int64", "height=np.int64(64)"), ("bool", "height=True"), ("float", "height=64.0"),
                        ("huge-pixels", "height=4096, width=4096"), ("negative", "width=-64")]:
        add(f"edit-size-{name}", ed(f"num_inference_steps=2, seed=1, {value}"), "any" if "np" in name else "error")
    for name, value in [("int", "5"), ("over-77", "'dark ' * 90"), ("bytes", "b'dark'")]:
        add(f"edit-negative-prompt-{name}", ed(f"num_inference_steps=2, seed=1, negative_prompt={value}"))
    for name, value, expect in [
        ("nan", "torch.full((1, 4, 16, 16), float('nan'))", "error"),
        ("inf", "torch.full((1, 4, 16, 16), float('inf'))", "error"),
        ("huge", "torch.full((1, 4, 16, 16), 1e30)", "any"),
        ("wrong-shape", "torch.zeros(1, 4, 8, 8)", "error"),
        ("three-for-two-prompts", "torch.zeros(3, 4, 16, 16)", "error"),
        ("int-dtype", "torch.zeros(1, 4, 16, 16, dtype=torch.int64)", "any"),
        ("meta-device", "torch.zeros(1, 4, 16, 16, device='meta')", "error"),
        ("numpy-array", "np.zeros((1, 4, 16, 16), np.float32)", "error"),
        ("one-dim", "torch.zeros(16)", "error"),
        ("bool-dtype", "torch.ones(1, 4, 16, 16, dtype=torch.bool)", "any"),
    ]:
        add(f"edit-latents-{name}", ed(f"num_inference_steps=2, latents={value}"), expect)
    for name, value in [("negative", "-1"), ("zero", "0"), ("10-pow-30", "10**30"), ("side-3", "3"),
                        ("list-with-bogus", "[16, 3]"), ("string", "'yes'"), ("float", "16.0")]:
        add(f"edit-record-attention-{name}", ed(f"num_inference_steps=2, seed=1, record_attention={value}"))
    add("edit-output-type-bogus", ed("num_inference_steps=2, seed=1, output_type='bogus'"))
    add("edit-generator-string", ed("num_inference_steps=2, generator='x'"))
    add("edit-seed-and-generator", ed("num_inference_steps=2, seed=1, generator=torch.Generator()"))
    for name, edits in [("none", "None"), ("int", "5"), ("none-item", "[None]"), ("empty-string-item", "['']"),
                        ("dict-item", "[{'prompt': EDIT}]"), ("generator", "(e for e in [EDIT])")]:
        add(f"edit-edits-{name}", ed("num_inference_steps=2, seed=1", edits=edits), "any" if name == "generator" else "error")
    add("edit-edits-65", ed("num_inference_steps=2, seed=1", edits="[EDIT] * 65"), "any")
    add("edit-edits-400", ed("num_inference_steps=2, seed=1", edits="[EDIT] * 400"), "any")
    for name, kwargs, expect in [("eta-nan", "eta=float('nan')", "error"), ("eta-negative", "eta=-1.0", "any"),
                                 ("guidance-rescale-nan", "guidance_rescale=float('nan')", "error"),
                                 ("lora-scale-nan", "cross_attention_kwargs={'scale': float('nan')}", "error"),
                                 ("unknown-kwarg", "bogus_keyword=1", "error"),
                                 ("callback-int", "callback_on_step_end=5", "error"),
                                 ("prompt-embeds-reserved", "prompt_embeds=torch.zeros(1)", "error"),
                                 ("clip-skip-huge", "clip_skip=10**6", "error"),
                                 ("timesteps-garbage", "timesteps=[5, 'x']", "error"),
                                 ("sigmas-nan", "sigmas=[float('nan')] * 2", "error")]:
        add(f"edit-kwargs-{name}", ed(f"num_inference_steps=2, seed=1, {kwargs}"), expect)
    for name, prompt in [("none", "None"), ("int", "5"), ("zwsp", "'\\u200b'"), ("over-77", "SRC * 10"),
                         ("10000-chars", "'a' * 10000"), ("bytes", "b'a cat'")]:
        add(f"edit-source-{name}", ed("num_inference_steps=2, seed=1", prompt=prompt), "any" if name == "zwsp" else "error")
    add("prepare-then-run-twice", "run = editor().prepare(SRC, [EDIT], num_inference_steps=2, seed=1)\n"
        "editor().run(run)\nRESULT = editor().run(run)", "ok")
    add("run-empty-list", "RESULT = editor().run([])")
    add("run-not-prepared", "RESULT = editor().run(5)")
    add("run-mixed-sizes", "a = editor().prepare(SRC, [EDIT], num_inference_steps=2, seed=1)\n"
        "b = editor().prepare(SRC, [EDIT], num_inference_steps=2, seed=1, height=32, width=32)\n"
        "RESULT = editor().run([a, b])")
    # Editor construction
    for name, code in [("pipe-none", "p2p.Editor(None)"), ("pipe-string", "p2p.Editor('demo')"),
                       ("self-replace-negative", "p2p.Editor(editor().pipe, self_replace_max_res=-1)"),
                       ("blend-res-zero", "p2p.Editor(editor().pipe, blend_res=0)"),
                       ("blend-res-3", "p2p.Editor(editor().pipe, blend_res=3)"),
                       ("blend-res-nan", "p2p.Editor(editor().pipe, blend_res=float('nan'))"),
                       ("attention-bogus", "p2p.Editor(editor().pipe, attention='bogus')"),
                       ("from-pretrained-missing", "p2p.Editor.from_pretrained('/nonexistent/model')"),
                       ("from-pretrained-device-bogus", "p2p.Editor.from_pretrained('demo', device='bogus')"),
                       ("from-pretrained-dtype-string", "p2p.Editor.from_pretrained('demo', torch_dtype='float16x')"),
                       ("from-pretrained-dtype-int8", "p2p.Editor.from_pretrained('demo', torch_dtype=torch.int8)"),
                       ("tokenize-int", "editor().tokenize(5)"), ("tokenize-zwsp", "editor().tokenize('\\u200b')")]:
        add(f"editor-{name}", f"RESULT = {code}", "any" if name == "tokenize-zwsp" else "error")
    add("editor-blend-res-3-run", "RESULT = p2p.Editor(editor().pipe, blend_res=3).edit(SRC, [p2p.Edit(EDIT, "
        "blend=p2p.LocalBlend('red', 'green'))], num_inference_steps=2, seed=1)")
    # inversion
    def inv(image, extra="method='ddim', num_inference_steps=2", prompt="SRC"):
        return f"RESULT = editor().invert({image}, {prompt}, {extra})"
    for kind in ("truncated-png", "bomb-30000", "text", "empty", "gif-animated", "float-nan-tiff", "wide-100000x1",
                 "exif-corrupt", "zero-width-png"):
        add(f"invert-file-{kind}", inv(f"IN + '/{kind}.img'"), "any" if kind in ("gif-animated", "wide-100000x1",
                                                                                 "float-nan-tiff", "exif-corrupt")
            else "error")
    for name, image, expect in [("missing", "IN + '/nowhere.png'", "error"), ("directory", "IN", "error"),
                                ("fifo", "IN + '/fifo.png'", "error"),
                                ("empty-array", "np.zeros((0, 0, 3), np.uint8)", "error"),
                                ("nan-array", "np.full((64, 64, 3), np.nan)", "error"),
                                ("five-channels", "np.zeros((64, 64, 5), np.uint8)", "error"),
                                ("complex-array", "np.zeros((64, 64), complex)", "error"),
                                ("object-array", "np.zeros((64, 64, 3), object)", "error"),
                                ("int64-array", "np.full((64, 64, 3), 10**12, np.int64)", "error"),
                                ("tensor", "torch.zeros(3, 64, 64)", "error"), ("nested-list", "[[0]]", "error"),
                                ("pil-F-nan", "__import__('PIL.Image').Image.fromarray(np.full((64, 64), np.nan, "
                                              "np.float32), 'F')", "any"),
                                ("pil-zero-size", "__import__('PIL.Image').Image.new('RGB', (0, 0))", "error"),
                                ("pil-1x1", "__import__('PIL.Image').Image.new('RGB', (1, 1))", "ok"),
                                ("bytes", "b'\\x89PNG'", "error"), ("none", "None", "error")]:
        add(f"invert-{name}", inv(image), expect)
    for name, extra, expect in [("method-bogus", "method='bogus', num_inference_steps=2", "error"),
                                ("method-euler", "method='euler', num_inference_steps=2", "error"),
                                ("inner-steps-negative", "method='null-text', num_inference_steps=2, num_inner_steps=-1",
                                 "error"),
                                ("inner-steps-huge", "method='null-text', num_inference_steps=2, num_inner_steps=10**9",
                                 "any"),
                                ("epsilon-nan", "method='null-text', num_inference_steps=2, early_stop_epsilon=float('nan')",
                                 "error"),
                                ("fit-stretch", "method='ddim', num_inference_steps=2, fit='stretch'", "error"),
                                ("height-63", "method='ddim', num_inference_steps=2, height=63", "error"),
                                ("steps-10-pow-30", "method='ddim', num_inference_steps=10**30", "any"),
                                ("null-text-guidance-1", "method='null-text', num_inference_steps=2, guidance_scale=1",
                                 "error"),
                                ("guidance-nan", "method='direct', num_inference_steps=2, guidance_scale=float('nan')",
                                 "error")]:
        add(f"invert-{name}", inv("IN + '/png.img'", extra), expect)
    add("invert-prompt-empty", inv("IN + '/png.img'", prompt="''"))
    add("invert-prompt-int", inv("IN + '/png.img'", prompt="5"))
    # saved inversions (files a user can be handed)
    save = ("inv = editor().invert(IN + '/png.img', SRC, method='ddim', num_inference_steps=2)\n"
            "inv.save(OUT + '/inv')\nimport json as _j\n"
            "side = _j.loads(open(OUT + '/inv.json').read())\n")
    reload_ = "\nopen(OUT + '/inv.json', 'w').write(_j.dumps(side))\nloaded = p2p.Inversion.load(OUT + '/inv')\n" \
              "RESULT = editor().edit(loaded.prompt, [EDIT], inversion=loaded)"
    for name, change in [("tensors-not-list", "side['tensors'] = 5"), ("tensors-mismatch", "side['tensors'] = ['x']"),
                         ("steps-negative", "side['num_inference_steps'] = -1"),
                         ("guidance-nan", "side['guidance_scale'] = float('nan')"),
                         ("height-string", "side['height'] = '64'"), ("prompt-int", "side['prompt'] = 5"),
                         ("method-bogus", "side['method'] = 'bogus'"), ("sidecar-list", "side = []"),
                         ("steps-mismatch-trajectory", "side['num_inference_steps'] = 50")]:
        add(f"inversion-load-{name}", save + change + reload_)
    add("inversion-load-nan-latents", save + "from safetensors.torch import load_file, save_file\n"
        "t = load_file(OUT + '/inv.safetensors')\nt['latents'] = torch.full_like(t['latents'], float('nan'))\n"
        "save_file(t, OUT + '/inv.safetensors')" + reload_)
    add("inversion-load-garbage-tensors", save + "open(OUT + '/inv.safetensors', 'wb').write(b'garbage' * 10)" + reload_)
    add("inversion-load-missing", "RESULT = p2p.Inversion.load(IN + '/nowhere')")
    # visualisation helpers
    add("heatmaps-without-record", "r = editor().edit(SRC, [EDIT], num_inference_steps=2, seed=1)\n"
        "RESULT = p2p.attention_heatmaps(r)")
    add("heatmaps-prompt-index-99", "r = editor().edit(SRC, [EDIT], num_inference_steps=2, seed=1, record_attention=True)\n"
        "RESULT = p2p.attention_heatmaps(r, prompt_index=99)")
    add("heatmaps-res-3", "r = editor().edit(SRC, [EDIT], num_inference_steps=2, seed=1, record_attention=True)\n"
        "RESULT = p2p.attention_heatmaps(r, res=3)")
    add("image-grid-empty", "RESULT = p2p.image_grid([])")
    add("image-grid-width-zero", "from PIL import Image\nRESULT = p2p.image_grid([Image.new('RGB', (8, 8))], width=0)")
    add("image-grid-captions-mismatch", "from PIL import Image\nRESULT = p2p.image_grid([Image.new('RGB', (8, 8))], "
        "['a', 'b'])")
    add("cache-source-stochastic", "from diffusers import EulerAncestralDiscreteScheduler\ne = editor()\n"
        "e.pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(e.pipe.scheduler.config)\n"
        "RESULT = e.cache_source(SRC, seed=1, num_inference_steps=2)")
    add("cache-other-prompt", "c = editor().cache_source(SRC, seed=1, num_inference_steps=2)\n"
        "RESULT = editor().edit(EDIT, [SRC], cache=c)")
    add("load-manifest-missing", "from prompt2prompt.batch import load_manifest\nRESULT = load_manifest(IN + '/x.jsonl')")

    def setup(root, ctx):
        for kind in ("png", "truncated-png", "bomb-30000", "text", "empty", "gif-animated", "float-nan-tiff",
                     "wide-100000x1", "exif-corrupt", "zero-width-png"):
            write_image(root / "in" / f"{kind}.img", kind)
        make_fifo(root / "in" / "fifo.png")
        (root / "out").mkdir()

    return [Case("api", name, code=code, expect=expect, setup=setup) for name, code, expect in specs]

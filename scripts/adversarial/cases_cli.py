"""cli: options (numbers, devices, dtypes, output folders, edit options, `serve`) and models (folders, indexes,
weights, single files) given to the `p2p` command."""

from __future__ import annotations

import json
import struct

from .case import CANARY, DEMO_MODEL, EDIT, FAST, INLINE, SRC, TAIL, Case, edit_args
from .inputs import afile, canary_module, demo_index, make_fifo, model_folder, pickle_payload, real_component


def cli_cases() -> list[Case]:
    """Options: numbers, devices, dtypes, output folders, edit options and models."""
    cases: list[Case] = []

    def add(name, args, expect="any", **kwargs):
        cases.append(Case("cli", name, args=args, expect=expect, **kwargs))

    big = str(10**30)
    # numbers
    for value, expect in [("-1", "usage"), (big, "usage"), ("2.5", "usage"), ("nan", "usage"), ("inf", "usage"),
                          ("", "usage"), ("0x10", "usage"), ("1e3", "usage"), (" 2", "any"), ("+2", "any"),
                          ("\u0662", "any"), ("1001", "usage"), ("1000", "ok")]:
        add(f"steps={value!r}", edit_args(INLINE, "--steps", value), expect)
    for value, expect in [("0", "ok"), ("-1", "ok"), ("1e30", "usage"), ("100.0001", "usage"), ("-100", "any"),
                          ("100", "any"), ("1e309", "usage"), ("-1e309", "usage"), ("abc", "usage"), ("", "usage"),
                          ("0x10", "usage"), ("1_0", "any"), ("-nan", "usage")]:
        add(f"guidance={value!r}", edit_args(INLINE, "--guidance", value), expect)
    for value, expect in [("-1", "usage"), (str(2**63), "usage"), (str(2**63 - 1), "ok"), ("1.5", "usage"),
                          ("nan", "usage"), (big, "usage"), ("0", "ok"), ("0" * 30 + "1", "ok"), ("", "usage")]:
        add(f"seed={value!r}", ["edit", INLINE, "--steps", "2", "--out", "@OUT@", "--seed", value], expect)
    for option in ("--height", "--width"):
        for value, expect in [("1", "usage"), ("7", "usage"), ("63", "usage"), ("65", "usage"), ("0", "usage"),
                              ("-64", "usage"), ("8", "usage"), ("24", "usage"), ("40", "usage"), ("4104", "usage"),
                              (big, "usage"), ("2.5", "usage"), ("nan", "usage")]:
            add(f"{option[2:]}={value!r}", edit_args(INLINE, option, value), expect)
    for height, width, expect in [("128", "128", "ok"), ("96", "32", "ok"), ("32", "32", "ok"), ("4096", "4096", "usage"),
                                  ("128", "160", "usage"), ("32", "4096", "usage"), ("32", "96", "ok")]:
        add(f"size={height}x{width}", edit_args(INLINE, "--height", height, "--width", width), expect)
    for value, expect in [("77", "usage"), ("1", "usage"), ("512", "usage"), ("0", "usage"), ("513", "usage"),
                          (big, "usage"), ("abc", "usage")]:
        add(f"max-sequence-length={value}", edit_args(INLINE, "--max-sequence-length", value), expect)
    for value, expect in [("0", "usage"), ("-1", "usage"), ("3", "usage"), ("5", "usage"), (big, "usage"),
                          ("1", "any"), ("2", "any"), ("16", "ok"), ("abc", "usage")]:
        add(f"attention-res={value}", ["attention", SRC, *FAST, "--out", "@OUT@", "--res", value], expect)
    # devices and dtypes
    for value, expect in [("cuda", "runtime"), ("cuda:7", "runtime"), ("mps", "runtime"), ("meta", "usage"),
                          ("cpu:0", "ok"), ("cpu:99", "any"), ("xpu", "runtime"), ("CPU", "usage"), ("", "usage"),
                          ("cuda:-1", "usage"), ("cpu,cuda", "usage"), ("hpu", "usage"), ("vulkan", "usage"),
                          ("privateuseone", "usage"), ("cpu\n", "usage")]:
        add(f"device={value!r}", edit_args(INLINE, "--device", value), expect)
    for value, expect in [("bogus", "usage"), ("int8", "usage"), ("float8_e4m3fn", "usage"), ("torch.float32", "usage"),
                          ("bool", "usage"), ("float64", "any"), ("bfloat16", "any"), ("float16", "any"),
                          ("half", "any"), ("", "usage"), ("FLOAT32", "usage"), ("complex64", "usage"),
                          ("uint8", "usage")]:
        add(f"dtype={value!r}", edit_args(INLINE, "--dtype", value), expect)
    add("attention-dtype-int8", ["attention", SRC, *FAST, "--out", "@OUT@", "--dtype", "int8"], "usage")
    # output folders
    add("out-is-a-file", ["edit", INLINE, *FAST, "--out", "@IN@/afile"], "runtime", setup=afile)
    add("out-in-proc", ["edit", INLINE, *FAST, "--out", "/proc/p2p-adversarial"], "runtime")
    add("out-under-proc-file", ["edit", INLINE, *FAST, "--out", "/proc/self/status/x"], "runtime")
    add("out-dev-null", ["edit", INLINE, *FAST, "--out", "/dev/null"], "runtime")
    add("out-dev-full-child", ["edit", INLINE, *FAST, "--out", "/dev/full/x"], "runtime")
    add("out-in-sys", ["edit", INLINE, *FAST, "--out", "/sys/p2p-adversarial"], "runtime")
    add("out-newline-name", ["edit", INLINE, *FAST, "--out", "out\nnl"], "any", allowed=("cwd/out\nnl",))
    add("out-ansi-name", ["edit", INLINE, *FAST, "--out", "out\x1b[31mred"], "any", allowed=("cwd/out\x1b[31mred",))
    add("out-space-name", ["edit", INLINE, *FAST, "--out", " "], "any", allowed=("cwd/ ",))
    add("out-dash-name", ["edit", INLINE, *FAST, "--out", "-weird"], "any", allowed=("cwd/-weird",))
    add("out-literal-tilde", ["edit", INLINE, *FAST, "--out", "~"], "any", allowed=("cwd/~",))
    add("out-empty-string", ["edit", INLINE, *FAST, "--out", ""], "any", allowed=("cwd",))
    add("out-300-char-name", ["edit", INLINE, *FAST, "--out", "@ROOT@/" + "x" * 300], "runtime")
    add("out-path-over-path-max", ["edit", INLINE, *FAST, "--out", "@ROOT@/out/" + "/".join(["d" * 50] * 90)], "runtime")
    add("out-symlink-loop", ["edit", INLINE, *FAST, "--out", "@IN@/loop/x"], "runtime",
        setup=lambda root, ctx: (root / "in" / "loop").symlink_to(root / "in" / "loop"))
    add("out-dangling-symlink", ["edit", INLINE, *FAST, "--out", "@IN@/dangling"], "runtime",
        setup=lambda root, ctx: (root / "in" / "dangling").symlink_to(root / "in" / "nowhere" / "x"))
    add("out-fifo", ["edit", INLINE, *FAST, "--out", "@IN@/fifo"], "runtime",
        setup=lambda root, ctx: make_fifo(root / "in" / "fifo"))
    add("attention-out-is-a-file", ["attention", SRC, *FAST, "--out", "@IN@/afile"], "runtime", setup=afile)
    add("demo-out-is-a-file", ["demo", "--out", "@IN@/afile"], "runtime", setup=afile)
    add("demo-out-proc", ["demo", "--out", "/proc/p2p-demo"], "runtime")
    # windows, weights, blends, modes, edit prompts
    for value, expect in [("-0.1", "usage"), ("1.0001", "usage"), ("0.5:0.2", "usage"), ("0.2:0.5:0.8", "usage"),
                          (":", "usage"), ("0.2:", "usage"), ("nan:0.5", "usage"), ("inf", "usage"),
                          ("1e-400", "ok"), ("", "usage"), ("  ", "usage"), ("0.5 ", "any"), ("\u0661", "any"),
                          ("0:0", "ok"), ("1:1", "ok")]:
        add(f"cross={value!r}", edit_args(INLINE, "--cross", value), expect)
    for value, expect in [("-1", "usage"), ("2", "usage"), ("nan", "usage"), (":0.5", "usage"), ("0.1:0.1", "ok"),
                          ("-inf:inf", "usage"), ("0.5:nan", "usage")]:
        add(f"self={value!r}", edit_args(INLINE, "--self", value), expect)
    for value, expect in [("=0.4", "usage"), ("green=", "usage"), ("green=0.4:0.2", "usage"), ("green==0.4", "usage"),
                          ("green=nan", "usage"), ("1=0.4", "any"), ("-1=0.4", "any"), ("99=0.4", "usage"),
                          ("green=0.4:1.2", "usage"), ("default=0.3", "any"), ("green=0.1:0.2:0.3", "usage")]:
        add(f"cross-word={value!r}", edit_args(INLINE, "--cross-word", value), expect)
    add("cross-word-twice", edit_args(INLINE, "--cross-word", "green=0.4", "--cross-word", "green=0.6"), "any")
    for value, expect in [("green=nan", "usage"), ("green=inf", "usage"), ("green=-100.1", "usage"), ("green=", "usage"),
                          ("=2", "usage"), ("green=2=3", "usage"), ("0=2", "any"), ("99=2", "usage"), ("-1=2", "any"),
                          ("green=1e-320", "ok"), ("green=0x10", "usage"), ("green=1_0", "any"),
                          ("green=100", "any"), ("green=-100", "any")]:
        add(f"weight={value!r}", edit_args(INLINE, "--weight", value), expect)
    add("weight-on-pure-source", edit_args(SRC, "--weight", "red=2"), "ok")
    for value, expect in [(":", "usage"), ("red:", "usage"), (":green", "usage"), ("red:green:blue", "usage"),
                          (",,:,,", "usage"), ("red,red:green", "any"), ("99:0", "usage"), ("2:2", "any"),
                          ("red:green,circle", "ok"), ("red :green", "usage")]:
        add(f"blend={value!r}", edit_args(INLINE, "--blend", value), expect)
    add("blend-word-missing-from-to", edit_args(SRC, "--to", "a big blue" + TAIL, "--blend", "red:green"), "usage")
    for value, expect in [("", "usage"), ("REPLACE", "usage"), ("refine", "ok"), ("replace", "ok"), ("auto ", "usage")]:
        add(f"mode={value!r}", edit_args(INLINE, "--mode", value), expect)
    add("65-to-edits", edit_args(SRC, *[arg for _ in range(65) for arg in ("--to", EDIT)]), "any")
    add("prompt-twice", ["edit", INLINE, "--prompt", SRC, *FAST, "--out", "@OUT@"], "usage")
    add("to-without-value", ["edit", INLINE, *FAST, "--out", "@OUT@", "--to"], "usage")
    add("option-given-twice", edit_args(INLINE, "--steps", "3"), "ok")
    add("unknown-short-option", edit_args(INLINE, "-z"), "usage")
    add("no-arguments", [], "usage")
    add("edit-help", ["edit", "--help"], "ok")
    add("uppercase-command", ["EDIT", INLINE], "usage")
    add("version-flag", ["--version"], "usage")
    add("inversion-without-image", edit_args(INLINE, "--inversion", "bogus"), "usage")
    # models
    missing_models = [("nonexistent-abs", "/nonexistent/model"), ("nonexistent-rel", "./nope"), ("empty", ""),
                      ("uppercase-demo", "DEMO"), ("demo-slash", "demo/"), ("dotdot", ".."), ("root", "/"),
                      ("dev-null", "/dev/null"), ("proc-environ", "/proc/self/environ"), ("four-slashes", "a/b/c/d"),
                      ("300-chars", "x" * 300), ("url", "https://example.com/model"), ("newline", "demo\nx"),
                      ("traversal-to-etc", "../../../../../../etc"), ("tilde-nobody", "~nobody/model")]
    for name, model in missing_models:
        add(f"model-{name}", edit_args(INLINE, "--model", model), "error")
    add("model-bogus-hub-offline", edit_args(INLINE, "--model", "bogus-org/bogus-model"), "runtime",
        env={"HF_HUB_OFFLINE": "1"})
    add("model-bogus-hub-online", edit_args(INLINE, "--model", "bogus-org/bogus-model"), "runtime")
    add("model-env-bogus", edit_args(INLINE), "runtime", env={"P2P_MODEL": "/nonexistent/model"})
    index_cases = [
        ("index-invalid-json", dict(index_text="{"), "runtime"),
        ("index-list", dict(index_text="[]"), "runtime"),
        ("index-empty-object", dict(index_text="{}"), "runtime"),
        ("index-not-utf8", dict(index_text=None), "runtime"),
        ("index-class-os-system", dict(index={**demo_index(), "_class_name": "os.system"}), "any"),
        ("index-class-list", dict(index={**demo_index(), "_class_name": ["canary_mod", "Canary"]}), "any"),
        ("index-unet-from-canary", dict(index={**demo_index(), "unet": ["canary_mod", "Canary"]}), "runtime"),
        ("index-extra-canary-component", dict(index={**demo_index(), "evil": ["canary_mod", "Canary"]}), "runtime"),
        ("index-unet-from-os", dict(index={**demo_index(), "unet": ["os", "system"]}), "runtime"),
        ("index-unet-class-pipeline", dict(index={**demo_index(), "unet": ["diffusers", "StableDiffusionPipeline"]}),
         "runtime"),
        ("index-sd3-class-on-demo", dict(index={**demo_index(), "_class_name": "StableDiffusion3Pipeline"}), "runtime"),
        ("index-flux-class-on-demo", dict(index={**demo_index(), "_class_name": "FluxPipeline"}), "runtime"),
        ("index-unet-null", dict(index={**demo_index(), "unet": [None, None]}), "runtime"),
        ("index-unet-int", dict(index={**demo_index(), "unet": 5}), "runtime"),
        ("index-tokenizer-bogus-class", dict(index={**demo_index(), "tokenizer": ["transformers", "NoSuchTokenizer"]}),
         "runtime"),
        ("index-safety-checker-missing", dict(index={**demo_index(), "safety_checker": ["stable_diffusion",
                                                                                         "StableDiffusionSafetyChecker"]}),
         "any"),
        ("index-missing-unet-folder", dict(components=("scheduler", "text_encoder", "tokenizer", "vae")), "runtime"),
        ("index-deep-nesting", dict(index_text='{"_class_name": "StableDiffusionPipeline", "unet": '
                                               + "[" * 5000 + "]" * 5000 + "}"), "runtime"),
    ]
    for name, kwargs, expect in index_cases:
        def setup(root, ctx, kwargs=kwargs, name=name):
            canary_module(root)
            if name == "index-not-utf8":
                folder = model_folder(root)
                (folder / "model_index.json").write_bytes(b'{"_class_name": "\xff\xfe"}')
            else:
                model_folder(root, **kwargs)
        add(f"model-{name}", edit_args(INLINE, "--model", "@IN@/model"), expect, setup=setup)

    def recursive(root, ctx):
        folder = model_folder(root, index={**demo_index(), "unet": ["diffusers", "StableDiffusionPipeline"]},
                              components=("scheduler", "text_encoder", "tokenizer", "vae"))
        (folder / "unet").symlink_to(folder, target_is_directory=True)
    add("model-recursive-pipeline-component", edit_args(INLINE, "--model", "@IN@/model"), "runtime", setup=recursive)

    def weights(kind):
        def setup(root, ctx):
            canary_module(root)
            folder = model_folder(root)
            unet = real_component(folder, "unet")
            target = unet / "diffusion_pytorch_model.safetensors"
            target.unlink()
            if kind == "garbage":
                target.write_bytes(b"not safetensors at all" * 10)
            elif kind == "empty":
                target.write_bytes(b"")
            elif kind == "huge-header":
                target.write_bytes(struct.pack("<Q", 2**62) + b"{}")
            elif kind == "header-lies":
                header = json.dumps({"conv_in.weight": {"dtype": "F32", "shape": [10**6, 10**6],
                                                         "data_offsets": [0, 4 * 10**12]}}).encode()
                target.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
            elif kind == "no-tensors":
                header = b'{"__metadata__":{}}'
                target.write_bytes(struct.pack("<Q", len(header)) + header)
            elif kind in ("pickle", "pickle-allowed"):
                (unet / "diffusion_pytorch_model.bin").write_bytes(pickle_payload(root / "cwd" / f"{CANARY}-pickle"))
            elif kind == "config-bad":
                (unet / "config.json").unlink()
                config = json.loads((DEMO_MODEL / "unet" / "config.json").read_text())
                config.update(attention_head_dim=0, sample_size=-1)
                (unet / "config.json").write_text(json.dumps(config))
            elif kind == "config-not-json":
                (unet / "config.json").unlink()
                (unet / "config.json").write_text("{{{{")
                target.symlink_to(DEMO_MODEL / "unet" / "diffusion_pytorch_model.safetensors")
            if kind == "config-bad":
                target.symlink_to(DEMO_MODEL / "unet" / "diffusion_pytorch_model.safetensors")
        return setup
    for kind in ("garbage", "empty", "huge-header", "header-lies", "no-tensors", "pickle", "config-bad",
                 "config-not-json"):
        add(f"model-unet-weights-{kind}", edit_args(INLINE, "--model", "@IN@/model"), "runtime", setup=weights(kind))
    add("model-unet-weights-pickle-allowed", edit_args(INLINE, "--model", "@IN@/model", "--allow-pickle"), "runtime",
        setup=weights("pickle"))

    def tokenizer_auto_map(root, ctx):
        folder = model_folder(root)
        tokenizer = real_component(folder, "tokenizer")
        (tokenizer / "tokenizer_config.json").unlink()
        config = json.loads((DEMO_MODEL / "tokenizer" / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": ["canary_tok.CanaryTokenizer", None]}
        (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
        (tokenizer / "canary_tok.py").write_text(
            f"open({str(root / 'cwd' / (CANARY + '-tokenizer'))!r}, 'w').write('x')\n"
            "from transformers import CLIPTokenizer\nclass CanaryTokenizer(CLIPTokenizer):\n    pass\n")
    add("model-tokenizer-auto-map", edit_args(INLINE, "--model", "@IN@/model"), "any", setup=tokenizer_auto_map)

    def single_file(kind):
        def setup(root, ctx):
            path = root / "in" / ("model.ckpt" if kind == "ckpt" else "model.safetensors")
            if kind == "garbage":
                path.write_bytes(b"\x00garbage" * 100)
            elif kind == "empty":
                path.write_bytes(b"")
            elif kind == "huge-header":
                path.write_bytes(struct.pack("<Q", 2**63 - 1) + b"{")
            elif kind == "no-tensors":
                header = b'{"__metadata__":{"format":"pt"}}'
                path.write_bytes(struct.pack("<Q", len(header)) + header)
            elif kind == "unknown-keys":
                header = json.dumps({"foo.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
                path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
            elif kind == "sd-keys-no-config":
                header = json.dumps({"model.diffusion_model.x": {"dtype": "F32", "shape": [1],
                                                                  "data_offsets": [0, 4]}}).encode()
                path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
            elif kind == "ckpt":
                path.write_bytes(pickle_payload(root / "cwd" / f"{CANARY}-ckpt"))
        return setup
    for kind in ("garbage", "empty", "huge-header", "no-tensors", "unknown-keys", "sd-keys-no-config"):
        add(f"model-single-file-{kind}", edit_args(INLINE, "--model", "@IN@/model.safetensors"), "error",
            setup=single_file(kind), env={"HF_HUB_OFFLINE": "1"})
    add("model-ckpt-pickle", edit_args(INLINE, "--model", "@IN@/model.ckpt"), "error", setup=single_file("ckpt"),
        env={"HF_HUB_OFFLINE": "1"})
    add("model-ckpt-pickle-allowed", edit_args(INLINE, "--model", "@IN@/model.ckpt", "--allow-pickle"), "error",
        setup=single_file("ckpt"), env={"HF_HUB_OFFLINE": "1"})
    # serve: only arguments that must fail before a server starts (a valid one would serve until the timeout)
    for name, args, expect in [
        ("port-0", ["--port", "0"], "usage"), ("port-70000", ["--port", "70000"], "usage"),
        ("port-negative", ["--port", "-1"], "usage"), ("max-upload-0", ["--max-upload-mb", "0"], "usage"),
        ("max-upload-inf", ["--max-upload-mb", "inf"], "usage"), ("cache-negative", ["--cache-mb", "-1"], "usage"),
        ("cache-nan", ["--cache-mb", "nan"], "usage"), ("device-cuda", ["--device", "cuda"], "runtime"),
        ("dtype-int8", ["--dtype", "int8"], "usage"), ("out-is-a-file", ["--out", "@IN@/afile"], "runtime"),
        ("max-upload-huge", ["--max-upload-mb", "1e30"], "usage"),
    ]:
        add(f"serve-{name}", ["serve", *args], expect, setup=afile if "afile" in args[-1] else None)
    return cases

"""The program of an API or web case: run a prelude, then the case's snippet, and print what happened.

run.py starts it as `python -c "<run this file>" PRELUDE ROOT IN OUT SNIPPET` (with `-c` the case's working folder
stays first on sys.path, as for the CLI cases). PRELUDE (prelude_api.py or prelude_web.py) and SNIPPET run in one
namespace; the snippet sets RESULT to the value whose images are checked. The outcome is one line on stdout,
`@@P2P@@` and a JSON object: {"status": "returned", ...} with the saved images, or {"status": "raised", "type": ...,
"mro": ..., "message": ..., "origin": ..., "where": ...}.
"""

import json
import os
import sys
import traceback
from pathlib import Path

HARNESS = Path(__file__).resolve().parent
# After the case's cwd and site-packages: only `scripts.adversarial` (the preludes' prompts) resolves from here.
sys.path.append(str(HARNESS.parents[1]))


def case_folders() -> tuple[str, str, str]:
    """ROOT, IN and OUT of the running case: its folder, its input folder and its output folder (from argv)."""
    root, in_folder, out = sys.argv[2:5]
    return root, in_folder, out


def _origin(tb) -> tuple[str, str]:
    """Who raised: prompt2prompt, a library (by its site-packages folder), the harness's own code, or the stdlib."""
    frames = traceback.extract_tb(tb)
    if not frames:
        return "?", "?"
    last = frames[-1]
    where = f"{last.filename}:{last.lineno} in {last.name}"
    name = last.filename
    if name.startswith("<") or name.startswith(str(HARNESS) + os.sep):
        return "snippet", where
    if os.sep + "prompt2prompt" + os.sep in name:
        return "prompt2prompt", where
    if "site-packages" + os.sep in name:
        return "library:" + name.split("site-packages" + os.sep, 1)[1].split(os.sep, 1)[0], where
    return "stdlib", where


def _save(result, out: str) -> dict:
    """Save the images of `result` (PIL images) under `out`; report tensors or arrays with NaN/inf values."""
    info = {"repr": repr(result)[:300]}
    images = getattr(result, "images", None)
    if images is None:
        return info
    import numpy as np

    saved, nonfinite = [], False
    items = [images[i] for i in range(len(images))]
    for i, item in enumerate(items):
        if hasattr(item, "save"):
            path = os.path.join(out, f"api-{i}.png")
            item.save(path)
            saved.append(path)
            continue
        array = item.detach().float().cpu().numpy() if hasattr(item, "detach") else np.asarray(item)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            nonfinite = True
    info.update(saved=saved, nonfinite=nonfinite, count=len(items))
    return info


def _report(payload: dict) -> None:
    sys.stdout.write("\n@@P2P@@" + json.dumps(payload, default=repr) + "\n")
    sys.stdout.flush()


def main() -> None:
    prelude, snippet = sys.argv[1], sys.argv[5]
    namespace = {"__name__": "__main__", "RESULT": None}
    try:
        exec(compile(Path(prelude).read_text(), prelude, "exec"), namespace)
        exec(compile(snippet, "<case>", "exec"), namespace)
    except BaseException as error:
        origin, where = _origin(error.__traceback__)
        gradio = any(c.__name__ == "Error" and c.__module__.startswith("gradio") for c in type(error).__mro__)
        message = getattr(error, "message", None) if gradio else None
        _report({"status": "raised", "type": type(error).__name__, "module": type(error).__module__,
                 "mro": [c.__name__ for c in type(error).__mro__], "gradio_error": gradio,
                 "message": str(message if message is not None else error), "origin": origin, "where": where})
    else:
        _report({"status": "returned", **_save(namespace["RESULT"], case_folders()[2])})


if __name__ == "__main__":
    main()

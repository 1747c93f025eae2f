"""web: `webapp.run_form` (what the Run button calls) with what a forged request or an odd upload can send, each a
snippet that child.py runs after prelude_web.py."""

from __future__ import annotations

from .case import TAIL, Case
from .inputs import make_fifo, write_image


def web_cases() -> list[Case]:
    """`webapp.run_form` (what the Run button calls) with what a forged request or an odd upload can send."""
    specs: list[tuple[str, str, str]] = [
        ("baseline", "RESULT = run()", "ok"),
        ("inline-markup-only", "RESULT = run('a big [red->green]' + " + repr(TAIL) + ", count=0)", "ok"),
        ("model-etc", "RESULT = run(model='/etc')", "error"),
        ("model-empty", "RESULT = run(model='')", "error"),
        ("model-none", "RESULT = run(model=None)", "error"),
        ("model-trailing-space", "RESULT = run(model='demo ')", "error"),
        ("model-int", "RESULT = run(model=5)", "error"),
        ("source-none", "RESULT = run(None)", "error"),
        ("source-int", "RESULT = run(5)", "error"),
        ("source-list", "RESULT = run(['a'])", "error"),
        ("source-whitespace", "RESULT = run(' \\n\\t')", "error"),
        ("source-triple-arrow", "RESULT = run('a [a->b->c] d', count=0)", "error"),
        ("source-weight-nan", "RESULT = run('a big (red:nan) circle')", "error"),
        ("source-zwsp", "RESULT = run('\\u200b')", "any"),
        ("source-over-77", "RESULT = run('red ' * 90)", "error"),
        ("source-lone-surrogate", "RESULT = run('a big \\udcff red' + " + repr(TAIL) + ")", "any"),
        ("source-nul", "RESULT = run('a big\\x00 red' + " + repr(TAIL) + ")", "any"),
        ("seed-nan", "RESULT = run(seed=NAN)", "error"),
        ("seed-inf", "RESULT = run(seed=INF)", "error"),
        ("seed-1e30", "RESULT = run(seed=1e30)", "error"),
        ("seed-2-pow-63", "RESULT = run(seed=2**63)", "error"),
        ("seed-string", "RESULT = run(seed='5')", "error"),
        ("seed-bool", "RESULT = run(seed=True)", "any"),
        ("seed-fraction", "RESULT = run(seed=0.5)", "any"),
        ("steps-nan", "RESULT = run(steps=NAN)", "error"),
        ("steps-inf", "RESULT = run(steps=INF)", "error"),
        ("steps-zero", "RESULT = run(steps=0)", "error"),
        ("steps-1e30", "RESULT = run(steps=1e30)", "error"),
        ("steps-string", "RESULT = run(steps='abc')", "error"),
        ("steps-none", "RESULT = run(steps=None)", "error"),
        ("steps-2.9", "RESULT = run(steps=2.9)", "any"),
        ("guidance-nan", "RESULT = run(guidance=NAN)", "error"),
        ("guidance-none", "RESULT = run(guidance=None)", "error"),
        ("guidance-1e400", "RESULT = run(guidance=1e400)", "error"),
        ("guidance-string", "RESULT = run(guidance='7.5')", "any"),
        ("count-negative", "RESULT = run(count=-1)", "error"),
        ("count-5", "RESULT = run(count=5)", "error"),
        ("count-1e30", "RESULT = run(count=10**30)", "error"),
        ("count-nan", "RESULT = run(count=NAN)", "error"),
        ("count-none", "RESULT = run(count=None)", "error"),
        ("count-string", "RESULT = run(count='2')", "any"),
        ("row-mode-bogus", "RESULT = run(edit_rows=rows(row(mode='bogus')))", "error"),
        ("row-cross-nan", "RESULT = run(edit_rows=rows(row(cross=NAN)))", "error"),
        ("row-cross-string", "RESULT = run(edit_rows=rows(row(cross='abc')))", "error"),
        ("row-cross-none", "RESULT = run(edit_rows=rows(row(cross=None)))", "error"),
        ("row-cross-1.5", "RESULT = run(edit_rows=rows(row(cross=1.5)))", "error"),
        ("row-self-inf", "RESULT = run(edit_rows=rows(row(self_steps=INF)))", "error"),
        ("row-weight-word-missing", "RESULT = run(edit_rows=rows(row(weight_words=['zebra'])))", "error"),
        ("row-weight-nan", "RESULT = run(edit_rows=rows(row(weight_words=['green'], weight=NAN)))", "error"),
        ("row-weight-1e400", "RESULT = run(edit_rows=rows(row(weight_words=['green'], weight=1e400)))", "error"),
        ("row-weight-string", "RESULT = run(edit_rows=rows(row(weight_words=['green'], weight='x')))", "error"),
        ("row-weight-words-int", "RESULT = run(edit_rows=rows(row(weight_words=5)))", "error"),
        ("row-blend-one-side", "RESULT = run(edit_rows=rows(row(blend_source=['red'])))", "error"),
        ("row-blend-word-missing", "RESULT = run(edit_rows=rows(row(blend_source=['zebra'], blend_edit=['green'])))",
         "error"),
        ("row-exclude-only", "RESULT = run(edit_rows=rows(row(exclude_source=['red'])))", "error"),
        ("row-prompt-int", "RESULT = run(edit_rows=rows(row(prompt=5)))", "error"),
        ("row-prompt-markup", "RESULT = run(edit_rows=rows(row(prompt='a [red->green]')))", "error"),
        ("row-prompt-weight-1e39", "RESULT = run(edit_rows=rows(row(prompt='a big (green:1e39)' + " + repr(TAIL) + ")))",
         "error"),
        ("row-short-list", "RESULT = request(['demo', SRC, 1, 2, 7.5, None, 'null-text', 1, EDIT, 'auto'])", "error"),
        ("rows-empty", "RESULT = run(edit_rows=[])", "error"),
        ("image-missing", "RESULT = run(image=IN + '/nowhere.png')", "error"),
        ("image-directory", "RESULT = run(image=IN)", "error"),
        ("image-text", "RESULT = run(image=IN + '/text.png')", "error"),
        ("image-truncated", "RESULT = run(image=IN + '/truncated.png')", "error"),
        ("image-bomb", "RESULT = run(image=IN + '/bomb.png')", "error"),
        ("image-fifo", "RESULT = run(image=IN + '/fifo.png')", "error"),
        ("image-valid-ddim", "RESULT = run(image=IN + '/photo.png', method='ddim')", "ok"),
        ("image-method-bogus", "RESULT = run(image=IN + '/photo.png', method='bogus')", "error"),
        ("image-method-euler", "RESULT = run(image=IN + '/photo.png', method='euler')", "error"),
        ("image-method-none", "RESULT = run(image=IN + '/photo.png', method=None)", "any"),
        ("image-over-limit", "RESULT = run(image=IN + '/photo.png', method='ddim', max_bytes=10)", "error"),
        ("image-odd-extension", "RESULT = run(image=IN + '/photo.PNG;rm -rf', method='ddim')", "any"),
        ("image-server-path", "RESULT = run(image='/etc/hostname', method='ddim')", "error"),
    ]

    def setup(root, ctx):
        (root / "out").mkdir()
        write_image(root / "in" / "photo.png", "png")
        write_image(root / "in" / "photo.PNG;rm -rf", "png")
        write_image(root / "in" / "text.png", "text")
        write_image(root / "in" / "truncated.png", "truncated-png")
        write_image(root / "in" / "bomb.png", "bomb-30000")
        make_fifo(root / "in" / "fifo.png")

    return [Case("web", name, code=code, expect=expect, setup=setup) for name, code, expect in specs]

"""Progress off a TTY: plain lines, one per N steps and one at the end, no carriage returns."""

import io

from mtr_jax.progress import LineProgress, progress


def test_line_progress_in_a_log_file():
    buf = io.StringIO()
    bar = progress(100, 0, "sft", True, stream=buf)
    assert isinstance(bar, LineProgress)
    for i in range(100):
        bar.set_postfix(loss=f"{1.0 / (i + 1):.3f}")
        bar.update(1)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 20 and "\r" not in buf.getvalue()
    assert lines[0].startswith("sft 5/100 [") and lines[-1].startswith("sft 100/100 [") and "loss=0.010" in lines[-1]


def test_resumed_and_disabled():
    buf = io.StringIO()
    bar = LineProgress(10, initial=7, desc="grpo", stream=buf)
    bar.update(1)
    bar.close()  # the last, partial interval is printed once
    assert buf.getvalue().splitlines() == [l for l in buf.getvalue().splitlines() if l.startswith("grpo 8/10 [")]
    quiet = progress(10, 0, "x", False, stream=buf)
    quiet.update(5)
    quiet.close()
    assert buf.getvalue().count("\n") == 1

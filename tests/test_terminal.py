"""The terminal of a run: progress events drawn as one bar per training stage, or as lines off a TTY."""

import io

from tgan_ray.terminal import StageBars, progress_line

EPOCH = {"stage": "pix2pix", "kind": "epoch", "epochs": 3, "metrics": {"loss_G": 1.25, "images_per_s": 9.5}}


def test_progress_lines_say_stage_epoch_metrics_and_eta():
    line = progress_line({**EPOCH, "epoch": 2, "eta_s": 75.0})
    assert line == "[pix2pix] epoch 2/3 loss_G=1.25 images_per_s=9.5 ETA 1m15s"
    assert progress_line({**EPOCH, "kind": "resumed", "epoch": 2}) == (
        "[pix2pix] resumed from the checkpoint of epoch 2"
    )
    assert progress_line({**EPOCH, "kind": "complete"}) == "[pix2pix] already complete (3 epochs)"


def test_one_bar_per_stage_on_a_terminal():
    out = io.StringIO()
    bars = StageBars(out, bars=True)
    for epoch in (1, 2, 3):
        bars({**EPOCH, "epoch": epoch, "eta_s": 10.0 * (3 - epoch)})
    bars({"stage": "pix2pix", "kind": "end"})
    bars({**EPOCH, "stage": "segmenter", "epoch": 1, "eta_s": 5.0})
    bars.close()
    text = out.getvalue()
    final = [seg for seg in text.replace("\r", "\n").splitlines() if "pix2pix" in seg][-1]
    assert "pix2pix 3/3 epochs" in final and "loss_G=1.25" in final and "ETA 0m00s" in final
    assert "segmenter 1/3 epochs" in text
    assert text.count("\n") == 2  # each bar ends in one line of its own; updates redraw it in place


def test_lines_where_no_one_watches_a_bar():
    out = io.StringIO()  # not a TTY: a pipe, a log file
    bars = StageBars(out)
    bars({**EPOCH, "epoch": 1, "eta_s": 20.0})
    bars({"stage": "pix2pix", "kind": "end"})
    assert out.getvalue() == progress_line({**EPOCH, "epoch": 1, "eta_s": 20.0}) + "\n"

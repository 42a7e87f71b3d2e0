"""Render a run's report.html in headless Chromium at desktop and laptop widths, and check it as a reader sees it.

    python bench/report_browser.py demo-run/report.html --out docs/        # exit 1 when a check fails

Per width: every image loaded (complete, non-zero natural size) and nothing wider than the window (the page
does not scroll sideways; wide tables scroll inside their own box). A screenshot of the top of the page goes to
``--out``. Needs Debian's ``chromium`` (``apt-get install chromium``); a docs check, not a CI test.

Chromium's own command line does the work (``--dump-dom`` after a check script injected into a copy of the
page, ``--screenshot``), so no browser-driver package is needed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WIDTHS = {"desktop": (1440, 1000), "laptop": (1024, 768)}
# The flags the machine notes give for a sandboxed, offline root: no background connections, no first-run UI.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
CHECK = """
<script>
window.addEventListener('load', () => {
  const vw = document.documentElement.clientWidth;
  const images = [...document.images];
  const clipped = (e) => {
    for (let a = e.parentElement; a && a !== document.body; a = a.parentElement) {
      if (['auto', 'scroll', 'hidden'].includes(getComputedStyle(a).overflowX)) return true;
    }
    return false;
  };
  const wide = [...document.body.querySelectorAll('*')]
    .filter((e) => e.getBoundingClientRect().right > vw + 1 && !clipped(e))
    .map((e) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + (e.className ? '.' + e.className : ''));
  const result = {
    images: images.length,
    broken: images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => (i.alt || i.src).slice(0, 80)),
    viewport_px: vw,
    page_width_px: document.documentElement.scrollWidth,
    page_height_px: document.documentElement.scrollHeight,
    too_wide: [...new Set(wide)].slice(0, 10),
  };
  const out = document.createElement('pre');
  out.id = 'tgan-report-check';
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        sys.exit("error: chromium not found; install Debian's package: apt-get install chromium")
    return found


def _run(args: list[str], profile: Path) -> str:
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        sys.exit(f"error: chromium failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def check_report(report: Path, out: Path) -> dict:
    """Results per width (see the module docstring); screenshots to ``out/report_<width>.png``."""
    out.mkdir(parents=True, exist_ok=True)
    # The checked copy sits beside the report, so images linked by relative path still resolve.
    probe = report.with_name(f".{report.stem}-check.html")
    html = report.read_text(encoding="utf-8")
    probe.write_text(html.replace("</body>", CHECK + "</body>") if "</body>" in html else html + CHECK)
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="tgan-chromium-") as profile:
            for name, (w, h) in WIDTHS.items():
                dom = _run(
                    [f"--window-size={w},{h}", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                    Path(profile),
                )
                m = re.search(r'<pre id="tgan-report-check">(.*?)</pre>', dom, re.S)
                if not m:
                    sys.exit(f"error: the check script did not run in {report} at {w} px")
                r = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
                shot = out / f"report_{name}.png"
                _run(
                    [f"--window-size={w},{h}", f"--screenshot={shot}", report.resolve().as_uri()],
                    Path(profile),
                )
                r["ok"] = not r["broken"] and r["page_width_px"] <= r["viewport_px"]
                r["screenshot"] = str(shot)
                results[name] = r
    finally:
        probe.unlink(missing_ok=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path, help="A run's report.html.")
    ap.add_argument("--out", type=Path, default=Path("report-check"), help="Folder for the screenshots.")
    args = ap.parse_args()
    if not args.report.is_file():
        sys.exit(f"error: no such report: {args.report}")
    results = check_report(args.report, args.out)
    for name, r in results.items():
        verdict = "ok" if r["ok"] else "FAILED"
        print(
            f"{name} {r['viewport_px']} px: {verdict}; {r['images']} images, {len(r['broken'])} broken "
            f"{r['broken'][:3]}; page {r['page_width_px']} x {r['page_height_px']} px; "
            f"too wide: {r['too_wide'] or 'none'}; screenshot {r['screenshot']}"
        )
    (args.out / "report_check.json").write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Take a PNG screenshot of one trace's detail view (span tree + span pane) in a running MLflow UI.

Drives Debian's Chromium (/usr/bin/chromium, `apt-get install chromium`) headless through the
Python `playwright` package, which is not a project or test dependency: install it in a dev venv
with `pip install playwright` and do NOT run `playwright install` (no browser download is needed).
The MLflow server must already be running; this script only opens the browser.

    python bench/screenshot_trace.py --tracking-url http://127.0.0.1:5000 \\
        --experiment-id 1 --trace-id tr-... --out docs/trace.png --span Completions

URL opened (MLflow 3.x; the UI rewrites /#/experiments/<id>/traces/<trace_id> to the same drawer):
    <tracking-url>/#/experiments/<id>/traces?q=<trace_id>&selectedEvaluationId=<trace_id>
selectedEvaluationId opens the trace drawer; q filters the traces table to that trace, without which
the drawer's header (trace id, status, duration) stays empty for a trace not on the table's first page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlencode

from playwright.sync_api import Page, sync_playwright

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Set before the app's own scripts run: keep the MLflow Assistant side panel closed and the
# one-time "Detect issues" / "Flag for review" tips dismissed, so they don't cover the trace view.
INIT_SCRIPT = """
try {
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
  localStorage.setItem('mlflow.detectIssues.guidanceShown_v1', 'true');
  localStorage.setItem('mlflow.flagForReview.guidanceShown_v1', 'true');
} catch (e) {}
"""

TREE_NODE = '[data-testid^="timeline-tree-node-"]'
TITLE_ROW = '[data-testid^="span-title-row-"]'
SPAN_VIEW = '[data-testid="model-trace-explorer-default-span-view"]'
HEADER_ID = '[data-component-id="mlflow.evaluations_review.modal.trace-id"]'
FULLSCREEN = '[data-component-id="mlflow.evaluations_review.modal.fullscreen"]'

# True once the span pane (outside the tree) shows the given span name as its title.
SPAN_PANE_SHOWS = """(name) => Array.from(document.querySelectorAll('span')).some(
  (e) => e.textContent === name && e.children.length === 0 && !e.closest('[data-testid^="timeline-tree-node-"]'))"""


def trace_url(tracking_url: str, experiment_id: str, trace_id: str) -> str:
    """The UI address of a trace's detail view."""
    query = urlencode({"q": trace_id, "selectedEvaluationId": trace_id})
    return f"{tracking_url.rstrip('/')}/#/experiments/{experiment_id}/traces?{query}"


def select_span(page: Page, name: str, timeout_ms: float) -> None:
    """Click the first span called `name` in the tree and wait until the span pane shows it."""
    row = page.locator(TITLE_ROW).filter(has=page.get_by_text(name, exact=True)).first
    try:
        row.wait_for(state="visible", timeout=timeout_ms)
    except Exception as exc:
        names = page.locator(TITLE_ROW).all_inner_texts()
        raise SystemExit(f"span {name!r} not in the tree; spans shown: {names}") from exc
    row.click()
    page.wait_for_function(SPAN_PANE_SHOWS, arg=name, timeout=timeout_ms)


def screenshot_trace(
    url: str,
    out: Path,
    span: str | None = None,
    *,
    width: int = 1600,
    height: int = 1000,
    fullscreen: bool = True,
    timeout_s: float = 60.0,
    executable: str = "/usr/bin/chromium",
) -> Path:
    """Open `url` in headless Chromium, wait for the trace view to render and save a PNG to `out`."""
    timeout_ms = timeout_s * 1000
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
            context.add_init_script(INIT_SCRIPT)
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            page.goto(url, wait_until="domcontentloaded")
            # The tree and the span pane appear only once the trace's spans have been fetched.
            page.locator(TREE_NODE).first.wait_for(state="visible")
            page.locator(SPAN_VIEW).first.wait_for(state="visible")
            page.locator(HEADER_ID).first.wait_for(state="visible")  # filled from the table's row
            if fullscreen and page.locator(FULLSCREEN).count():
                button = page.locator(FULLSCREEN).first
                label = button.get_attribute("aria-label")
                button.click()
                page.wait_for_function(
                    "([sel, label]) => document.querySelector(sel)?.getAttribute('aria-label') !== label",
                    arg=[FULLSCREEN, label],
                )
            if span:
                select_span(page, span, timeout_ms)
            page.evaluate("document.fonts.ready.then(() => true)")
            page.mouse.move(0, height - 1)  # no hover highlight or tooltip in the picture
            page.wait_for_timeout(500)  # drawer / selection transitions
            page.screenshot(path=str(out), animations="disabled")
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-url", required=True, help="MLflow server address, e.g. http://127.0.0.1:5000")
    parser.add_argument("--experiment-id", required=True)
    parser.add_argument("--trace-id", required=True, help="e.g. tr-3422d1c52d3a47095efa2fe29ee84fe6")
    parser.add_argument("--out", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--span", help="select the first span with this exact name (default: the root span)")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--no-fullscreen", dest="fullscreen", action="store_false", help="keep the traces table beside the drawer")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each step")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="browser executable")
    args = parser.parse_args(argv)

    url = trace_url(args.tracking_url, args.experiment_id, args.trace_id)
    out = screenshot_trace(
        url,
        args.out,
        args.span,
        width=args.width,
        height=args.height,
        fullscreen=args.fullscreen,
        timeout_s=args.timeout,
        executable=args.chromium,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

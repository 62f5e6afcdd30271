#!/usr/bin/env bash
# Regenerate the README's screenshots of `sdlora serve` (docs/ui/*.png): the browser test clicks through the
# workflow on the tiny model and saves one screenshot per tab here. Plain test runs save them to a temporary folder
# and never touch these files. Needs /usr/bin/chromium (apt-get install chromium) and the ui extra.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m pytest tests/test_serve_browser.py -k test_click_through_the_workflow -p no:cacheprovider -q \
    --screenshots docs/ui "$@"

#!/usr/bin/env bash
# Screenshot of the leaderboard page in a real headless Chromium (Debian's `chromium` package).
#
#   leaderboard/screenshot.sh [OUT.png]        (default: leaderboard/screenshot.png)
#
# Renders robustkit's entries ranked together with RobustBench's 236 (../shared/data/robustbench/
# model_info, when it is there; ours are highlighted), opens the page with the CIFAR-10 L∞ table
# sorted by AutoAttack accuracy, lowest first, through the page's own sort script (#sort=...), and writes a PNG.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-leaderboard/screenshot.png}")"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [[ -z "$browser" ]]; then
  echo "screenshot.sh: no chromium on PATH (Debian: apt-get install chromium)" >&2; exit 2
fi
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
rb="../shared/data/robustbench/model_info"
with=(); [[ -d "$rb" ]] && with=(--with "$rb")
robustkit leaderboard build --entries leaderboard/entries "${with[@]}" --out-dir "$work/site" >/dev/null
# Flags: no sandbox (root in CI), and nothing that phones home (this machine has no network).
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
  --user-data-dir="$work/profile" --window-size=1400,1000 --virtual-time-budget=2000 \
  --screenshot="$out" "file://$work/site/index.html#sort=cifar10-Linf:3:asc" 2>"$work/chromium.log" \
  || { cat "$work/chromium.log" >&2; exit 1; }
[[ -s "$out" ]] || { echo "screenshot.sh: chromium wrote no PNG" >&2; cat "$work/chromium.log" >&2; exit 1; }
echo "wrote $out"

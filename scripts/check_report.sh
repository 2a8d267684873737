#!/usr/bin/env bash
# Open a onehead report in headless Chromium: check that it is self-contained and that every
# image loads, and take a screenshot of the whole page.
#
#   scripts/check_report.sh RUN_DIR|COMPARE_DIR|REPORT.html [SCREENSHOT.png]
#
# The screenshot goes to SCREENSHOT.png, default: report-screenshot.png next to the report.
# Needs Chromium (Debian: `apt-get install chromium`; or set CHROMIUM=/path/to/chrome); this
# script installs nothing. Exit status: 0 all images load, 1 a check failed, 2 usage/setup.
set -euo pipefail

die() { echo "check_report: $*" >&2; exit 2; }
fail() { echo "check_report: FAIL: $*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: $0 RUN_DIR|REPORT.html [SCREENSHOT.png]"
target=$1
if [ -d "$target" ]; then report="$target/report.html"; else report="$target"; fi
[ -f "$report" ] || die "$report not found (run \`onehead plot RUN_DIR\` first)"
report=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
shot=${2:-$(dirname "$report")/report-screenshot.png}

browser=${CHROMIUM:-}
if [ -z "$browser" ]; then
  for b in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$b" >/dev/null 2>&1; then browser=$(command -v "$b"); break; fi
  done
fi
[ -n "$browser" ] && [ -x "$browser" ] || die "Chromium not found: install it (Debian: apt-get install chromium) or set CHROMIUM=/path/to/chromium"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. Self-contained: every src/href is a data: URI or an in-page anchor.
external=$(grep -oE '(src|href)="[^"#][^"]*"' "$report" | grep -vE '^(src|href)="data:' || true)
[ -z "$external" ] || fail "external references in $report:"$'\n'"$external"
grep -qiE '<link[^>]+stylesheet|@import' "$report" && fail "external style sheet in $report"

run_chromium() {
  # A fresh profile per call; no network features, no sandbox (we run as root here).
  local profile
  profile=$(mktemp -d "$work/profile.XXXX")
  timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --disable-dev-shm-usage --hide-scrollbars --user-data-dir="$profile" "$@" 2>"$work/chromium.log"
}

# 2. Every image loads: a copy of the page with a small script that, once the page has
# loaded, writes how many images there are, which failed (naturalWidth 0), and the height.
probe="$work/probe.html"
sed 's#</body>#<script>window.addEventListener("load",function(){var i=Array.prototype.slice.call(document.images);var b=i.filter(function(x){return !x.complete||x.naturalWidth===0;}).map(function(x){return x.alt||x.src.slice(0,80);});var p=document.createElement("pre");p.id="onehead-check";p.textContent="ONEHEAD-CHECK images="+i.length+" broken="+b.length+" height="+document.documentElement.scrollHeight+(b.length?" :: "+b.join(" | "):"");document.body.appendChild(p);});</script></body>#' "$report" >"$probe"
dom=$(run_chromium --virtual-time-budget=10000 --dump-dom "file://$probe") || {
  cat "$work/chromium.log" >&2; fail "chromium could not load $report"; }
line=$(printf '%s\n' "$dom" | grep -oE 'ONEHEAD-CHECK images=[0-9]+ [^<]*' | head -1 || true)
[ -n "$line" ] || fail "the page did not finish loading (no check result)"
images=$(sed -E 's/.*images=([0-9]+).*/\1/' <<<"$line")
broken=$(sed -E 's/.*broken=([0-9]+).*/\1/' <<<"$line")
height=$(sed -E 's/.*height=([0-9]+).*/\1/' <<<"$line")
echo "check_report: $report: $images images, $broken broken, page height ${height}px"
[ "$broken" = 0 ] || fail "broken images: ${line#*:: }"
[ "$images" -gt 0 ] || fail "the report has no images"

# 3. A screenshot of the whole page.
[ "$height" -gt 100 ] 2>/dev/null || height=3000
[ "$height" -le 16000 ] || height=16000
run_chromium --virtual-time-budget=10000 --window-size=1200,"$height" --screenshot="$shot" "file://$report" >/dev/null || {
  cat "$work/chromium.log" >&2; fail "chromium could not take the screenshot"; }
[ -s "$shot" ] || fail "no screenshot written"
echo "check_report: screenshot $shot (1200x${height})"

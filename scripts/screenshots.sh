#!/usr/bin/env bash
# Render what a person looks at into PNGs for the README, with headless Chromium:
#   docs/tensorboard_scalars.png  the TensorBoard scalars dashboard of a run (served on loopback only)
#   docs/report.png               the `csprune report` page (table + plot) of a sweep
# Usage: scripts/screenshots.sh RUN_DIR SWEEP_DIR      (make screenshots RUN=... SWEEP=...)
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir=${1:?usage: scripts/screenshots.sh RUN_DIR SWEEP_DIR}
sweep_dir=${2:?usage: scripts/screenshots.sh RUN_DIR SWEEP_DIR}
py=${PY:-.venv/bin/python}
if ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium (needs root)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
mkdir -p docs
profile=$(mktemp -d)
work=$(mktemp -d)
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$(dirname "$py")/tensorboard" --logdir "$run_dir" --host 127.0.0.1 --port "$port" >"$work/tb.log" 2>&1 &
tb=$!
trap 'kill $tb 2>/dev/null || true; rm -rf "$profile" "$work"' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/data/runs" >/dev/null && break; sleep 0.5; done
shot() {  # shot OUT.png URL WIDTHxHEIGHT
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --no-first-run --disable-sync --user-data-dir="$profile" --hide-scrollbars --window-size="$3" \
    --virtual-time-budget=15000 --screenshot="$1" "$2" >/dev/null 2>&1
}
shot docs/tensorboard_scalars.png "http://127.0.0.1:$port/#scalars&tagFilter=loss%7Csparsity%2Ftotal%7Cprune%2Frel_error%7Ceval%2Fwer" 1400,1000
"$py" -m csprune.cli report "$sweep_dir" --out "$work" >/dev/null
"$py" - "$work" <<'PY'
import html, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = [l.strip().strip("|").split("|") for l in (out / "report.md").read_text().splitlines() if l.startswith("|") and "---" not in l]
cells = lambda r, tag: "".join(f"<{tag}>{html.escape(c.strip()).replace('**', '')}</{tag}>" if "**" not in c else f"<{tag}><b>{html.escape(c.strip().strip('*'))}</b></{tag}>" for c in r)
table = "<tr>" + cells(rows[0], "th") + "</tr>" + "".join("<tr>" + cells(r, "td") + "</tr>" for r in rows[1:])
(out / "report.html").write_text(f"""<html><body style="font-family:sans-serif;margin:24px">
<h2>csprune report</h2><img src="report.png" style="width:1100px"><table border=1 cellpadding=4 style="border-collapse:collapse;margin-top:12px">{table}</table></body></html>""")
PY
shot docs/report.png "file://$work/report.html" 1400,640
echo "wrote docs/tensorboard_scalars.png and docs/report.png"

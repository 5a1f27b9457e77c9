#!/usr/bin/env bash
# Vendor the map page's JavaScript and base-map data from npm into the package, so `geoswc serve` works
# with no internet. Repeatable: pinned versions, a fresh temporary npm project, and a VERSIONS.txt with
# the SHA-256 of every copied file. Run from anywhere; needs node/npm. Commit the result.
#
#   scripts/vendor_web_assets.sh
#
# leaflet (BSD-2-Clause): the map; topojson-client (ISC): TopoJSON -> GeoJSON in the browser;
# world-atlas (ISC; data: Natural Earth, public domain): the 1:50m country outlines drawn as the base map;
# swagger-ui-dist (Apache-2.0): the interactive API docs at /docs.
set -euo pipefail

LEAFLET=1.9.4
TOPOJSON_CLIENT=3.1.0
WORLD_ATLAS=2.0.2
SWAGGER_UI=5.35.0

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/src/geoswc/service/static/vendor"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

cd "$TMP"
npm init -y >/dev/null
npm install --no-audit --no-fund --ignore-scripts --save-exact \
    "leaflet@$LEAFLET" "topojson-client@$TOPOJSON_CLIENT" "world-atlas@$WORLD_ATLAS" \
    "swagger-ui-dist@$SWAGGER_UI" >/dev/null
M="$TMP/node_modules"

rm -rf "$DEST"
mkdir -p "$DEST/leaflet/images" "$DEST/topojson-client" "$DEST/world-atlas" "$DEST/swagger-ui"
cp "$M/leaflet/dist/leaflet.js" "$M/leaflet/dist/leaflet.css" "$M/leaflet/LICENSE" "$DEST/leaflet/"
cp "$M/leaflet/dist/images/"*.png "$DEST/leaflet/images/"
cp "$M/topojson-client/dist/topojson-client.min.js" "$M/topojson-client/LICENSE" "$DEST/topojson-client/"
cp "$M/world-atlas/countries-50m.json" "$M/world-atlas/LICENSE" "$DEST/world-atlas/"
cp "$M/swagger-ui-dist/swagger-ui-bundle.js" "$M/swagger-ui-dist/swagger-ui.css" "$M/swagger-ui-dist/favicon-32x32.png" \
    "$M/swagger-ui-dist/LICENSE" "$DEST/swagger-ui/"
cat > "$DEST/world-atlas/NATURAL_EARTH.txt" <<'EOF'
countries-50m.json is derived from Natural Earth's 1:50m Admin 0 - Countries (https://www.naturalearthdata.com/),
which is in the public domain ("Made with Natural Earth"). The TopoJSON packaging is world-atlas (ISC, see LICENSE).
EOF

{
    echo "# Vendored by scripts/vendor_web_assets.sh from npm; do not edit by hand."
    echo "leaflet@$LEAFLET BSD-2-Clause"
    echo "topojson-client@$TOPOJSON_CLIENT ISC"
    echo "world-atlas@$WORLD_ATLAS ISC (data: Natural Earth, public domain)"
    echo "swagger-ui-dist@$SWAGGER_UI Apache-2.0"
    echo
    (cd "$DEST" && find . -type f ! -name VERSIONS.txt | LC_ALL=C sort | xargs sha256sum)
} > "$DEST/VERSIONS.txt"

echo "vendored into $DEST:"
(cd "$DEST" && du -ah . | sort -k2)

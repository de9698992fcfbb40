#!/usr/bin/env bash
# Vendor the /docs and /redoc assets: the exact files of the upstream npm releases, unmodified,
# with their licences, into app/static/docs/. app/docs.py says why these are vendored and not
# taken from a PyPI package.
#
# Run from the repository root (needs npm and the npm registry); commit what changes:
#   bash scripts/vendor-docs-assets.sh [SWAGGER_UI_VERSION] [REDOC_VERSION]
# The versions are the package.json files it copies; app/docs.py reads them from there.
set -euo pipefail

swagger_version=${1:-5.35.0}
redoc_version=${2:-2.5.4}
dest=app/static/docs
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# `npm pack` checks each tarball against the registry's sha512 integrity before writing it.
(cd "$tmp" && npm pack --silent "swagger-ui-dist@$swagger_version" "redoc@$redoc_version" >/dev/null)
mkdir -p "$tmp/swagger" "$tmp/redoc"
tar -xzf "$tmp/swagger-ui-dist-$swagger_version.tgz" -C "$tmp/swagger"
tar -xzf "$tmp/redoc-$redoc_version.tgz" -C "$tmp/redoc"

rm -rf "$dest"
mkdir -p "$dest/swagger-ui-dist" "$dest/redoc"
# Only what the pages load, plus the licences and the package.json that names the version. No
# source maps: browsers fetch them only with developer tools open, and they are 2-4 MB each.
for f in swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css favicon-32x32.png \
  LICENSE NOTICE package.json; do
  cp "$tmp/swagger/package/$f" "$dest/swagger-ui-dist/$f"
done
for f in bundles/redoc.standalone.js bundles/redoc.standalone.js.LICENSE.txt LICENSE package.json; do
  cp "$tmp/redoc/package/$f" "$dest/redoc/$(basename "$f")"
done

{
  echo "# Vendored documentation assets"
  echo
  echo "Written by scripts/vendor-docs-assets.sh; do not edit these files by hand."
  echo "Each file is byte-identical to the one in the npm release tarball named below."
  echo
  for pkg in "swagger-ui-dist $swagger_version swagger-ui-dist" "redoc $redoc_version redoc"; do
    set -- $pkg
    integrity=$(npm view "$1@$2" dist.integrity)
    license=$(npm view "$1@$2" license)
    echo "- \`$1@$2\` ($license), tarball integrity \`$integrity\`: \`$3/\`"
  done
  echo
  echo "SHA256SUMS lists every file here; check with \`cd $dest && sha256sum -c SHA256SUMS\`."
} >"$dest/SOURCES.md"

(cd "$dest" && find swagger-ui-dist redoc -type f | LC_ALL=C sort | xargs sha256sum >SHA256SUMS)
echo "vendored swagger-ui-dist@$swagger_version and redoc@$redoc_version into $dest" >&2

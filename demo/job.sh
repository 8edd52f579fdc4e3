#!/bin/sh
# The demo job: what a real job does at start-up, run inside `ovlrun --profile demo`.
SW=${OVLRUN_DEMO_TREE:-/srv/ovlrun-demo/sw}
LIBDIRS="$SW/compilers/gcc/13/lib $SW/compilers/gcc/12/lib $SW/tools/2.0/bin $SW/libs/2.0/lib $SW/libs/1.0/lib"

echo "== job runs as $(id -un), profile $OVLRUN_PROFILE"
${OVLRUN_CMD:-python3 -m ovlrun} status

echo "== library search, as ld.so walks LD_LIBRARY_PATH (most probes fail: ENOENT)"
for lib in $(ls "$SW/libs/1.0/lib" | head -3) libmissing.so.1 libnotthere.so.2; do
    found="not found"
    for d in $LIBDIRS; do
        if [ -e "$d/$lib" ]; then found="$d/$lib"; break; fi
    done
    echo "  $lib -> $found"
done

echo "== Python imports resolved in the localised release"
PYTHONPATH="$SW/pystack/2024.1/nothere:$SW/pystack/2025.1/lib/python3" \
    python3 -c 'import json, email.parser, textwrap; print("  json from", json.__file__)'

echo "== file data still comes from the shared tree"
echo "  $(cat "$SW/pystack/2025.1/RELEASE")"
echo "  $(find "$SW/pystack/2025.1" -type f | wc -l) files localised in pystack/2025.1"

echo "== the localised view is read-only"
touch "$SW/pystack/2025.1/scratch" 2>&1 | sed 's/^/  /'
exit 0

#!/usr/bin/env bash
# Prepare what bench/device_check.sh needs on a device machine (which reaches no package registry): wheels of the
# packages its image lacks, for its Python 3.12 (into .whl/), and the layouts of ../shared (into .devcarry/; the
# folder beside the checkout does not travel). Both folders are ignored by git. Run from the repository root.
set -euo pipefail
mkdir -p .whl .devcarry
for pkg in blake3 platformdirs jsonschema jsonschema-specifications referencing rpds-py; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
done
rm -rf .devcarry/layouts
cp -r ../shared/layouts .devcarry/layouts
du -sh .whl .devcarry

#!/usr/bin/env bash
# Download here, as wheels in .whl/, what the lent GPU machine lacks to run the notebooks under nbval: it has
# PyTorch, numpy, matplotlib, tqdm, einops, safetensors, pillow, psutil and pytest, but no Jupyter stack, no
# ipywidgets and no network. Its Python is 3.12 on x86-64 Linux; pip resolves the dependencies for that
# platform. sdlearn itself travels as the working tree (tools/gpu_validate.sh puts it on PYTHONPATH).
#
#     bash tools/gpu_wheels.sh           # then: the device tool's run, carry [".whl"], bash tools/gpu_validate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_34_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl nbval nbclient nbformat ipykernel ipywidgets
# already on the GPU machine, in versions that go with its torch: drop them so they do not shadow those
for pkg in numpy pytest pluggy iniconfig packaging psutil pygments python_dateutil six typing_extensions \
           attrs coverage; do
    rm -f .whl/"$pkg"-*.whl
done
ls .whl | sed 's/-[0-9].*//' | sort | uniq -d | grep . && { echo "two versions of one package in .whl"; exit 1; }
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"

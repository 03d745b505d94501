#!/usr/bin/env bash
# Fetches, on the dev machine, the wheels the GPU machine lacks (its Python is 3.12 and has
# torch, triton, transformers, torchvision, pillow, numpy, jinja2, safetensors, tokenizers).
# Versions are the set that ran together on an H200 in session 5 (engine, server, GPU tests,
# bench_serving.py). Carry ".whl" with each device call and install it first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# (.whl/ is excluded from git through .git/info/exclude; ~42 MiB, av being 35 of them; py-spy
# samples the engine-core process: bench_mm_throughput.py --py-spy, installed as /tmp/site/bin/py-spy.)
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d .whl \
  msgspec==0.22.0 pyzmq==27.3.0 blake3==1.0.11 pybase64==1.5.1 av==19.0.2 \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 click==8.5.1 h11==0.16.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2 \
  anyio==4.16.0 sniffio==1.3.1 prometheus-client==0.26.0 \
  httpx==0.28.1 httpcore==1.0.9 certifi==2026.10.19.post1 idna==3.20 pytest-timeout==2.4.0 \
  py-spy==0.4.3
ls .whl | wc -l

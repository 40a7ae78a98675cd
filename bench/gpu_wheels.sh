#!/usr/bin/env bash
# Wheels the GPU machine lacks for the benches that run TRL and bitsandbytes (bench/dpo_bench.py,
# bench/throughput.py's TRL peer): trl, datasets and its dill/multiprocess, bitsandbytes; and the
# service's own modules' (pydantic and its parts, pydantic-settings, sqlalchemy, redis, tenacity,
# standardwebhooks; alembic and celery for the benches that run a job through execute_job), at the
# versions of this venv, for the benches that build the service's step from worker/training. The
# machine's image has torch 2.11 (CUDA 13), transformers, peft, accelerate, pyarrow, pandas,
# fsspec, xxhash, huggingface-hub; nothing can be fetched there, so these travel with the call.
# bitsandbytes' wheel (43 MB: a library for every CUDA/ROCm/XPU) is repacked with only its CUDA 13.0
# library (what torch cu130 loads) and the small CPU one: ~2 MB instead of 43.
#
# usage (here, where pip reaches PyPI):  bash bench/gpu_wheels.sh [DIR]      (default .wheels, git-ignored)
# on the GPU machine (the `run` tool with carry [".wheels"]), before the bench:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.wheels}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$DIR"
# the GPU machine's Python is 3.12 (multiprocess has a wheel per Python version)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    $("$PYTHON" -m pip freeze | grep -i -E '^(pydantic|pydantic[-_]core|pydantic-settings|python-dotenv|annotated-types|typing-inspection|sqlalchemy|greenlet|redis|tenacity|standardwebhooks|alembic|mako|celery|kombu|billiard|vine|amqp|click|click-didyoumean|click-plugins|click-repl|prompt[-_]toolkit|wcwidth|tzlocal)==') \
    $(ls "$DIR"/bitsandbytes-0.50.2-*.whl >/dev/null 2>&1 || echo bitsandbytes==0.50.2)  # not again once repacked
"$PYTHON" - "$DIR" <<'EOF'
import sys, zipfile
from pathlib import Path

keep = {"libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so"}
for wheel in Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dropped = {n for n in names if n.endswith(".so") and Path(n).name not in keep}
        if not dropped:
            continue  # repacked already
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in z.infolist():
                if info.filename in dropped:
                    continue
                data = z.read(info)
                if info.filename.endswith(".dist-info/RECORD"):  # no entries for files left out
                    data = b"".join(
                        l for l in data.splitlines(keepends=True) if l.split(b",")[0].decode() not in dropped
                    )
                out.writestr(info, data)
    tmp.replace(wheel)
    print(f"{wheel.name}: kept {sorted(keep)}, dropped {len(dropped)} other libraries")
EOF
ls -la "$DIR"
du -sh "$DIR"

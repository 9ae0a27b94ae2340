#!/usr/bin/env bash
# Runs ON each TPU worker (tpu.py setup sends it there): builds the pinned Python environment.
#
# Idempotent: the venv holds a stamp of what it was built from (hash of requirements.txt, the
# jax[tpu] pin, the Python version); when the stamp matches, nothing is installed.
# The TPU VM images ship Python 3.10 while jax 0.10 needs >= 3.11, so the venv is made by uv,
# which fetches a standalone CPython of the requested version.
#
# Environment (all optional): IRG_CODE_DIR (default ~/irg_jax), IRG_VENV (~/irg_venv),
# IRG_PYTHON_VERSION (3.11), IRG_UV_VERSION (0.13.8).
set -euo pipefail

code_dir=${IRG_CODE_DIR:-$HOME/irg_jax}
venv=${IRG_VENV:-$HOME/irg_venv}
python_version=${IRG_PYTHON_VERSION:-3.11}
uv_version=${IRG_UV_VERSION:-0.13.8}
requirements=$code_dir/requirements.txt
host=$(hostname)

[[ -f $requirements ]] || { echo "$host: $requirements not found (run 'tpu.py ship' first)" >&2; exit 1; }
jax_version=$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$requirements")
[[ -n $jax_version ]] || { echo "$host: no 'jax==' pin in $requirements" >&2; exit 1; }

stamp_file=$venv/.irg_environment
stamp="$(sha256sum "$requirements" | cut -d' ' -f1) jax[tpu]==$jax_version python$python_version"
if [[ -f $stamp_file && $(cat "$stamp_file") == "$stamp" ]]; then
  echo "$host: environment up to date ($venv)"
  exit 0
fi

export PATH=$HOME/.local/bin:$PATH
if ! command -v uv >/dev/null; then
  python3 -m pip install --user --quiet "uv==$uv_version" ||
    python3 -m pip install --user --quiet --break-system-packages "uv==$uv_version"
fi
uv venv --clear --python "$python_version" "$venv"
# jax[tpu] adds the libtpu wheel matching the pinned jax; everything else is the exact pins.
uv pip install --python "$venv/bin/python" -r "$requirements" "jax[tpu]==$jax_version"
"$venv/bin/python" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'
echo "$stamp" > "$stamp_file"
echo "$host: environment ready ($venv)"

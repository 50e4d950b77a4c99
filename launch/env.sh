# Source me: makes .venv on first use and installs the project into it.
# CUDA hosts keep pip's choice of torch; hosts without nvidia-smi get the CPU build (constraints-cpu.txt).
set -e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TITANS_VENV:-$ROOT/.venv}"
STAMP="$VENV/.installed-$(cat "$ROOT/requirements.txt" "$ROOT/constraints-cpu.txt" "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
    # One set-up at a time (several launchers or nodes sharing this venv): the others wait, then find the stamp.
    mkdir -p "$VENV"
    exec 9>"$VENV/.setup.lock"
    command -v flock >/dev/null 2>&1 && flock 9
    if [ ! -f "$STAMP" ]; then
        echo "[env] setting up $VENV (first use or requirements changed)"
        [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
        CONSTRAINTS=()
        command -v nvidia-smi >/dev/null 2>&1 || CONSTRAINTS=(-c "$ROOT/constraints-cpu.txt")
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${CONSTRAINTS[@]}" -r "$ROOT/requirements.txt"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
        rm -f "$VENV"/.installed-*
        touch "$STAMP"
    fi
    exec 9>&-
fi
export PATH="$VENV/bin:$PATH"
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
cd "$ROOT"

# Sourced by the README's commands: use the active virtual environment, or create and use `.venv` in the clone.
# A system Python may refuse `pip install` (PEP 668), so prod9 never installs into one.
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    if [[ ! -x .venv/bin/python ]]; then
        echo "[prod9] no virtual environment is active: creating .venv in $(pwd) and installing into it"
        python3 -m venv .venv
    else
        echo "[prod9] no virtual environment is active: using .venv in $(pwd)"
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi

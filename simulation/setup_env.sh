# Sourced by the README's commands: make ./.venv (Python >= 3.10) with the project installed, and
# activate it. Reinstalls only when pyproject.toml or the constraints changed.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$python_bin" - <<'PY' || { echo "flwr-splitfed needs Python >= 3.10 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys; sys.exit(sys.version_info < (3, 10))
PY
stamp="$(cat "$repo_root/pyproject.toml" "$repo_root/simulation/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.installed" 2>/dev/null)" != "$stamp" ]; then
  echo "Setting up $venv (first run: about two minutes) ..."
  "$python_bin" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet \
    --constraint "$repo_root/simulation/constraints.txt" \
    --editable "$repo_root[test]"
  echo "$stamp" > "$venv/.installed"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
cd "$repo_root"

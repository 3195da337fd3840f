#!/usr/bin/env bash
# System packages ssip needs (DESIGN.md section 5): ffmpeg decodes the G.722 prompts; the Debian
# speech packages are the real speech; g++ and ninja build DeepSpeed's CPU ops.
# Installs them with apt-get when run as root; otherwise prints the exact command to run.
set -euo pipefail
PKGS="ffmpeg sox espeak-ng flite asterisk-core-sounds-en asterisk-core-sounds-en-g722 pocketsphinx-testdata g++ ninja-build"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then
  echo "installing system packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq $missing >/dev/null
else
  echo "ssip needs these system packages:$missing"
  echo "run:  sudo apt-get update && sudo apt-get install -y$missing"
  exit 1
fi

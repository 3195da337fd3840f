#!/usr/bin/env bash
# System packages ssip needs (docs/method.md, Assets that ship in packages): ffmpeg decodes the G.722 and GSM prompts; the
# Debian speech packages are the real speech of the simulated corpus and of the default prior
# corpus (asterisk core sounds in five languages, asterisk voice prompts, pocketsphinx test data);
# flite and espeak-ng synthesise more voices; g++ and ninja build DeepSpeed's CPU ops.
# Installs them with apt-get when run as root; otherwise prints the exact command to run.
#
# Two voice packages (asterisk-prompt-es-co, asterisk-prompt-fr-armelle) conflict with the core
# sounds' text packages (both provide /usr/share/asterisk/sounds/{es,fr}), so they are not
# installed: `apt-get download` fetches them and `dpkg-deb -x` unpacks them under
# $SSIP_DEBIAN_SPEECH (default ~/.cache/ssip/debian-speech), which needs no root.
set -euo pipefail
PKGS="ffmpeg sox espeak-ng flite pocketsphinx-testdata g++ ninja-build
asterisk-core-sounds-en asterisk-core-sounds-en-g722 asterisk-core-sounds-es asterisk-core-sounds-es-g722
asterisk-core-sounds-fr asterisk-core-sounds-fr-g722 asterisk-core-sounds-it asterisk-core-sounds-it-g722
asterisk-core-sounds-ru asterisk-core-sounds-ru-g722 asterisk-prompt-it-menardi"
UNPACK="asterisk-prompt-es-co asterisk-prompt-fr-armelle"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
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
fi
dest="${SSIP_DEBIAN_SPEECH:-${XDG_CACHE_HOME:-$HOME/.cache}/ssip/debian-speech}"
for p in $UNPACK; do
  [ -f "$dest/$p.unpacked" ] && continue
  echo "unpacking $p into $dest"
  mkdir -p "$dest/.debs"
  (cd "$dest/.debs" && apt-get download -qq "$p" 2>/dev/null)
  dpkg-deb -x "$(ls "$dest"/.debs/"$p"_*.deb | tail -1)" "$dest/$p"
  touch "$dest/$p.unpacked"
done

#!/usr/bin/env bash
# Install or upgrade rpm-gateway on the hub (Debian 12 / Raspberry Pi OS), as root:
#
#   sudo systemd/install.sh                    # from a checkout: installs that checkout
#   sudo systemd/install.sh rpm_gateway-0.1.0-py3-none-any.whl
#   systemd/install.sh --root /tmp/image       # into a directory tree; see --help
#
# Idempotent: running it again upgrades in place. It never deletes or rewrites
# /var/lib/rpm-gateway (outbox.db, pairings.json) nor an existing /etc/rpm-gateway/gateway.toml.
set -euo pipefail
# A hardened root umask (027, 077) would leave the venv and parent directories unreadable to
# the service user; every mode that matters is set explicitly below.
umask 022

SERVICE_USER=rpm-gateway
PREFIX=/opt/rpm-gateway
CONF_DIR=/etc/rpm-gateway
STATE_DIR=/var/lib/rpm-gateway
UNIT_DIR=/etc/systemd/system
UNIT=rpm-gateway.service

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
checkout=$(dirname "$here")
root=""
polkit=auto
source_arg=""

usage() {
    cat <<EOF
usage: $0 [--root DIR] [--polkit auto|js|pkla|none] [CHECKOUT_OR_WHEEL]

Creates the system user $SERVICE_USER (group bluetooth), a venv in $PREFIX/.venv with
rpm-gateway installed from CHECKOUT_OR_WHEEL (default: the checkout holding this script),
$CONF_DIR (gateway.toml from the example when absent), $STATE_DIR, the polkit rule
that lets the agent restart bluetooth.service, and $UNIT_DIR/$UNIT; then enables the
unit and starts it, or restarts it when it is running (the upgrade path).

  --root DIR   install the files under DIR instead of /, for an image or a test: the user,
               the venv, ownership and systemctl are only printed ("would run: ...").
  --polkit     js: a rules.d rule (polkit >= 0.106); pkla: a localauthority file
               (polkit 0.105; it cannot name the unit, so it grants every unit);
               none; auto (default): js when polkit has rules.d, else none with advice.
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        --root=*) root=${1#--root=}; shift ;;
        --polkit) polkit=${2:?--polkit needs auto, js, pkla or none}; shift 2 ;;
        --polkit=*) polkit=${1#--polkit=}; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "install.sh: unknown option $1" >&2; usage >&2; exit 64 ;;
        *) source_arg=$1; shift ;;
    esac
done
case "$polkit" in auto|js|pkla|none) ;; *) echo "install.sh: --polkit $polkit?" >&2; exit 64 ;; esac

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

# Without --root every step runs; with it, what needs the real system is printed instead.
system() {
    if [ -n "$root" ]; then
        echo "would run: $*"
    else
        "$@"
    fi
}

if [ -n "$root" ]; then
    mkdir -p "$root"
    root=$(cd "$root" && pwd)
elif [ "$(id -u)" != 0 ]; then
    die "run as root (sudo $0), or with --root DIR to install into a directory"
fi

source=${source_arg:-$checkout}
if [ -d "$source" ]; then
    [ -f "$source/pyproject.toml" ] || die "$source is not an rpm-gateway checkout (no pyproject.toml)"
    source=$(cd "$source" && pwd)
    example=$source/config/gateway.example.toml
elif [ -f "$source" ] && [[ "$source" == *.whl ]]; then
    # A wheel carries the code, not config/: the example comes from the checkout beside us.
    example=$checkout/config/gateway.example.toml
else
    die "$source: neither a checkout directory nor a .whl file"
fi
[ -f "$here/$UNIT" ] || die "$here/$UNIT is missing"

if [ -z "$root" ]; then
    command -v python3 >/dev/null || die "python3 is needed: apt-get install python3 python3-venv"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "rpm-gateway needs Python 3.11 or newer (found $(python3 --version))"
    python3 -c 'import ensurepip' 2>/dev/null || die "apt-get install python3-venv"
    # bluez creates the group; the unit's SupplementaryGroups=bluetooth fails without it.
    getent group bluetooth >/dev/null || die "no group bluetooth: apt-get install bluez"
    command -v adduser >/dev/null || die "apt-get install adduser"
fi

# -- the service user ------------------------------------------------------------------------
if [ -n "$root" ] || ! getent passwd "$SERVICE_USER" >/dev/null; then
    system adduser --system --group --home "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin "$SERVICE_USER"
fi
# Debian's bluez D-Bus policy lets group bluetooth talk to org.bluez. adduser says so and
# does nothing when the user is a member already.
if [ -n "$root" ] || ! id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx bluetooth; then
    system adduser "$SERVICE_USER" bluetooth
fi

# Ownership is set only on the real system (under --root the user does not exist there).
own() {
    if [ -z "$root" ]; then
        chown "$1" "$2"
    fi
}

# -- the code --------------------------------------------------------------------------------
# root-owned and read-only to the service: a compromised agent cannot change its own code.
install -d -m 0755 "$root$PREFIX"
if [ -n "$root" ] || [ ! -x "$PREFIX/.venv/bin/python" ]; then
    system python3 -m venv "$PREFIX/.venv"
fi
# --upgrade keeps the venv and replaces the package (and what its pins moved): the upgrade
# path. pip stops on the first error and then so does this script, before any restart.
system "$PREFIX/.venv/bin/pip" install --quiet --disable-pip-version-check --upgrade "$source"
# The unit's Documentation= points here.
if [ -f "$checkout/README.md" ]; then
    install -m 0644 "$checkout/README.md" "$root$PREFIX/README.md"
fi

# -- configuration ---------------------------------------------------------------------------
install -d -m 0750 "$root$CONF_DIR"
own "root:$SERVICE_USER" "$root$CONF_DIR"
fresh_config=no
if [ ! -e "$root$CONF_DIR/gateway.toml" ]; then
    [ -f "$example" ] || die "$example is missing: cannot create $CONF_DIR/gateway.toml"
    install -m 0640 "$example" "$root$CONF_DIR/gateway.toml"
    own "root:$SERVICE_USER" "$root$CONF_DIR/gateway.toml"
    fresh_config=yes
    say "created $CONF_DIR/gateway.toml from the example: set hub.id, mqtt.* and [[devices]]"
else
    say "kept $CONF_DIR/gateway.toml"
fi

# -- state -----------------------------------------------------------------------------------
# Only the directory itself is created or fixed; what is inside (the outbox, the registry)
# is never touched. StateDirectory= would create it too, but a check before the first start
# (and a technician's `rpm-gateway pair`) wants it now.
install -d -m 0700 "$root$STATE_DIR"
own "$SERVICE_USER:$SERVICE_USER" "$root$STATE_DIR"
chmod 0700 "$root$STATE_DIR"

# -- polkit: RestartUnit(bluetooth.service) for the radio recovery's last step ---------------
rules_dir=$root/etc/polkit-1/rules.d
pkla_dir=$root/etc/polkit-1/localauthority/50-local.d
if [ "$polkit" = auto ]; then
    if [ -d /etc/polkit-1/rules.d ] || [ -d /usr/share/polkit-1/rules.d ]; then
        polkit=js
    else
        polkit=none
        if [ -d /etc/polkit-1/localauthority ]; then
            say "polkit 0.105 (.pkla only) cannot grant a single unit: no rule installed, so the"
            say "radio recovery's bluetoothd restart will be refused. Either accept a grant for"
            say "every unit (--polkit pkla) or set radio.recovery_restart_bluetooth = false"
        else
            say "no polkit here: set radio.recovery_restart_bluetooth = false in gateway.toml"
        fi
    fi
fi
case "$polkit" in
    js)
        install -d -m 0755 "$rules_dir"
        install -m 0644 "$here/polkit/50-rpm-gateway.rules" "$rules_dir/50-rpm-gateway.rules"
        ;;
    pkla)
        install -d -m 0755 "$pkla_dir"
        install -m 0644 "$here/polkit/rpm-gateway.pkla" "$pkla_dir/rpm-gateway.pkla"
        ;;
esac

# -- the unit --------------------------------------------------------------------------------
install -d -m 0755 "$root$UNIT_DIR"
install -m 0644 "$here/$UNIT" "$root$UNIT_DIR/$UNIT"
system systemctl daemon-reload
system systemctl enable "$UNIT"

# Start (or restart, the upgrade) only a config that checks out, as the service user sees
# it; otherwise a running agent keeps running on its old config and code.
check=("$PREFIX/.venv/bin/rpm-gateway" config check "$CONF_DIR/gateway.toml")
if [ "$fresh_config" = yes ]; then
    say "not started: edit $CONF_DIR/gateway.toml, then: systemctl start rpm-gateway"
elif [ -n "$root" ]; then
    system runuser -u "$SERVICE_USER" -- "${check[@]}"
    system systemctl restart "$UNIT"
elif ! runuser -u "$SERVICE_USER" -- "${check[@]}"; then
    say "not (re)started: fix $CONF_DIR/gateway.toml (above), then: systemctl restart rpm-gateway"
elif systemctl is-active --quiet "$UNIT"; then
    systemctl restart "$UNIT"
    say "upgraded and restarted; the outbox and the pairings are as they were"
else
    systemctl start "$UNIT"
    say "started; logs: journalctl -u rpm-gateway -f"
fi

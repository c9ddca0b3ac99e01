#!/bin/sh
# Install what the benchmark suite and the tests need: Dovecot's POP3 service (to
# compare against), its IMAP service (the upstream of the IMAP backend's tests and
# benchmark), mpop (the client benchmark's reference) and the Python packages in
# benches/requirements.txt.
# Run as root (CI and developer machines here are root). Safe to run twice.
set -eu
here=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if [ ! -x /usr/lib/dovecot/pop3 ] || [ ! -x /usr/lib/dovecot/imap ] \
        || ! command -v mpop >/dev/null 2>&1; then
        # Keep the package's init script from starting a system-wide Dovecot
        # (it would listen on every interface); the suite runs its own instances.
        created_policy=
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            created_policy=1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            dovecot-core dovecot-pop3d dovecot-imapd mpop
        if [ -n "$created_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    fi
else
    echo "benches/setup.sh: not root or no apt-get: skipping Dovecot (pypop is benchmarked alone)" >&2
fi

python3 -m pip install -q -r "$here/requirements.txt"
